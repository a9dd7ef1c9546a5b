"""Export a segmentation as a DICOM SEG from Slicer, through ``ctfm export-seg`` in a child process.

highdicom needs pydicom >= 3.0.1 and Slicer 5.6-5.10 bundle pydicom 2.4, so neither is imported
here: the source series' files and the segmentation are staged in a work folder and the child
writes the SEG (:func:`CTFMLib.dicom_seg.write_dicom_seg`, the writer ``ctfm segment --out seg.dcm``
uses). The source files are found as Slicer's own DICOM export finds them: the volume node's
``DICOM.instanceUIDs`` attribute (set by DICOMScalarVolumePlugin, 5.6 to main) and
``slicer.dicomDatabase.fileForInstance(uid)``. The finished SEG goes into the DICOM database
(``DICOMLib.DICOMUtils.importDicom(folder, database, copyFiles=True)``, the same signature in 5.6
and main), or to a file the caller names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from CTFMLib.image import Image, ImageError
from CTFMLib.labels import LabelInfo
from CTFMLib.text import count
from CTFMSlicer.nodes import RAS_TO_LPS, array_from_vtk_matrix

NOT_FROM_DICOM = "load the CT from the DICOM database to export a DICOM SEG"
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # DICOMScalarVolumePlugin: the loaded slices' SOPInstanceUIDs
SEG_TYPES = ("labelmap", "binary")

__all__ = [
    "NOT_FROM_DICOM", "SEG_TYPES", "dicom_database", "source_instance_uids", "source_files", "stage_series",
    "segmentation_label_map", "export_problem", "import_into_database", "copy_seg",
]


def _slicer():
    import slicer

    return slicer


def dicom_database():
    """Slicer's DICOM database when it exists and is open, else None (slicer-core and a closed database)."""
    database = getattr(_slicer(), "dicomDatabase", None)
    if database is None or not getattr(database, "isOpen", True):
        return None
    return database


def source_instance_uids(volume_node) -> list:
    """The SOPInstanceUIDs of the slices a volume was loaded from (empty when not loaded from DICOM)."""
    text = volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) if volume_node is not None else None
    return [uid for uid in (text or "").split() if uid]


def export_problem(segmentation_node, volume_node) -> str:
    """Why the export button cannot run now (a sentence), or "" (cheap: no voxels, no database lookup)."""
    if volume_node is None:
        return "Choose the input volume the segmentation was made on."
    if segmentation_node is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return "Segment the input volume first (or choose a segmentation with segments)."
    return ""


def source_files(volume_node, database) -> list:
    """The files of the series ``volume_node`` was loaded from; ValueError (one line) where there are none."""
    name = volume_node.GetName()
    uids = source_instance_uids(volume_node)
    if not uids:
        raise ValueError(f"'{name}' was not loaded from DICOM: {NOT_FROM_DICOM}")
    if database is None:
        raise ValueError(f"Slicer's DICOM database is not open, so the slices of '{name}' cannot be found: "
                         f"{NOT_FROM_DICOM}")
    files, missing = [], []
    for uid in uids:
        path = database.fileForInstance(uid) if uid != "Unknown" else ""
        if path and os.path.isfile(path):
            if Path(path) not in files:  # a multi-frame file holds several instances' frames
                files.append(Path(path))
        else:
            missing.append(uid)
    if missing:
        raise ValueError(f"{count(len(missing), 'slice')} of '{name}' are not in the DICOM database (instance "
                         f"{missing[0]}): {NOT_FROM_DICOM}")
    return files


def stage_series(files, folder: Path) -> Path:
    """Hard links to (or, across drives, copies of) the series' files in ``folder``: the child reads only the
    volume's own slices, never the rest of the database's folder; the originals are never written."""
    folder.mkdir(parents=True, exist_ok=False)
    for index, source in enumerate(files):
        target = folder / f"{index:06d}.dcm"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def segmentation_label_map(segmentation_node, volume_node) -> tuple:
    """``(label map Image, [LabelInfo])`` of every segment, on the volume's own voxel grid (the DICOM grid: the
    volume's parent transform, if any, moves it in the scene, not in its files) with values 1..n in segment order,
    names, colours and terminology from the segments. Where segments overlap, the later one wins (Slicer's own
    label map export). Raises ImageError when the export fails."""
    import vtk

    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for index in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ctfm_dicom_seg_export__")
    labelmap.SetHideFromEditors(True)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise ImageError(f"Slicer could not export '{segmentation_node.GetName()}' as a label map on "
                             f"'{volume_node.GetName()}'")
        voxels = np.array(slicer.util.arrayFromVolume(labelmap).transpose(2, 1, 0), order="C", copy=True)
    finally:
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        scene.RemoveNode(labelmap)
        if color is not None and color.GetName().startswith("__ctfm_dicom_seg_export__"):
            scene.RemoveNode(color)
    dims = tuple(volume_node.GetImageData().GetDimensions())
    if voxels.shape != dims:
        raise ImageError(f"the exported label map ({voxels.shape}) is not on the grid of '{volume_node.GetName()}' "
                         f"({dims})")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)  # local: the grid of the files
    ijk_to_lps = RAS_TO_LPS @ array_from_vtk_matrix(matrix)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = Image(voxels, spacing, ijk_to_lps[:3, 3].copy(), ijk_to_lps[:3, :3] / spacing)
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    infos, names = [], set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        name = segment.GetName() or f"segment {index + 1}"
        unique, n = name, 2
        while unique in names:  # names are segment IDs in a .seg.nrrd and labels in the SEG: keep them apart
            unique, n = f"{name} ({n})", n + 1
        names.add(unique)
        terminology = vtk.reference("")
        has = segment.GetTag(tag, terminology)
        infos.append(LabelInfo(index + 1, unique, tuple(float(c) for c in segment.GetColor()),
                               str(terminology) if has else "", unique))
    return image, infos


def import_into_database(seg_path: Path, database) -> bool:
    """Add the SEG to Slicer's DICOM database (copied into it: the work folder goes); False where it cannot."""
    try:
        from DICOMLib import DICOMUtils
    except ImportError:  # slicer-core, or the DICOM module disabled
        return False
    folder = Path(seg_path).parent
    return bool(DICOMUtils.importDicom(str(folder), database, copyFiles=True))


def copy_seg(seg_path: Path, out, overwrite: bool = False) -> Path:
    """Copy the SEG to ``out`` atomically (:func:`CTFMLib.files.atomic_output`); ``overwrite=False`` refuses an
    existing file."""
    from CTFMLib.files import atomic_output

    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        shutil.copyfile(seg_path, tmp)
    return out


def check_seg_type(seg_type: Optional[str]) -> str:
    if seg_type not in SEG_TYPES:
        raise ValueError(f"Unknown DICOM SEG type '{seg_type}'; choose one of {', '.join(SEG_TYPES)}.")
    return seg_type
