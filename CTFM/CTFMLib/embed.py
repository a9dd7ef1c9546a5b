"""CT-FM embeddings: a whole volume, a scan by patches, or a patch around a point.

- ``volume``: the model card's way: the whole preprocessed volume in one pass,
  then the global average of the deepest feature map (512 values).
- ``scan``: resample to 3 x 1 x 1 mm (SPL), cut into 24 x 128 x 128 patches
  covering the foreground, embed each, aggregate by mean, max or min (as
  upstream's retrieval experiments did).
- ``point``: the 24 x 128 x 128 patch (3 x 1 x 1 mm) centred on an LPS point.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .image import Image, ImageError
from .preprocess import PreprocessConfig, Preprocessed, preprocess
from .progress import Estimate, null_progress, subrange
from .runtime import Runner, RunOptions
from .text import count

PATCH_SIZE = (24, 128, 128)
PATCH_SPACING = (3.0, 1.0, 1.0)
AGGREGATES = ("mean", "max", "min")
MODES = ("volume", "scan", "point")


def expect_forward(runner: Runner, voxels: float, progress, detail: str) -> float:
    """Tell ``progress`` how long ``voxels`` input voxels through ``runner``'s network take on this computer
    (:mod:`CTFMLib.costs`, measured once here); returns the seconds."""
    from .costs import network_seconds, rate

    measured = rate("forward", runner.device, runner.options.precision, announce=lambda m: progress(None, m))
    seconds = network_seconds(measured, voxels, runner.model)
    progress(None, Estimate(seconds, detail))
    return seconds


def resolve_encoder(weights, model):
    """The encoder to run: ``model`` when given, else the SegResEncoder loaded from ``weights`` (id, folder or file)."""
    if model is not None:
        return model
    if weights is None:
        raise ValueError("give weights (a model id, folder or file) or a model")
    from .weights import load_model

    return load_model(weights, expect="SegResEncoder")[0]


def embed_image(
    image: Image,
    weights=None,
    model: Optional[torch.nn.Module] = None,
    mode: str = "volume",
    point_lps: Optional[Sequence[float]] = None,
    aggregate: str = "mean",
    options: Optional[RunOptions] = None,
    progress=None,
    **run_kwargs,
) -> np.ndarray:
    """The 512-d CT-FM embedding of ``image`` (float32), by ``mode``: volume, scan or point.

    ``run_kwargs`` (device, precision, threads, channels_last, batch_size) build
    :class:`RunOptions` when ``options`` is not given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    if mode == "point" and point_lps is None:
        raise ValueError("mode 'point' needs a point (LPS mm)")
    progress = progress or null_progress
    options = options or RunOptions(**run_kwargs)
    progress(0.0, "loading the model")
    runner = Runner(resolve_encoder(weights, model), options, progress)
    progress(0.05, "preprocessing")
    if mode == "volume":
        pre = preprocess(image)
        expect_forward(runner, pre.array.size, progress, f"the whole volume, {runner.placement}")
        progress(0.1, f"embedding the whole volume {pre.array.shape} on {runner.placement}")
        vector = runner.embed(pre.array[None])[0]
        progress(1.0, "done")
        return vector
    config = PreprocessConfig(spacing=PATCH_SPACING, crop_foreground=(mode == "scan"))
    pre = preprocess(image, config)
    if mode == "point":
        patch = patch_at_point(pre, point_lps)
        expect_forward(runner, patch.size, progress, f"one patch, {runner.placement}")
        progress(0.1, f"embedding the patch at {np.round(point_lps, 1).tolist()} mm")
        vector = runner.embed(patch[None])[0]
        progress(1.0, "done")
        return vector
    vectors, _ = embed_patches(pre, runner, subrange(progress, 0.1, 1.0))
    return aggregate_vectors(vectors, aggregate)


def aggregate_vectors(vectors: np.ndarray, how: str) -> np.ndarray:
    return {"mean": np.mean, "max": np.max, "min": np.min}[how](vectors, axis=0).astype(np.float32)


def patch_starts(size: int, patch: int, stride: Optional[int] = None) -> list:
    """Start indices of patches covering ``size`` voxels, ``stride`` apart (default: ``patch``, no overlap);
    the last one is flush with the end."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride or patch))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def cut_patch(array: np.ndarray, start, size) -> np.ndarray:
    """A patch of ``size`` at ``start`` (may reach outside: the outside is 0, i.e. -1024 HU)."""
    out = np.zeros(size, dtype=np.float32)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def axis_triple(value, name: str, kind=int) -> tuple:
    """One positive number or three (one per axis) as a triple; ValueError naming ``name`` otherwise."""
    values = tuple(kind(v) for v in (np.broadcast_to(value, 3) if np.ndim(value) == 0 else value))
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be one positive number or three (one per axis), not {value!r}")
    return values


def patch_grid(shape, patch_size=PATCH_SIZE, stride=None) -> np.ndarray:
    """``(N, 3)`` int start indices of the patches covering a volume of ``shape`` (axis 0 slowest),
    ``stride`` apart (default: the patch size, no overlap), the last on each axis flush with the end:
    the one tiling of scan embeddings and of the retrieval index."""
    patch_size = axis_triple(patch_size, "patch_size")
    stride = axis_triple(stride if stride is not None else patch_size, "stride")
    axes = [patch_starts(int(n), p, s) for n, p, s in zip(shape, patch_size, stride)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def embed_patches(pre: Preprocessed, runner: Runner, progress=None, size=PATCH_SIZE) -> tuple:
    """Embeddings ``(N, C)`` of the patches tiling ``pre`` and their centres ``(N, 3)`` in LPS mm."""
    progress = progress or null_progress
    starts = [tuple(int(v) for v in s) for s in patch_grid(pre.array.shape, size)]
    expect_forward(runner, len(starts) * float(np.prod(size)), progress,
                   f"{count(len(starts), 'patch', 'patches')}, {runner.placement}")
    vectors, centres = [], []
    bs = runner.options.batch_size
    for i in range(0, len(starts), bs):
        chunk = starts[i:i + bs]
        batch = np.stack([cut_patch(pre.array, s, size) for s in chunk])
        vectors.append(runner.embed(batch))
        for s in chunk:
            centres.append(pre.geometry.index_to_physical(np.asarray(s) + (np.asarray(size) - 1) / 2.0))
        progress(min(i + bs, len(starts)) / len(starts), f"patch {min(i + bs, len(starts))} of {len(starts)}")
    return np.concatenate(vectors).astype(np.float32), np.asarray(centres)


def patch_at_point(pre: Preprocessed, point_lps, size=PATCH_SIZE) -> np.ndarray:
    """The patch of ``size`` centred on an LPS point; the point must lie inside the image."""
    idx = pre.physical_to_model_index(point_lps)
    shape = np.asarray(pre.array.shape)
    if np.any(idx < -0.5) or np.any(idx > shape - 0.5):
        raise ImageError(f"the point {np.round(point_lps, 1).tolist()} mm (LPS) lies outside the image")
    centre = np.floor(idx + 0.5).astype(int)
    start = centre - np.asarray(size) // 2
    return cut_patch(pre.array, tuple(int(s) for s in start), size)

