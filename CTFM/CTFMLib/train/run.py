"""One entry point for every training task: configuration -> data -> task -> the training loop.

Used by ``ctfm train`` and by the CTFMTrain Slicer CLI module, single-process or
under ``torchrun`` (every process runs the same call; the loop finds its rank).

Order, so that nothing is written for a run that is refused: the configuration (every key and value, and
the keys that go together), ``max_steps``, the device, every data source (each must exist) and the output
folder (:mod:`.runfolder`: new, empty, or a run of the same task; without ``resume`` it may not hold
checkpoints) are checked together, and every problem found is refused at once, in one
:class:`~.config.ConfigError` that lists them all. Pretraining then estimates the memory of a step and
picks its micro-batch (:mod:`.memory`), or is refused there in a second or two. Then the scans are listed
(a CSV row naming a missing file is refused here, before any preprocessing); only then is the folder
created and marked, and the data prepared.

The preprocessed-scan cache is ``data/`` in the output folder (``--out``, else ``run.out_dir``), unless
``data.cache_dir`` names another folder: it belongs to the run (deleting the run deletes it; ``--resume``
and a new run into the same folder reuse it), and training writes nowhere but the folder it was given.

A run that fails before its first checkpoint in a folder it created (or found empty) leaves nothing
behind: the folder is removed again (an empty folder it found stays, empty), unless scans were already
preprocessed into its ``data/``, which are kept (with the marker) so that running again does not redo
them. (Single-process runs: under ``torchrun`` other processes may still be writing, and the folder stays.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..files import FileSafetyError, WriteError, remove_tree
from ..progress import null_progress, subrange
from .config import ConfigError, check_for_training, load_config
from .runfolder import MARKER, claim_run_folder, has_checkpoints, inspect_run_folder, remove_temporaries
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
        device: Optional[str] = None, progress=None, overrides: Optional[dict] = None,
        allow_non_ct: bool = False, max_memory_gb: Optional[float] = None) -> dict:
    """Train ``task`` ("pretrain", "segment", "classify") as the configuration file says.

    ``out_dir`` (or the configuration's ``run.out_dir``) receives ``ctfm-run.json`` (the marker),
    ``checkpoints/``, ``metrics.csv``, ``data/`` (the preprocessed-scan cache, unless ``data.cache_dir``
    says otherwise) and, at the end, ``model/``; it must be new, empty or a run of the same task
    (:mod:`.runfolder`). ``allow_non_ct`` (``ctfm train --allow-non-ct``) sets ``data.allow_non_ct``: scans
    whose values do not look like a CT in HU are trained on instead of skipped. ``max_memory_gb``
    (``ctfm train --max-memory-gb``) sets ``run.max_memory_gb``: pretraining picks its micro-batch to fit it,
    or is refused (:class:`~.memory.PretrainMemoryError`) before any scan is read. Returns the loop's summary,
    plus ``skipped``: the scans left out and why (also in ``skipped.csv`` of the cache folder), ``non_ct``:
    the scans used although they do not look like CT, ``exit_code`` (:func:`stop_exit_code`) and, for
    pretraining, ``micro_batch`` (crops per forward pass) and ``memory`` (the estimate, bytes).
    Raises :class:`ConfigError` listing every problem of the configuration, the sources and the folder.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown training task {task!r}; choose one of {', '.join(TASKS)}")
    progress = progress or null_progress
    if allow_non_ct:
        overrides = {**(overrides or {}), "data.allow_non_ct": True}
    if max_memory_gb is not None:
        if task != "pretrain":  # only pretraining plans its memory; a budget nothing honours is refused
            raise ConfigError(f"--max-memory-gb applies to ctfm train pretrain (its micro-batches); ctfm train "
                              f"{task} has no memory plan: leave it out")
        overrides = {**(overrides or {}), "run.max_memory_gb": max_memory_gb}
    problems: list = []
    config, partial, failed = None, None, None
    try:
        config = partial = load_config(config_path, task, overrides)
        check_for_training(config)  # load_config checked these; kept for configurations changed since
    except ConfigError as e:
        problems.extend(e.problems)
        config, partial, failed = None, e.config or partial, e

    def usable(key: str) -> bool:  # a key of the (partly) merged configuration that has no problem itself
        return partial is not None and (failed is None or not failed.concerns(key))

    if max_steps is not None and not (isinstance(max_steps, int) and 1 <= max_steps <= 10 ** 9):
        problems.append(f"max_steps must be a whole number from 1 to 1000000000, not {max_steps!r}")
    named = out_dir or (partial["run"].get("out_dir") if usable("run.out_dir") else None)
    out = Path(named) if named and str(named) != "." else None
    if out is None and (out_dir or usable("run.out_dir")):
        problems.append("no output folder: give one (--out) or set run.out_dir in the configuration")
    if device or usable("run.device"):
        device = device or partial["run"].get("device", "auto")
        try:
            resolve_device(device if device not in ("", "auto") else
                           (partial["run"].get("device", "auto") if usable("run.device") else "auto"))
        except TrainingError as e:
            problems.append(str(e))
    if usable("data.source"):
        problems.extend(_source_problems(partial["data"].get("source") or []))
    if out is not None:
        try:
            inspect_run_folder(out, task, checkpoint_task)  # a refused folder before the scans are even listed
            if not resume and has_checkpoints(out):
                problems.append(f"{out / 'checkpoints'} already holds checkpoints; resume to continue that run, "
                                "or choose an empty output folder")
        except FileSafetyError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems=problems)
    plan = None
    if task == "pretrain":  # the memory a step needs, before any scan is listed or read (PretrainMemoryError)
        from .memory import plan_micro_batch

        plan = plan_micro_batch(config, world=_world(), device=str(resolve_device(
            device if device not in (None, "", "auto") else config["run"].get("device", "auto"))))
        if _rank() == 0:
            progress(None, plan.describe())
    from .data import find_scans

    rejected: list = []
    # DataError naming every CSV row whose file is missing, before any preprocessing
    scans = find_scans(config["data"]["source"], rejected=rejected)
    labels = _labels(config, task, scans)  # a scan without its label is refused before the folder is made
    made = [p for p in [out, *out.parents] if not os.path.lexists(p)]  # the folders claiming creates
    try:
        folder = claim_run_folder(out, task, checkpoint_task)
    except WriteError as e:  # the marker could not be written (disk full, read-only)
        raise TrainingError(str(e)) from None
    try:
        try:
            return _train_in(folder, task, config, scans, rejected, labels, resume, max_steps, device, progress,
                             plan)
        except WriteError as e:  # the data cache or skipped.csv could not be written (disk full, read-only)
            raise TrainingError(str(e)) from None
    except BaseException:
        if folder.state in ("new", "empty") and _rank() == 0 and _world() <= 1:
            _undo_unused_run(folder.path, made, progress)
        raise


def _source_problems(sources) -> list:
    """The problems of ``data.source`` found without listing any folder: empty, or paths that do not exist."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        return ["data.source is empty: list CT files, folders, CSV files or DICOM trees to train on"]
    missing = [str(s) for s in sources if not os.path.lexists(Path(str(s)).expanduser())]
    if not missing:
        return []
    shown = "; ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return [f"data.source: {len(missing)} of {len(sources)} path(s) do not exist: {shown} (relative paths are "
            f"taken from the current folder, {Path.cwd()})"]


# What a run writes into its folder (runfolder's module docstring); a failed fresh run removes these again.
_RUN_ENTRIES = (MARKER, "data", "embeddings", "checkpoints", "tensorboard", "model", "config.json", "metrics.csv")


def _undo_unused_run(path: Path, made: list, progress) -> None:
    """After a failure before any checkpoint, in a folder this run created or found empty: remove what the
    run wrote, and the folders it created. Scans already preprocessed into ``data/`` are kept, with the
    marker (so that the next run into the folder reuses them, and the folder is known as a run); the rest
    goes. Never raises: the failure is what the user must see."""
    try:
        if has_checkpoints(path):
            return
        data = path / "data"
        prepared = len(list(data.glob("*.npy"))) if data.is_dir() else 0
        keep = {MARKER, "data"} if prepared else set()
        for name in _RUN_ENTRIES:
            entry = path / name
            if name not in keep and os.path.lexists(entry):
                remove_tree(entry, path, "run entry")
        remove_temporaries(path, path)
        if prepared:
            progress(None, f"kept the {prepared} preprocessed scan file(s) in {data}: a new run into {path} "
                           "reuses them")
            return
        for folder in made:  # innermost first; only the folders this run made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
    except OSError:  # a folder that cannot be cleaned stays as it is
        pass


def _train_in(folder, task, config, scans, rejected, labels, resume, max_steps, device, progress, plan=None) -> dict:
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
    non_ct: list = []
    if task == "classify":
        task_object, usable, skipped = classify_task(config, scans, out, report, rejected, labels, non_ct)
    elif task == "segment":
        task_object, usable, skipped = _segment_task(config, scans, out, report, rejected, non_ct)
    else:
        from .pretrain import PretrainTask

        p = config["pretrain"]
        usable, skipped, cache = _prepare(config, scans, out, p["spacing"], p["hu_range"], report, rejected=rejected,
                                          used_non_ct=non_ct)
        task_object = PretrainTask(config, [cache.get(scan) for scan in usable],
                                   micro_batch=plan.micro_batch if plan is not None else None)
    summary = train(task_object, out, resume=resume, max_steps=max_steps,
                    progress=subrange(progress, 0.1, 1.0), device=device)
    summary["skipped"] = [(s.path, reason) for s, reason in skipped]
    summary["scans"] = len(usable)
    summary["non_ct"] = non_ct
    summary["exit_code"] = stop_exit_code(summary)
    if plan is not None:
        summary["micro_batch"] = plan.micro_batch
        summary["memory"] = plan.as_dict()
    return summary


def _cache_folder(config, out) -> Path:
    return Path(config["data"].get("cache_dir") or out / "data")


def _prepare(config, scans, out, spacing, hu_range, report, cache=None, rejected=(), used_non_ct=None):
    """Fill the preprocessed-scan cache; ``(usable scans, [(scan, reason)], cache)``. ``used_non_ct`` receives
    ``(path, reason)`` of the usable scans that do not look like CT (only with ``data.allow_non_ct``).

    Every process prepares the same cache; its atomic writes make that safe, and after the
    first process has written a scan the others only read it.
    """
    from .data import ScanCache

    used_non_ct = [] if used_non_ct is None else used_non_ct
    if cache is None:
        cache = ScanCache(_cache_folder(config, out), spacing=tuple(spacing), hu_range=tuple(hu_range),
                          allow_non_ct=bool(config["data"].get("allow_non_ct", False)))
    usable, skipped = cache.prepare(scans, workers=int(config["data"].get("workers", 2)),
                                    progress=subrange(report, 0.0, 0.1), rejected=rejected)
    for scan, reason in skipped:
        report(None, f"skipped {scan.path}: {reason}")
    non_ct = [(scan, cache.non_ct_reason(scan)) for scan in usable]
    non_ct = [(scan, reason) for scan, reason in non_ct if reason]
    for scan, reason in non_ct:
        report(None, f"warning: training on {scan.path} although it is {reason} (data.allow_non_ct)")
    if not usable:
        listed = "; ".join(f"{Path(scan.path).name}: {reason}" for scan, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        where = Path(cache.folder)
        kept = "" if _inside(where, out) else f" (all listed in {where / 'skipped.csv'})"
        hint = (" (ctfm train --allow-non-ct, or data.allow_non_ct, trains on scans that do not look like CT)"
                if any("not CT-like" in str(reason) for _, reason in skipped) else "")
        raise TrainingError(f"none of the {len(scans)} scans can be used for training: {listed}{more}{kept}{hint}")
    used_non_ct.extend((scan.path, reason) for scan, reason in non_ct)
    return usable, skipped, cache


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        return True
    except ValueError:
        return False


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


def classify_task(config, scans, out, report, rejected=(), labels=None, used_non_ct=None):
    """Labelled scans (a CSV column, 0 or 1) -> ClassifyTask with a seeded validation split.

    Scans are cached as :func:`CTFMLib.triage.triage_volume` gives them (HU on the SPL triage grid), the
    same function ``ctfm triage`` runs at inference, so training and inference feed the same input.
    """
    from .classify import ClassifyTask, TriageScanCache

    c = config["classify"]
    labels = labels if labels is not None else _labels(config, "classify", scans)
    cache = TriageScanCache(_cache_folder(config, out), spacing=tuple(c["spacing"]),
                            allow_non_ct=bool(config["data"].get("allow_non_ct", False)))
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache, rejected=rejected,
                                      used_non_ct=used_non_ct)
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


def _segment_task(config, scans, out, report, rejected=(), used_non_ct=None):
    """Scans with label maps (CSV column ``segment.label_column``) -> SegmentTask with a seeded validation split."""
    from .segmentation import LabelledScanCache, SegmentTask, resolve_classes

    s = config["segment"]
    column = s["label_column"]
    _labels(config, "segment", scans)
    cache = LabelledScanCache(_cache_folder(config, out), spacing=s["spacing"], label_column=column,
                              allow_non_ct=bool(config["data"].get("allow_non_ct", False)))
    usable, skipped, cache = _prepare(config, scans, out, None, None, report, cache=cache, rejected=rejected,
                                      used_non_ct=used_non_ct)
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
