"""The hub's Triage section: ``ctfm triage`` in a child process, and reading back its verdict.

A triage model is a folder that CT-FM Train's classify task wrote (``<output>/model``:
``config.json`` with ``"architecture": "TriageModel"`` and the decision ``threshold``,
``model.safetensors``), or a catalogue model of task "triage" imported under its id.
With ``--json`` the child prints ``{probability, logit, decision, threshold, model, seconds, saliency}``
as its last stdout line and writes it to ``--json-out OUT``; with ``--saliency heat.nii.gz``
it also writes the map that shows which voxels drove the decision. No Qt, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from CTFMLib.model_store import TRIAGE_ARCHITECTURE, folder_problem, imported_model_path

from .jobs import start_volume_command
from .models import triage_catalog_ids
from .process import ProcessRunner, last_json_object
from .saliency import HEAT_NAME, METHODS, HeatmapOutput, read_heatmap, read_json_file

FOLDER = "folder"
DECISIONS = ("abnormal", "normal")
RESULT_NAME = "triage.json"
# What the section says when no triage model folder is chosen (model_store.folder_problem says the rest).
CHOOSE_FOLDER = "Choose the triage model folder (the 'model' folder that CT-FM Train's classify task wrote)."


def triage_model_choices(catalog_path=None) -> tuple:
    """What the Triage model box offers: a folder, then the catalogue's triage models."""
    return (FOLDER, *triage_catalog_ids(catalog_path))


def model_folder(choice: str, folder=None, catalog_path=None) -> Path:
    """The triage model folder for the section's choice; ``ValueError`` saying what to do otherwise."""
    if choice == FOLDER:
        problem = folder_problem(folder, TRIAGE_ARCHITECTURE, CHOOSE_FOLDER)
        if problem:
            raise ValueError(problem)
        return Path(folder)
    if choice not in triage_catalog_ids(catalog_path):
        raise ValueError(f"unknown triage model '{choice}'")
    path = imported_model_path(choice)
    if path is None:
        raise ValueError(f"the triage model {choice} is not on this computer: train it with CT-FM Train and import "
                         "its model folder in the Models section (Import...) with the model selected.")
    problem = folder_problem(path, TRIAGE_ARCHITECTURE, CHOOSE_FOLDER)
    if problem:
        raise ValueError(problem)
    return path


def triage_arguments(image, model, json_out, device: str = "auto", saliency_out=None,
                     method: Optional[str] = None) -> list:
    """``ctfm`` arguments (after ``--progress json``) for one triage run, optionally with its saliency map."""
    args = ["triage", str(image), "--model", str(model), "--device", device, "--json-out", str(json_out), "--json"]
    if saliency_out is not None:
        args += ["--saliency", str(saliency_out)]
        if method is not None:
            if method not in METHODS:
                raise ValueError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
            args += ["--method", method]
    return args


@dataclass
class TriageOutput:
    """A triage verdict: probability = sigmoid(logit), decision at the model's threshold."""

    probability: float
    logit: float
    decision: str
    threshold: float
    model: str
    seconds: float
    saliency: Optional[HeatmapOutput] = None

    def row(self, volume: str) -> dict:
        """The triage table's row (:data:`CTFMSlicer.overlay.TRIAGE_COLUMNS`)."""
        return {"volume": volume, "model": self.model, "probability": self.probability, "threshold": self.threshold,
                "decision": self.decision, "logit": self.logit}

    def summary(self) -> str:
        relation = ">=" if self.probability >= self.threshold else "<"
        return (f"{self.decision}: probability {self.probability:.3f} {relation} threshold {self.threshold:.3f} "
                f"(logit {self.logit:+.3f}).")


def parse_result(value: Optional[dict]) -> TriageOutput:
    """A :class:`TriageOutput` from the CLI's result object; ``ValueError`` naming what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("the triage command printed no result")
    missing = [k for k in ("probability", "logit", "decision", "threshold") if value.get(k) is None]
    if missing:
        raise ValueError(f"the triage result lacks {', '.join(missing)}")
    probability, logit, threshold = (float(value[k]) for k in ("probability", "logit", "threshold"))
    if not (0.0 <= probability <= 1.0 and 0.0 <= threshold <= 1.0 and np.isfinite(logit)):
        raise ValueError(f"the triage result is not a probability: {value}")
    decision = str(value["decision"])
    if decision not in DECISIONS:
        raise ValueError(f"unknown triage decision '{decision}'")
    return TriageOutput(probability, logit, decision, threshold, str(value.get("model") or ""),
                        float(value.get("seconds") or 0.0))


def start_triage(volumeNode, model, device: str = "auto", saliency: bool = False, method: str = "gradient",
                 on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None) -> ProcessRunner:
    """Triage ``volumeNode`` with the model folder ``model`` in a child process; returns its runner.

    ``on_done(output_or_None, message)``: a :class:`TriageOutput` on success (with its
    ``saliency`` map read when ``saliency``); None and the child's error, or "Cancelled.".
    """
    def arguments(work, source):
        return triage_arguments(source, model, work / RESULT_NAME, device, work / HEAT_NAME if saliency else None,
                                method if saliency else None)

    def read(work, stdout, result):
        output = parse_result(read_json_file(work / RESULT_NAME) or last_json_object(stdout))
        if saliency:
            output.saliency = read_heatmap(work / HEAT_NAME)
        return output, output.summary()

    return start_volume_command(volumeNode, "ctfm-triage-", arguments, read, "Triage", on_progress, on_done)
