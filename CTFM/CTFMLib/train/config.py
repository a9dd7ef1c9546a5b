"""Training configuration: per-task defaults, deep-merged with a JSON (or YAML) file and overrides.

``load_config(path, task, overrides)`` returns a plain nested dict (JSON-serialisable, stored in every
checkpoint). Every key a user gives must exist in ``DEFAULTS[task]``: a typo such as ``optim.learning_rate``
is an error naming the key and the allowed ones, never silently ignored. Values are checked against the
type of their default (a default of ``None`` accepts anything).

Sections shared by all tasks (units in brackets):

- ``data``: ``source`` (list of files / folders / CSV / DICOM trees), ``cache_dir`` (preprocessed-scan cache,
  ``None`` = ``<out_dir>/cache``), ``workers`` (preprocessing processes), ``val_fraction`` (0-1).
- ``optim``: ``lr``, ``weight_decay`` (AdamW), ``warmup_steps``, ``max_steps`` [optimizer updates],
  ``grad_clip`` (max gradient norm, ``None`` = off).
- ``run``: ``seed``, ``device`` (auto/cpu/cuda[:N]), ``precision`` (auto/fp32/bf16/fp16; mixed precision on
  CUDA only), ``checkpoint_every``, ``log_every``, ``val_every`` (0 = never) [steps], ``keep_checkpoints``
  (numbered checkpoints kept, 0 = all), ``deterministic``, ``out_dir``, ``scans_per_step`` (global batch:
  scans per update, split evenly over the processes).
- ``model``: ``init_filters``, ``blocks_down`` (SegResEncoder), ``weights`` (start from these weights: any
  ``weights.load_model`` source, ``None`` = random init).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

TASKS = ("pretrain", "segment", "classify")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_SHARED = {
    "data": {"source": [], "cache_dir": None, "workers": 2, "val_fraction": 0.0},
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
    },
    "model": {"init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "weights": None},
}

_PRETRAIN = {
    "crops_per_scan": 15,
    "crop_size": [32, 128, 128],  # voxels, (S, P, L) at `spacing`
    "temperature": 0.1,
    "projection": [512, 256, 128],
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
_NULLABLE = {"model.weights", "segment.labels", "segment.spacing"}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""


def load_config(path: str | Path | None, task: str, overrides: dict | None = None) -> dict:
    """``DEFAULTS[task]`` deep-merged with the file at ``path`` (JSON; YAML when PyYAML imports) and ``overrides``.

    ``overrides`` is nested like the file, or flat with dotted keys (``{"optim.lr": 3e-4}``), or a mix.
    Returns a new dict; ``DEFAULTS`` is never modified. Raises :class:`ConfigError`.
    """
    if task not in DEFAULTS:
        raise ConfigError(f"unknown training task {task!r}; choose one of: {', '.join(TASKS)}")
    config = copy.deepcopy(DEFAULTS[task])
    if path is not None:
        _merge(config, _read(Path(path)), "", str(path))
    if overrides:
        _merge(config, _undot(overrides), "", "overrides")
    if config["task"] != task:
        raise ConfigError(f"the configuration is for task {config['task']!r} but {task!r} was requested; "
                          "remove the `task` key or use the matching task")
    _check_values(config)
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


def _merge(base: dict, new: dict, prefix: str, source: str) -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in base:
            allowed = ", ".join(f"{prefix}{k}" for k in base)
            raise ConfigError(f"unknown configuration key {name!r} in {source}; allowed here: {allowed}")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} in {source} must be a section (mapping) with keys "
                                  f"{', '.join(default)}, not {value!r}")
            _merge(default, value, name + ".", source)
        else:
            base[key] = _coerce(default, value, name, source)


def _coerce(default: Any, value: Any, name: str, source: str) -> Any:
    """``value`` checked against the type of ``default`` (``None`` defaults accept anything)."""
    if default is None or (value is None and name in _NULLABLE):
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


def _check_values(config: dict) -> None:
    optim, run = config["optim"], config["run"]
    checks = [
        (optim["lr"] > 0, "optim.lr must be > 0"),
        (optim["weight_decay"] >= 0, "optim.weight_decay must be >= 0"),
        (optim["warmup_steps"] >= 0, "optim.warmup_steps must be >= 0"),
        (optim["max_steps"] >= 1, "optim.max_steps must be >= 1"),
        (optim["grad_clip"] is None or (isinstance(optim["grad_clip"], (int, float)) and optim["grad_clip"] > 0),
         "optim.grad_clip must be a positive number or null (no clipping)"),
        (run["checkpoint_every"] >= 1, "run.checkpoint_every must be >= 1"),
        (run["log_every"] >= 1, "run.log_every must be >= 1"),
        (run["val_every"] >= 0, "run.val_every must be >= 0 (0 = no validation)"),
        (run["keep_checkpoints"] >= 0, "run.keep_checkpoints must be >= 0 (0 = keep all)"),
        (run["scans_per_step"] >= 1, "run.scans_per_step must be >= 1"),
        (run["precision"] in PRECISIONS, f"run.precision must be one of {', '.join(PRECISIONS)}"),
        (0 <= config["data"]["val_fraction"] < 1, "data.val_fraction must be in [0, 1)"),
        (config["data"]["workers"] >= 0, "data.workers must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
