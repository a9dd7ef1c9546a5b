"""One entry point for every training task: configuration -> data -> task -> the training loop.

Used by ``ctfm train`` and by the CTFMTrain Slicer CLI module, single-process or
under ``torchrun`` (every process runs the same call; the loop finds its rank).

Order, so that nothing is written for a run that is refused: the configuration is checked (every value,
then the keys that go together), the scans are listed, the output folder is checked
(:mod:`.runfolder`: new, empty, or a run of the same task; without ``resume`` it may not hold
checkpoints); only then is the folder created and marked, and the data prepared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..files import WriteError
from ..progress import null_progress, subrange
from .config import ConfigError, check_for_training, load_config
from .runfolder import claim_run_folder, has_checkpoints, inspect_run_folder, remove_temporaries
from .trainer import TrainingError, checkpoint_task, resolve_device, train

CHECKPOINT = Path("checkpoints") / "last.pt"  # in the output folder: what --resume continues from

TASKS = ("pretrain", "segment", "classify")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


STOP_EXIT_CODES = {"SIGINT": 130}  # any other stop (SIGTERM, another process stopped): 143


def stop_exit_code(summary: dict) -> int:
    """The exit status for a training summary: 0 when it ran to the end; 128 + the signal when a signal
    stopped it (SIGINT 130, SIGTERM and a stop of another process 143), so schedulers see it did not finish."""
    if not summary.get("stopped"):
        return 0
    return STOP_EXIT_CODES.get(str(summary.get("stop_reason")), 143)


def run(task: str, config_path=None, out_dir=None, resume: bool = False, max_steps: Optional[int] = None,
        device: Optional[str] = None, progress=None, overrides: Optional[dict] = None) -> dict:
    """Train ``task`` ("pretrain", "segment", "classify") as the configuration file says.

    ``out_dir`` (or the configuration's ``run.out_dir``) receives ``ctfm-run.json`` (the marker),
    ``checkpoints/``, ``metrics.csv``, ``data/`` (the preprocessed-scan cache, unless ``data.cache_dir``
    says otherwise) and, at the end, ``model/``; it must be new, empty or a run of the same task
    (:mod:`.runfolder`). Returns the loop's summary, plus ``skipped``: the scans left out and why
    (also in ``skipped.csv`` of the cache folder), and ``exit_code`` (:func:`stop_exit_code`).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown training task {task!r}; choose one of {', '.join(TASKS)}")
    progress = progress or null_progress
    config = load_config(config_path, task, overrides)
    check_for_training(config)
    if max_steps is not None and not (isinstance(max_steps, int) and 1 <= max_steps <= 10 ** 9):
        raise ConfigError(f"max_steps must be a whole number from 1 to 1000000000, not {max_steps!r}")
    out = Path(out_dir or config["run"].get("out_dir") or "")
    if not str(out) or str(out) == ".":
        raise ConfigError("no output folder: give one (--out) or set run.out_dir in the configuration")
    device = device or config["run"].get("device", "auto")
    resolve_device(device if device not in ("", "auto") else config["run"].get("device", "auto"))  # before any work
    from .data import find_scans

    sources = config["data"].get("source") or []
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ConfigError("data.source is empty: list CT files, folders, CSV files or DICOM trees to train on")
    inspect_run_folder(out, task, checkpoint_task)  # a refused folder before the scans are even listed
    if not resume and has_checkpoints(out):
        raise TrainingError(f"{out / 'checkpoints'} already holds checkpoints; resume to continue that run, "
                            "or choose an empty output folder")
    rejected: list = []
    scans = find_scans(sources, rejected=rejected)
    labels = _labels(config, task, scans)  # a scan without its label is refused before the folder is made
    try:
        folder = claim_run_folder(out, task, checkpoint_task)
        return _train_in(folder, task, config, scans, rejected, labels, resume, max_steps, device, progress)
    except WriteError as e:  # the marker, the data cache or skipped.csv could not be written (disk full, read-only)
        raise TrainingError(str(e)) from None


def _train_in(folder, task, config, scans, rejected, labels, resume, max_steps, device, progress) -> dict:
    out = folder.path
    if _rank() == 0:
        # What a killed run left; the shared cache folders only when no other process may be writing there.
        remove_temporaries(out / "model", out, (".model.safetensors.tmp*", ".config.json.tmp*", ".labels.json.tmp*"))
        if _world() <= 1:
            for sub in ("data", "embeddings"):
                remove_temporaries(out / sub, out)
    report = progress if _rank() == 0 else null_progress
    if folder.state == "legacy":
        report(None, f"{out} is a {task} run made before run folders were marked; marked it (ctfm-run.json)")
    if task == "classify":
        task_object, usable, skipped = _classify_task(config, scans, out, report, rejected, labels)
    elif task == "segment":
        task_object, usable, skipped = _segment_task(config, scans, out, report, rejected)
    else:
        from .pretrain import PretrainTask

        p = config["pretrain"]
        usable, skipped, cache = _prepare(config, scans, out, p["spacing"], p["hu_range"], report, rejected=rejected)
        task_object = PretrainTask(config, [cache.get(scan) for scan in usable])
    summary = train(task_object, out, resume=resume, max_steps=max_steps,
                    progress=subrange(progress, 0.1, 1.0), device=device)
    summary["skipped"] = [(s.path, reason) for s, reason in skipped]
    summary["scans"] = len(usable)
    summary["exit_code"] = stop_exit_code(summary)
    return summary


def _cache_folder(config, out) -> Path:
    return Path(config["data"].get("cache_dir") or out / "data")


def _prepare(config, scans, out, spacing, hu_range, report, cache=None, rejected=()):
    """Fill the preprocessed-scan cache; ``(usable scans, [(scan, reason)], cache)``.

    Every process prepares the same cache; its atomic writes make that safe, and after the
    first process has written a scan the others only read it.
    """
    from .data import ScanCache

    if cache is None:
        cache = ScanCache(_cache_folder(config, out), spacing=tuple(spacing), hu_range=tuple(hu_range))
    usable, skipped = cache.prepare(scans, workers=int(config["data"].get("workers", 2)),
                                    progress=subrange(report, 0.0, 0.1), rejected=rejected)
    for scan, reason in skipped:
        report(None, f"skipped {scan.path}: {reason}")
    if not usable:
        raise TrainingError(f"none of the {len(scans)} scans can be used for training "
                            f"(see {Path(cache.folder) / 'skipped.csv'})")
    return usable, skipped, cache


def _labels(config, task, scans) -> dict:
    """Classify: ``{scan key: 0 or 1}`` from the CSV column; segment: every scan must name its label map.
    Raises :class:`ConfigError` naming the first scan without one."""
    labels = {}
    if task == "classify":
        column = config["classify"]["label_column"]
        for scan in scans:
            value = str(scan.label.get(column, "")).strip()
            if value not in ("0", "1"):
                raise ConfigError(f"{scan.path}: classification needs a 0/1 label in the CSV column {column!r} "
                                  f"(classify.label_column), found {value or 'none'}")
            labels[scan.key] = int(value)
    elif task == "segment":
        column = config["segment"]["label_column"]
        unlabelled = [scan.path for scan in scans if not str(scan.label.get(column, "")).strip()]
        if unlabelled:
            raise ConfigError(f"segmentation needs a label map for every scan in the CSV column {column!r} "
                              f"(segment.label_column); {len(unlabelled)} have none, e.g. {unlabelled[0]}")
    return labels


def _classify_task(config, scans, out, report, rejected=(), labels=None):
    """Labelled scans (a CSV column, 0 or 1) -> ClassifyTask with a seeded validation split.

    Scans are cached as :func:`CTFMLib.triage.triage_volume` gives them (HU on the SPL triage grid), the
    same function ``ctfm triage`` runs at inference, so training and inference feed the same input.
    """
    from .classify import ClassifyTask, TriageScanCache

    c = config["classify"]
    labels = labels if labels is not None else _labels(config, "classify", scans)
    cache = TriageScanCache(_cache_folder(config, out), spacing=tuple(c["spacing"]))
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache, rejected=rejected)
    pairs = [(cache.get(s), labels[s.key]) for s in usable]
    training, validation = _split(config, pairs)
    # Probe mode keeps the frozen encoder's embeddings there (keyed by weights and scans, so never stale).
    return ClassifyTask(config, training, validation or None, cache_dir=out / "embeddings"), usable, skipped


def _split(config, items: list) -> tuple:
    """``(training, validation)``: a seeded ``data.val_fraction`` of ``items`` held out."""
    import numpy as np

    order = np.random.default_rng(int(config["run"]["seed"])).permutation(len(items))
    n_val = int(round(float(config["data"].get("val_fraction", 0.0)) * len(items)))
    training = [items[i] for i in order[n_val:]]
    if not training:
        raise ConfigError(f"data.val_fraction leaves no scans to train on ({len(items)} usable)")
    return training, [items[i] for i in order[:n_val]]


def _segment_task(config, scans, out, report, rejected=()):
    """Scans with label maps (CSV column ``segment.label_column``) -> SegmentTask with a seeded validation split."""
    from .segmentation import LabelledScanCache, SegmentTask, resolve_classes

    s = config["segment"]
    column = s["label_column"]
    _labels(config, "segment", scans)
    cache = LabelledScanCache(_cache_folder(config, out), spacing=s["spacing"], label_column=column)
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache, rejected=rejected)
    items = [cache.get(scan) for scan in usable]
    present = sorted({v for item in items for v in item.present})
    try:
        classes = resolve_classes(s["labels"], s["structures"], present)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    report(None, f"learning {len(classes)} structure(s): " + ", ".join(name for _, name in classes[:10])
           + (" ..." if len(classes) > 10 else ""))
    training, validation = _split(config, items)
    try:
        task = SegmentTask(config, classes, training, validation or None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task, usable, skipped
