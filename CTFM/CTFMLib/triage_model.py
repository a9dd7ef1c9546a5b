"""The triage input and its loader, as inference needs them: :func:`triage_input` and :func:`load_triage_model`
(an exported folder read back strictly; the network, :class:`~CTFMLib.networks.TriageModel`, is built and
checked in :mod:`CTFMLib.networks` like every CT-FM network).

Training (:mod:`CTFMLib.train.classify`) builds, trains and exports the same network; ``ctfm triage``
and saliency read it from here, so inference never imports the training package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import WEIGHTS_NAME, WeightsError
from .model_store import TRIAGE_ARCHITECTURE, read_config
from .networks import architecture_of, build_network, validate_config
from .weights import build_and_load

__all__ = ["DEFAULT_SIZE", "DEFAULT_SPACING", "DEFAULT_WINDOWS", "PAD_MODE", "center_pad_crop",
           "center_crop_slices", "triage_input", "load_triage_model"]

DEFAULT_SIZE = (48, 128, 128)
DEFAULT_SPACING = (5.0, 2.0, 2.0)  # mm (S, P, L) of the triage grid, upstream's pixdim
# HU [lo, hi] per window, as upstream's triage recipe: blood (40/80), subdural (25/300), stroke (32/8), bone (600/3000).
DEFAULT_WINDOWS = ((0.0, 80.0), (-125.0, 175.0), (28.0, 36.0), (-900.0, 2100.0))
# Upstream pads with MONAI SpatialPad(mode="minimum"), i.e. numpy's np.pad "minimum": each padded line takes
# the lowest HU of that line of the scan (air for almost every line of a head CT, so 0 in every window).
PAD_MODE = "minimum"


# --- input -----------------------------------------------------------------------------------


def center_pad_crop(array: np.ndarray, size: Sequence[int], value=PAD_MODE) -> np.ndarray:
    """``array`` centre-cropped / padded to ``size`` on every axis, as MONAI's CenterSpatialCrop / SpatialPad.

    A crop from ``n`` to ``s`` voxels starts at ``n // 2 - s // 2``; a pad puts ``(s - n) // 2`` voxels
    before and the rest after. ``value``: a number pads with that constant; ``"minimum"`` pads each line
    with its own minimum (np.pad's mode, axis after axis, as MONAI's SpatialPad(mode="minimum") runs it).
    Each axis is either cropped or padded, so cropping first gives the same result as MONAI's pad-then-crop.
    """
    out = np.asarray(array)
    size = tuple(int(s) for s in size)
    if len(size) != out.ndim:
        raise ValueError(f"size {size} has {len(size)} axes but the array has {out.ndim} (shape {out.shape})")
    out = out[center_crop_slices(out.shape, size)]
    pad = [((s - n) // 2, s - n - (s - n) // 2) if n < s else (0, 0) for n, s in zip(out.shape, size)]
    if any(p != (0, 0) for p in pad):
        if isinstance(value, str):
            out = np.pad(out, pad, mode=value)
        else:
            out = np.pad(out, pad, mode="constant", constant_values=value)
    return out


def center_crop_slices(shape: Sequence[int], size: Sequence[int]) -> tuple:
    """The slices of MONAI's CenterSpatialCrop from ``shape`` to ``size`` (an axis already small enough: all)."""
    return tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) if n > s else slice(None) for n, s in zip(shape, size))


def triage_input(volume_hu: np.ndarray, size: Sequence[int] = DEFAULT_SIZE,
                 windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS) -> np.ndarray:
    """Head CT ``(D, H, W)`` in HU (SPL triage grid) -> float32 ``(1, len(windows) * S, P, L)``, ``(S, P, L) = size``.

    The HU volume is centre-padded (each padded line with its own minimum, upstream's "minimum" mode) or
    cropped to ``size``; then each window ``[lo, hi]`` maps HU to ``(hu - lo) / (hi - lo)`` clipped to
    ``[0, 1]`` (MONAI's ScaleIntensityRange arithmetic); the copies follow each other along the first
    axis in the order of ``windows``.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"triage input needs a 3-D (D, H, W) HU volume, got shape {volume.shape}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"classify.size must be three positive voxel counts (S, P, L), got {size}")
    hu = center_pad_crop(volume.astype(np.float32, copy=False), size, PAD_MODE)
    parts = []
    for window in windows:
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"HU window {list(window)} must be [lo, hi] with hi > lo")
        parts.append(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))
    return np.concatenate(parts, axis=0)[None].astype(np.float32, copy=False)


# --- model -----------------------------------------------------------------------------------


def _what_folder_holds(config: dict) -> str:
    """A model folder's network in words, from its config.json (for messages)."""
    try:
        name = architecture_of(config)
    except ValueError:
        return f"a {config.get('architecture') or config.get('_class_name')} network"
    return {"SegResEncoder": "a CT-FM encoder (feature extractor, for `ctfm embed`)",
            "SegResNetDS": "a segmentation network (for `ctfm segment`)"}.get(name, f"a {name} network")


def load_triage_model(folder) -> tuple:
    """``(TriageModel in eval mode on the CPU, config dict)`` from an exported folder, loaded strictly.

    Checked before anything is allocated, as every CT-FM model is (:func:`CTFMLib.weights.build_and_load`):
    the encoder config's types and ranges, the head's sizes, the network's size, the tensors' names, shapes
    and dtypes; then their values and a finite output on a constant input.
    """
    folder = Path(folder)
    where = "point to the model folder a classification training wrote (<out_dir>/model of `ctfm train classify`)"
    if folder.is_file():
        raise WeightsError(f"{folder} is a file; a triage model is a folder holding config.json and "
                           f"{WEIGHTS_NAME}: {where}")
    config = read_config(folder)
    if config is None:
        missing = "does not exist" if not folder.exists() else "is a folder without config.json"
        raise WeightsError(f"{folder} {missing} (no config.json to read); {where}")
    if config.get("architecture") != TRIAGE_ARCHITECTURE or not isinstance(config.get("encoder"), dict):
        raise WeightsError(f"{folder} holds {_what_folder_holds(config)}, not a triage model (encoder + "
                           f"classification head); {where}")
    try:
        validate_config(config)  # the encoder's settings, and the head's sizes against the encoder's output
    except ValueError as e:
        raise WeightsError(f"{folder}/config.json: {e}") from None
    model, _ = build_and_load(lambda: build_network(config), folder / WEIGHTS_NAME, str(folder))
    return model, config
