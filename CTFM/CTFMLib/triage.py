"""Head-CT triage: upstream's preprocessing, one probability per scan, and heat maps back on the input grid.

The recipe is CT-FM's triage evaluation (``evaluation/sinoct.yaml``; ``cq500.yaml`` is the same), whose
MONAI transforms run in this order, and which :func:`triage_volume` + :func:`~CTFMLib.triage_model.triage_input`
reproduce step by step:

1. ``LoadImage`` (ITK reader, channel first) and ``EnsureType``: the voxels as float32 HU.
2. ``Orientation(axcodes="SPL")``: axes permuted/flipped only, never resampled (an oblique scan stays
   oblique; the triage grid keeps its direction).
3. ``CropForeground`` with MONAI's defaults on the image itself: the bounding box of voxels with HU > 0
   (``select_fn`` is_positive, ``source_key`` the image, margin 0), on the ORIENTED INPUT GRID, i.e.
   BEFORE resampling (pretraining crops after resampling; the triage recipe the other way round).
4. ``Spacing(pixdim=(5, 2, 2), mode="bilinear")`` with its defaults: voxel 0 of the cropped scan stays
   where it is, an axis of ``n`` voxels at ``s`` mm becomes ``round((n - 1) * s / t + 1)`` voxels at ``t``
   mm (numpy rounding, halves to even), samples past the last voxel take the edge value (border padding).
5. ``SpatialPad(spatial_size=(48, 128, 128), mode="minimum")`` in HU: numpy's ``np.pad(mode="minimum")``,
   so each padded line gets the minimum of that line of the scan, axis after axis (S, then P, then L);
   ``(s - n) // 2`` voxels before and the rest after. For a head CT almost every line meets air, so the
   padding is air (0 in every window); a line that crosses only tissue is padded with its lowest HU.
6. ``CenterSpatialCrop(roi_size=(48, 128, 128))``: from ``n`` to ``s`` voxels starting at ``n // 2 - s // 2``.
7. Four copies each through ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)``:
   blood 0..80, subdural -125..175, stroke 28..36, bone -900..2100 HU. Padding and cropping happen in HU
   before the windows (a window is non-decreasing, so windowing first would give the same numbers).
8. ``ConcatItems(dim=1)``: the copies follow each other along the first SPATIAL axis (S), giving one
   channel of ``(4 * 48) x 128 x 128``: ``(1, 192, 128, 128)``.

Training (``ctfm train classify``) caches every scan with :func:`triage_volume` (steps 1-4) and runs
:func:`~CTFMLib.triage_model.triage_input` (steps 5-8) at each step, the same two functions
:func:`triage_preprocess` runs here, so a scan reaches the network identically in training and inference.

:class:`TriageInput` keeps what maps a map on the network grid (a saliency heat map) back onto the input
voxel grid: the window copies are combined by their maximum, the centre pad/crop undone (voxels cropped
away come back as 0), the resampling undone by linear interpolation and the crop and orientation undone;
outside the foreground box the map is 0. Coordinates are LPS millimetres (:mod:`CTFMLib.image`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .image import Geometry, Image, ImageError
from .networks import TriageModel
from .preprocess import (
    apply_orientation,
    foreground_box,
    orientation_transform,
    oriented_geometry,
    resample_axes,
    undo_orientation,
    validate_ct,
)
from .progress import null_progress
from .triage_model import (
    DEFAULT_SIZE,
    DEFAULT_SPACING,
    DEFAULT_WINDOWS,
    center_crop_slices,
    load_triage_model,
    triage_input,
)

TRIAGE_SPACING = DEFAULT_SPACING  # (5, 2, 2) mm (S, P, L), upstream's pixdim; training's default too
DECISIONS = ("normal", "abnormal")


# --- preprocessing -------------------------------------------------------------------------


@dataclass
class TriageVolume:
    """A scan on the triage grid (steps 1-4 of the module docstring) and where that grid lies.

    ``hu``: float32 ``(D, H, W)`` HU, SPL; ``geometry``: its grid (LPS; direction that of the oriented input);
    ``perm``/``flip``: the orientation step (:func:`CTFMLib.preprocess.orientation_transform`);
    ``box_start``/``box_end``: the foreground box (HU > 0) on the oriented input grid of shape ``oriented_shape``.
    """

    hu: np.ndarray
    geometry: Geometry
    input_geometry: Geometry
    perm: tuple
    flip: tuple
    oriented_shape: tuple
    box_start: tuple
    box_end: tuple


def triage_volume(image: Image, spacing: Sequence[float] = TRIAGE_SPACING, orientation: str = "SPL",
                  validate: bool = True) -> TriageVolume:
    """Orientation, foreground crop (HU > 0, on the input grid) and resampling to ``spacing`` mm, as upstream.

    Raises :class:`~CTFMLib.image.ImageError` for an image that is not a CT in HU (``validate``), or that
    has no voxel above 0 HU.
    """
    target = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if target.size != 3 or not np.all(target > 0):
        raise ValueError(f"the triage spacing must be three positive sizes in mm (S, P, L), got {list(spacing)}")
    if validate:
        validate_ct(image)
    g_in = image.geometry
    perm, flip = orientation_transform(g_in.direction, orientation)
    oriented = apply_orientation(image.array, perm, flip)
    g_or = oriented_geometry(g_in, perm, flip)
    try:
        start, end = foreground_box(oriented)
    except ImageError:
        raise ImageError("the image has no voxel above 0 HU (no head in it?): nothing to triage") from None
    cropped = oriented[tuple(slice(s, e) for s, e in zip(start, end))]
    # MONAI's compute_shape_offset: round(distance between the first and last voxel centres + 1).
    out_shape = tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(cropped.shape, g_or.spacing, target))
    hu = resample_axes(cropped, target / g_or.spacing, out_shape, "linear")
    geometry = Geometry(out_shape, target, g_or.index_to_physical(np.asarray(start, dtype=np.float64)), g_or.direction)
    return TriageVolume(np.ascontiguousarray(hu, dtype=np.float32), geometry, g_in, tuple(perm), tuple(flip),
                        tuple(oriented.shape), tuple(int(s) for s in start), tuple(int(e) for e in end))


@dataclass
class TriageInput:
    """The network input of one scan and the way back from its grid to the input voxel grid.

    ``array``: float32 ``(1, W * S, P, L)``, the input without its batch axis (``W`` windows of ``(S, P, L)``
    voxels stacked along S). ``geometry``: the ``(S, P, L)`` grid of one window copy in LPS mm (padding
    voxels included, so its corners may lie outside the scan). ``offset``: the index on ``volume``'s grid
    of the network's voxel 0 per axis (negative where padded). ``volume.hu`` is the scan before pad/crop.
    """

    array: np.ndarray
    geometry: Geometry
    volume: TriageVolume
    offset: tuple
    windows: int

    def to_input(self, heat: np.ndarray) -> np.ndarray:
        """A map on the network grid, ``(W * S, P, L)`` or ``(S, P, L)``, as float32 on the input voxel grid.

        Window copies are combined by their maximum; voxels the centre crop removed, and everything outside
        the foreground box, are 0; in between, linear interpolation (edge values past the last triage voxel).
        """
        heat = np.asarray(heat, dtype=np.float32)
        size = self.geometry.shape
        stacked = (self.windows * size[0],) + tuple(size[1:])
        if heat.shape == stacked:
            heat = heat.reshape((self.windows,) + tuple(size)).max(axis=0)
        elif heat.shape != tuple(size):
            raise ValueError(f"a heat map on the triage grid has shape {stacked} or {tuple(size)}, got {heat.shape}")
        v = self.volume
        grid = np.zeros(v.geometry.shape, dtype=np.float32)
        dst, src = [], []
        for o, n, s in zip(self.offset, v.geometry.shape, size):
            lo, hi = max(o, 0), min(o + s, n)
            dst.append(slice(lo, hi))
            src.append(slice(lo - o, hi - o))
        grid[tuple(dst)] = heat[tuple(src)]
        box_shape = tuple(e - s for s, e in zip(v.box_start, v.box_end))
        oriented_spacing = v.input_geometry.spacing[list(v.perm)]
        cropped = resample_axes(grid, oriented_spacing / v.geometry.spacing, box_shape, "linear")
        oriented = np.zeros(v.oriented_shape, dtype=np.float32)
        oriented[tuple(slice(s, e) for s, e in zip(v.box_start, v.box_end))] = cropped
        return np.ascontiguousarray(undo_orientation(oriented, v.perm, v.flip), dtype=np.float32)

    def to_input_image(self, heat: np.ndarray, **metadata) -> Image:
        """:meth:`to_input` as an :class:`~CTFMLib.image.Image` with the input's geometry."""
        return Image.from_geometry(self.to_input(heat), self.volume.input_geometry, metadata)


def _network_offset(shape: Sequence[int], size: Sequence[int]) -> tuple:
    """Per axis, the index of the padded/cropped grid's voxel 0 on the unpadded grid (as triage_input does it)."""
    crop = center_crop_slices(shape, size)
    return tuple(sl.start if n > s else -((s - n) // 2) for sl, n, s in zip(crop, shape, size))


def triage_preprocess(image: Image, size: Sequence[int] = DEFAULT_SIZE,
                      windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS,
                      spacing: Sequence[float] = TRIAGE_SPACING, orientation: str = "SPL") -> TriageInput:
    """Upstream's triage preprocessing of a CT in HU (module docstring): :func:`triage_volume`, then
    :func:`~CTFMLib.triage_model.triage_input`, with the record that maps network-grid maps back."""
    size = tuple(int(s) for s in size)
    volume = triage_volume(image, spacing, orientation)
    array = triage_input(volume.hu, size, windows)
    offset = _network_offset(volume.hu.shape, size)
    g = volume.geometry
    geometry = Geometry(size, g.spacing, g.index_to_physical(np.asarray(offset, dtype=np.float64)), g.direction)
    return TriageInput(array, geometry, volume, offset, len(windows))


# --- inference -----------------------------------------------------------------------------


@dataclass
class TriageResult:
    """One scan's triage: ``probability`` = sigmoid(``logit``); ``decision`` "abnormal" when
    ``probability >= threshold`` (the model's exported threshold), else "normal"; ``model`` names it;
    ``seconds`` the whole call (loading, preprocessing, forward pass)."""

    probability: float
    logit: float
    decision: str
    threshold: float
    model: str
    seconds: float

    def to_dict(self) -> dict:
        return {"probability": self.probability, "logit": self.logit, "decision": self.decision,
                "threshold": self.threshold, "model": self.model, "seconds": self.seconds}


def load_triage(model) -> tuple:
    """``(TriageModel, config, name)`` from a folder written by the classification training (or an imported
    model's id / name), or from an already loaded ``(model, config)`` pair."""
    if isinstance(model, (tuple, list)):
        if len(model) != 2 or not isinstance(model[0], TriageModel) or not isinstance(model[1], dict):
            raise ValueError("a loaded triage model is a (TriageModel, config dict) pair, as load_triage_model "
                             "returns it")
        net, config = model
        return net, config, str(config.get("name") or "TriageModel (loaded)")
    if not isinstance(model, (str, Path)):
        raise ValueError(f"the triage model is a folder or a (TriageModel, config) pair, not {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        from .model_store import resolve

        path, _ = resolve(str(model))  # an imported model's id, or a clear "no such folder or model"
    net, config = load_triage_model(path)
    return net, config, str(model)


def triage_image(image: Image, model, device: str = "auto", progress=None) -> TriageResult:
    """Triage one head CT in HU with a triage model (:func:`load_triage`: a folder or ``(model, config)``).

    The model's exported ``_preprocessing`` (size, windows, spacing) drives :func:`triage_preprocess`. The
    model is put in eval mode on ``device`` (auto: CUDA, then MPS, else the CPU) for the call and left there.
    ``progress(fraction, message)`` may raise :class:`~CTFMLib.progress.Cancelled` to stop.
    """
    import torch

    from .runtime import select_device

    t0 = time.perf_counter()
    report = progress or null_progress
    report(0.0, "loading the triage model")
    net, config, name = load_triage(model)
    prep = config.get("_preprocessing") or {}
    threshold = float(config.get("threshold", 0.5))
    spacing = prep.get("spacing", TRIAGE_SPACING)
    report(0.1, f"preprocessing: foreground crop, {' x '.join(f'{s:g}' for s in spacing)} mm, HU windows")
    x = triage_preprocess(image, size=prep.get("size", DEFAULT_SIZE), windows=prep.get("windows", DEFAULT_WINDOWS),
                          spacing=spacing, orientation=prep.get("orientation", "SPL"))
    dev = select_device(device, report)
    report(0.5, f"running the triage model on {dev}")
    was_training = net.training
    net.to(dev).eval()
    try:
        with torch.no_grad():
            logit = float(net(torch.from_numpy(x.array[None]).to(dev)).float().cpu().reshape(-1)[0])
    finally:
        net.train(was_training)
    if not math.isfinite(logit):
        raise ValueError(f"the triage model returned {logit} for this scan; check the model folder and the image")
    probability = 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))
    decision = DECISIONS[int(probability >= threshold)]
    report(1.0, f"{decision}: probability {probability:.3f} (threshold {threshold:.3f})")
    return TriageResult(probability, logit, decision, threshold, name, time.perf_counter() - t0)

