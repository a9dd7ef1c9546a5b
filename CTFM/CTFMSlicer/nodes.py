"""Volume and table nodes to and from CTFMLib types.

Slicer keeps a volume's voxels in ``vtkImageData`` (numpy view ``[k, j, i]``)
and its geometry in the node's IJK-to-RAS matrix; CTFMLib's
:class:`~CTFMLib.image.Image` is indexed ``[i, j, k]`` with LPS geometry. The
conversion transposes the voxels and negates the first two rows of the matrix
(RAS -> LPS), nothing else: no resampling, no change of voxel type.

A volume under a parent transform is converted in world coordinates: a linear
parent transform is folded into the geometry, a non-linear one is refused
(the user hardens it first), because a warped grid is not a grid.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from CTFMLib.image import Image, ImageError

# RAS <-> LPS: negate x and y. The matrix is its own inverse.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

SCALAR_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"
LABELMAP_VOLUME_CLASS = "vtkMRMLLabelMapVolumeNode"

# Tolerance for "the direction columns are orthonormal": a geometry with shear
# (or different scaling along a rotated axis) cannot be expressed as
# spacing + direction + origin.
_ORTHONORMAL_ATOL = 1e-5


def path_is_set(path) -> bool:
    """A parameter-node path counts as unset when empty (``Path()`` reads back as ``.``)."""
    return path is not None and str(path) not in ("", ".")


def import_slicer():
    """The ``slicer`` module, imported on first use so that importing CTFMSlicer needs no running Slicer."""
    import slicer  # deferred so that importing this module never needs a running Slicer

    return slicer


def array_from_vtk_matrix(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4 x 4 float64 array (the node geometry conversions in this module and CT-FM Segment)."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray):
    """A 4 x 4 array as a new ``vtkMatrix4x4`` (the inverse of :func:`array_from_vtk_matrix`)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ras_to_lps(point) -> np.ndarray:
    """An RAS point (mm) in LPS."""
    p = np.asarray(point, dtype=np.float64).reshape(3)
    return p * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps  # the same flip both ways


def parent_to_world(node) -> np.ndarray:
    """4x4 matrix from the node's own RAS to world RAS (identity without a parent transform).

    Raises :class:`ImageError` for a non-linear parent transform.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ImageError(
            f"volume '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden the transform first (Data module: right-click the volume > Harden transform)"
        )
    import vtk

    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return array_from_vtk_matrix(matrix)


def ijk_to_world_ras(node) -> np.ndarray:
    """4x4 IJK -> world RAS matrix of a volume node, parent linear transforms included."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return parent_to_world(node) @ array_from_vtk_matrix(matrix)


def _is_scalar_volume_node(node) -> bool:
    """Scalar or labelmap volume; vector, tensor and diffusion volumes derive from the scalar class but are not."""
    return (
        node.IsA(SCALAR_VOLUME_CLASS)
        and not node.IsA("vtkMRMLTensorVolumeNode")  # also the base of vtkMRMLVectorVolumeNode
        and not node.IsA("vtkMRMLDiffusionWeightedVolumeNode")
    )


def check_scalar_volume(node) -> None:
    """Raise :class:`ImageError` unless ``node`` is a scalar or labelmap volume with voxels."""
    if node is None:
        raise ImageError("no volume selected")
    if not _is_scalar_volume_node(node):
        raise ImageError(
            f"'{node.GetName()}' is a {node.GetClassName()}; CT-FM needs a scalar (grey-level) volume. "
            "Convert colour or multi-component volumes to scalar first (Vector to Scalar Volume module)"
        )
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise ImageError(f"volume '{node.GetName()}' has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ImageError(
            f"volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components per voxel; "
            "CT-FM needs a scalar (grey-level) volume"
        )


def image_from_volume_node(node, copy: bool = True) -> Image:
    """A scalar or labelmap volume node as an :class:`Image` (geometry in world LPS).

    ``copy``: the voxels are copied, so the Image outlives the node's buffer. ``copy=False`` gives a
    view of the node's VTK memory (indexed ``[i, j, k]``): to use at once, while the node's voxels stay
    as they are, and never to write to (the Segment panel's plan reads it in the GUI thread).
    """
    check_scalar_volume(node)
    slicer = import_slicer()
    voxels = slicer.util.arrayFromVolume(node).transpose(2, 1, 0)
    if copy:
        voxels = np.array(voxels, order="C", copy=True)
    ijk_to_lps = RAS_TO_LPS @ ijk_to_world_ras(node)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ImageError(f"volume '{node.GetName()}' has a degenerate geometry (zero voxel size)")
    direction = axes / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_ATOL):
        raise ImageError(
            f"volume '{node.GetName()}' is sheared by its parent transform; "
            "harden the transform (which resamples it) before using CT-FM"
        )
    metadata = {"source": "slicer", "node_name": node.GetName()}
    return Image(voxels, spacing, ijk_to_lps[:3, 3].copy(), direction, metadata)


def _voxels_for_vtk(array: np.ndarray, label: bool) -> np.ndarray:
    """Voxels in a dtype Slicer displays; refuses conversions that would change values."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if label and not np.issubdtype(array.dtype, np.integer):
        raise ImageError(f"a labelmap needs integer voxels, got {array.dtype}")
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        # Slicer refuses 64-bit integer volumes (they do not render); narrow when lossless.
        target = np.int32 if array.dtype == np.int64 else np.uint32
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ImageError(f"{array.dtype} voxel values exceed the {np.dtype(target).name} range Slicer supports")
        return array.astype(target)
    return array


def volume_node_from_image(image: Image, name: str = "CT-FM", scene=None, node=None, label: bool = False):
    """Put an :class:`Image` into a (new or given) scalar or labelmap volume node.

    With ``node`` given its voxels and geometry are replaced; if it sits under
    a linear parent transform, its local matrix is chosen so that the image
    lands at its world position. Returns the node.
    """
    slicer = import_slicer()
    if node is None:
        scene = scene or slicer.mrmlScene
        if scene is None:
            raise ImageError("no MRML scene to add the volume to")
        node = scene.AddNewNodeByClass(LABELMAP_VOLUME_CLASS if label else SCALAR_VOLUME_CLASS, name)
    elif not _is_scalar_volume_node(node):
        raise ImageError(f"cannot write an image into a {node.GetClassName()}; use a scalar or labelmap volume node")
    label = label or node.IsA(LABELMAP_VOLUME_CLASS)
    voxels = _voxels_for_vtk(np.asarray(image.array), label)
    world_ras = RAS_TO_LPS @ image.affine
    local_ras = np.linalg.solve(parent_to_world(node), world_ras)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(local_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# --- tables ---------------------------------------------------------------------

_INT32 = np.iinfo(np.int32)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _column_array(name: str, values: list):
    """A VTK array for one column: int, float (missing -> NaN) or string (missing -> "")."""
    import vtk

    present = [v for v in values if v is not None]
    if present and len(present) == len(values) and all(_is_int(v) and _INT32.min <= v <= _INT32.max for v in present):
        array = vtk.vtkIntArray()
        convert = int
    elif present and all(_is_number(v) for v in present):
        array = vtk.vtkDoubleArray()
        convert = lambda v: float("nan") if v is None else float(v)  # noqa: E731
    else:
        array = vtk.vtkStringArray()
        convert = lambda v: "" if v is None else str(v)  # noqa: E731
    array.SetName(name)
    array.SetNumberOfValues(len(values))
    for row, value in enumerate(values):
        array.SetValue(row, convert(value))
    return array


def table_node_from_rows(
    rows: Iterable,
    name: str = "CT-FM table",
    columns: Optional[Sequence[str]] = None,
    scene=None,
    node=None,
):
    """A ``vtkMRMLTableNode`` holding ``rows`` (dicts, or sequences matching ``columns``).

    Column order is ``columns`` when given, else the order keys first appear.
    Each column gets one type: integers, numbers (missing cells NaN) or text.
    """
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            if not isinstance(row, dict):
                raise ValueError("rows that are not dicts need explicit column names")
            columns.extend(k for k in row if k not in columns)
    columns = [str(c) for c in columns]
    if len(set(columns)) != len(columns):
        raise ValueError(f"duplicate column names: {columns}")
    cells = []
    for row in rows:
        if isinstance(row, dict):
            cells.append([row.get(c) for c in columns])
        else:
            row = list(row)
            if len(row) != len(columns):
                raise ValueError(f"a row has {len(row)} values for {len(columns)} columns")
            cells.append(row)

    import vtk

    table = vtk.vtkTable()
    for index, column in enumerate(columns):
        table.AddColumn(_column_array(column, [r[index] for r in cells]))
    slicer = import_slicer()
    if node is None:
        scene = scene or slicer.mrmlScene
        if scene is None:
            raise ValueError("no MRML scene to add the table to")
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    # Column names as the view's header, not as its first row (Slicer's default), as Segment Statistics does:
    # then view row i is table row i (see table_row_of_view_row).
    node.SetUseColumnTitleAsColumnHeader(True)
    return node


def table_row_of_view_row(node, view_row: int) -> Optional[int]:
    """The row of table ``node`` that row ``view_row`` of a ``qMRMLTableView``'s model shows (after
    mapping through the view's sort proxy), or None for the column-name row or no row.

    ``qMRMLTableModel`` shows the column names as an extra first row unless the node's
    UseColumnTitleAsColumnHeader is on (``tableRowOffset`` in qMRMLTableModel.cxx, Slicer 5.6 to main).
    """
    if node is None or view_row is None:
        return None
    row = view_row if node.GetUseColumnTitleAsColumnHeader() else view_row - 1
    return row if 0 <= row < node.GetNumberOfRows() else None


def rows_from_table_node(node) -> list:
    """The rows of a table node as dicts (the inverse of :func:`table_node_from_rows`)."""
    table = node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, column in enumerate(names):
            array = table.GetColumn(c)
            value = array.GetValue(r)
            row[column] = value
        rows.append(row)
    return rows


# --- handing a volume to a child process ------------------------------------------------


def stage_volume(node, prefix: str = "ctfm-"):
    """Write a volume node (world geometry) to ``<new temporary folder>/input.nrrd`` for a child process.

    NRRD keeps the geometry in double precision (NIfTI would round it to float32, and
    results computed on the rounded grid would no longer sit exactly on the volume).
    Returns ``(folder, path)``; the caller removes the folder when the child is done.
    """
    from pathlib import Path

    from CTFMLib.image import write_image

    from .process import remove_work_folder, work_folder

    image = image_from_volume_node(node)
    folder = work_folder(prefix)
    try:
        path = write_image(image, folder / "input.nrrd", compress=False)
    except BaseException:
        remove_work_folder(folder)
        raise
    return folder, Path(path)


# --- where a query or a map starts: the ROI and the crosshair --------------------------------


def roi_lps_box(roi_node) -> tuple:
    """``(min_lps, max_lps)`` (mm): the axis-aligned world box around a markups ROI, in LPS.

    A rotated ROI gives the box that holds it. Raises ``ValueError`` for an ROI without
    a defined extent.
    """
    if roi_node is None:
        raise ValueError("no ROI selected: create a markups ROI around the region to explain")
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    ras_min, ras_max = np.array(bounds[0::2]), np.array(bounds[1::2])
    if not np.all(np.isfinite(ras_min + ras_max)) or np.any(ras_max <= ras_min):
        raise ValueError(f"the ROI '{roi_node.GetName()}' has no extent; place it on the volume first")
    corners = np.stack([ras_to_lps(ras_min), ras_to_lps(ras_max)])
    return corners.min(axis=0), corners.max(axis=0)


def crosshair_ras(scene=None) -> np.ndarray:
    """World RAS position (mm) of the scene's crosshair (Shift + mouse move in a slice view sets it)."""
    scene = scene or import_slicer().mrmlScene
    node = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") if scene is not None else None
    if node is None:
        raise ValueError("the scene has no crosshair; choose a markup point instead")
    return np.array(node.GetCrosshairRAS(), dtype=np.float64)


class QueryPlaceObserver:
    """Calls ``changed()`` whenever the place a search starts from moves: the crosshair (Shift + mouse move in
    a slice view) or the ROI (dragged, resized, placed). A panel's state that depends on them ("Find similar"
    enabled only when they lie in the volume) is otherwise never refreshed: moving them does not modify the
    parameter node that references the ROI. Plain VTK observers; the panel throttles ``changed`` itself."""

    def __init__(self, changed):
        self.changed = changed
        self._observed = []  # (node, observer tag)

    def observe(self, scene, roiNode=None, crosshair: bool = True) -> None:
        """Observe the scene's crosshair node(s) (with ``crosshair``) and ``roiNode`` (replacing what was
        observed before)."""
        slicer = import_slicer()
        wanted = [(n, "ModifiedEvent") for n in nodes_of_class(scene, "vtkMRMLCrosshairNode")] if crosshair else []
        if roiNode is not None:
            wanted += [(roiNode, "ModifiedEvent"), (roiNode, slicer.vtkMRMLMarkupsNode.PointModifiedEvent),
                       (roiNode, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)]
        if [(n, e) for n, e, _ in self._observed] == wanted:
            return
        self.stop()
        self._observed = [(n, e, n.AddObserver(e, self._on_event)) for n, e in wanted]

    def stop(self) -> None:
        for node, _event, tag in self._observed:
            node.RemoveObserver(tag)
        self._observed = []

    def _on_event(self, caller, event) -> None:
        self.changed()


def nodes_of_class(scene, class_name: str) -> list:
    """The scene's nodes of one class (none without a scene)."""
    if scene is None:
        return []
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]
