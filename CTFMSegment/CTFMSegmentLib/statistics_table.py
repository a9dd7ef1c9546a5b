"""Organ statistics of a segmentation as a table node (``ctfm segment --statistics``'s stats.json in Slicer).

One row per structure present, the columns of the CSV (:data:`CTFMLib.statistics.CSV_COLUMNS`), numbers as
numeric columns (so the table sorts and plots), ``touches_border`` and ``note`` as the CSV writes them. The
table node refers to its volume (:data:`VOLUME_ROLE`), so the next run on the same volume updates the same
node instead of piling up copies, and the reference survives saving and reloading the scene. No Qt.
"""

from __future__ import annotations

from typing import Optional

from CTFMSlicer.nodes import import_slicer, nodes_of_class, table_node_from_rows

__all__ = ["VOLUME_ROLE", "TABLE_SUFFIX", "UNITS", "statistics_table_name", "find_statistics_table",
           "statistics_table_node"]

VOLUME_ROLE = "CTFMStatisticsVolume"  # table node -> the volume its statistics are of
TABLE_SUFFIX = "CT-FM statistics"
# Column units shown by Slicer's table view (stats.json's units: mm3, mL, HU, LPS mm, voxel indices).
UNITS = {"volume": "mm3", "volume_ml": "mL", "intensity": "HU", "hu_mean": "HU", "hu_std": "HU",
         "hu_min": "HU", "hu_max": "HU", "centroid_lps": "mm", "bbox_lps": "mm"}


def statistics_table_name(volumeNode) -> str:
    """``"<volume> CT-FM statistics"``: the name a new statistics table gets."""
    return f"{volumeNode.GetName()} {TABLE_SUFFIX}"


def find_statistics_table(volumeNode, scene=None):
    """The statistics table node of ``volumeNode`` already in the scene (the last one made), or None."""
    scene = scene or volumeNode.GetScene()
    if scene is None:
        return None
    found = [n for n in nodes_of_class(scene, "vtkMRMLTableNode") if n.GetNodeReference(VOLUME_ROLE) is volumeNode]
    return found[-1] if found else None


def _unit(column: str) -> Optional[str]:
    for prefix, unit in UNITS.items():
        if column == prefix or column.startswith(prefix + "_"):
            return unit
    return None


def statistics_table_node(stats: dict, volumeNode, scene=None, node=None):
    """The table of ``stats`` (``{structure: {...}}`` as in stats.json) for ``volumeNode``.

    Fills ``node`` when given, else the volume's existing statistics table (:func:`find_statistics_table`),
    else a new ``"<volume> CT-FM statistics"``; an existing table keeps its name (the user may have renamed it).
    """
    from CTFMLib.statistics import CSV_COLUMNS, statistics_rows

    slicer = import_slicer()
    scene = scene or volumeNode.GetScene() or slicer.mrmlScene
    if node is None:
        node = find_statistics_table(volumeNode, scene)
    created = node is None
    if created:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", statistics_table_name(volumeNode))
    try:
        node = table_node_from_rows(statistics_rows(stats), columns=CSV_COLUMNS, node=node)
        for column in CSV_COLUMNS:
            unit = _unit(column)
            if unit:
                node.SetColumnUnitLabel(column, unit)
        node.SetNodeReferenceID(VOLUME_ROLE, volumeNode.GetID())
    except BaseException:
        if created:  # a half-made table is not left behind
            scene.RemoveNode(node)
        raise
    return node
