"""Crops and the random augmentations of segmentation fine-tuning (upstream's MONAI transforms, on one crop).

Arrays are ``(D, H, W)`` (numpy) or ``(B, C, D, H, W)`` (torch); images are preprocessed CT in ``[0, 1]``
(0 = air), labels integer maps. Every random draw comes from the caller's ``numpy.random.Generator``, so
an augmented crop is a pure function of its seed (resume and DDP see the same data).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def crop_window(shape: Sequence[int], size: Sequence[int], centre: Sequence[int]) -> list:
    """Start of a ``size`` crop around ``centre``, kept inside ``shape``; axes shorter than the crop
    start at ``-(size - n) // 2`` (the volume centred in air, as MONAI's symmetric ``SpatialPad``)."""
    starts = []
    for n, s, c in zip(shape, size, centre):
        if n <= s:
            starts.append(-((s - n) // 2))
        else:
            starts.append(int(min(max(int(c) - s // 2, 0), n - s)))
    return starts


def extract(array: np.ndarray, starts: Sequence[int], size: Sequence[int], fill=0) -> np.ndarray:
    """``array[starts : starts + size]`` with ``fill`` where the window leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for n, st, s in zip(array.shape, starts, size):
        lo, hi = max(st, 0), min(st + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # MONAI's truncation at 4 sigma
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, D, H, W)`` along the three spatial axes (zero padding)."""
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    for axis, sigma in enumerate(sigmas):
        k = _gaussian_kernel(float(sigma)).to(x)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k.numel() // 2
        out = F.conv3d(F.pad(out, pad), k.reshape(shape))
    return out.reshape(x.shape)


def affine_matrix(angles: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """Rotation about the three axes (radians, in index space (D, H, W)) times a per-axis zoom."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx @ np.diag(scales)


def warp(image: torch.Tensor, labels: torch.Tensor, matrix: np.ndarray) -> tuple:
    """Resample ``(1, 1, D, H, W)`` image (linear) and labels (nearest) at ``matrix @ (p - centre) + centre``
    (voxel coordinates); outside the crop the image is 0 (air) and the labels background."""
    size = image.shape[2:]
    half = np.array([(n - 1) / 2.0 for n in size])
    # affine_grid works in [-1, 1] per axis (x = W, y = H, z = D): conjugate the voxel-space matrix.
    theta_dhw = np.diag(1.0 / half) @ matrix @ np.diag(half)
    theta = theta_dhw[::-1, ::-1].copy()
    theta = torch.tensor(np.concatenate([theta, np.zeros((3, 1))], axis=1), dtype=torch.float32)[None]
    grid = F.affine_grid(theta, list(image.shape), align_corners=True)
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped_labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return warped, warped_labels.round().to(labels.dtype)


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: dict) -> tuple:
    """Upstream's random augmentations of one crop; ``(image float32, labels int64)`` tensors ``(1, D, H, W)``.

    Every random draw comes from ``rng`` (numpy, and a torch generator seeded from it for the noise),
    so a crop's augmentation is a pure function of its seed.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))[None, None]
    if rng.random() < float(cfg.get("affine_p", 0.0)):
        r, s = float(cfg.get("rotate", 0.0)), float(cfg.get("scale", 0.0))
        matrix = affine_matrix(rng.uniform(-r, r, 3), 1.0 + rng.uniform(-s, s, 3))
        x, y = warp(x, y, matrix)
    if rng.random() < float(cfg.get("smooth_p", 0.0)):
        lo, hi = (float(v) for v in cfg.get("smooth_sigma", (0.5, 1.0)))
        x = smooth(x, rng.uniform(lo, hi, 3))
    if rng.random() < float(cfg.get("intensity_scale_p", 0.0)):
        s = float(cfg.get("intensity_scale", 0.0))
        x = x * (1.0 + float(rng.uniform(-s, s)))
    if rng.random() < float(cfg.get("intensity_shift_p", 0.0)):
        s = float(cfg.get("intensity_shift", 0.0))
        x = x + float(rng.uniform(-s, s))
    if rng.random() < float(cfg.get("noise_p", 0.0)):
        std = float(rng.uniform(0.0, float(cfg.get("noise_std", 0.0))))
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = x + std * torch.randn(x.shape, generator=g)
    flip_p = float(cfg.get("flip_p", 0.0))
    dims = [2 + a for a in range(3) if rng.random() < flip_p]
    if dims:
        x, y = x.flip(dims), y.flip(dims)
    return x[0].contiguous(), y[0].contiguous()
