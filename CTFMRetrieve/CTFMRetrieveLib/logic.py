"""The CT-FM Retrieve module's logic: MRML in, ``ctfm index`` child processes, MRML out (no Qt).

- Index: :meth:`indexProblem`, :meth:`indexStatistics`; :meth:`startAdd` adds loaded volumes
  (written into the index folder when they exist only in the scene) and/or folders. The index is a
  folder (a ``Path``) or a shared database (a ``str``: ``postgresql://...`` or ``env:NAME``,
  :mod:`CTFMRetrieveLib.shared`), which the children reach with :attr:`passwordFile` as ``PGPASSFILE``.
- Find similar: :meth:`startQuery` from the crosshair (the place around a point), a markups ROI
  (a box) or the whole scan; world RAS in, LPS to the child.
- Results: :meth:`resultsTableNode`; :meth:`showResult` loads a hit's case and puts the crosshair
  and a point on the matched location (RAS).

``CTFMRetrieve.py`` subclasses :class:`CTFMRetrieveLogic` together with Slicer's
``ScriptedLoadableModuleLogic``; scripts and tests use it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from CTFMSlicer.nodes import crosshair_ras, path_is_set, ras_to_lps, roi_lps_box, table_row_of_view_row
from CTFMSlicer.process import remove_work_folder

from . import cases, jobs, results, shared
from .cases import index_folder_problem
from .results import RESULT_COLUMNS, RESULTS_TABLE_NAME  # noqa: F401  (part of the logic's interface)

QUERY_MODES = jobs.QUERY_MODES
DEVICES = jobs.DEVICES
SHARED_INFO_TIMEOUT = 120.0  # seconds a script waits for a shared index's statistics


class CTFMRetrieveLogic:
    """Index, search and show similar cases for the CT-FM Retrieve module."""

    def __init__(self) -> None:
        self._thumbnails: Optional[Path] = None  # the last query's thumbnail PNGs, removed with the next query
        # A shared index's password file (PGPASSFILE for the children): the workstation's, never the scene's.
        self.passwordFile: Optional[str] = None

    # --- checks ------------------------------------------------------------------------

    def indexProblem(self, indexPath, forAdding: bool = False) -> Optional[str]:
        """Why the index cannot be searched (or, ``forAdding``, added to), or None. A shared index is checked
        without connecting: whether it exists shows in :meth:`indexStatisticsText` and in the children's errors."""
        if shared.is_shared(indexPath):
            return shared.problem(indexPath, self.passwordFile)
        if isinstance(indexPath, str) and not indexPath.strip():
            return "Choose an index folder, or type a shared index's URL (postgresql://user@host/database?schema=NAME)."
        return index_folder_problem(indexPath, must_exist=not forAdding)

    def addVolumesProblem(self, indexPath, volumeNodes: Sequence) -> Optional[str]:
        """Why these volumes cannot be added to the index, or None: a shared index takes files only."""
        if shared.is_shared(indexPath):
            for node in volumeNodes:
                if cases.case_of(node) is None:
                    return shared.scene_only_volume_problem(node)
        return None

    def _sharedReady(self, indexPath) -> None:
        """Before a child works on a shared index: its packages are installed (ValueError: one line)."""
        if shared.is_shared(indexPath):
            problem = shared.packages_problem()
            if problem:
                raise ValueError(problem)

    def queryProblems(self, indexPath, volumeNode, mode: str = "scan", roiNode=None, scene=None) -> list:
        """Everything that keeps a search from running; empty when it can run."""
        problems = [p for p in (self.indexProblem(indexPath),) if p]
        problem = cases.check_volume(volumeNode)
        if problem:
            problems.append(f"Query volume: {problem}")
        if mode not in QUERY_MODES:
            problems.append(f"Unknown query mode '{mode}'.")
            return problems
        try:
            if mode == "roi":
                low, high = (lps * [-1.0, -1.0, 1.0] for lps in roi_lps_box(roiNode))
                low, high = np.minimum(low, high), np.maximum(low, high)
                where = "The ROI"
            elif mode == "crosshair":
                low = high = crosshair_ras(scene)
                where = "The crosshair ({}, {}, {})".format(*np.round(low, 1))
        except ValueError as e:
            problems.append(f"{e}.")
            return problems
        if mode != "scan" and not problem and not _overlaps(volumeNode, low, high):
            problems.append(f"{where} is outside the query volume '{volumeNode.GetName()}': "
                            + ("Shift + move the mouse over the volume in a slice view." if mode == "crosshair"
                               else "place the ROI on the volume."))
        return problems

    # --- index -------------------------------------------------------------------------

    def indexStatistics(self, indexPath) -> Optional[dict]:
        """``ctfm index info`` of the index, or None when the folder holds none yet; a shared index is read by a
        child (``ValueError`` with its error when that fails)."""
        if shared.is_shared(indexPath):
            self._sharedReady(indexPath)
            done = []
            shared.start_info(indexPath, self.passwordFile, lambda info, message: done.append((info, message))).wait(
                timeout=SHARED_INFO_TIMEOUT)
            if not done or done[0][0] is None:
                raise ValueError(done[0][1] if done else "the index did not answer")
            return done[0][0]
        return cases.index_statistics(indexPath) if cases.is_index(indexPath) else None

    def startIndexStatistics(self, indexPath, on_done: Callable):
        """:meth:`indexStatisticsText` without waiting for a shared index: ``on_done(text)`` from the returned
        runner's poll (None: a folder or a problem, and ``on_done`` was called already)."""
        if not shared.is_shared(indexPath) or self.indexProblem(indexPath) or shared.packages_problem():
            on_done(self.indexStatisticsText(indexPath))
            return None
        return shared.start_info(indexPath, self.passwordFile,
                                 lambda info, message: on_done(_shared_statistics_text(info, message)))

    def indexStatisticsText(self, indexPath) -> str:
        """One line saying what the index holds, or why it cannot be read."""
        if shared.is_shared(indexPath):
            problem = self.indexProblem(indexPath) or shared.packages_problem()
            if problem:
                return problem
            try:
                return _shared_statistics_text(self.indexStatistics(indexPath), "")
            except ValueError as e:
                return _shared_statistics_text(None, str(e))
        if not path_is_set(indexPath):
            return "No index chosen."
        if not cases.is_index(indexPath):
            problem = self.indexProblem(indexPath, forAdding=True)
            return problem or "A new index: add cases to create it."
        try:
            return cases.statistics_text(self.indexStatistics(indexPath))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign index is reported, not raised into the GUI
            return f"The index cannot be read: {e}"

    def volumesToAdd(self, scene=None) -> list:
        import slicer

        return cases.volumes_to_add(scene or slicer.mrmlScene)

    def startAdd(self, indexPath, volumeNodes: Sequence = (), folders: Sequence = (), weights: str = "",
                 device: str = "auto", on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None):
        """Add volume nodes and folders (files, DICOM trees) to the index in a child process; returns its runner.

        Volume nodes that exist only in the scene are first written to ``<index>/volumes``.
        ``on_done(outcome, message)``: see :func:`CTFMRetrieveLib.jobs.start_add`.
        """
        problem = self.indexProblem(indexPath, forAdding=True)
        if problem:
            raise ValueError(problem)
        self._sharedReady(indexPath)
        paths = []
        for node in volumeNodes:
            problem = cases.check_volume(node)
            if problem:
                raise ValueError(f"Volume '{node.GetName() if node else None}': {problem}")
            problem = self.addVolumesProblem(indexPath, [node])
            if problem:
                raise ValueError(problem)
            paths.append(cases.volume_file_for_index(node, indexPath))
        for folder in folders:
            if not path_is_set(folder) or not Path(folder).exists():
                raise ValueError(f"There is no folder or file {folder} to add.")
            paths.append(Path(folder).resolve())
        if not paths:
            raise ValueError("Nothing to add: load volumes or choose a folder.")
        paths = list(dict.fromkeys(str(p) for p in paths))  # the same file twice is added once
        with shared.child_environment(self.passwordFile if shared.is_shared(indexPath) else None):
            return jobs.start_add(_index_argument(indexPath), paths, weights or None, device, on_progress, on_done)

    # --- search ------------------------------------------------------------------------

    def queryRegion(self, mode: str, roiNode=None, scene=None) -> dict:
        """``point_lps`` (crosshair) or ``box_lps`` (ROI) for :func:`jobs.start_query`, from world RAS."""
        if mode == "crosshair":
            return {"point_lps": ras_to_lps(crosshair_ras(scene))}
        if mode == "roi":
            return {"box_lps": np.concatenate(roi_lps_box(roiNode))}
        return {}

    def startQuery(self, indexPath, volumeNode, mode: str = "crosshair", roiNode=None, k: int = 10,
                   excludeQueryCase: bool = True, thumbnails: bool = True, device: str = "auto",
                   on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None, scene=None):
        """Find the ``k`` cases (or places in them) most like the query in a child process; returns its runner.

        ``excludeQueryCase``: leave out the indexed file the query volume came from, when known.
        ``on_done(hits_or_None, message)``: see :func:`CTFMRetrieveLib.jobs.start_query`.
        """
        problems = self.queryProblems(indexPath, volumeNode, mode, roiNode, scene)
        if problems:
            raise ValueError(" ".join(problems))
        self._sharedReady(indexPath)
        region = self.queryRegion(mode, roiNode, scene)
        exclude = []
        if excludeQueryCase:
            known = cases.case_of(volumeNode)
            if known is not None:
                exclude.append(known[0])
        folder = None
        if thumbnails:
            self.clearThumbnails()
            folder = self._thumbnails = jobs.new_thumbnails_folder()
        with shared.child_environment(self.passwordFile if shared.is_shared(indexPath) else None):
            return jobs.start_query(volumeNode, _index_argument(indexPath), mode, k=k, exclude_paths=exclude,
                                    thumbnails_folder=folder, device=device, on_progress=on_progress, on_done=on_done,
                                    **region)

    def clearThumbnails(self) -> None:
        if self._thumbnails is not None:
            remove_work_folder(self._thumbnails)
            self._thumbnails = None

    # --- results -----------------------------------------------------------------------

    def resultsTableNode(self, hits, tableNode=None, name: str = RESULTS_TABLE_NAME, scene=None):
        """The hits as a table node (:data:`RESULT_COLUMNS`), replacing ``tableNode``'s rows when given."""
        return results.results_table_node(hits, node=tableNode, name=name, scene=scene)

    def resultOfRow(self, tableNode, row: int) -> dict:
        return results.hit_of_row(tableNode, row)

    @staticmethod
    def resultRowOfViewRow(tableNode, viewRow: int):
        """The results table's row that a table view's model row shows (None: the header row, or no row)."""
        return table_row_of_view_row(tableNode, viewRow)

    def showResult(self, tableNode, row: int, scene=None) -> tuple:
        """Load row ``row``'s case (or reuse it when loaded) and mark the matched place; ``(volume node, RAS)``."""
        hit = self.resultOfRow(tableNode, row)
        node = results.load_case(hit["path"], hit["series_uid"], name=hit["case"], scene=scene)
        ras = hit["ras"] if hit["ras"] is not None else results.volume_centre_ras(node)
        results.show_location(ras, scene=scene or node.GetScene(), label=f"#{hit['rank']} {hit['case']}")
        return node, ras


def _index_argument(indexPath):
    """The children's INDEX: a folder as it is, a shared index's URL or ``env:NAME`` without surrounding blanks."""
    return indexPath.strip() if shared.is_shared(indexPath) else indexPath


def _shared_statistics_text(info: Optional[dict], message: str) -> str:
    """The Holds: line of a shared index from its ``ctfm index info`` (None: the child's error ``message``)."""
    if info is None:
        return f"The shared index cannot be read: {message}"
    return cases.statistics_text(info)


def _overlaps(volumeNode, low, high) -> bool:
    """Whether the world RAS box ``low``..``high`` (a point when equal) touches the volume (its RAS bounds)."""
    bounds = [0.0] * 6
    volumeNode.GetRASBounds(bounds)
    lower, upper = np.array(bounds[0::2]), np.array(bounds[1::2])
    return bool(np.all(high >= lower - 1e-6) and np.all(low <= upper + 1e-6))
