"""Retrieval results in the scene: the results table, loading a hit's case, marking the matched place.

The table (:data:`RESULT_COLUMNS`) holds one row per hit: rank, similarity, the case's name, the
matched location in RAS mm (R, A, S: the patch centre the index stored in LPS, x and y negated),
and what is needed to open it again (scan id, path, series, thumbnail PNG). Loading a hit reads
its file with CTFMLib (NIfTI, NRRD, MHA or a DICOM series) into a volume node whose geometry is
the file's, so the RAS location lands on the matched anatomy; the crosshair moves there, the
slice views centre on it, and a locked point marks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from CTFMSlicer.nodes import lps_to_ras, rows_from_table_node, table_node_from_rows, volume_node_from_image

from .cases import case_of, remember_case
from .jobs import QueryHit

RESULT_COLUMNS = ("rank", "similarity", "case", "R", "A", "S", "scan_id", "path", "series_uid", "thumbnail")
RESULTS_TABLE_NAME = "CT-FM similar cases"
MATCH_MARKUP_NAME = "CT-FM match"


def results_table_node(hits: Sequence[QueryHit], node=None, name: str = RESULTS_TABLE_NAME, scene=None):
    """The hits as a table node, best first (ranks as the search gave them; ties keep their order)."""
    rows = []
    for hit in sorted(hits, key=lambda h: (-h.similarity, h.rank)):
        ras = lps_to_ras(hit.centre_lps) if hit.centre_lps is not None else np.full(3, np.nan)
        rows.append({"rank": len(rows) + 1, "similarity": float(hit.similarity), "case": hit.case,
                     "R": float(ras[0]), "A": float(ras[1]), "S": float(ras[2]), "scan_id": int(hit.scan_id),
                     "path": str(hit.path), "series_uid": hit.series_uid or "", "thumbnail": hit.thumbnail or ""})
    return table_node_from_rows(rows, name=name, columns=list(RESULT_COLUMNS), scene=scene, node=node)


def hit_of_row(tableNode, row: int) -> dict:
    """Row ``row`` (0-based) of a results table: ``path``, ``series_uid``, ``ras`` (None when unknown), ..."""
    rows = rows_from_table_node(tableNode)
    if not 0 <= row < len(rows):
        raise ValueError(f"the results table has no row {row + 1}")
    r = rows[row]
    ras = np.array([float(r["R"]), float(r["A"]), float(r["S"])])
    return {"rank": int(r["rank"]), "similarity": float(r["similarity"]), "case": str(r["case"]),
            "path": str(r["path"]), "series_uid": str(r["series_uid"]) or None,
            "ras": ras if np.all(np.isfinite(ras)) else None, "thumbnail": str(r["thumbnail"]) or None}


def find_loaded_case(scene, path, series_uid: Optional[str] = None):
    """A volume node in ``scene`` that holds the voxels of ``path`` (and series) unchanged, or None."""
    target = Path(path).resolve()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        known = case_of(node)
        if known is not None and Path(known[0]).resolve() == target and (known[1] or None) == (series_uid or None):
            return node
    return None


def load_case(path, series_uid: Optional[str] = None, name: Optional[str] = None, scene=None):
    """The volume node of an indexed case: one already loaded (unchanged), else the file read into a new node."""
    import slicer

    scene = scene or slicer.mrmlScene
    node = find_loaded_case(scene, path, series_uid)
    if node is not None:
        return node
    from CTFMLib.image import read_image

    path = Path(path)
    image = read_image(path, series_uid, recursive=True)  # an indexed DICOM tree may span subfolders
    node = volume_node_from_image(image, name=name or path.name.split(".")[0], scene=scene)
    node.CreateDefaultDisplayNodes()
    remember_case(node, path.resolve(), series_uid)
    return node


def volume_centre_ras(node) -> np.ndarray:
    """World RAS of the middle of a volume's voxel grid."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return (np.array(bounds[0::2]) + np.array(bounds[1::2])) / 2.0


def show_location(ras, scene=None, label: str = "match", markupNode=None):
    """Crosshair on ``ras``, slice views centred there, a locked point marking it; returns the point list."""
    import slicer

    scene = scene or slicer.mrmlScene
    ras = np.asarray(ras, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(ras)):
        raise ValueError(f"the location {list(ras)} is not a point")
    crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    if crosshair is None:  # Slicer makes a singleton one; a bare scene (scripts, tests) may have none
        crosshair = scene.AddNode(slicer.vtkMRMLCrosshairNode())
    crosshair.SetCrosshairRAS(*ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    if markupNode is None:
        markupNode = scene.GetFirstNodeByName(MATCH_MARKUP_NAME)
        if markupNode is None or not markupNode.IsA("vtkMRMLMarkupsFiducialNode"):
            markupNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", MATCH_MARKUP_NAME)
    markupNode.RemoveAllControlPoints()
    markupNode.AddControlPoint(ras.tolist(), label)
    markupNode.SetNthControlPointLocked(0, True)
    return markupNode
