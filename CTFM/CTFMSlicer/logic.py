"""The CT-FM hub module's logic, usable without its widget (and without Qt).

``CTFM.py`` subclasses :class:`CTFMLogic` together with Slicer's
``ScriptedLoadableModuleLogic``; scripts and tests can use it directly.
Embeddings are computed here; the Models, Triage and Saliency sections' work
lives in :mod:`.models`, :mod:`.triage`, :mod:`.saliency` and :mod:`.overlay`,
which the methods below put behind one object for the widget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import models, nodes, overlay, saliency, triage
from .nodes import image_from_volume_node, ras_to_lps, table_node_from_rows
from .process import DEVICES, ProcessRunner, ctfm_cli_command, remove_work_folder, work_folder

DEFAULT_WEIGHTS = "project-lighter/ct_fm_feature_extractor"
EMBED_MODES = ("volume", "scan", "point")


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

        work = work_folder("ctfm-embed-")
        try:
            source = write_image(image_from_volume_node(volumeNode), work / "input.nrrd", compress=False)
        except BaseException:
            remove_work_folder(work)
            raise
        out = work / "embedding.npy"
        args = ["embed", source, "--weights", weights, "--mode", mode, "--device", device, "--out", out]
        if pointRAS is not None:
            # "--point=" because a point left of the origin starts with "-", which argparse takes for an option.
            args.append("--point=" + ",".join(repr(float(v)) for v in ras_to_lps(pointRAS)))

        def finished(result):
            try:
                if result.ok and out.is_file():
                    vector, message = np.load(out), result.describe()
                else:
                    vector, message = None, result.describe()
            finally:
                remove_work_folder(work)
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

    # --- models --------------------------------------------------------------------------

    def modelRows(self, catalog_path: Optional[str] = None) -> list:
        """The Models table: catalogue and imported models with their status (:func:`.models.model_rows`)."""
        return models.model_rows(catalog_path)

    def startDownload(self, modelId: str, on_progress: Optional[Callable] = None,
                      on_done: Optional[Callable] = None) -> ProcessRunner:
        """``ctfm models download`` in a child process; ``on_done(ok, message)``."""
        return models.start_download(modelId, on_progress=on_progress, on_done=on_done)

    def importModel(self, source, modelId: Optional[str] = None, catalog_path: Optional[str] = None,
                    force: bool = False) -> Path:
        """Import a model folder or .zip (in this process; needs torch). Returns the imported folder.

        Other weights than the published ones under a published id raise ``CTFMLib.weights.NotPublishedError``
        unless ``force`` (they are then shown as "imported, not the published weights").
        """
        return models.import_model(source, modelId, catalog_path, force=force)

    def removeModel(self, modelId: str, catalog_path: Optional[str] = None) -> list:
        """Remove a model's imported and downloaded files (in this process; needs torch)."""
        return models.remove_model(modelId, catalog_path)

    # --- triage --------------------------------------------------------------------------

    def triageInputProblem(self, volumeNode, modelChoice: str, modelFolder=None) -> Optional[str]:
        """Why the Triage section cannot run with these inputs (a sentence), or None."""
        if volumeNode is None:
            return "Select the volume to triage."
        try:
            triage.model_folder(modelChoice, modelFolder)
        except ValueError as e:
            return _sentence(e)
        return None

    def startTriage(self, volumeNode, modelChoice: str, modelFolder=None, device: str = "auto",
                    withSaliency: bool = False, method: str = "gradient", on_progress: Optional[Callable] = None,
                    on_done: Optional[Callable] = None) -> ProcessRunner:
        """``ctfm triage`` on the volume in a child process; ``on_done(TriageOutput_or_None, message)``."""
        if device not in DEVICES:
            raise ValueError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
        folder = triage.model_folder(modelChoice, modelFolder)
        return triage.start_triage(volumeNode, folder, device, withSaliency, method, on_progress, on_done)

    def triageTableNode(self, output, volumeName: str, node=None, scene=None):
        """Append a :class:`~.triage.TriageOutput` to the triage table (a new "CT-FM triage" table without ``node``)."""
        return overlay.triage_table_node(output.row(volumeName), scene=scene, node=node)

    # --- saliency ------------------------------------------------------------------------

    def saliencyPointRAS(self, pointSource: str, pointList=None, scene=None) -> np.ndarray:
        """The point (world RAS mm) a saliency target or cube uses: the list's first control point, or the crosshair."""
        if pointSource == "crosshair":
            return nodes.crosshair_ras(scene)
        if pointSource != "markup":
            raise ValueError(f"unknown point source '{pointSource}'; choose one of {', '.join(saliency.POINT_SOURCES)}")
        if pointList is None or pointList.GetNumberOfControlPoints() == 0:
            raise ValueError("place a markup point on the volume (or use the crosshair)")
        return self.firstPointRAS(pointList)

    def saliencyRequest(self, target: str = "embedding", method: str = "occlusion", weights: str = DEFAULT_WEIGHTS,
                        segmentationModel: str = "", className: str = "", triageModelFolder=None,
                        pointSource: str = "markup", pointList=None, region: str = "whole", cubeMm: float = 64.0,
                        roiNode=None, device: str = "auto", scene=None) -> dict:
        """The Saliency section's values as :func:`.saliency.saliency_arguments` keywords (LPS), or ``ValueError``.

        The encoder ``weights`` serve targets embedding and point, ``segmentationModel``
        the class target, ``triageModelFolder`` the triage target. Region ``cube`` is a
        cube of ``cubeMm`` around the point, ``roi`` the box around ``roiNode``.
        """
        if target not in saliency.TARGETS:
            raise ValueError(f"unknown saliency target '{target}'; choose one of {', '.join(saliency.TARGETS)}")
        if region not in saliency.REGIONS:
            raise ValueError(f"unknown region '{region}'; choose one of {', '.join(saliency.REGIONS)}")
        if device not in DEVICES:
            raise ValueError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
        request = {"target": target, "method": method, "device": device}
        pointRAS = None
        if target == "point" or region == "cube":
            pointRAS = self.saliencyPointRAS(pointSource, pointList, scene)
        if target == "point":
            request["point_lps"] = ras_to_lps(pointRAS)
        if target == "class":
            request["class_name"] = (className or "").strip()
            request["weights"] = (segmentationModel or "").strip()
            if not request["weights"]:
                raise ValueError("enter the segmentation model whose class to explain (e.g. whole-body)")
        elif target == "triage":
            request["triage_model"] = str(triage.model_folder(triage.FOLDER, triageModelFolder))
        else:
            request["weights"] = (weights or "").strip()
        if region == "cube":
            request["cube_mm"] = float(cubeMm)
            if target != "point":  # the point target's cube is centred on its point
                request["center_lps"] = ras_to_lps(pointRAS)
        elif region == "roi":
            request["region_lps"] = nodes.roi_lps_box(roiNode)
        saliency.saliency_arguments("input", "heat.nii.gz", **request)  # the checks the command line needs
        return request

    def saliencyInputProblem(self, volumeNode, **values) -> Optional[str]:
        """Why the Saliency section cannot run (a sentence), or None. ``values``: :meth:`saliencyRequest`'s."""
        if volumeNode is None:
            return "Select the volume to explain."
        try:
            self.saliencyRequest(**values)
        except ValueError as e:
            return _sentence(e)
        return None

    def startSaliency(self, volumeNode, request: dict, on_progress: Optional[Callable] = None,
                      on_done: Optional[Callable] = None) -> ProcessRunner:
        """``ctfm saliency`` in a child process for a :meth:`saliencyRequest`.

        ``on_done(HeatmapOutput_or_None, message)`` follows from :meth:`ProcessRunner.poll`.
        """
        return saliency.start_saliency(volumeNode, on_progress=on_progress, on_done=on_done, **request)

    def showHeatmap(self, output, referenceNode, name: str, threshold: float = overlay.DEFAULT_THRESHOLD,
                    attributes: Optional[dict] = None, withPeak: bool = True, scene=None) -> tuple:
        """Add a heatmap (:class:`~.saliency.HeatmapOutput`) to the scene: ``(heatmap node, peak point list)``.

        The heatmap sits on ``referenceNode``'s grid with heat colours and ``threshold``;
        the point list marks the peak (``peak_lps`` in RAS, else the map's maximum voxel; None
        for a map of 0s or without ``withPeak``).
        The widget then lays the map over the input with :func:`.overlay.heatmap_layers`.
        """
        info = {**(output.info or {}), **(attributes or {})}
        described = {k: info.get(k) for k in ("target", "method", "region") if k in info}
        heat = overlay.heatmap_volume_node(output.heatmap, referenceNode, name=name, threshold=threshold,
                                           attributes={k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                       for k, v in described.items()},
                                           scene=scene)
        peak = None
        if withPeak:
            # Without a described peak, the maximum voxel on the node's grid (the input's, not the file's rounding).
            peak_lps = output.peak_lps
            if peak_lps is None:
                peak_lps = overlay.peak_lps_of(image_from_volume_node(heat))
            if peak_lps is not None:  # an all-0 map has no peak
                peak = overlay.peak_markup_node(peak_lps, name=f"{name} peak", scene=scene or heat.GetScene())
        return heat, peak


def _sentence(error: Exception) -> str:
    """An exception's message as a sentence for the panel (capital first letter, final full stop)."""
    text = str(error).strip() or type(error).__name__
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."
