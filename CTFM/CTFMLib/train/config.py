"""Training configuration: per-task defaults, deep-merged with a JSON (or YAML) file and overrides.

``load_config(path, task, overrides)`` returns a plain nested dict (JSON-serialisable, stored in every
checkpoint). Every key a user gives must exist in ``DEFAULTS[task]``: a typo such as ``optim.learning_rate``
is an error naming the key and the allowed ones, never silently ignored. Values are checked against the
type of their default (a default of ``None`` accepts anything).

Sections shared by all tasks (units in brackets):

- ``data``: ``source`` (list of files / folders / CSV / DICOM trees; relative paths are taken from the
  current folder), ``cache_dir`` (the preprocessed-scan cache; ``None`` = ``data/`` in the run's output
  folder, i.e. ``<--out>/data``, or ``<run.out_dir>/data`` without ``--out``; a relative path is taken from
  the current folder), ``workers`` (preprocessing processes), ``val_fraction`` (0-1), ``allow_non_ct``
  (``false``: scans whose values do not look like a CT in HU, :mod:`CTFMLib.ct_check`, are skipped and
  listed in ``skipped.csv``; ``true`` (``ctfm train --allow-non-ct``): they are trained on).
- ``optim``: ``lr``, ``weight_decay`` (AdamW), ``warmup_steps``, ``max_steps`` [optimizer updates],
  ``grad_clip`` (max gradient norm, ``None`` = off).
- ``run``: ``seed``, ``device`` (auto/cpu/cuda[:N]), ``precision`` (auto/fp32/bf16/fp16; mixed precision on
  CUDA only), ``checkpoint_every``, ``log_every``, ``val_every`` (0 = never) [steps], ``keep_checkpoints``
  (numbered checkpoints kept, 0 = all), ``deterministic``, ``out_dir``, ``scans_per_step`` (global batch:
  scans per update, split evenly over the processes), ``max_memory_gb`` [GB] (what one pretraining step may
  use on the device the network runs on, ``ctfm train --max-memory-gb``; ``None`` = 85 % of the memory
  available, shared by the processes of one machine).
- ``model``: ``init_filters``, ``blocks_down`` (SegResEncoder), ``weights`` (start from these weights: any
  ``weights.load_model`` source, ``None`` = random init).

Pretraining's ``pretrain.projection`` (the projection head's widths, input first) defaults to ``None``:
derived from the encoder as ``[C, C/2, C/4]`` with ``C = model.init_filters * 2**(len(model.blocks_down) - 1)``
(``[512, 256, 128]`` for the published encoder), so changing the encoder needs no second edit. A list given
must start with ``C``.

Pretraining's ``pretrain.micro_batch``: crops per forward pass. ``"auto"`` (default): the most whose estimated
memory (:mod:`.memory`, measured before any scan is read) fits ``run.max_memory_gb``; a number: that many
(refused when it does not fit); ``0`` or ``None``: all the crops of a step at once. The gradient is that of the
whole step either way (the contrastive loss is computed on every crop's projection; see
``PretrainTask.backward``), except that the encoder's batch norms normalise each micro-batch by its own
statistics (and update their running statistics once per micro-batch), so a smaller micro-batch changes
training slightly, as a smaller batch per GPU does under DDP.

Every value is range-checked when the configuration is loaded (see "value checks" below: finite numbers,
spacings in 0.05-50 mm, probabilities in [0, 1], crop sizes that fit a training step's memory, ...), and
so are the keys that go together (:func:`check_for_training`: the projection's input width, crop sizes the
encoder's levels divide). Every problem is collected: one :class:`ConfigError` lists them all (its
``problems``), in one line, before any scan is read or any folder made. :func:`CTFMLib.train.run.run` adds
the data sources (each must exist) and the output folder to that list.

This module imports no torch (the Slicer hub checks configurations with it).
"""

from __future__ import annotations

import copy
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

TASKS = ("pretrain", "segment", "classify")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_SHARED = {
    "data": {"source": [], "cache_dir": None, "workers": 2, "val_fraction": 0.0, "allow_non_ct": False},
    "optim": {"lr": 1e-4, "weight_decay": 1e-6, "warmup_steps": 100, "max_steps": 10000, "grad_clip": None},
    "run": {
        "seed": 0,
        "device": "auto",
        "precision": "auto",
        "checkpoint_every": 100,
        "log_every": 10,
        "val_every": 0,
        "keep_checkpoints": 5,
        "deterministic": False,
        "out_dir": None,
        "scans_per_step": 2,
        "max_memory_gb": None,
    },
    "model": {"init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "weights": None},
}

_PRETRAIN = {
    "crops_per_scan": 15,
    "crop_size": [32, 128, 128],  # voxels, (S, P, L) at `spacing`
    "micro_batch": "auto",  # crops per forward pass: "auto" (the most that fit run.max_memory_gb), N, or 0/null = all
    "temperature": 0.1,
    "projection": None,  # None: [C, C/2, C/4], C the encoder's deepest channel count (512 -> [512, 256, 128])
    "spacing": [3, 1, 1],  # mm, (S, P, L)
    "hu_range": [-1024, 2048],
    "views": {
        "scale": [0.33, 1.0],
        "flip_p": 0.5,
        "hist_shift_p": 0.5,
        "hist_points": 5,
        "smooth_p": 0.5,
        "smooth_sigma": [0.5, 1.0],
    },
}

# Scan-level triage (classify.py): windowed head CT -> one logit. See classify.py for the details.
_CLASSIFY = {
    # "full": everything trains; "frozen": the encoder is fixed (eval-mode batch norm); "probe": logistic
    # regression on the frozen encoder's embeddings, computed once and cached in <out_dir>/embeddings
    "mode": "full",
    "size": [48, 128, 128],  # voxels per window (S, P, L), centre pad/crop; the input is (1, 4*S, P, L)
    "windows": [[0, 80], [-125, 175], [28, 36], [-900, 2100]],  # HU [lo, hi]: blood, subdural, stroke, bone
    "hidden": 256,  # head: Linear(C, hidden) - ReLU - Linear(hidden, 1); 0 (and always in probe mode): Linear(C, 1)
    "flip_p": 0.5,  # probability of a left-right flip of a training sample (not in probe mode: fixed embeddings)
    "val_batch": 4,  # scans per forward pass in validation
    "threshold": 0.5,  # exported when no validation set (or only one class) gives a Youden-optimal one
    "spacing": [5, 2, 2],  # mm (S, P, L) the scans are resampled to, as upstream's triage
    "label_column": "label",  # the CSV column holding 0 (normal) or 1 (abnormal)
}

# Segmentation fine-tuning (segmentation.py): SegResNetDS whose encoder starts from CT-FM, upstream's
# TotalSegmentator recipe. Scans and labels are preprocessed as the segmentation model card runs them
# (SPL, HU -1024..2048 -> 0..1, foreground crop, native spacing unless `spacing`), so the exported model
# runs through CTFMSegment / `ctfm segment` unchanged.
_SEGMENT = {
    "label_column": "segmentation",  # CSV column: the label map of each scan (same grid), relative to the CSV
    "labels": None,  # {value: name} or a labels.json path; None: label_<value>
    "structures": [],  # label names or values to learn, output channels 1..K in this order; []: every labelled value
    "spacing": None,  # mm (S, P, L) to resample to; None: each scan's own spacing, as inference runs by default
    "crop_size": [96, 160, 160],  # voxels (S, P, L); each axis divisible by 2 ** (len(model.blocks_down) - 1)
    "dsdepth": 4,  # decoder levels with an output head (deep supervision)
    "freeze_encoder": False,  # True: only the decoder trains (the encoder keeps its weights and batch statistics)
    "augment": {  # applied to each crop; upstream's (MONAI RandAffine, RandGaussianSmooth, ... with these values)
        "affine_p": 0.2, "rotate": 0.26, "scale": 0.2,  # rotation +-rad per axis, zoom 1 +- scale per axis
        "smooth_p": 0.2, "smooth_sigma": [0.5, 1.0],  # Gaussian smoothing, sigma in voxels
        "intensity_scale_p": 0.5, "intensity_scale": 0.3,  # x * (1 + U(-s, s))
        "intensity_shift_p": 0.5, "intensity_shift": 0.1,  # x + U(-s, s)
        "noise_p": 0.2, "noise_std": 0.1,  # x + N(0, U(0, std))
        "flip_p": 0.0,  # per axis; upstream used none
    },
    "val_overlap": 0.625,  # sliding-window overlap in validation (as inference)
}

DEFAULTS = {
    "pretrain": {"task": "pretrain", **_SHARED, "pretrain": _PRETRAIN},
    # Upstream: AdamW lr 2e-4, weight decay 1e-5; fine-tuning starts from the published CT-FM encoder.
    "segment": {"task": "segment", **_SHARED,
                "optim": {**_SHARED["optim"], "lr": 2e-4, "weight_decay": 1e-5},
                "model": {**_SHARED["model"], "weights": "project-lighter/ct_fm_feature_extractor"},
                "segment": _SEGMENT},
    "classify": {"task": "classify", **_SHARED, "classify": _CLASSIFY},
}


# Keys whose default is a value but that also accept null (random init, no resampling, ...).
_NULLABLE = {"model.weights", "segment.labels", "segment.spacing", "pretrain.micro_batch"}
# Keys that take values of several types (checked by the value checks below).
_ANY_TYPE = {"pretrain.micro_batch"}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says which key and why.

    ``problems``: every problem found (the message lists them all, in one line). From :func:`load_config`:
    ``config``, the configuration as far as it could be merged (a bad value keeps its default), and
    ``bad_keys``, the keys with a problem, so that a caller can go on checking what does not depend on them.
    """

    def __init__(self, message: str = "", problems: Optional[Iterable[str]] = None, config: Optional[dict] = None,
                 bad_keys: Iterable[str] = ()):
        self.problems = [str(p) for p in problems] if problems is not None else [str(message)]
        self.config = config
        self.bad_keys = set(bad_keys)
        super().__init__(message if problems is None else joined_problems(self.problems))

    def concerns(self, *keys: str) -> bool:
        """Whether a problem concerns one of ``keys`` (or a key inside one of them)."""
        return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for key in keys
                   for k in self.bad_keys)


def joined_problems(problems: list) -> str:
    """One line for a list of problems: the problem itself, or ``"3 problems: (1) ...; (2) ...; (3) ..."``."""
    flat = [" ".join(str(p).split()) for p in problems]
    if len(flat) == 1:
        return flat[0]
    return f"{len(flat)} problems: " + "; ".join(f"({n}) {p}" for n, p in enumerate(flat, 1))


class _Problems(list):
    """The problems found so far, and the keys they concern (so that checks built on a bad key are skipped)."""

    def __init__(self):
        super().__init__()
        self.keys: set = set()

    def add(self, key: str, message: str) -> None:
        self.append(message)
        self.keys.add(key)

    @contextmanager
    def check(self, key: str):
        try:
            yield
        except ConfigError as e:
            for problem in e.problems:
                self.add(key, problem)

    def run(self, key: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, or ``None`` with its ConfigError recorded under ``key``."""
        with self.check(key):
            return function(*args, **kwargs)
        return None

    def bad(self, *keys: str) -> bool:
        """Whether a problem concerns one of ``keys`` (or a key inside one of them)."""
        return any(k == key or k.startswith(key + ".") for key in keys for k in self.keys)


def load_config(path: str | Path | None, task: str, overrides: dict | None = None) -> dict:
    """``DEFAULTS[task]`` deep-merged with the file at ``path`` (JSON; YAML when PyYAML imports) and ``overrides``.

    ``overrides`` is nested like the file, or flat with dotted keys (``{"optim.lr": 3e-4}``), or a mix.
    Returns a new dict, every value checked, ``pretrain.projection`` derived when it is ``None``; ``DEFAULTS``
    is never modified. Raises :class:`ConfigError` listing every problem found (unknown keys, wrong types,
    values out of range, keys that do not go together).
    """
    if task not in DEFAULTS:
        raise ConfigError(f"unknown training task {task!r}; choose one of: {', '.join(TASKS)}")
    config = copy.deepcopy(DEFAULTS[task])
    problems = _Problems()
    if path is not None:
        _merge(config, _read(Path(path)), "", str(path), problems)
    if overrides:
        _merge(config, _undot(overrides), "", "overrides", problems)
    if config["task"] != task:
        problems.add("task", f"the configuration is for task {config['task']!r} but {task!r} was requested; "
                             "remove the `task` key or use the matching task")
        config["task"] = task
    _check_values(config, problems)
    _check_together(config, problems)
    if problems:
        raise ConfigError(problems=problems, config=config, bad_keys=problems.keys)
    return config


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed; install it (pip install pyyaml) "
                              "or write the configuration as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (e.g. {{\"optim\": {{\"lr\": 1e-4}}}}), "
                          f"not a {type(data).__name__}")
    return data


def _undot(overrides: dict) -> dict:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``; nested dicts are kept (and their keys undotted too)."""
    out: dict = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {part!r}")
        if isinstance(value, dict):
            value = _undot(value)
            if isinstance(node.get(parts[-1]), dict):
                _deep_update(node[parts[-1]], value)
                continue
        node[parts[-1]] = value
    return out


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _merge(base: dict, new: dict, prefix: str, source: str, problems: Optional[_Problems] = None) -> None:
    """Merge ``new`` into ``base``; every unknown key and wrong type goes to ``problems`` (raised at once
    without it) and leaves the default in place."""
    own = problems is None
    problems = _Problems() if own else problems
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in base:
            allowed = ", ".join(f"{prefix}{k}" for k in base)
            problems.add(name, f"unknown configuration key {name!r} in {source}; allowed here: {allowed}")
            continue
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                problems.add(name, f"{name!r} in {source} must be a section (mapping) with keys "
                                   f"{', '.join(default)}, not {value!r}")
                continue
            _merge(default, value, name + ".", source, problems)
        else:
            with problems.check(name):
                base[key] = _coerce(default, value, name, source)
    if own and problems:
        raise ConfigError(problems=problems)


def _coerce(default: Any, value: Any, name: str, source: str) -> Any:
    """``value`` checked against the type of ``default`` (``None`` defaults accept anything)."""
    if default is None or (value is None and name in _NULLABLE) or name in _ANY_TYPE:
        return value
    if name == "data.source" and isinstance(value, str):
        return [value]  # one path is a natural thing to write

    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{name!r} in {source} must be {kind}, not {value!r} (default {default!r})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(float(value)):  # JSON's Infinity / NaN and 1e309 parse as floats
            raise bad("a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return list(value)
    return value




# --- value checks ------------------------------------------------------------------------------
#
# Every value is checked here, when the configuration is loaded, so that a wrong one is a one-line
# ConfigError before any scan is read or any folder is made.
#
# Crop limits. A crop edge below MIN_CROP_EDGE voxels leaves nothing for the encoder's downsampling
# levels to see; above MAX_CROP_EDGE it is wider than any CT (512 mm at 0.5 mm voxels). The voxel count
# of one crop is limited to MAX_CROP_VOXELS (2**24, e.g. 256 x 256 x 256): the encoder keeps about
# 11 x init_filters float32 values per input voxel for the backward pass (the first level's convolution,
# norm and activation maps at full resolution, then a quarter as much per level), so one crop of 2**24
# voxels already needs ~24 GB with the published 32 filters, and beyond it not even one crop fits on an
# accelerator. The input array of one step (scans x views x crops x voxels x 4 bytes), which is allocated
# before the network runs, is limited to MAX_STEP_INPUT_BYTES. [4000, 4000, 4000] (6.4e10 voxels, a
# 238 GiB array for ONE crop) is refused by both.

SPACING_RANGE_MM = (0.05, 50.0)  # a voxel edge outside this is no CT (as CTFMLib.image's geometry checks)
MIN_CROP_EDGE, MAX_CROP_EDGE = 8, 1024
MAX_CROP_VOXELS = 2 ** 24
MAX_STEP_INPUT_BYTES = 16 * 2 ** 30
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding takes 32 bits
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value, name: str, low=None, high=None, low_open=False, high_open=False, integer=False, what=""):
    """``value`` as a finite int/float inside the bounds, else a ConfigError naming the key."""
    kind = "a whole number" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (low is None or (value > low if low_open else value >= low)) and \
             (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        limit = f" {' and '.join(bounds)}" if bounds else ""
        raise ConfigError(f"{name} must be {what or kind}{limit}, not {_shown(value)}")
    return int(value) if integer else float(value)


def _numbers(value, name: str, count: int | None, low=None, high=None, low_open=False, integer=False) -> list:
    if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count) or not value:
        size = f"{count} " if count else ""
        raise ConfigError(f"{name} must be a list of {size}{'whole numbers' if integer else 'numbers'}, "
                          f"not {_shown(value)}")
    return [_number(v, f"{name} item {i + 1}", low, high, low_open=low_open, integer=integer)
            for i, v in enumerate(value)]


def _probability(value, name: str) -> float:
    return _number(value, name, 0.0, 1.0, what="a probability")


def _range_pair(value, name: str, low=None, high=None, low_open=False) -> list:
    """``[lo, hi]`` with ``lo <= hi`` inside the bounds."""
    pair = _numbers(value, name, 2, low, high, low_open=low_open)
    if pair[0] > pair[1]:
        raise ConfigError(f"{name} must be [low, high] with low <= high, not {_shown(value)}")
    return pair


def _text(value, name: str, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty text{' or null' if nullable else ''}, not {_shown(value)}")


def _spacing(value, name: str, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    lo, hi = SPACING_RANGE_MM
    _numbers(value, name, 3, lo, hi)


def _crop(value, name: str) -> int:
    """Voxel count of a checked ``[D, H, W]`` crop."""
    size = _numbers(value, name, 3, MIN_CROP_EDGE, MAX_CROP_EDGE, integer=True)
    voxels = size[0] * size[1] * size[2]
    if voxels > MAX_CROP_VOXELS:
        raise ConfigError(f"{name} {size} is {voxels} voxels; at most {MAX_CROP_VOXELS} (2**24, e.g. "
                          f"[256, 256, 256]) fit the memory of one training step: use smaller crops")
    return voxels


def _step_input(n_crops: int, voxels: int, name: str) -> None:
    size = n_crops * voxels * 4
    if size > MAX_STEP_INPUT_BYTES:
        raise ConfigError(f"one training step would take {size / 2 ** 30:.1f} GiB of input ({name}), more than "
                          f"{MAX_STEP_INPUT_BYTES // 2 ** 30} GiB: lower run.scans_per_step or the crop size")


def _check_values(config: dict, p: Optional[_Problems] = None) -> None:
    """Every value of every section within its range (called by :func:`load_config`); each problem goes to
    ``p`` (without it, ConfigError listing them is raised)."""
    own = p is None
    p = _Problems() if own else p
    data, optim, run, model = config["data"], config["optim"], config["run"], config["model"]
    sources = data["source"]
    if not isinstance(sources, list) or not all(isinstance(s, str) and s.strip() for s in sources):
        p.add("data.source", f"data.source must be a list of paths (text), not {_shown(sources)}")
    p.run("data.cache_dir", _text, data["cache_dir"], "data.cache_dir", nullable=True)
    p.run("data.workers", _number, data["workers"], "data.workers", 0, 256, integer=True)
    p.run("data.val_fraction", _number, data["val_fraction"], "data.val_fraction", 0.0, 1.0, high_open=True,
          what="a fraction (of the scans held out for validation)")

    p.run("optim.lr", _number, optim["lr"], "optim.lr", 0.0, low_open=True)
    p.run("optim.weight_decay", _number, optim["weight_decay"], "optim.weight_decay", 0.0)
    p.run("optim.warmup_steps", _number, optim["warmup_steps"], "optim.warmup_steps", 0, integer=True)
    p.run("optim.max_steps", _number, optim["max_steps"], "optim.max_steps", 1, 10 ** 9, integer=True)
    if optim["grad_clip"] is not None:
        p.run("optim.grad_clip", _number, optim["grad_clip"], "optim.grad_clip", 0.0, low_open=True,
              what="a positive number (the largest gradient norm) or null (no clipping),")

    p.run("run.seed", _number, run["seed"], "run.seed", 0, MAX_SEED, integer=True)
    if not isinstance(run["device"], str) or not _DEVICE.match(run["device"].strip().lower()):
        p.add("run.device", f"run.device must be auto, cpu, mps, cuda or cuda:N, not {_shown(run['device'])}")
    if run["precision"] not in PRECISIONS:
        p.add("run.precision",
              f"run.precision must be one of {', '.join(PRECISIONS)}, not {_shown(run['precision'])}")
    p.run("run.checkpoint_every", _number, run["checkpoint_every"], "run.checkpoint_every", 1, integer=True)
    p.run("run.log_every", _number, run["log_every"], "run.log_every", 1, integer=True)
    p.run("run.val_every", _number, run["val_every"], "run.val_every", 0, integer=True,
          what="a whole number (0 = no validation)")
    p.run("run.keep_checkpoints", _number, run["keep_checkpoints"], "run.keep_checkpoints", 0, integer=True,
          what="a whole number (0 = keep all)")
    p.run("run.out_dir", _text, run["out_dir"], "run.out_dir", nullable=True)
    p.run("run.scans_per_step", _number, run["scans_per_step"], "run.scans_per_step", 1, 4096, integer=True)
    if run.get("max_memory_gb") is not None:
        p.run("run.max_memory_gb", _number, run["max_memory_gb"], "run.max_memory_gb", 0.0, 1e6, low_open=True,
              what="a number of GB (the memory a pretraining step may use) or null (85 % of what is available),")

    p.run("model.init_filters", _number, model["init_filters"], "model.init_filters", 1, 128, integer=True)
    blocks = model["blocks_down"]
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        p.add("model.blocks_down", f"model.blocks_down must be a list of 1 to 8 block counts (one per level), "
                                   f"not {_shown(blocks)}")
    else:
        p.run("model.blocks_down", _numbers, blocks, "model.blocks_down", None, 1, 64, integer=True)
    p.run("model.weights", _text, model["weights"], "model.weights", nullable=True)

    task = config["task"]
    scans_per_step = run["scans_per_step"] if not p.bad("run.scans_per_step") else 1
    if task == "pretrain":
        _check_pretrain(config["pretrain"], scans_per_step, p)
    elif task == "segment":
        _check_segment(config["segment"], scans_per_step, p)
    elif task == "classify":
        _check_classify(config["classify"], scans_per_step, p)
    if own and p:
        raise ConfigError(problems=p)


def _check_pretrain(pre: dict, scans_per_step: int, p: _Problems) -> None:
    crops = p.run("pretrain.crops_per_scan", _number, pre["crops_per_scan"], "pretrain.crops_per_scan", 2, 1024,
                  integer=True, what="a whole number (the crops of a scan are each other's negatives)")
    voxels = p.run("pretrain.crop_size", _crop, pre["crop_size"], "pretrain.crop_size")
    micro = pre.get("micro_batch", "auto")
    if micro != "auto" and micro is not None:
        p.run("pretrain.micro_batch", _number, micro, "pretrain.micro_batch", 0, 1 << 20, integer=True,
              what="'auto', null or a whole number of crops per forward pass (0 = all at once)")
    if crops is not None and voxels is not None:
        p.run("pretrain.crop_size", _step_input, scans_per_step * 2 * crops, voxels,
              "run.scans_per_step x 2 views x pretrain.crops_per_scan x pretrain.crop_size float32 voxels")
    p.run("pretrain.temperature", _number, pre["temperature"], "pretrain.temperature", 0.0, 100.0, low_open=True)
    projection = pre["projection"]
    if projection is not None:
        if not isinstance(projection, list) or len(projection) < 2:
            p.add("pretrain.projection", f"pretrain.projection must be null (derived from the encoder) or a list of "
                                         f"at least [input, output] sizes, not {_shown(projection)}")
        else:
            p.run("pretrain.projection", _numbers, projection, "pretrain.projection", None, 1, 65536, integer=True)
    p.run("pretrain.spacing", _spacing, pre["spacing"], "pretrain.spacing")
    with p.check("pretrain.hu_range"):
        low, high = _numbers(pre["hu_range"], "pretrain.hu_range", 2)
        if not low < high:
            raise ConfigError(f"pretrain.hu_range must be [low, high] HU with low < high (they are scaled to 0..1), "
                              f"not {_shown(pre['hu_range'])}")
    v = pre["views"]
    p.run("pretrain.views.scale", _range_pair, v["scale"], "pretrain.views.scale", 0.0, 1.0, low_open=True)
    for key in ("flip_p", "hist_shift_p", "smooth_p"):
        p.run(f"pretrain.views.{key}", _probability, v[key], f"pretrain.views.{key}")
    p.run("pretrain.views.hist_points", _number, v["hist_points"], "pretrain.views.hist_points", 3, 256, integer=True)
    p.run("pretrain.views.smooth_sigma", _range_pair, v["smooth_sigma"], "pretrain.views.smooth_sigma", 0.0, 32.0,
          low_open=True)


def _check_segment(s: dict, scans_per_step: int, p: _Problems) -> None:
    p.run("segment.label_column", _text, s["label_column"], "segment.label_column")
    labels = s["labels"]
    if labels is not None and not (isinstance(labels, str) and labels.strip()) and not isinstance(labels, dict):
        p.add("segment.labels", f"segment.labels must be null, a labels.json path, 'totalsegmentator' or a mapping "
                                f"{{value: name}}, not {_shown(labels)}")
    if isinstance(labels, dict):
        for value, name in labels.items():
            try:
                number = int(str(value).strip())
            except ValueError:
                number = -1
            if not 0 <= number <= 65535 or not isinstance(name, str) or not name.strip():
                p.add("segment.labels", f"segment.labels must map label values 0..65535 to names, not "
                                        f"{_shown(value)}: {_shown(name)}")
                break
    structures = s["structures"]
    if not all((isinstance(v, str) and v.strip()) or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
               for v in structures):
        p.add("segment.structures", f"segment.structures must list label names or values, not {_shown(structures)}")
    p.run("segment.spacing", _spacing, s["spacing"], "segment.spacing", nullable=True)
    voxels = p.run("segment.crop_size", _crop, s["crop_size"], "segment.crop_size")
    if voxels is not None:
        p.run("segment.crop_size", _step_input, scans_per_step, voxels,
              "run.scans_per_step x segment.crop_size float32 voxels")
    p.run("segment.dsdepth", _number, s["dsdepth"], "segment.dsdepth", 1, 8, integer=True)
    a = s["augment"]
    for key in ("affine_p", "smooth_p", "intensity_scale_p", "intensity_shift_p", "noise_p", "flip_p"):
        p.run(f"segment.augment.{key}", _probability, a[key], f"segment.augment.{key}")
    p.run("segment.augment.rotate", _number, a["rotate"], "segment.augment.rotate", 0.0, math.pi,
          what="an angle in radians")
    p.run("segment.augment.scale", _number, a["scale"], "segment.augment.scale", 0.0, 1.0, high_open=True)
    p.run("segment.augment.smooth_sigma", _range_pair, a["smooth_sigma"], "segment.augment.smooth_sigma", 0.0, 32.0,
          low_open=True)
    for key in ("intensity_scale", "intensity_shift", "noise_std"):
        p.run(f"segment.augment.{key}", _number, a[key], f"segment.augment.{key}", 0.0, 1.0)
    p.run("segment.val_overlap", _number, s["val_overlap"], "segment.val_overlap", 0.0, 1.0, high_open=True)


def _check_classify(c: dict, scans_per_step: int, p: _Problems) -> None:
    if c["mode"] not in ("full", "frozen", "probe"):
        p.add("classify.mode", f"classify.mode must be full, frozen or probe, not {_shown(c['mode'])}")
    voxels = p.run("classify.size", _crop, c["size"], "classify.size")
    windows = c["windows"]
    if not isinstance(windows, list) or not 1 <= len(windows) <= 16:
        p.add("classify.windows",
              f"classify.windows must be a list of 1 to 16 [low, high] HU windows, not {_shown(windows)}")
    else:
        for i, window in enumerate(windows):
            with p.check("classify.windows"):
                low, high = _numbers(window, f"classify.windows item {i + 1}", 2)
                if not low < high:
                    raise ConfigError(f"classify.windows item {i + 1} must be [low, high] HU with low < high, "
                                      f"not {_shown(window)}")
        if voxels is not None:
            p.run("classify.size", _step_input, scans_per_step * len(windows), voxels,
                  "run.scans_per_step x classify.windows x classify.size float32 voxels")
    p.run("classify.hidden", _number, c["hidden"], "classify.hidden", 0, 65536, integer=True,
          what="a whole number (0 = a linear head)")
    p.run("classify.flip_p", _probability, c["flip_p"], "classify.flip_p")
    p.run("classify.val_batch", _number, c["val_batch"], "classify.val_batch", 1, 4096, integer=True)
    p.run("classify.threshold", _number, c["threshold"], "classify.threshold", 0.0, 1.0, low_open=True,
          high_open=True)
    p.run("classify.spacing", _spacing, c["spacing"], "classify.spacing")
    p.run("classify.label_column", _text, c["label_column"], "classify.label_column")


def deepest_channels(model: dict) -> int:
    """The encoder's deepest channel count, its embedding width: ``init_filters * 2**(levels - 1)``."""
    return int(model["init_filters"]) * 2 ** (len(model["blocks_down"]) - 1)


def derived_projection(model: dict) -> list:
    """``pretrain.projection`` when it is ``None``: ``[C, C/2, C/4]`` for the encoder's deepest width ``C``
    (``[512, 256, 128]``, upstream's head, for the published encoder)."""
    deepest = deepest_channels(model)
    return [deepest, max(deepest // 2, 1), max(deepest // 4, 1)]


def _check_together(config: dict, p: _Problems) -> None:
    """The keys that go together, each check only when the keys it reads are valid on their own; a ``None``
    ``pretrain.projection`` is filled in (:func:`derived_projection`)."""
    if p.bad("model.init_filters", "model.blocks_down"):
        return
    model = config["model"]
    levels = len(model["blocks_down"])
    deepest = deepest_channels(model)
    if config["task"] == "pretrain":
        pre = config["pretrain"]
        if pre["projection"] is None:
            pre["projection"] = derived_projection(model)
        elif not p.bad("pretrain.projection") and int(pre["projection"][0]) != deepest:
            example = derived_projection(model)
            p.add("pretrain.projection",
                  f"pretrain.projection {pre['projection']} must start with the encoder's deepest channel count "
                  f"{deepest} (model.init_filters {model['init_filters']} * 2**(len(model.blocks_down) - 1)); e.g. "
                  f"{example}, or null to derive it from the encoder")
    elif config["task"] == "segment":
        s = config["segment"]
        factor = 2 ** (levels - 1)
        if not p.bad("segment.crop_size") and any(int(v) % factor for v in s["crop_size"]):
            p.add("segment.crop_size", f"segment.crop_size {s['crop_size']} must be three sizes divisible by {factor} "
                                       f"(2 ** (levels - 1) of model.blocks_down {model['blocks_down']})")
        if not p.bad("segment.dsdepth") and not int(s["dsdepth"]) <= levels - 1:
            p.add("segment.dsdepth", f"segment.dsdepth must be 1..{levels - 1} (the decoder levels of "
                                     f"model.blocks_down {model['blocks_down']}), not {s['dsdepth']}")


def check_for_training(config: dict) -> None:
    """The checks that tie keys together (:func:`load_config` runs them too); raises ConfigError listing them.

    For a configuration built without :func:`load_config`: a projection that does not fit the encoder or
    a crop the network cannot take is refused at once, not after the data are prepared; a ``None``
    projection is derived.
    """
    p = _Problems()
    _check_together(config, p)
    if p:
        raise ConfigError(problems=p)
