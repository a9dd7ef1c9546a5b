"""The CT-FM hub module's logic, usable without its widget (and without Qt).

``CTFM.py`` subclasses :class:`CTFMLogic` together with Slicer's
``ScriptedLoadableModuleLogic``; scripts and tests can use it directly.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .nodes import image_from_volume_node, ras_to_lps, table_node_from_rows
from .process import ProcessRunner, ctfm_cli_command

DEFAULT_WEIGHTS = "project-lighter/ct_fm_feature_extractor"
EMBED_MODES = ("volume", "scan", "point")
DEVICES = ("auto", "cpu", "cuda", "mps")


class CTFMLogic:
    """Embeddings of volume nodes and the model catalogue, for the CT-FM hub module."""

    def embedVolume(
        self,
        volumeNode,
        weights: str = DEFAULT_WEIGHTS,
        mode: str = "volume",
        pointRAS=None,
        device: str = "auto",
        progress=None,
    ) -> np.ndarray:
        """The CT-FM embedding of a volume node, computed in this process (scripts, tests).

        The module's widget uses :meth:`startEmbedding` instead, which runs the
        same computation in a child process.

        ``pointRAS`` (world RAS, mm) is required for ``mode="point"`` and is
        handed to CTFMLib in LPS. ``progress`` follows CTFMLib's protocol
        ``progress(fraction_or_None, message)``; it may raise
        ``CTFMLib.progress.Cancelled`` to stop.
        """
        self._checkEmbeddingRequest(weights, mode, pointRAS, device)
        image = image_from_volume_node(volumeNode)
        point_lps = None if pointRAS is None else ras_to_lps(pointRAS)
        try:
            # Imported here: torch loads only when an embedding is computed, not when Slicer starts.
            from CTFMLib.embed import embed_image
        except ImportError as e:
            raise RuntimeError(f"CT-FM embedding is unavailable: {e}. Install the Python dependencies (PyTorch) first") from e
        embedding = embed_image(image, weights=weights, mode=mode, point_lps=point_lps, device=device, progress=progress)
        return np.asarray(embedding)

    def startEmbedding(
        self,
        volumeNode,
        weights: str = DEFAULT_WEIGHTS,
        mode: str = "volume",
        pointRAS=None,
        device: str = "auto",
        on_progress: Optional[Callable] = None,
        on_done: Optional[Callable] = None,
    ) -> ProcessRunner:
        """Compute the embedding in a child process (``ctfm embed``) so the GUI never blocks.

        The volume is written to a temporary NRRD with its geometry; the child
        reports progress as JSON lines. ``on_done(embedding_or_None, message)``
        is called from :meth:`ProcessRunner.poll` once the child has ended:
        the vector on success, ``None`` and the reason on failure or cancel.
        The caller polls the returned runner (a QTimer in the widget) and may
        :meth:`~ProcessRunner.cancel` it, which kills the whole process tree.
        """
        self._checkEmbeddingRequest(weights, mode, pointRAS, device)
        from CTFMLib.image import write_image

        work = Path(tempfile.mkdtemp(prefix="ctfm-embed-"))
        try:
            source = write_image(image_from_volume_node(volumeNode), work / "input.nrrd", compress=False)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        out = work / "embedding.npy"
        args = ["embed", source, "--weights", weights, "--mode", mode, "--device", device, "--out", out]
        if pointRAS is not None:
            args += ["--point", ",".join(repr(float(v)) for v in ras_to_lps(pointRAS))]

        def finished(result):
            try:
                if result.ok and out.is_file():
                    vector, message = np.load(out), result.describe()
                else:
                    vector, message = None, result.describe()
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if on_done:
                on_done(vector, message)

        return ProcessRunner(ctfm_cli_command(*args), on_progress=on_progress, on_done=finished)

    @staticmethod
    def _checkEmbeddingRequest(weights, mode, pointRAS, device) -> None:
        if mode not in EMBED_MODES:
            raise ValueError(f"unknown embedding mode '{mode}'; choose one of {', '.join(EMBED_MODES)}")
        if device not in DEVICES:
            raise ValueError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
        if mode == "point" and pointRAS is None:
            raise ValueError("point mode needs a point: place a markup point on the volume")
        if not weights:
            raise ValueError("no model weights given (a Hugging Face repo id, a catalogue id or a folder)")

    def embeddingInputProblem(self, volumeNode, weights: str, mode: str, pointList=None) -> Optional[str]:
        """Why an embedding cannot be computed from these inputs (a sentence for the GUI), or None."""
        if volumeNode is None:
            return "Select an input volume."
        if not (weights or "").strip():
            return f"Enter the model weights (e.g. {DEFAULT_WEIGHTS})."
        if mode not in EMBED_MODES:
            return f"Unknown embedding mode '{mode}'."
        if mode == "point" and (pointList is None or pointList.GetNumberOfControlPoints() == 0):
            return "Point mode: place a markup point on the volume."
        return None

    @staticmethod
    def firstPointRAS(pointList) -> np.ndarray:
        """World RAS position (mm) of the first control point of a markups point list."""
        if pointList is None or pointList.GetNumberOfControlPoints() == 0:
            raise ValueError("the point list has no control points")
        position = [0.0, 0.0, 0.0]
        pointList.GetNthControlPointPositionWorld(0, position)
        return np.array(position, dtype=np.float64)

    def embeddingTableNode(self, embedding, name: str = "CT-FM embedding", scene=None, node=None):
        """An embedding vector as a table node (columns ``index`` and ``value``), for inspection and saving."""
        values = np.asarray(embedding, dtype=np.float64).reshape(-1)
        rows = [{"index": i, "value": float(v)} for i, v in enumerate(values)]
        return table_node_from_rows(rows, name=name, columns=["index", "value"], scene=scene, node=node)

    def catalogRows(self, catalog_path: Optional[str] = None) -> list:
        """One dict per catalogue model (``id``, ``title``, ``task``, ``repo_id``) for the Models list."""
        from CTFMLib.catalog import load_catalog

        return [
            {"id": m.id, "title": m.title, "task": m.task, "repo_id": m.repo_id or ""}
            for m in load_catalog(catalog_path)
        ]
