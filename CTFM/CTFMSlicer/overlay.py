"""What the Triage and Saliency sections put in the scene: heatmap volumes, peak markups, result tables.

A saliency heatmap arrives as an :class:`~CTFMLib.image.Image` in ``[0, 1]`` on the
input volume's voxel grid (world LPS). :func:`heatmap_volume_node` shows it as a scalar
volume on exactly the input volume's grid (same IJK-to-RAS matrix, same parent transform),
coloured with :data:`HEAT_COLOR_NODE_ID`, window 0..1 and a lower threshold below which it
is transparent; :func:`heatmap_layers` says how to lay it over the input in the slice
views (the widget hands that to ``slicer.util.setSliceViewerLayers``). Points and boxes
come in world RAS (Slicer) and leave in LPS (CTFMLib), and back.

No Qt and no torch: this runs on slicer-core.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from CTFMLib.image import Image, ImageError

from .nodes import (
    SCALAR_VOLUME_CLASS,
    image_from_volume_node,
    import_slicer,
    lps_to_ras,
    rows_from_table_node,
    table_node_from_rows,
)

# Slicer's "PET-Heat" (black - red - yellow - white): a procedural colour node that
# vtkMRMLColorLogic creates in every scene, in Slicer and in slicer-core alike (the
# file-based maps such as Inferno need Slicer's ColorFiles folder, which slicer-core
# lacks). Low saliency is dark, so with the threshold it reads as "hot spots".
HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
FALLBACK_COLOR_NODE_ID = "vtkMRMLColorTableNodeRed"  # built in as well; used only if PET-Heat is missing
DEFAULT_THRESHOLD = 0.2
DEFAULT_OPACITY = 0.5
# The heatmap file is NIfTI, whose geometry is single precision: grids that agree to this
# (mm, and unitless for the direction cosines) are the input's grid.
GRID_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4

TRIAGE_COLUMNS = ("volume", "model", "probability", "threshold", "decision", "logit")
TRIAGE_TABLE_NAME = "CT-FM triage"

# Node attributes recording what a heatmap shows (kept with the scene).
ATTRIBUTE_PREFIX = "CTFM."


def _check_same_grid(heat: Image, reference_node) -> None:
    grid = image_from_volume_node(reference_node).geometry
    got = heat.geometry
    same = (
        got.shape == grid.shape
        and np.allclose(got.spacing, grid.spacing, atol=GRID_ATOL_MM)
        and np.allclose(got.origin, grid.origin, atol=GRID_ATOL_MM)
        and np.allclose(got.direction, grid.direction, atol=DIRECTION_ATOL)
    )
    if not same:
        raise ImageError(
            f"the heatmap's voxel grid ({got.shape}, spacing {np.round(got.spacing, 4).tolist()}, origin "
            f"{np.round(got.origin, 3).tolist()}) is not that of '{reference_node.GetName()}' ({grid.shape}, spacing "
            f"{np.round(grid.spacing, 4).tolist()}, origin {np.round(grid.origin, 3).tolist()}); "
            "was the volume moved or resampled while the map was computed? Compute it again"
        )


def heatmap_volume_node(
    heat: Image,
    reference_node,
    name: str = "CT-FM saliency",
    threshold: float = DEFAULT_THRESHOLD,
    attributes: Optional[dict] = None,
    scene=None,
    node=None,
):
    """A scalar volume node showing ``heat`` (values in [0, 1]) on ``reference_node``'s grid.

    The node gets the reference's IJK-to-RAS matrix and parent transform (not a copy
    rounded through the heatmap file), float32 voxels equal to ``heat.array``, and a
    display node: colour :data:`HEAT_COLOR_NODE_ID`, window/level 0..1, threshold on
    from ``threshold`` up. ``attributes`` are stored as ``CTFM.<key>`` node attributes.
    Raises :class:`ImageError` when ``heat`` is not on the reference's grid.
    """
    import vtk

    slicer = import_slicer()
    _check_same_grid(heat, reference_node)
    values = np.asarray(heat.array, dtype=np.float32)
    if values.size and not np.all(np.isfinite(values)):
        raise ImageError("the heatmap holds NaN or infinite values")
    if node is None:
        scene = scene or reference_node.GetScene() or slicer.mrmlScene
        node = scene.AddNewNodeByClass(SCALAR_VOLUME_CLASS, name)
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_ras)
    node.SetIJKToRASMatrix(ijk_to_ras)
    node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(values.transpose(2, 1, 0)))
    for key, value in (attributes or {}).items():
        node.SetAttribute(ATTRIBUTE_PREFIX + str(key), "" if value is None else str(value))
    style_heatmap(node, threshold, upper=max(1.0, float(values.max()) if values.size else 1.0))
    return node


def style_heatmap(node, threshold: float = DEFAULT_THRESHOLD, upper: float = 1.0):
    """Heat colours, window/level 0..1 and the lower threshold on ``node``'s display node (created if missing)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    scene = node.GetScene()
    for color_id in (HEAT_COLOR_NODE_ID, FALLBACK_COLOR_NODE_ID):
        if scene is not None and scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    was = display.StartModify()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetApplyThreshold(True)
    display.SetUpperThreshold(float(upper))
    display.SetLowerThreshold(_check_fraction(threshold, "threshold"))
    display.EndModify(was)
    return display


def set_heatmap_threshold(node, threshold: float) -> None:
    """Hide heatmap values below ``threshold`` (0..1); 0 shows the whole map."""
    display = node.GetDisplayNode() if node is not None else None
    if display is None:
        raise ValueError("no heatmap volume (or it has no display node)")
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(_check_fraction(threshold, "threshold"))


def heatmap_layers(heat_node, background_node, opacity: float = DEFAULT_OPACITY) -> dict:
    """Keyword arguments for ``slicer.util.setSliceViewerLayers``: the input below, the heatmap above it."""
    return {
        "background": background_node,
        "foreground": heat_node,
        "foregroundOpacity": _check_fraction(opacity, "opacity"),
    }


def _check_fraction(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the heatmap {what} must be between 0 and 1, got {value}")
    return value


# --- points and boxes --------------------------------------------------------------------


def peak_markup_node(peak_lps: Sequence[float], name: str = "CT-FM saliency peak", label: str = "peak",
                     scene=None, node=None):
    """A point list with one locked control point at the heatmap's maximum (``peak_lps``, LPS mm, shown in RAS)."""
    slicer = import_slicer()
    position = lps_to_ras(peak_lps)
    if not np.all(np.isfinite(position)):
        raise ValueError(f"the heatmap peak {list(peak_lps)} is not a point")
    if node is None:
        scene = scene or slicer.mrmlScene
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.RemoveAllControlPoints()
    node.AddControlPoint(position.tolist(), label)
    node.SetNthControlPointLocked(0, True)
    return node


def peak_lps_of(heat: Image) -> Optional[np.ndarray]:
    """LPS position (mm) of the heatmap's largest value (the first one, in [i, j, k] order); None for a map of 0s."""
    array = np.asarray(heat.array)
    if array.size == 0 or not array.max() > 0:
        return None
    ijk = np.unravel_index(int(np.argmax(array)), array.shape)
    return heat.index_to_physical(np.asarray(ijk, dtype=np.float64))


# --- triage table ------------------------------------------------------------------------


def triage_table_node(row: dict, name: str = TRIAGE_TABLE_NAME, scene=None, node=None):
    """Append one triage result to a table node (a new one when ``node`` is None).

    ``row`` holds :data:`TRIAGE_COLUMNS`: volume (name), model (folder or id),
    probability, threshold, decision ("abnormal"/"normal") and logit. Earlier rows of
    ``node`` are kept, so one table collects a session's triage runs.
    """
    missing = [c for c in TRIAGE_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"a triage result needs {', '.join(missing)}")
    rows = rows_from_table_node(node) if node is not None and node.GetTable() is not None else []
    rows = [{c: r.get(c) for c in TRIAGE_COLUMNS} for r in rows]
    new = {c: row[c] for c in TRIAGE_COLUMNS}
    for key in ("probability", "threshold", "logit"):
        new[key] = float(new[key])
    new["volume"], new["model"], new["decision"] = str(new["volume"]), str(new["model"]), str(new["decision"])
    return table_node_from_rows([*rows, new], name=name, columns=list(TRIAGE_COLUMNS), scene=scene, node=node)

