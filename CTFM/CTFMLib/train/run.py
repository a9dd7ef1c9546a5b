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


class NotAvailableYet(TrainingError):
    """A valid request for a task this version cannot train yet."""


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
    if task != "pretrain":
        raise NotAvailableYet(f"training task {task!r} is not implemented yet in this version; "
                              "pretraining is (task 'pretrain')")
    progress = progress or null_progress
    config = load_config(config_path, task, overrides)
    out = Path(out_dir or config["run"].get("out_dir") or "")
    if not str(out) or str(out) == ".":
        raise ConfigError("no output folder: give one (--out) or set run.out_dir in the configuration")
    out.mkdir(parents=True, exist_ok=True)
    device = device or config["run"].get("device", "auto")
    from .data import ScanCache, find_scans
    from .pretrain import PretrainTask

    sources = config["data"].get("source") or []
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ConfigError("data.source is empty: list CT files, folders, CSV files or DICOM trees to train on")
    scans = find_scans(sources)
    p = config["pretrain"]
    cache = ScanCache(config["data"].get("cache_dir") or out / "data", spacing=tuple(p["spacing"]),
                      hu_range=tuple(p["hu_range"]))
    # Every process prepares the same cache; the cache's atomic writes make that safe, and
    # after the first process has written a scan the others only read it.
    report = progress if _rank() == 0 else null_progress
    usable, skipped = cache.prepare(scans, workers=int(config["data"].get("workers", 2)),
                                    progress=subrange(report, 0.0, 0.1))
    for scan, reason in skipped:
        report(None, f"skipped {scan.path}: {reason}")
    if not usable:
        raise TrainingError(f"none of the {len(scans)} scans can be used for training "
                            f"(see {Path(cache.folder) / 'skipped.csv'})")
    volumes = [cache.get(scan) for scan in usable]
    summary = train(PretrainTask(config, volumes), out, resume=resume, max_steps=max_steps,
                    progress=subrange(progress, 0.1, 1.0), device=device)
    summary["skipped"] = [(s.path, reason) for s, reason in skipped]
    summary["scans"] = len(usable)
    return summary
