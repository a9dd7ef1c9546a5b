"""The CT-FM hub module's Train section: from the section's values to a followed, cancellable CTFMTrain CLI run.

- :func:`trainRequest` turns the section's values into the CLI's parameters (the ``<name>`` s of
  ``CTFMTrain/CTFMTrain.xml``), or raises :class:`TrainSetupError` saying what to change.
- :func:`writeStarterConfig` writes a task's default configuration with the user's scans in it.
- :class:`TrainRun` starts the CLI with ``slicer.cli.run`` (not blocking), follows its
  ``vtkMRMLCommandLineModuleNode`` and cancels it with ``Cancel()``.

No ``qt``/``ctk`` and no torch here: it runs on ``slicer-core`` and in plain Python.

How a CLI's progress reaches Python (Slicer's Base/Logic/vtkSlicerCLIModuleLogic.cxx): the logic
thread parses the child's stdout; ``<filter-progress>`` goes to ``ProcessInformation->Progress``,
read with ``GetProgress()`` (0-100, reset to 0 when the run ends); ``<filter-comment>`` goes to
``ProcessInformation->ProgressMessage``, which only C++ reads (``qSlicerCLIProgressBar``): the
node's ``GetModuleDescription()`` is not wrapped for Python, and ``RemoveProgressInfoFromProcessOutput``
strips the ``<filter-*>`` elements from ``GetOutputText()``. So the message shown here is the newest
plain line of the output (live with ``StartContinuousOutputUpdate()``), else the newest row of the
run's ``metrics.csv``. Progress-only updates arrive as ``ModifiedEvent`` (``RequestModified``);
``StatusModifiedEvent`` only follows status changes, so :class:`TrainRun` observes ``ModifiedEvent``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .logic import DEFAULT_WEIGHTS
from .process import DEVICES

TRAIN_TASKS = ("pretrain", "segment", "classify", "check")
TRAINING_TASKS = ("pretrain", "segment", "classify")  # the ones that train (and need a configuration)
CHECKPOINT = Path("checkpoints") / "last.pt"  # as CTFMLib.train.run.CHECKPOINT (that module imports torch)
MODEL_FOLDER = "model"  # <output folder>/model: what a finished training exports
METRICS_FILE = "metrics.csv"
MAX_STEPS_LIMIT = 10_000_000  # CTFMTrain.xml: maxSteps maximum
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

# What data.source should name, per task (the file dialogs of "Create configuration..." and its errors).
SOURCE_KINDS = {"pretrain": "folder", "segment": "csv", "classify": "csv"}
SOURCE_HINTS = {
    "pretrain": "the CT scans to pretrain on: a folder (searched recursively: NIfTI, NRRD, MHA, DICOM series), "
                "image files or a CSV file with a 'path' column",
    "segment": "a CSV file with a 'path' column (the scans) and a 'segmentation' column (each scan's label map "
               "on the same voxel grid)",
    "classify": "a CSV file with a 'path' column (the scans) and a 'label' column (0 normal, 1 abnormal)",
}
# Fine-tuning starts from the published CT-FM encoder; pretraining starts from random weights.
STARTER_WEIGHTS = {"pretrain": None, "segment": DEFAULT_WEIGHTS, "classify": DEFAULT_WEIGHTS}

OUTCOMES = ("completed", "failed", "cancelled")
ERROR_TAIL_LINES = 15


class TrainSetupError(ValueError):
    """The Train section's values cannot start a run; the message says what to change."""


@dataclass
class TrainRequest:
    """The CLI parameters for ``slicer.cli.run`` and sentences worth showing before the run starts."""

    parameters: dict
    notes: list = field(default_factory=list)


def givenPath(value) -> Optional[Path]:
    """An absolute path, or None for "nothing chosen" (None, "" and "." - what an empty Path parameter holds)."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(os.path.abspath(os.path.expanduser(text)))


def trainRequest(task: str, configFile=None, outputFolder=None, device: str = "auto", resume: bool = False,
                 maxSteps: int = 0) -> TrainRequest:
    """The CTFMTrain parameters (``task configFile outputDirectory device resume maxSteps``) for these values.

    Training tasks need an existing configuration that :func:`CTFMLib.train.config.load_config` accepts
    and an output folder that is new, empty or an earlier run of the same task
    (:func:`CTFMLib.train.runfolder.inspect_run_folder`: a model folder or any other user folder is refused
    before the CLI starts); one that already holds ``checkpoints/last.pt`` needs ``resume``. ``resume``
    without a checkpoint is dropped (the CLI would refuse it) with a note that training starts from
    scratch. ``maxSteps`` 0 keeps the configuration's schedule. Raises :class:`TrainSetupError`.
    """
    if task not in TRAIN_TASKS:
        raise TrainSetupError(f"Unknown task '{task}'; choose one of {', '.join(TRAIN_TASKS)}.")
    if device not in DEVICES:
        raise TrainSetupError(f"Unknown device '{device}'; choose one of {', '.join(DEVICES)}.")
    if isinstance(maxSteps, bool) or not isinstance(maxSteps, int) or not 0 <= maxSteps <= MAX_STEPS_LIMIT:
        raise TrainSetupError(f"Maximum steps must be a whole number from 0 (the configuration's schedule) "
                              f"to {MAX_STEPS_LIMIT}, not {maxSteps!r}.")
    config, out = givenPath(configFile), givenPath(outputFolder)
    notes = []
    training = task in TRAINING_TASKS
    if config is None:
        if training:
            raise TrainSetupError(f"Choose a configuration file for task '{task}' (JSON or YAML), "
                                  "or press 'Create configuration...' to write one.")
    else:
        _checkConfig(config, task if training else None)
    if out is None:
        if training:
            raise TrainSetupError("Choose an output folder: checkpoints, metrics and the trained model are "
                                  "written there.")
    elif out.exists() and not out.is_dir():
        raise TrainSetupError(f"The output folder {out} is a file; choose a folder.")
    elif training:
        from CTFMLib.train.runfolder import RunFolderError, inspect_run_folder

        try:
            inspect_run_folder(out, task)  # torch-free: a run made before markers is checked by the CLI
        except RunFolderError as e:
            raise TrainSetupError(f"The output folder cannot be used: {e}.") from None
        checkpoint = out / CHECKPOINT
        if checkpoint.is_file() and not resume:
            raise TrainSetupError(f"The output folder {out} already holds a training run ({CHECKPOINT.as_posix()}): "
                                  "tick Resume to continue it, or choose an empty folder.")
        if resume and not checkpoint.is_file():
            notes.append(f"Resume: there is no checkpoint in {out} yet, so training starts from scratch.")
            resume = False
    parameters = {
        "task": task,
        "configFile": "" if config is None else str(config),
        "outputDirectory": "" if out is None else str(out),
        "device": device,
        "resume": bool(resume) and training,
        "maxSteps": int(maxSteps),
    }
    return TrainRequest(parameters, notes)


def _checkConfig(config: Path, task: Optional[str]) -> None:
    if not config.is_file():
        raise TrainSetupError(f"The configuration file {config} does not exist: choose an existing one, "
                              "or press 'Create configuration...' to write one.")
    if config.suffix.lower() not in CONFIG_SUFFIXES:
        raise TrainSetupError(f"The configuration file {config} should be JSON or YAML ({', '.join(CONFIG_SUFFIXES)}).")
    if task is None:
        return  # the check task parses it itself and reports what it finds
    from CTFMLib.train.config import ConfigError, load_config

    try:
        load_config(config, task)
    except ConfigError as e:
        raise TrainSetupError(f"The configuration cannot be used for task '{task}': {e}") from None


def writeStarterConfig(task: str, path, sources, weights: Optional[str] = "task default",
                       overwrite: bool = False) -> Path:
    """Write ``DEFAULTS[task]`` as JSON with ``data.source`` = ``sources`` (absolute paths); return the path.

    ``weights`` (``model.weights``): by default :data:`STARTER_WEIGHTS` (CT-FM's published encoder for
    fine-tuning, random initialisation for pretraining). Every other value is the task's default, so
    the file lists every setting there is to edit. Raises :class:`TrainSetupError`.
    """
    if task not in TRAINING_TASKS:
        raise TrainSetupError(f"A configuration is written for a training task ({', '.join(TRAINING_TASKS)}), "
                              f"not '{task}'.")
    from CTFMLib.train.config import DEFAULTS

    target = givenPath(path)
    if target is None:
        raise TrainSetupError("Choose where to save the configuration file.")
    if target.suffix.lower() != ".json":
        raise TrainSetupError(f"The configuration is written as JSON: name it *.json, not {target.name}.")
    if target.exists() and not overwrite:
        raise TrainSetupError(f"{target} already exists; choose another name or allow overwriting it.")
    chosen = [givenPath(s) for s in ([sources] if isinstance(sources, (str, Path)) else list(sources or []))]
    chosen = [s for s in chosen if s is not None]
    if not chosen:
        raise TrainSetupError(f"Choose the training data for task '{task}': {SOURCE_HINTS[task]}.")
    missing = [str(s) for s in chosen if not s.exists()]
    if missing:
        raise TrainSetupError(f"Training data not found: {', '.join(missing)}.")
    config = copy.deepcopy(DEFAULTS[task])
    config["data"]["source"] = [str(s) for s in chosen]
    config["model"]["weights"] = STARTER_WEIGHTS[task] if weights == "task default" else weights
    from CTFMLib.files import FileSafetyError, WriteError, atomic_write_text

    try:  # atomic: a failed write leaves no half file; without overwrite an existing file is never replaced
        atomic_write_text(target, json.dumps(config, indent=2) + "\n", overwrite=overwrite)
    except (FileSafetyError, WriteError) as e:
        raise TrainSetupError(f"Cannot write {target}: {e}.") from None
    return target


def trainModule():
    """``slicer.modules.ctfmtrain``, or :class:`TrainSetupError` saying why it is missing."""
    import slicer

    module = getattr(getattr(slicer, "modules", None), "ctfmtrain", None)
    if module is None:
        raise TrainSetupError("The CT-FM Train CLI module is not loaded: enable CLI modules in the application "
                              "settings (Modules), or add the CTFMTrain folder to the additional module paths.")
    return module


# --- after a run ---------------------------------------------------------------------------


def exportedModel(outputFolder) -> Optional[Path]:
    """``<outputFolder>/model`` when a finished training wrote one (it holds ``config.json``), else None."""
    out = givenPath(outputFolder)
    folder = None if out is None else out / MODEL_FOLDER
    return folder if folder is not None and (folder / "config.json").is_file() else None


def modelHint(task: str, modelFolder) -> str:
    """How to use the model a training of ``task`` exported to ``modelFolder``."""
    if task == "segment":
        return (f"Segment with it in the CT-FM Segment module: Model 'folder', Model folder {modelFolder}.")
    if task == "classify":
        return (f"It is a triage model (encoder and classification head): import the folder {modelFolder} "
                "as a triage model, or load it with CTFMLib.train.classify.load_triage_model.")
    return (f"It is a CT-FM encoder: enter {modelFolder} as Weights in the Embedding section, "
            "or as model.weights of a fine-tuning configuration.")


def latestMetrics(outputFolder, since: float = 0.0) -> Optional[str]:
    """The newest ``metrics.csv`` row as a sentence ("step 120: loss 3.142, lr 0.0001"), or None.

    Rows of a file last written before ``since`` (``time.time()`` seconds) belong to an earlier run.
    """
    out = givenPath(outputFolder)
    path = None if out is None else out / METRICS_FILE
    try:
        if path is None or path.stat().st_mtime < since:
            return None
        with open(path, "rb") as f:  # only the header and the tail: the file grows with the run
            header = f.readline().decode("utf-8", "replace")
            f.seek(0, os.SEEK_END)
            f.seek(max(len(header), f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    lines = [line for line in tail if line.strip()]
    if not lines:
        return None
    row = next(csv.DictReader(io.StringIO(header + lines[-1] + "\n")), None)
    if not row or not row.get("step"):
        return None
    values = [f"{key} {_short(value)}" for key, value in row.items() if key not in ("step", "seconds") and value]
    return f"step {row['step']}: " + ", ".join(values) if values else f"step {row['step']}"


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def lastLines(text: str, count: int = ERROR_TAIL_LINES) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def latestOutputLine(text: str) -> Optional[str]:
    """The newest complete plain line of a CLI's output text, or None.

    While a CLI runs Slicer strips ``<filter-*>`` elements chunk by chunk, so an element split
    between two chunks stays behind (in parts); such lines, and a line still being written (no
    newline yet), are not messages.
    """
    complete = (text or "").rpartition("\n")[0]
    for line in reversed(complete.splitlines()):
        line = line.strip()
        if line and "<" not in line and ">" not in line:
            return line
    return None


# --- one run ---------------------------------------------------------------------------------


class TrainRun:
    """One CTFMTrain run started with ``slicer.cli.run`` (not waiting), followed through its CLI node.

    ``on_progress(fraction_or_None, message)`` while it runs (None: busy, no fraction known yet);
    ``on_done(outcome, message, details)`` once, with outcome ``"completed"``, ``"failed"`` or
    ``"cancelled"`` and the last lines of the error output as details. Both are called from the
    node's events, i.e. in Slicer's main thread. ``cliRun`` defaults to ``slicer.cli.run``; ``node``
    reuses the CLI node of an earlier run instead of adding a new one to the scene.
    """

    def __init__(self, module, request: TrainRequest, on_progress: Optional[Callable] = None,
                 on_done: Optional[Callable] = None, cliRun: Optional[Callable] = None, node=None):
        self.module = module
        self.request = request
        self.on_progress = on_progress
        self.on_done = on_done
        self.cliRun = cliRun
        self.node = node
        self.outcome: Optional[str] = None
        self.message = ""
        self.details = ""
        self._observer = None
        self._started = 0.0
        self._wasBusy = False
        self._lastReport = None

    @property
    def task(self) -> str:
        return self.request.parameters["task"]

    @property
    def outputFolder(self) -> Optional[Path]:
        return givenPath(self.request.parameters.get("outputDirectory"))

    @property
    def running(self) -> bool:
        return self._observer is not None

    def start(self):
        """Start the CLI and return its node at once; the run goes on in Slicer's CLI thread."""
        import vtk

        run = self.cliRun
        if run is None:
            import slicer.cli

            run = slicer.cli.run
        self._started = time.time()
        node = run(self.module, self.node, self.request.parameters, wait_for_completion=False)
        if node is None:
            raise TrainSetupError("Slicer could not start the CT-FM Train CLI module (see the application log).")
        self.node = node
        node.StartContinuousOutputUpdate()  # output and errors while it runs, not only at the end
        self._observer = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onModified)
        self._onModified(node, None)  # the logic may have changed the status before we observed it
        return node

    def cancel(self) -> None:
        """Ask Slicer to stop the CLI (``Cancel()``: the process is killed; the last checkpoint stays)."""
        if self.node is not None and self.running:
            self.node.Cancel()

    def close(self) -> None:
        """Stop following the node (without cancelling it)."""
        if self._observer is not None and self.node is not None:
            self.node.RemoveObserver(self._observer)
            self.node.EndContinuousOutputUpdate()
        self._observer = None

    def _onModified(self, caller, event) -> None:
        node = self.node
        status = node.GetStatus()
        if status & node.BusyMask:
            self._wasBusy = True
            self._report(*self._progress(node, status))
            return
        if status == node.Idle and not self._wasBusy and event is None:
            # Not scheduled: slicer.cli.run's Apply leaves a node it could not schedule Idle.
            self._finish("failed", "Slicer could not schedule the CT-FM Train CLI (see the application log).")
            return
        if status == node.Cancelled:
            self._finish("cancelled", self._cancelledMessage())
        elif status == node.Completed:
            self._finish("completed", self._completedMessage())
        elif status & node.ErrorsMask or status == node.Idle:
            # Idle after being busy: the logic stopped before starting the process (a parameter problem).
            self._finish("failed", self._failedMessage())

    def _progress(self, node, status):
        if status == node.Scheduled:
            return None, "Waiting for Slicer to start CT-FM Train..."
        if status == node.Cancelling:
            return None, "Cancelling..."
        if status == node.Completing:
            return 1.0, "Finishing..."
        percent = node.GetProgress()
        fraction = percent / 100.0 if percent > 0 else None
        message = latestOutputLine(node.GetOutputText()) or latestMetrics(self.outputFolder, self._started)
        elapsed = _duration(time.time() - self._started)
        return fraction, f"{message} ({elapsed})" if message else f"Running ({elapsed})..."

    def _report(self, fraction, message: str) -> None:
        if (fraction, message) != self._lastReport and self.on_progress:
            self._lastReport = (fraction, message)
            self.on_progress(fraction, message)

    def _finish(self, outcome: str, message: str) -> None:
        self.outcome, self.message = outcome, message
        self.details = lastLines(self.node.GetErrorText())
        self.close()
        if self.on_done:
            self.on_done(outcome, message, self.details)

    def _completedMessage(self) -> str:
        if self.task == "check":
            return "The training environment is ready."
        model = exportedModel(self.outputFolder)
        if model is None:
            return (f"Stopped before the end of the schedule; the checkpoint in "
                    f"{self.outputFolder / CHECKPOINT.parent} is kept: tick Resume and press Start to continue.")
        return f"Finished: the trained model is in {model}. {modelHint(self.task, model)}"

    def _cancelledMessage(self) -> str:
        out = self.outputFolder
        if self.task in TRAINING_TASKS and out is not None and (out / CHECKPOINT).is_file():
            return (f"Cancelled. The last checkpoint ({out / CHECKPOINT}) is kept: tick Resume and press Start "
                    "to continue from it.")
        return "Cancelled."

    def _failedMessage(self) -> str:
        errors = [line.strip() for line in self.node.GetErrorText().splitlines() if line.strip()]
        reasons = [line[len("ERROR:"):].strip() for line in errors if line.startswith("ERROR:")]
        if reasons and reasons[-1].startswith("training stopped ("):
            # SIGTERM from outside Slicer (a shutdown, a scheduler): exit 143 with its checkpoint kept.
            return f"CT-FM Train ({self.task}) did not finish: {reasons[-1]}"
        if reasons or errors:
            return f"CT-FM Train ({self.task}) failed: {reasons[-1] if reasons else errors[-1]}"
        return (f"CT-FM Train ({self.task}) failed ({self.node.GetStatusString()}) without an error message; "
                "the application log (View > Error Log) has Slicer's report.")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
