"""Random crops and augmented views for CT-FM pretraining (the upstream recipe, in NumPy + torch).

A scan gives ``crops_per_scan`` random crops; each crop gives two views, each
made independently by:

1. random resized crop: a sub-box whose edges are a fraction ``s ~ U(scale)``
   of the crop's edges (the same ``s`` on every axis, as upstream's
   ``RandomResizedCrop3D`` built on MONAI's ``RandScaleCrop``; edge length
   ``ceil(s * n)``), at a random place, resized back to the crop's shape
   (trilinear, ``align_corners=False``, as MONAI's ``Resize``);
2. flip along axis 0 (superior-inferior in SPL) with probability ``flip_p``;
3. histogram shift with probability ``hist_shift_p`` (MONAI ``RandHistogramShift``):
   ``hist_points`` control points evenly spaced between the view's min and max
   are mapped to random monotone targets (first and last fixed) and intensities
   are remapped piecewise-linearly in between;
4. Gaussian smoothing with probability ``smooth_p``, sigma per axis drawn from
   ``smooth_sigma`` (voxels); normalised erf-sampled kernel truncated at 4 sigma,
   edges replicated (MONAI pads with zeros, which darkens the borders).

Every random number comes from the ``numpy.random.Generator`` passed in, so
the same generator state gives the same views. Values in ``[0, 1]`` stay in
``[0, 1]``; each step only mixes or remaps values between the input's extremes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

VIEW_DEFAULTS = {"scale": [0.33, 1.0], "flip_p": 0.5, "hist_shift_p": 0.5, "hist_points": 5, "smooth_p": 0.5,
                 "smooth_sigma": [0.5, 1.0]}


def view_config(cfg: dict | None) -> dict:
    """``cfg`` completed with :data:`VIEW_DEFAULTS` and checked; names the wrong key and how to fix it."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(VIEW_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pretrain.views option(s) {', '.join(unknown)}; allowed: {', '.join(VIEW_DEFAULTS)}")
    cfg = {**VIEW_DEFAULTS, **cfg}
    lo, hi = (float(v) for v in cfg["scale"])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"pretrain.views.scale must be [low, high] with 0 < low <= high <= 1, got {cfg['scale']}")
    for key in ("flip_p", "hist_shift_p", "smooth_p"):
        if not 0 <= float(cfg[key]) <= 1:
            raise ValueError(f"pretrain.views.{key} is a probability in [0, 1], got {cfg[key]}")
    if int(cfg["hist_points"]) < 3:
        raise ValueError(f"pretrain.views.hist_points must be at least 3 (2 fixed ends + 1 moving), "
                         f"got {cfg['hist_points']}")
    s_lo, s_hi = (float(v) for v in cfg["smooth_sigma"])
    if not 0 < s_lo <= s_hi:
        raise ValueError(f"pretrain.views.smooth_sigma must be [low, high] voxels with 0 < low <= high, "
                         f"got {cfg['smooth_sigma']}")
    return cfg


@contextlib.contextmanager
def _float32():
    """Views are data: computed in float32 without autograd, even when the caller is inside autocast."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        yield


# --- crops ----------------------------------------------------------------------------


def random_crop(volume: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """One ``size`` crop of a 3-D ``volume`` at a uniformly random place, float32.

    Axes shorter than ``size`` are padded with 0 (-1024 HU after scaling) equally
    on both sides (MONAI ``SpatialPad``'s "symmetric"). Only the crop is read, so
    a memory-mapped volume is never loaded whole.
    """
    if volume.ndim != 3:
        raise ValueError(f"a preprocessed scan must be a 3-D array, got shape {volume.shape}")
    out = np.zeros(tuple(int(s) for s in size), dtype=np.float32)
    src, dst = [], []
    for n, c in zip(volume.shape, out.shape):
        if n >= c:
            start = int(rng.integers(0, n - c + 1))
            src.append(slice(start, start + c))
            dst.append(slice(0, c))
        else:
            before = (c - n) // 2
            src.append(slice(0, n))
            dst.append(slice(before, before + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def random_crops(volume: np.ndarray, n_crops: int, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """``(n_crops, *size)`` independent random crops (see :func:`random_crop`)."""
    return np.stack([random_crop(volume, size, rng) for _ in range(n_crops)])


# --- the augmentations ----------------------------------------------------------------


def resized_crop(crop: np.ndarray, rng: np.random.Generator, scale: Sequence[float]) -> np.ndarray:
    """A random sub-box with edges ``s`` times the crop's, resized back to the crop's shape."""
    s = float(rng.uniform(scale[0], scale[1]))
    roi = [max(1, min(n, math.ceil(s * n))) for n in crop.shape]
    starts = [int(rng.integers(0, n - r + 1)) for n, r in zip(crop.shape, roi)]
    sub = crop[tuple(slice(a, a + r) for a, r in zip(starts, roi))]
    if sub.shape == crop.shape:
        return crop.copy()  # s == 1: identity, without interpolation round-off
    t = torch.from_numpy(np.ascontiguousarray(sub, dtype=np.float32))[None, None]
    with _float32():
        return F.interpolate(t, size=crop.shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def histogram_points(rng: np.random.Generator, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``RandHistogramShift``'s control points: ``(reference, moved)``, both from 0 to 1, ``moved`` monotone."""
    reference = np.linspace(0, 1, n_points)
    moved = reference.copy()
    for i in range(1, n_points - 1):  # each point between its (already moved) left and (original) right neighbour
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    return reference, moved


def remap_intensities(x: np.ndarray, reference: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of ``x``: control points scaled to ``[x.min(), x.max()]``, ``reference`` -> ``moved``."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x.copy()  # a constant image has no histogram to shift (MONAI returns it unchanged too)
    span = hi - lo
    return np.interp(x, reference * span + lo, moved * span + lo).astype(np.float32)


def histogram_shift(x: np.ndarray, rng: np.random.Generator, n_points: int) -> np.ndarray:
    """MONAI ``RandHistogramShift``: random monotone piecewise-linear remap between the image's min and max."""
    return remap_intensities(x, *histogram_points(rng, n_points))


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian sampled by integrating over each voxel (erf), radius ``round(truncate * sigma)``."""
    radius = max(1, int(truncate * sigma + 0.5))
    k = np.array([0.5 * (math.erf((i + 0.5) / (sigma * math.sqrt(2))) - math.erf((i - 0.5) / (sigma * math.sqrt(2))))
                  for i in range(-radius, radius + 1)])
    return (k / k.sum()).astype(np.float32)


def gaussian_smooth(x: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian smoothing of a 3-D array, ``sigmas`` in voxels per axis, edges replicated."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    with _float32():
        return _smooth(t, sigmas)[0, 0].numpy()


def _smooth(t: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    for axis, sigma in enumerate(sigmas):
        k = torch.from_numpy(gaussian_kernel(float(sigma)))
        r = (k.numel() - 1) // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k.reshape(shape))
    return t


def make_view(crop: np.ndarray, rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """One augmented view of a 3-D ``crop`` (float32, same shape); ``cfg`` as :func:`view_config` returns."""
    x = resized_crop(crop, rng, cfg["scale"])
    if rng.random() < cfg["flip_p"]:
        x = np.ascontiguousarray(x[::-1])
    if rng.random() < cfg["hist_shift_p"]:
        x = histogram_shift(x, rng, int(cfg["hist_points"]))
    if rng.random() < cfg["smooth_p"]:
        lo, hi = cfg["smooth_sigma"]
        x = gaussian_smooth(x, [rng.uniform(lo, hi) for _ in range(3)])
    # Float round-off of the interpolations may step a hair outside the input range.
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def make_views(crop: np.ndarray, rng: np.random.Generator, cfg: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two independently augmented views of one crop ``(D, H, W)`` in ``[0, 1]``; float32, same shape."""
    if crop.ndim != 3:
        raise ValueError(f"a crop must be a 3-D array, got shape {crop.shape}")
    cfg = view_config(cfg)
    crop = np.asarray(crop, dtype=np.float32)
    return make_view(crop, rng, cfg), make_view(crop, rng, cfg)


def scan_views(volume: np.ndarray, n_crops: int, size: Sequence[int], rng: np.random.Generator,
               cfg: dict | None = None) -> np.ndarray:
    """``(2, n_crops, *size)`` float32: view ``v`` of crop ``c`` at ``[v, c]``, the order the loss expects."""
    cfg = view_config(cfg)
    crops = random_crops(volume, n_crops, size, rng)
    lo, hi = float(crops.min()), float(crops.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"a scan has values in [{lo:g}, {hi:g}], outside [0, 1]: pretraining takes preprocessed "
                         "scans (HU scaled to [0, 1]), not raw Hounsfield units")
    out = np.empty((2, n_crops) + tuple(int(s) for s in size), dtype=np.float32)
    for c, crop in enumerate(crops):
        out[0, c], out[1, c] = make_views(crop, rng, cfg)
    return out
