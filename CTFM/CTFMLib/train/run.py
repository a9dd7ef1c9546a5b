"""One entry point for every training task: configuration -> data -> task -> the training loop.

Used by ``ctfm train`` and by the CTFMTrain Slicer CLI module, single-process or
under ``torchrun`` (every process runs the same call; the loop finds its rank).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..progress import null_progress, subrange
from .config import ConfigError, load_config
from .trainer import TrainingError, train

CHECKPOINT = Path("checkpoints") / "last.pt"  # in the output folder: what --resume continues from

TASKS = ("pretrain", "segment", "classify")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(task: str, config_path=None, out_dir=None, resume: bool = False, max_steps: Optional[int] = None,
        device: Optional[str] = None, progress=None, overrides: Optional[dict] = None) -> dict:
    """Train ``task`` ("pretrain", "segment", "classify") as the configuration file says.

    ``out_dir`` (or the configuration's ``run.out_dir``) receives ``checkpoints/``,
    ``metrics.csv``, ``data/`` (the preprocessed-scan cache, unless ``data.cache_dir``
    says otherwise) and, at the end, ``model/``. Returns the loop's summary, plus
    ``skipped``: the scans left out and why.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown training task {task!r}; choose one of {', '.join(TASKS)}")
    progress = progress or null_progress
    config = load_config(config_path, task, overrides)
    out = Path(out_dir or config["run"].get("out_dir") or "")
    if not str(out) or str(out) == ".":
        raise ConfigError("no output folder: give one (--out) or set run.out_dir in the configuration")
    out.mkdir(parents=True, exist_ok=True)
    device = device or config["run"].get("device", "auto")
    from .data import find_scans

    sources = config["data"].get("source") or []
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ConfigError("data.source is empty: list CT files, folders, CSV files or DICOM trees to train on")
    scans = find_scans(sources)
    report = progress if _rank() == 0 else null_progress
    if task == "classify":
        task_object, usable, skipped = _classify_task(config, scans, out, report)
    elif task == "segment":
        task_object, usable, skipped = _segment_task(config, scans, out, report)
    else:
        from .pretrain import PretrainTask

        p = config["pretrain"]
        usable, skipped, cache = _prepare(config, scans, out, p["spacing"], p["hu_range"], report)
        task_object = PretrainTask(config, [cache.get(scan) for scan in usable])
    summary = train(task_object, out, resume=resume, max_steps=max_steps,
                    progress=subrange(progress, 0.1, 1.0), device=device)
    summary["skipped"] = [(s.path, reason) for s, reason in skipped]
    summary["scans"] = len(usable)
    return summary


def _cache_folder(config, out) -> Path:
    return Path(config["data"].get("cache_dir") or out / "data")


def _prepare(config, scans, out, spacing, hu_range, report, cache=None):
    """Fill the preprocessed-scan cache; ``(usable scans, [(scan, reason)], cache)``.

    Every process prepares the same cache; its atomic writes make that safe, and after the
    first process has written a scan the others only read it.
    """
    from .data import ScanCache

    if cache is None:
        cache = ScanCache(_cache_folder(config, out), spacing=tuple(spacing), hu_range=tuple(hu_range))
    usable, skipped = cache.prepare(scans, workers=int(config["data"].get("workers", 2)),
                                    progress=subrange(report, 0.0, 0.1))
    for scan, reason in skipped:
        report(None, f"skipped {scan.path}: {reason}")
    if not usable:
        raise TrainingError(f"none of the {len(scans)} scans can be used for training "
                            f"(see {Path(cache.folder) / 'skipped.csv'})")
    return usable, skipped, cache


def _classify_task(config, scans, out, report):
    """Labelled scans (a CSV column, 0 or 1) -> ClassifyTask with a seeded validation split.

    Scans are cached as :func:`CTFMLib.triage.triage_volume` gives them (HU on the SPL triage grid), the
    same function ``ctfm triage`` runs at inference, so training and inference feed the same input.
    """
    from .classify import ClassifyTask, TriageScanCache

    c = config["classify"]
    column = c["label_column"]
    labels = {}
    for scan in scans:
        value = str(scan.label.get(column, "")).strip()
        if value not in ("0", "1"):
            raise ConfigError(f"{scan.path}: classification needs a 0/1 label in the CSV column {column!r} "
                              f"(classify.label_column), found {value or 'none'}")
        labels[scan.key] = int(value)
    cache = TriageScanCache(_cache_folder(config, out), spacing=tuple(c["spacing"]))
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache)
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


def _segment_task(config, scans, out, report):
    """Scans with label maps (CSV column ``segment.label_column``) -> SegmentTask with a seeded validation split."""
    from .segmentation import LabelledScanCache, SegmentTask, resolve_classes

    s = config["segment"]
    column = s["label_column"]
    unlabelled = [scan.path for scan in scans if not str(scan.label.get(column, "")).strip()]
    if unlabelled:
        raise ConfigError(f"segmentation needs a label map for every scan in the CSV column {column!r} "
                          f"(segment.label_column); {len(unlabelled)} have none, e.g. {unlabelled[0]}")
    cache = LabelledScanCache(_cache_folder(config, out), spacing=s["spacing"], label_column=column)
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache)
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
