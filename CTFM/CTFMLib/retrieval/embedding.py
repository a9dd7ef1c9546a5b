"""Embeddings for retrieval: every patch of a scan with its centre in LPS mm, and query vectors.

The patch grid is the one :mod:`CTFMLib.embed` uses for its ``scan`` mode:

1. Preprocess as CT-FM's pretraining did (:func:`CTFMLib.preprocess.preprocess`): orientation
   SPL, resampling to ``spacing`` (3 x 1 x 1 mm: 3 mm head-foot, 1 mm in-plane), HU
   [-1024, 2048] -> [0, 1], crop to the foreground box (voxels above -1024 HU).
2. Cut patches of ``patch_size`` voxels (24 x 128 x 128 = 72 x 128 x 128 mm) starting at the
   foreground box's first voxel, ``stride`` voxels apart along each axis. The last start on an
   axis is flush with the box's end, so every voxel is in a patch; an axis shorter than a patch
   gets one patch, padded beyond the image with 0 (-1024 HU, air). ``stride=None`` means the
   patch size: embed.py's tiling, no overlap except the flush last patch. ``stride=(12, 64,
   64)`` overlaps neighbours by half (36 x 64 x 64 mm apart), four times the patches in-plane
   and twice along the head-foot axis: finer localisation, more time and storage.
3. A patch's centre is the model-grid index ``start + (size - 1) / 2`` mapped to LPS mm through
   the preprocessed geometry, which carries the orientation, resampling and crop; so a centre
   is a physical point of the input scan whatever its voxel grid, orientation or origin.

The scan vector is the mean of the patch vectors (embed.py's ``scan`` mode, aggregate ``mean``).

Queries (:func:`query_vector`) are cut from the same preprocessed, cropped volume by the same
rules: a point gives the patch whose centre is the grid position nearest the point; a box gives
the patches tiling the voxels whose centres lie in it (a box smaller than a patch gets one patch
centred on it), their vectors averaged; neither gives the scan vector. A query patch that would
reach beyond the volume is moved inside it, as the grid's last patches are, so a query near the
edge of a scan (not centred on its point then) has the same content as the index patch of the
same place; padding it with air would make it unlike every patch in the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..embed import (
    PATCH_SIZE,
    PATCH_SPACING,
    axis_triple,
    cut_patch,
    expect_forward,
    patch_grid,
    patch_starts,
    resolve_encoder,
)
from ..image import Image, ImageError
from ..preprocess import HU_MAX, HU_MIN, PreprocessConfig, Preprocessed, preprocess
from ..progress import null_progress
from ..runtime import Runner, RunOptions
from ..text import count


def embedding_settings(patch_size=PATCH_SIZE, spacing=PATCH_SPACING, stride=None) -> dict:
    """The settings that make vectors comparable, as stored with an index (JSON-serialisable).

    Two vectors are comparable only when computed with the same settings and weights.
    """
    patch_size = axis_triple(patch_size, "patch_size")
    return {
        "orientation": "SPL",
        "spacing": list(axis_triple(spacing, "spacing", float)),
        "hu_range": [HU_MIN, HU_MAX],
        "crop_foreground": True,
        "patch_size": list(patch_size),
        "stride": list(axis_triple(stride if stride is not None else patch_size, "stride")),
        "scan_vector": "mean of patch vectors",
    }


def as_runner(encoder, options: Optional[RunOptions] = None, progress=None) -> Runner:
    """A :class:`Runner` from a Runner, a network (``torch.nn.Module``) or a weights source (id, folder, file)."""
    if isinstance(encoder, Runner):
        return encoder
    if isinstance(encoder, torch.nn.Module):
        return Runner(encoder, options, progress)
    if isinstance(encoder, (str, Path)):
        return Runner(resolve_encoder(str(encoder), None), options, progress)
    raise TypeError(f"encoder must be a Runner, a torch.nn.Module or a weights source, not {type(encoder).__name__}")


def patch_centres(pre: Preprocessed, starts: np.ndarray, patch_size=PATCH_SIZE) -> np.ndarray:
    """``(N, 3)`` LPS mm centres of the patches starting at ``starts`` (model-grid indices) of ``pre``."""
    offset = (np.asarray(axis_triple(patch_size, "patch_size"), dtype=np.float64) - 1) / 2
    return pre.geometry.index_to_physical(np.asarray(starts, dtype=np.float64).reshape(-1, 3) + offset)


def _embed_starts(pre: Preprocessed, runner: Runner, starts: np.ndarray, patch_size, progress) -> np.ndarray:
    """``(N, D)`` float32 embeddings of the patches of ``patch_size`` at ``starts``, in batches."""
    bs = runner.options.batch_size
    out, n = [], len(starts)
    for i in range(0, n, bs):
        chunk = starts[i:i + bs]
        batch = np.stack([cut_patch(pre.array, tuple(int(v) for v in s), patch_size) for s in chunk])
        out.append(np.asarray(runner.embed(batch), dtype=np.float32))
        done = min(i + bs, n)
        progress(done / n, f"patch {done} of {n}")
    return np.concatenate(out).astype(np.float32, copy=False)


def _preprocess(image: Image, spacing) -> Preprocessed:
    return preprocess(image, PreprocessConfig(spacing=axis_triple(spacing, "spacing", float), crop_foreground=True))


def scan_embeddings(
    image: Image,
    encoder,
    patch_size=PATCH_SIZE,
    spacing=PATCH_SPACING,
    stride=None,
    options: Optional[RunOptions] = None,
    progress=None,
) -> tuple:
    """Embed every patch of the grid (module docstring) of ``image`` (a CT in HU).

    ``encoder``: a :class:`~CTFMLib.runtime.Runner`, a network, or a weights source. ``stride``:
    voxels between patch starts on the preprocessed grid, one int or one per axis (S, P, L);
    ``None`` = ``patch_size``. Returns ``(scan_vector (D,), patch_vectors (N, D), centres_lps
    (N, 3))``: float32 vectors, float64 centres in LPS mm.
    """
    progress = progress or null_progress
    patch_size = axis_triple(patch_size, "patch_size")
    runner = as_runner(encoder, options, progress)
    progress(0.0, "preprocessing")
    pre = _preprocess(image, spacing)
    starts = patch_grid(pre.array.shape, patch_size, stride)
    expect_forward(runner, len(starts) * float(np.prod(patch_size)), progress,
                   f"{count(len(starts), 'patch', 'patches')}, {runner.placement}")
    vectors = _embed_starts(pre, runner, starts, patch_size, progress)
    return vectors.mean(axis=0).astype(np.float32), vectors, patch_centres(pre, starts, patch_size)


def _check_inside(pre: Preprocessed, points_lps, what: str) -> None:
    idx = pre.input_geometry.physical_to_index(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))
    shape = np.asarray(pre.input_geometry.shape)
    if not np.any(np.all((idx >= -0.5) & (idx <= shape - 0.5), axis=1)):
        raise ImageError(f"the {what} lies outside the image; give a point or box inside the scan")


def _clamp_starts(starts, shape, patch_size) -> np.ndarray:
    """Keep patches inside the volume where they fit, as the index grid's flush last patches are."""
    hi = np.maximum(np.asarray(shape) - np.asarray(patch_size), 0)
    return np.clip(np.asarray(starts).reshape(-1, 3), 0, hi).astype(int)


def point_patch_start(pre: Preprocessed, point_lps, patch_size=PATCH_SIZE) -> np.ndarray:
    """Start index (model grid of ``pre``) of the patch for a query at ``point_lps``.

    The patch whose centre is nearest the point, moved inside the volume where it would reach
    beyond it (like the index grid's last patches, so a point near the scan's edge still finds
    its own place). Raises :class:`ImageError` when the point lies outside the input image.
    """
    patch_size = np.asarray(axis_triple(patch_size, "patch_size"))
    point = np.asarray(point_lps, dtype=np.float64).reshape(3)
    _check_inside(pre, point, f"point {np.round(point, 1).tolist()} mm (LPS)")
    idx = pre.physical_to_model_index(point)
    return _clamp_starts(np.round(idx - (patch_size - 1) / 2), pre.array.shape, patch_size)[0]


def box_patch_starts(pre: Preprocessed, box_lps, patch_size=PATCH_SIZE) -> np.ndarray:
    """``(N, 3)`` starts (model grid of ``pre``) of the patches tiling an LPS box (two opposite corners).

    The box is the voxels whose centres lie in it, clipped to the volume; an axis on which it is
    thinner than a voxel takes the nearest voxel. Patches are moved inside the volume where they
    would reach beyond it, as in :func:`point_patch_start`. Raises :class:`ImageError` when the
    box misses the image.
    """
    patch_size = axis_triple(patch_size, "patch_size")
    box = np.asarray(box_lps, dtype=np.float64).reshape(2, 3)
    corners = np.array([[box[i, 0], box[j, 1], box[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    idx = pre.physical_to_model_index(corners)
    lo_f, hi_f = idx.min(axis=0), idx.max(axis=0)
    # The whole (uncropped) preprocessed grid, in the cropped grid's indices.
    full_lo = -np.asarray(pre.crop_start) - 0.5
    full_hi = np.asarray(pre.resampled_shape) - np.asarray(pre.crop_start) - 0.5
    if np.any(hi_f < full_lo) or np.any(lo_f > full_hi):
        raise ImageError(f"the box {np.round(box, 1).tolist()} mm (LPS) lies outside the image; "
                         "give two opposite corners of a box that overlaps the scan")
    eps = 1e-6  # a corner on a voxel centre includes that voxel despite rounding in the geometry
    lo, hi = np.ceil(lo_f - eps).astype(int), np.floor(hi_f + eps).astype(int)
    thin = lo > hi
    lo[thin] = hi[thin] = np.round((lo_f[thin] + hi_f[thin]) / 2).astype(int)
    shape = np.asarray(pre.array.shape)
    lo, hi = np.clip(lo, 0, shape - 1), np.clip(hi, 0, shape - 1)
    axes = []
    for a, p in enumerate(patch_size):
        n = int(hi[a] - lo[a] + 1)
        if n <= p:  # one patch centred on the box
            axes.append([int(np.round((lo[a] + hi[a]) / 2 - (p - 1) / 2))])
        else:
            axes.append([int(lo[a]) + s for s in patch_starts(n, p, p)])
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.unique(_clamp_starts(starts, shape, patch_size), axis=0)


def query_vector(
    image: Image,
    encoder,
    point_lps: Optional[Sequence[float]] = None,
    box_lps=None,
    patch_size=PATCH_SIZE,
    spacing=PATCH_SPACING,
    stride=None,
    options: Optional[RunOptions] = None,
    progress=None,
) -> np.ndarray:
    """The ``(D,)`` float32 vector to search an index with (module docstring).

    ``point_lps``: the patch around an LPS point (search the patch level). ``box_lps``: two
    opposite LPS corners ``(2, 3)``; the mean of the patches tiling the box (patch level).
    Neither: the scan vector, with ``stride`` as the index was built (scan level).
    """
    if point_lps is not None and box_lps is not None:
        raise ValueError("give a point or a box, not both")
    progress = progress or null_progress
    patch_size = axis_triple(patch_size, "patch_size")
    if point_lps is None and box_lps is None:
        return scan_embeddings(image, encoder, patch_size, spacing, stride, options, progress)[0]
    runner = as_runner(encoder, options, progress)
    progress(0.0, "preprocessing")
    pre = _preprocess(image, spacing)
    if point_lps is not None:
        starts = point_patch_start(pre, point_lps, patch_size)[None]
    else:
        starts = box_patch_starts(pre, box_lps, patch_size)
    return _embed_starts(pre, runner, starts, patch_size, progress).mean(axis=0).astype(np.float32)
