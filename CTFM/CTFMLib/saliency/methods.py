"""Saliency methods on one network input: occlusion sensitivity and integrated gradients.

Both work on an input ``x`` of shape ``(C, D, H, W)`` (the network input without its batch
axis) and a ``forward`` that maps a batch ``(n, C, D, H, W)`` to outputs ``(n, K)``. The
spatial grid ``(D, H, W)`` is what gets occluded and attributed; all ``C`` channels of a
voxel are occluded together (the triage target stacks its four HU windows as channels).

Occlusion follows MONAI's ``OcclusionSensitivity`` (monai.visualize, 1.x) exactly:

- windows of ``mask`` voxels (``mask_size`` clamped to the grid, as MONAI does once a
  bounding box is given) start every ``int(mask * (1 - overlap))`` voxels, the last one
  flush with the far edge (MONAI's sliding-window layout; :mod:`CTFMLib.sliding_window`);
- each window is occluded in its own copy of ``x``: ``mode="gaussian"`` multiplies it by
  ``1 - G`` where ``G`` is a Gaussian (sigma = mask / 4, MONAI's "erf" discrete kernel)
  rescaled to [0, 1], so the centre voxel becomes 0 (-1024 HU once scaled) and the window's
  far corner keeps its value; ``mode=<float>`` sets the window to that value (MONAI's
  "mean_patch" multiplies the window by its mean instead of replacing it, so it is left out);
- every voxel gets the average of the outputs of the windows covering it, weighted by
  MONAI's Gaussian importance map (sigma = mask / 8, clamped at 1e-3) for ``"gaussian"``,
  uniformly otherwise.

:func:`occlusion` then turns the per-voxel averaged output ``m(v)`` into a map with a
``score`` (``score(reference) - score(m(v))``), e.g. ``1 - cos(e(x), m(v))`` as upstream's
saliency maps did with MONAI's averaged embeddings; ``blend="objective"`` averages each
window's ``score(reference) - score(o_i)`` instead (MONAI run on a module that outputs the
objective). A ``box`` limits the work to the windows that touch it, on the same global
window layout, so the values inside the box are those of the unrestricted run.

:func:`integrated_gradients` (Sundararajan et al. 2017) attributes ``objective(x) -
objective(baseline)`` to voxels: ``(x - baseline) * mean_k grad objective(baseline +
a_k (x - baseline))`` with midpoint ``a_k = (k + 1/2) / steps``; the attributions sum to
that difference up to the quadrature error (completeness).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..progress import null_progress
from ..sliding_window import gaussian_importance, scan_interval, window_starts

OCCLUSION_MODES = ("gaussian",)
BLENDS = ("outputs", "objective")


@dataclass
class OcclusionGrid:
    """Where the occluding windows go on a ``shape`` grid (MONAI's layout, no padding)."""

    shape: tuple
    mask: tuple
    starts: tuple  # per axis, the window starts

    @property
    def n_windows(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def windows(self, box: Optional[tuple] = None) -> np.ndarray:
        """``(N, 3)`` window starts in MONAI's order (axis 0 outermost); with ``box = (start, end)``
        (index ranges, end exclusive) only the windows that cover a voxel of the box."""
        axes = []
        for a in range(3):
            s = np.asarray(self.starts[a])
            if box is not None:
                s = s[(s < box[1][a]) & (s + self.mask[a] > box[0][a])]
            axes.append(s)
        if any(len(s) == 0 for s in axes):
            return np.zeros((0, 3), dtype=np.int64)
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.int64)


def occlusion_grid(shape: Sequence[int], mask_size=10, overlap: float = 0.25) -> OcclusionGrid:
    """The window layout of MONAI's ``OcclusionSensitivity(mask_size, overlap)`` on a ``shape`` grid."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    shape = tuple(int(s) for s in shape)
    sizes = (mask_size,) * 3 if np.isscalar(mask_size) else tuple(mask_size)
    if len(sizes) != 3 or min(int(m) for m in sizes) < 1:
        raise ValueError(f"mask_size must be a positive voxel count (or three), not {mask_size!r}")
    mask = tuple(min(int(m), s) for m, s in zip(sizes, shape))
    starts = tuple(tuple(window_starts(s, m, scan_interval(s, m, overlap))) for s, m in zip(shape, mask))
    return OcclusionGrid(shape, mask, starts)


def occlusion_multiplier(mask: Sequence[int]) -> np.ndarray:
    """MONAI's Gaussian occlusion: ``1 - G`` rescaled to [0, 1], float32 ``mask`` shaped.

    ``G`` is a unit impulse at voxel ``m // 2`` smoothed with the "erf" discrete Gaussian
    (sigma = m / 4 per axis): the product of ``0.5 * (erf((d + 1/2) / (sigma sqrt 2)) -
    erf((d - 1/2) / (sigma sqrt 2)))`` over the axes, ``d`` the offset from that voxel.
    """
    g = np.ones((1, 1, 1))
    for a, m in enumerate(mask):
        sigma = 0.25 * m
        d = np.arange(m, dtype=np.float64) - m // 2
        t = 1.0 / (sigma * math.sqrt(2.0))
        k = np.array([0.5 * (math.erf(t * (v + 0.5)) - math.erf(t * (v - 0.5))) for v in d]).clip(min=0)
        shape = [1, 1, 1]
        shape[a] = m
        g = g * k.reshape(shape)
    v = -g
    span = v.max() - v.min()
    if span == 0:  # a one-voxel mask: MONAI's rescale of a constant gives 0 (the voxel is removed)
        return np.zeros(tuple(mask), dtype=np.float32)
    return ((v - v.min()) / span).astype(np.float32)


def blend_weights(mask: Sequence[int], mode) -> np.ndarray:
    """How much a window's output counts at each of its voxels: Gaussian for "gaussian", else 1."""
    if isinstance(mode, str) and mode == "gaussian":
        return gaussian_importance(tuple(mask), 0.125).numpy().astype(np.float64)
    return np.ones(tuple(mask), dtype=np.float64)


def _check_mode(mode):
    if isinstance(mode, str):
        if mode not in OCCLUSION_MODES:
            raise ValueError(f"occlusion mode must be {', '.join(OCCLUSION_MODES)} or a number, not {mode!r}")
        return mode
    try:
        return float(mode)
    except (TypeError, ValueError):
        raise ValueError(f"occlusion mode must be {', '.join(OCCLUSION_MODES)} or a number, not {mode!r}") from None


def occlude(x: torch.Tensor, starts: np.ndarray, mask: Sequence[int], mode, multiplier: Optional[torch.Tensor]):
    """A batch ``(n, C, D, H, W)``: copy ``b`` of ``x`` with the window at ``starts[b]`` occluded."""
    batch = x.unsqueeze(0).repeat(len(starts), *([1] * x.ndim))
    for b, (z, y, w) in enumerate(starts):
        region = (b, slice(None), slice(z, z + mask[0]), slice(y, y + mask[1]), slice(w, w + mask[2]))
        if isinstance(mode, str):  # gaussian
            batch[region] = batch[region] * multiplier
        else:
            batch[region] = mode
    return batch


def run_windows(forward: Callable, x: torch.Tensor, grid: OcclusionGrid, windows: np.ndarray, mode="gaussian",
                batch_size: int = 12, progress=None) -> np.ndarray:
    """Outputs ``(N, K)`` float64 of ``forward`` on ``x`` with each window occluded in turn.

    ``progress(fraction, message)`` is called after every batch and may raise
    :class:`CTFMLib.progress.Cancelled`.
    """
    progress = progress or null_progress
    mode = _check_mode(mode)
    multiplier = torch.from_numpy(occlusion_multiplier(grid.mask)).to(x.device, x.dtype)
    outputs = []
    total = len(windows)
    with torch.inference_mode():
        for i in range(0, total, batch_size):
            chunk = windows[i:i + batch_size]
            out = forward(occlude(x, chunk, grid.mask, mode, multiplier))
            outputs.append(out.detach().reshape(len(chunk), -1).double().cpu().numpy())
            done = min(i + batch_size, total)
            progress(done / total, f"occluded window {done} of {total}")
    if not outputs:
        return np.zeros((0, 0))
    return np.concatenate(outputs)


def blend(outputs: np.ndarray, windows: np.ndarray, grid: OcclusionGrid, weights: np.ndarray, box: tuple,
          reduce: Callable) -> np.ndarray:
    """``reduce`` of the weighted mean of the window outputs at every voxel of ``box``.

    ``outputs``: ``(N, K)`` for the ``windows`` (which must include every window covering the
    box). ``reduce``: ``(P, K)`` averaged outputs -> ``(P,)`` values. Worked one plane of axis 0
    at a time, so memory is ``K x H x W`` whatever ``K`` (512 for CT-FM embeddings).
    Returns ``(D, H, W)`` of the box, float64.
    """
    (b0, b1) = (np.asarray(box[0]), np.asarray(box[1]))
    size = b1 - b0
    k = outputs.shape[1]
    out = np.zeros(tuple(size), dtype=np.float64)
    m = grid.mask
    for z in range(b0[0], b1[0]):
        acc = np.zeros((size[1], size[2], k))
        count = np.zeros((size[1], size[2]))
        for i in np.flatnonzero((windows[:, 0] <= z) & (windows[:, 0] + m[0] > z)):
            (z0, y0, x0), o = windows[i], outputs[i]
            y_lo, y_hi = max(y0, b0[1]), min(y0 + m[1], b1[1])
            x_lo, x_hi = max(x0, b0[2]), min(x0 + m[2], b1[2])
            if y_hi <= y_lo or x_hi <= x_lo:
                continue
            w = weights[z - z0, y_lo - y0:y_hi - y0, x_lo - x0:x_hi - x0]
            acc[y_lo - b0[1]:y_hi - b0[1], x_lo - b0[2]:x_hi - b0[2]] += w[..., None] * o
            count[y_lo - b0[1]:y_hi - b0[1], x_lo - b0[2]:x_hi - b0[2]] += w
        if np.any(count == 0):
            raise ValueError("blend: a voxel of the box is covered by none of the windows given")
        out[z - b0[0]] = reduce((acc / count[..., None]).reshape(-1, k)).reshape(size[1], size[2])
    return out


def occlusion(forward: Callable, x: torch.Tensor, score: Callable, box: Optional[tuple] = None, mask_size=10,
              overlap: float = 0.25, mode="gaussian", blend_mode: str = "outputs", batch_size: int = 12,
              progress=None) -> tuple:
    """Occlusion map ``score(reference) - score(occluded)`` over ``box`` of the grid; ``(map, details)``.

    ``score``: ``(P, K)`` float64 outputs -> ``(P,)`` (numpy), larger = more like the input
    (cosine to the reference embedding, a probability). ``blend_mode`` "outputs" averages the
    window outputs per voxel, then scores (upstream CT-FM with MONAI); "objective" averages
    each window's score drop. ``box``: ``(start, end)`` voxel indices, end exclusive (default:
    the whole grid). Returns the map on the whole grid (0 outside the box), float64, and a dict
    of what ran (windows evaluated, mask, overlap).
    """
    if blend_mode not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}, not {blend_mode!r}")
    shape = tuple(x.shape[1:])
    grid = occlusion_grid(shape, mask_size, overlap)
    box = _clip_box(box, shape)
    windows = grid.windows(box)
    with torch.inference_mode():
        reference = forward(x.unsqueeze(0)).detach().reshape(1, -1).double().cpu().numpy()
    outputs = run_windows(forward, x, grid, windows, mode, batch_size, progress)
    ref_score = float(score(reference)[0])
    weights = blend_weights(grid.mask, _check_mode(mode))
    if blend_mode == "outputs":
        part = blend(outputs, windows, grid, weights, box, lambda v: ref_score - score(v))
    else:
        drops = (ref_score - score(outputs)).reshape(-1, 1)
        part = blend(drops, windows, grid, weights, box, lambda v: v[:, 0])
    heat = np.zeros(shape, dtype=np.float64)
    heat[tuple(slice(s, e) for s, e in zip(*box))] = part
    details = {"windows": int(len(windows)), "windows_whole_grid": grid.n_windows, "mask_voxels": list(grid.mask), "axes": "SPL",
               "overlap": overlap, "occlusion": mode if isinstance(mode, str) else float(mode),
               "blend": blend_mode, "reference_score": ref_score}
    return heat, details


def _clip_box(box, shape) -> tuple:
    if box is None:
        return (0, 0, 0), tuple(shape)
    start = tuple(max(0, int(s)) for s in box[0])
    end = tuple(min(n, int(e)) for e, n in zip(box[1], shape))
    if any(e <= s for s, e in zip(start, end)):
        raise ValueError(f"the box {list(box[0])}..{list(box[1])} does not overlap the grid {list(shape)}")
    return start, end


@contextlib.contextmanager
def input_gradients_only(model: torch.nn.Module):
    """Eval mode, parameters without gradients (only the input's are needed), and a frozen
    :class:`~CTFMLib.triage_model.TriageModel` made differentiable; all restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training, frozen = model.training, getattr(model, "frozen", None)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if frozen:
            model.frozen = False  # its forward would otherwise run the encoder under no_grad
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        if frozen:
            model.frozen = frozen
        model.train(was_training)


def integrated_gradients(objective: Callable, x: torch.Tensor, steps: int = 4, batch_size: int = 1,
                         baseline: float = 0.0, progress=None) -> tuple:
    """Integrated-gradients attributions of ``objective`` at ``x`` from a constant ``baseline``.

    ``objective``: a batch ``(n, C, D, H, W)`` -> ``(n,)`` differentiable values. Returns
    ``(attributions (C, D, H, W) float64 numpy, details)``; the attributions add up to
    ``objective(x) - objective(baseline)`` up to the midpoint rule's error. Cost: ``steps``
    forward and backward passes.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    progress = progress or null_progress
    delta = x - baseline
    total = torch.zeros_like(x)
    alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps
    for i in range(0, steps, batch_size):
        a = alphas[i:i + batch_size].to(x.device).view(-1, *([1] * x.ndim))
        with torch.enable_grad():
            inp = (baseline + a * delta.unsqueeze(0)).requires_grad_(True)
            value = objective(inp)
            (grad,) = torch.autograd.grad(value.sum(), inp)
        total += grad.sum(0)
        done = min(i + batch_size, steps)
        progress(done / steps, f"gradient step {done} of {steps}")
    attributions = (delta * total / steps).double().cpu().numpy()
    return attributions, {"steps": steps, "baseline": baseline}
