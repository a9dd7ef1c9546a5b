"""The triage network and its input, as inference needs them: :class:`TriageModel`, :func:`triage_input` and
:func:`load_triage_model` (an exported folder read back strictly).

Training (:mod:`CTFMLib.train.classify`) builds, trains and exports the same network; ``ctfm triage``,
saliency and the model store read it from here, so inference never imports the training package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .networks import SegResEncoder, global_average

__all__ = ["ARCHITECTURE", "DEFAULT_SIZE", "DEFAULT_SPACING", "DEFAULT_WINDOWS", "PAD_MODE", "TriageModel",
           "center_pad_crop", "center_crop_slices", "triage_input", "load_triage_model"]

ARCHITECTURE = "TriageModel"
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


class TriageModel(nn.Module):
    """Encoder -> global average of the deepest map -> ``Linear(C, hidden)`` - ReLU - ``Linear(hidden, 1)``.

    ``hidden = 0``: the head is one ``Linear(C, 1)`` (a linear probe). ``forward``: ``(B, 1, D, H, W)``
    -> logits ``(B,)``; with ``embedded=True`` the input is already the embedding ``(B, C)`` (the global
    average) and only the head runs. ``frozen=True`` fixes the encoder: its parameters do not require
    gradients, its batch norms stay in eval mode (running statistics) even when the model is put in
    training mode, and its forward runs without autograd.
    """

    def __init__(self, encoder: SegResEncoder, hidden: int = 256, frozen: bool = False):
        super().__init__()
        self.encoder = encoder
        hidden, channels = int(hidden), encoder.out_channels
        if hidden < 0:
            raise ValueError(f"the head's hidden size must be >= 0 (0 = a linear head), got {hidden}")
        self.head = (nn.Linear(channels, 1) if hidden == 0 else
                     nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)))
        self.frozen = bool(frozen)
        if self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> TriageModel:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        if embedded:
            return self.head(x).squeeze(-1)
        if self.frozen:
            with torch.no_grad():
                features = global_average(self.encoder(x)[-1])
        else:
            features = global_average(self.encoder(x)[-1])
        return self.head(features).squeeze(-1)


def _what_folder_holds(config: dict) -> str:
    """A model folder's network in words, from its config.json (for messages)."""
    from .networks import architecture_of

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
    from .networks import build_network, meta_network, validate_config
    from .weights import WEIGHTS_NAME, WeightsError, build_and_load, read_config

    folder = Path(folder)
    where = "point to the model folder a classification training wrote (<out_dir>/model of `ctfm train classify`)"
    if folder.is_file():
        raise WeightsError(f"{folder} is a file; a triage model is a folder holding config.json and "
                           f"{WEIGHTS_NAME}: {where}")
    config = read_config(folder)
    if config is None:
        missing = "does not exist" if not folder.exists() else "is a folder without config.json"
        raise WeightsError(f"{folder} {missing} (no config.json to read); {where}")
    if config.get("architecture") != ARCHITECTURE or not isinstance(config.get("encoder"), dict):
        raise WeightsError(f"{folder} holds {_what_folder_holds(config)}, not a triage model (encoder + "
                           f"classification head); {where}")
    encoder_config = {k: v for k, v in config["encoder"].items() if not str(k).startswith("_")}
    try:
        validate_config(encoder_config)
        channels = meta_network(lambda: build_network(encoder_config)).out_channels
    except ValueError as e:
        raise WeightsError(f"{folder}/config.json: the encoder does not describe a supported network: {e}") from None
    head = config.get("head") or [channels, 256, 1]
    whole = isinstance(head, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in head)
    if not whole or len(head) not in (2, 3) or head[0] != channels or head[-1] != 1 or \
            (len(head) == 3 and not 1 <= head[1] <= 65536):
        raise WeightsError(f"{folder}/config.json: head {str(head)[:80]} is neither [C, 1] (linear) nor [C, hidden, 1] "
                           f"(hidden 1..65536) with C = {channels}, the encoder's output; re-export the model")
    hidden = head[1] if len(head) == 3 else 0
    model, _ = build_and_load(lambda: TriageModel(build_network(encoder_config), hidden, frozen=False),
                              folder / WEIGHTS_NAME, str(folder))
    return model, config
