"""Sliding-window inference with Gaussian blending, streamed along the first axis.

The window layout, padding and weights are those of MONAI's
``sliding_window_inference`` (``SlidingWindowInferer(roi_size, overlap,
mode="gaussian", sigma_scale=0.125)``), which the CT-FM model cards use:

- an axis shorter than the window is padded with zeros, ``diff // 2`` before
  and the rest after, and the result cropped back at the end;
- windows start every ``int(roi * (1 - overlap))`` voxels (the whole window
  when it equals the padded size), the last one flush with the far edge;
- each window's output is multiplied by a separable Gaussian
  (sigma = ``sigma_scale * roi``) whose values are clamped from below at
  ``max(min, 1e-3)``, summed over windows, and divided by the summed weights.

MONAI holds the blended ``C x D x H x W`` volume in memory (13 GB for the
118-class whole-body model on a CT at 1.5 mm). Here windows are visited in
MONAI's order, which is grouped by their start along axis 0, and the sums
live in a ring buffer of one window's depth: once no later window touches a
row of axis 0, that row is divided by its weight, reduced (e.g. argmax) and
its buffer space reused. Same additions in the same order, so the blended
values are bit for bit MONAI's; memory is ``C x roi_z x H x W``.

Dividing by the summed weights cannot change an argmax (they are positive:
the clamp gives every covered voxel at least 1e-3), but it costs little on a
finished row and keeps the values, and so the rare exact ties, MONAI's.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .progress import null_progress
from .windows import WindowPlan, plan_windows, scan_interval, window_starts  # noqa: F401  (the layout, torch-free)

# Rows are divided and reduced in blocks of about this many bytes of blended values;
# window outputs are weighted and added in slabs of about ADD_BYTES.
FINALISE_BYTES = 32 << 20
ADD_BYTES = 16 << 20


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """The window weights MONAI's ``compute_importance_map(mode="gaussian")`` gives, float32, same arithmetic."""
    weights = None
    for i, n in enumerate(roi):
        sigma = n * sigma_scale
        x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x**2 / (-2 * sigma**2))
        weights = x if i == 0 else weights.unsqueeze(-1) * x[(None,) * i]
    # The corners of a 3-D Gaussian underflow towards 1e-11; MONAI clamps them so every voxel keeps a weight.
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights, min=floor)


def _ring_pieces(start: int, stop: int, depth: int) -> list:
    """Rows ``start..stop-1`` of axis 0 as ``[(ring slice, offset in the run)]`` in a ring of ``depth`` rows."""
    pieces, row = [], start
    while row < stop:
        i = row % depth
        n = min(stop - row, depth - i)
        pieces.append((slice(i, i + n), row - start))
        row += n
    return pieces


def argmax_reducer(dtype=np.uint8) -> Callable:
    """Rows of blended values ``(n, H, W, C)`` -> labels ``(n, H, W)`` (first maximum on ties, as torch)."""

    def reduce(values: torch.Tensor) -> np.ndarray:
        return values.argmax(dim=-1).numpy().astype(dtype, copy=False)

    return reduce


def stitch(
    volume: np.ndarray,
    predict: Callable,
    channels: int,
    roi: Sequence[int],
    overlap: float = 0.625,
    sigma_scale: float = 0.125,
    batch_size: int = 1,
    reduce: Optional[Callable] = None,
    out_dtype=np.uint8,
    progress=None,
    consume: Optional[Callable] = None,
    stats: Optional[dict] = None,
    reuse_air: bool = True,
) -> Optional[np.ndarray]:
    """Blend ``predict`` over windows of ``volume`` and reduce each voxel's ``channels`` values.

    ``volume``: ``(D, H, W)`` float32 (the preprocessed CT). ``predict``: a batch
    ``(B, 1, *roi)`` float32 tensor -> ``(B, channels, *roi)`` (any float dtype,
    device or memory format). ``reduce``: finished rows of blended values
    ``(n, H, W, channels)`` float32 -> ``(n, H, W)`` array (default: argmax).
    Returns the reduced volume ``(D, H, W)``. Or ``consume(first_row, values)``
    receives the finished rows (on the padded grid: :func:`plan_windows` says where
    the volume lies in it), in order, and nothing is returned. ``progress`` is told
    ``window k of N`` after each batch; it may raise :class:`CTFMLib.progress.Cancelled`,
    which stops the work there.

    A window whose voxels are all 0 (all air after the card's scaling) gives the same output
    wherever it lies: it is predicted once and that output is reused, which leaves every
    blended value as it would be (``reuse_air=False`` predicts every window, for comparison).
    ``stats`` (a dict) receives ``windows_total``,
    ``windows_run`` (predicted, the one all-air window included) and ``windows_skipped``.
    """
    with torch.inference_mode():  # no autograd records, no version counters
        return _stitch(volume, predict, channels, roi, overlap, sigma_scale, batch_size,
                       reduce or argmax_reducer(out_dtype), out_dtype, progress or null_progress, consume,
                       stats if stats is not None else {}, reuse_air)


def _stitch(volume, predict, channels, roi, overlap, sigma_scale, batch_size, reduce, out_dtype, progress, consume,
            stats, reuse_air):
    plan = plan_windows(volume.shape, roi, overlap)
    volume = _pad(volume, plan)
    depth = plan.roi[0]
    _, height, width = plan.padded_shape
    weight = gaussian_importance(plan.roi, sigma_scale)
    # The blending buffers: one window depth of rows, channels last (the layout a channels_last_3d
    # network returns, so adding a window is a contiguous pass and a finished row feeds a matmul).
    acc = torch.zeros((min(depth, plan.padded_shape[0]), height, width, channels), dtype=torch.float32)
    count = torch.zeros(acc.shape[:3] + (1,), dtype=torch.float32)
    weight_cl = weight[..., None]
    out = None if consume is not None else np.zeros(plan.padded_shape, dtype=out_dtype)
    expected = (channels,) + plan.roi
    # A window's output is added a few rows at a time: the float32 weighted copy stays small.
    step = max(1, ADD_BYTES // (4 * channels * plan.roi[1] * plan.roi[2]))
    groups = plan.z_groups()
    done, total, finished = 0, plan.n_windows, 0
    air = None  # the output of an all-air window, once one was needed
    stats.update(windows_total=total, windows_run=0, windows_skipped=0)

    def run(windows):
        result = predict(torch.from_numpy(np.stack(windows))[:, None])
        if tuple(result.shape) != (len(windows),) + expected:
            raise ValueError(f"the model returned {tuple(result.shape)} for {len(windows)} windows, "
                             f"expected {(len(windows),) + expected}")
        stats["windows_run"] += len(windows)
        return result

    for g, (z, windows) in enumerate(groups):
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            inputs = [volume[z:z + depth, y:y + plan.roi[1], x:x + plan.roi[2]] for y, x in chunk]
            empty = [reuse_air and not w.any() for w in inputs]
            busy = [w for w, e in zip(inputs, empty) if not e]
            outputs = iter(run(busy)) if busy else iter(())
            if any(empty) and air is None:
                air = run([np.zeros_like(inputs[0])])[0]  # stands for every all-air window
            result = []
            for e in empty:
                result.append(air if e else next(outputs))
            stats["windows_skipped"] += sum(empty)
            for (y, x), values in zip(chunk, result):
                cols = (slice(y, y + plan.roi[1]), slice(x, x + plan.roi[2]))
                for r0 in range(0, depth, step):
                    r1 = min(r0 + step, depth)
                    # as MONAI: weight the window (in float32), then add it
                    weighted = values[:, r0:r1].to(device="cpu", dtype=torch.float32) * weight[r0:r1]
                    weighted = weighted.permute(1, 2, 3, 0)
                    for rows, offset in _ring_pieces(z + r0, z + r1, depth):
                        n = rows.stop - rows.start
                        acc[(rows,) + cols] += weighted[offset:offset + n]
                        count[(rows,) + cols] += weight_cl[r0 + offset:r0 + offset + n]
            del result, outputs
            done += len(chunk)
            progress(done / total, f"window {done} of {total}")
        # Rows before the next group's start are complete: no later window reaches them.
        until = groups[g + 1][0] if g + 1 < len(groups) else plan.padded_shape[0]
        block = max(1, FINALISE_BYTES // (channels * height * width * 4))
        for start in range(finished, until, block):
            stop = min(start + block, until)
            for rows, offset in _ring_pieces(start, stop, depth):
                row0 = start + offset
                if consume is not None:
                    consume(row0, acc[rows] / count[rows])
                else:
                    out[row0:row0 + rows.stop - rows.start] = reduce(acc[rows] / count[rows])
                acc[rows] = 0
                count[rows] = 0
        finished = until
    if air is not None:
        stats["windows_skipped"] -= 1  # the one that was predicted counts as run
    return None if out is None else out[plan.crop()]


def _pad(volume: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Zero-pad axes shorter than the window, as MONAI does (``diff // 2`` before)."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if plan.padded_shape == tuple(volume.shape):
        return volume
    widths = [(b, p - s - b) for b, p, s in zip(plan.pad_before, plan.padded_shape, volume.shape)]
    return np.pad(volume, widths, mode="constant", constant_values=0.0)
