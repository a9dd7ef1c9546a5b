"""Segmentation nodes from CT-FM label maps, without Qt (tested on slicer-core).

A CT-FM model returns a label map on the input volume's voxel grid and, for
each label value, a description: an object with ``.value``, ``.name``,
``.color`` (RGB in 0..1, or None) and ``.terminology`` (a Slicer terminology
entry string, or empty) - ``CTFMLib.labels.LabelInfo`` or anything shaped like
it. :func:`segmentation_node_from_labels` turns the two into a
``vtkMRMLSegmentationNode``: one segment per label value present, named,
coloured and terminology-tagged, with the volume as reference geometry (what
DICOM SEG export needs), under the volume's parent transform and next to it in
the subject hierarchy.

The node is assembled outside the scene and added only when complete, so a
failure leaves the scene as it was.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from CTFMLib.image import Image, ImageError
from CTFMSlicer.nodes import (
    RAS_TO_LPS,
    array_from_vtk_matrix,
    check_scalar_volume,
    ijk_to_world_ras,
    vtk_matrix_from_array,
)

SEGMENTATION_CLASS = "vtkMRMLSegmentationNode"
CLOSED_SURFACE = "Closed surface"
# How far (mm, and unitless for directions) the labels' grid may be from the volume's:
# NIfTI stores geometry in float32, so a round trip through a file moves it by ~1e-5.
GRID_TOLERANCE = 1e-3


def _slicer():
    import slicer  # deferred so that importing this module never needs a running Slicer

    return slicer


def fallback_name(value: int) -> str:
    """The name of a segment whose label value the model does not describe."""
    return f"label {int(value)}"


def labels_by_value(label_infos: Iterable) -> dict:
    """``{value: info}`` of label descriptions; a value described twice is an error (which one would win?)."""
    found = {}
    for info in label_infos or ():
        value = int(info.value)
        if value in found:
            raise ValueError(f"label value {value} is described twice ({found[value].name!r} and {info.name!r})")
        found[value] = info
    return found


def _check_labels(labels: Image) -> np.ndarray:
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise ImageError(f"a label map must be 3-D, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ImageError(f"a label map needs integer voxels, got {array.dtype}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.size and array.min() < 0:
        raise ImageError("a label map cannot hold negative label values")
    return array


def _check_same_grid(labels: Image, volume_node) -> None:
    """Refuse labels that are not on the volume's (world) grid: importing them would resample silently."""
    dims = volume_node.GetImageData().GetDimensions()
    volume_lps = RAS_TO_LPS @ ijk_to_world_ras(volume_node)
    if tuple(labels.shape) != tuple(dims) or not np.allclose(labels.affine, volume_lps, atol=GRID_TOLERANCE):
        raise ImageError(
            f"the label map (shape {tuple(labels.shape)}) is not on the voxel grid of volume "
            f"'{volume_node.GetName()}' (shape {tuple(dims)})"
        )


def oriented_image_from_labels(array: np.ndarray, ijk_to_ras: np.ndarray):
    """A ``vtkOrientedImageData`` holding ``array`` (indexed ``[i, j, k]``) with the given IJK-to-RAS matrix."""
    slicer = _slicer()
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*array.shape)
    # VTK stores x (i) fastest: the C-order ravel of the [k, j, i] view.
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetName("labels")
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_ras))
    return image


def _describe_segments(segmentation, infos: dict) -> None:
    """Name, colour and terminology of each imported segment, matched by its label value."""
    slicer = _slicer()
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = segment.GetLabelValue()
        info = infos.get(value)
        segment.SetName(str(info.name) if info is not None else fallback_name(value))
        color = getattr(info, "color", None)
        if color is not None:
            segment.SetColor(*(float(c) for c in color))
        terminology = getattr(info, "terminology", None)
        if terminology:
            segment.SetTag(tag, str(terminology))


def place_next_to(node, reference_node) -> None:
    """Put ``node`` under the same subject hierarchy parent (the study) as ``reference_node``.

    Without an item for the reference (e.g. outside the Slicer application,
    where no plugin creates items) there is no study to join.
    """
    scene = reference_node.GetScene()
    slicer = _slicer()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


def segmentation_node_from_labels(
    labels: Image,
    label_infos: Iterable,
    reference_volume_node,
    name: str = "CT-FM segmentation",
    scene=None,
    node=None,
    show3d: bool = True,
):
    """A segmentation node holding ``labels`` (an :class:`Image` on the volume's world grid).

    One segment per non-zero label value present, described by the matching
    entry of ``label_infos`` (values it does not describe get a generic name;
    described values that are absent get no segment). With ``node`` given,
    its segments are replaced; otherwise a new node named ``name`` is added
    to ``scene`` (default ``slicer.mrmlScene``). ``show3d`` also builds the
    closed-surface representation, which the 3D view shows. Returns the node.
    """
    slicer = _slicer()
    check_scalar_volume(reference_volume_node)
    array = _check_labels(labels)
    _check_same_grid(labels, reference_volume_node)
    infos = labels_by_value(label_infos)
    scene = scene or (node.GetScene() if node is not None else None) or reference_volume_node.GetScene() or slicer.mrmlScene
    if scene is None:
        raise ImageError("no MRML scene to add the segmentation to")

    # The segmentation lives in the volume's local (parent-transform) frame, like the volume:
    # its labelmap takes the volume's own IJK-to-RAS matrix, not an approximation read from a file.
    import vtk

    matrix = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(matrix)
    labelmap = oriented_image_from_labels(array, array_from_vtk_matrix(matrix))

    # Build the segments in a private scene: nothing reaches the user's scene unless all of it worked.
    workshop = slicer.vtkMRMLScene()
    built = workshop.AddNewNodeByClass(SEGMENTATION_CLASS)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, built, ""):
        raise RuntimeError("Slicer could not import the label map into a segmentation")
    _describe_segments(built.GetSegmentation(), infos)

    if node is None:
        node = scene.AddNewNodeByClass(SEGMENTATION_CLASS, name)
        created = True
    else:
        created = False
    try:
        node.GetSegmentation().DeepCopy(built.GetSegmentation())
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        place_next_to(node, reference_volume_node)
    except BaseException:
        if created:
            scene.RemoveNode(node)
        raise
    if show3d:
        show_in_3d(node)
    return node


def show_in_3d(node) -> bool:
    """Build the closed-surface representation (what Segmentations' "Show 3D" does); False if it failed."""
    try:
        return bool(node.CreateClosedSurfaceRepresentation())
    except Exception:  # a missing converter must not lose the segmentation itself
        return False


def load_terminology(terminologies_logic) -> str:
    """Load CT-FM's terminology context (codes Slicer's own lists lack) into Slicer's Terminologies logic.

    Without it Slicer shows the segments' names and colours but cannot browse
    the CT-FM codes in its terminology selector. Returns the context name, or
    "" where CTFMLib ships no such file; loading twice is skipped.
    """
    try:
        from CTFMLib.labels import CTFM_CONTEXT, terminology_file

        path = terminology_file()
    except (ImportError, FileNotFoundError):
        return ""
    if CTFM_CONTEXT in loaded_terminology_names(terminologies_logic):
        return CTFM_CONTEXT
    return terminologies_logic.LoadTerminologyFromFile(str(path))


def loaded_terminology_names(terminologies_logic) -> set:
    """The terminology contexts Slicer has loaded. ``GetLoadedTerminologyNames(vtkStringArray)`` exists from
    Slicer 5.6 on; ``IsTerminologyContextLoaded`` only from 5.10."""
    import vtk

    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    return {names.GetValue(i) for i in range(names.GetNumberOfValues())}
