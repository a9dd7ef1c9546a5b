"""The four saliency targets: each turns an image into a network input, the network's output, a
score of it, and the way from the input's grid back to the image's voxel grid (:class:`Problem`).

Scores are "larger = more like the input's own output": the cosine similarity to the input's
embedding (embedding, point), a class's mean softmax probability (class), the triage probability
(triage). See :mod:`CTFMLib.saliency` for what each target explains.

Each target hands its loaded network to ``hold`` (from :func:`CTFMLib.saliency.saliency_image`): eval mode, no
parameter gradients, and back the :class:`~CTFMLib.runtime.Runner` that places it and holds the precision;
every forward pass goes through :func:`network`, under that Runner's autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..image import Geometry, ImageError
from ..preprocess import PreprocessConfig, preprocess

EMBEDDING_SPACING = (3.0, 3.0, 3.0)  # mm, upstream's saliency preprocessing


@dataclass
class Problem:
    """What a target hands the methods: the input, the network and the way back."""

    x: torch.Tensor  # (C, D, H, W) network input; the (D, H, W) grid is occluded / attributed
    forward: Callable  # (n, C, D, H, W) -> (n, K) outputs
    score: Callable  # numpy (P, K) float64 -> (P,): larger = more like the input's output
    objective: Callable  # torch (n, C, D, H, W) -> (n,): the score, differentiable
    geometry: Geometry  # the (D, H, W) grid in LPS mm
    to_input: Callable  # (D, H, W) map -> float32 on the input voxel grid
    model: nn.Module
    notes: list
    limit: Optional[tuple] = None  # (start, end): the part of the grid worth occluding (class: unpadded)


# --- targets ------------------------------------------------------------------------------------


def _auto(spacing) -> bool:
    return isinstance(spacing, str) and spacing == "auto"


def network(runner, batch: torch.Tensor):
    """The network's output for ``batch`` in ``runner``'s precision (:meth:`CTFMLib.runtime.Runner.autocast`:
    bf16 autocast or none). Gradients flow as the caller allows (``Runner.run`` would forbid them); callers
    cast the output to float32 before scoring it, so scores, their gradients and the heat stay float32."""
    with runner.autocast():
        return runner.model(batch)


def _embedding(runner, batch: torch.Tensor) -> torch.Tensor:
    """``(n, C)``: the global average of the last map a CT-FM encoder returns (or the model's ``(n, C)``)."""
    from ..networks import global_average

    out = network(runner, batch)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    return global_average(out) if out.ndim > 2 else out.float()


def _cosine_score(reference: np.ndarray) -> Callable:
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(ref)

    def score(v: np.ndarray) -> np.ndarray:
        return (v @ ref) / np.maximum(np.linalg.norm(v, axis=1) * norm, 1e-12)

    return score


def _similarity_problem(runner, x, geometry, to_input, notes) -> Problem:
    """Embedding targets: similarity to the input's own embedding (computed in the same precision)."""
    with torch.inference_mode():
        reference = _embedding(runner, x[None])[0]
    ref = reference.detach().clone()

    def forward(b):
        return _embedding(runner, b)

    def objective(b):
        return nn.functional.cosine_similarity(_embedding(runner, b), ref[None], dim=1)

    return Problem(x, forward, _cosine_score(ref.double().cpu().numpy()), objective, geometry, to_input,
                   runner.model, notes)


def _load_encoder(weights) -> nn.Module:
    if isinstance(weights, nn.Module):
        return weights
    from ..weights import load_model

    return load_model(weights or "ct_fm_feature_extractor", expect="SegResEncoder")[0]


def embedding_problem(image, weights, spacing, device, hold) -> Problem:
    """The scan embedding: the whole preprocessed volume (3 mm by default), its global average."""
    spacing = EMBEDDING_SPACING if _auto(spacing) else spacing
    pre = preprocess(image, PreprocessConfig(spacing=spacing))
    runner = hold(_load_encoder(weights).to(device))
    x = torch.from_numpy(pre.array)[None].to(device)
    where = "native spacing" if spacing is None else f"{'x'.join(f'{s:g}' for s in spacing)} mm"
    notes = [f"scan embedding: model-card preprocessing at {where} (SPL), grid {'x'.join(map(str, pre.array.shape))}"]
    return _similarity_problem(runner, x, pre.geometry, lambda h: pre.to_input(h, mode="linear", fill=0), notes)


def point_problem(image, weights, point_lps, device, hold) -> Problem:
    """The embedding of the 24 x 128 x 128 patch at 3 x 1 x 1 mm around ``point_lps``."""
    from ..embed import PATCH_SIZE, PATCH_SPACING, patch_at_point

    if point_lps is None:
        raise ValueError("the point target needs a point (point_lps, LPS mm)")
    pre = preprocess(image, PreprocessConfig(spacing=PATCH_SPACING, crop_foreground=False))
    patch = patch_at_point(pre, point_lps)  # refuses a point outside the image
    # Where patch_at_point cut it: the voxel nearest the point, minus half the patch.
    start = np.floor(pre.physical_to_model_index(point_lps) + 0.5).astype(int) - np.asarray(PATCH_SIZE) // 2
    g = pre.geometry
    geometry = Geometry(PATCH_SIZE, g.spacing, g.index_to_physical(start.astype(np.float64)), g.direction)
    runner = hold(_load_encoder(weights).to(device))

    def to_input(heat):
        full = np.zeros(pre.array.shape, dtype=np.float32)
        dst, src = [], []
        for s, n, size in zip(start, pre.array.shape, PATCH_SIZE):
            lo, hi = max(s, 0), min(s + size, n)
            dst.append(slice(lo, hi))
            src.append(slice(lo - s, hi - s))
        full[tuple(dst)] = heat[tuple(src)]
        return pre.to_input(full, mode="linear", fill=0)

    notes = [f"patch embedding: {'x'.join(map(str, PATCH_SIZE))} voxels at "
             f"{'x'.join(f'{s:g}' for s in PATCH_SPACING)} mm (SPL) around {np.round(point_lps, 1).tolist()} mm LPS"]
    return _similarity_problem(runner, torch.from_numpy(patch)[None].to(device), geometry, to_input, notes)


def _segmentation(weights, labels):
    """``(SegResNetDS, [LabelInfo])`` from a model source (default whole-body) or a loaded network."""
    from ..labels import load_labels
    from ..segment import load_segmentation_model, output_channels

    if not isinstance(weights, nn.Module):
        return load_segmentation_model(weights or "whole-body")
    classes = output_channels(weights)
    named = {int(k): str(v) for k, v in (labels or {}).items()}
    return weights, load_labels({str(v): named.get(v, f"label_{v}") for v in range(1, classes)})


def class_problem(image, weights, class_name, labels, spacing, region, device, hold) -> Problem:
    """A segmentation class's mean softmax probability over the region (or the whole input)."""
    from ..segment import ROI, select_structures

    if not class_name:
        raise ValueError("the class target needs a class name (class:NAME)")
    model, label_info = _segmentation(weights, labels)
    try:
        (chosen,) = select_structures(label_info, [class_name])
    except ValueError:
        names = ", ".join(x.name for x in label_info)
        raise ValueError(f"the segmentation model has no class {class_name!r}; its classes are: {names}") from None
    pre = preprocess(image, PreprocessConfig(spacing=None if _auto(spacing) else spacing))
    shape = np.asarray(pre.array.shape)
    window = np.asarray(getattr(model, "ctfm_window", None) or ROI)
    if region is None:
        start, end = np.zeros(3, int), shape.copy()
        target_box = (start.copy(), end.copy())
    else:
        lo, hi = index_box(pre.geometry, region, 0)
        if np.any(hi <= lo):
            raise ImageError("the region holds no voxel of the segmentation model's grid")
        size = np.minimum(np.maximum(window, hi - lo), shape)
        start = np.clip(np.round((lo + hi) / 2.0 - size / 2.0).astype(int), 0, shape - size)
        start, end = np.minimum(start, lo), np.maximum(start + size, hi)  # the region always fits
        target_box = (lo - start, hi - start)
    factor = int(model.shape_factor()) if hasattr(model, "shape_factor") else 16
    crop = pre.array[tuple(slice(s, e) for s, e in zip(start, end))]
    padded = np.zeros(tuple(-(-n // factor) * factor for n in crop.shape), dtype=np.float32)
    padded[tuple(slice(0, n) for n in crop.shape)] = crop  # 0 = -1024 HU, as the sliding window pads
    x = torch.from_numpy(padded)[None].to(device)
    runner = hold(model.to(device))
    box = tuple(slice(int(s), int(e)) for s, e in zip(*target_box))
    channel = int(chosen.value)

    def objective(b):
        logits = network(runner, b)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        return torch.softmax(logits[(slice(None), slice(None)) + box].float(), dim=1)[:, channel].mean(dim=(1, 2, 3))

    g = pre.geometry
    geometry = Geometry(padded.shape, g.spacing, g.index_to_physical(start.astype(np.float64)), g.direction)

    def to_input(heat):
        full = np.zeros(pre.array.shape, dtype=np.float32)
        full[tuple(slice(s, e) for s, e in zip(start, end))] = heat[tuple(slice(0, n) for n in crop.shape)]
        return pre.to_input(full, mode="linear", fill=0)

    padding = f" (zero-padded to a multiple of {factor})" if padded.shape != crop.shape else ""
    notes = [f"class {chosen.name!r} (channel {channel}): mean softmax probability over "
             f"{'the region' if region is not None else 'the input'}; network input "
             f"{'x'.join(map(str, padded.shape))} voxels of the {'x'.join(map(str, pre.array.shape))} "
             f"model-card grid (S, P, L){padding}"]
    return Problem(x, lambda b: objective(b)[:, None], lambda v: v[:, 0], objective, geometry, to_input,
                   runner.model, notes, limit=((0, 0, 0), tuple(crop.shape)))


def triage_problem(image, triage_model, device, hold) -> Problem:
    """A triage model's probability; the HU-window copies of a voxel are the input's channels."""
    from ..triage import TRIAGE_SPACING, load_triage, triage_preprocess
    from ..triage_model import DEFAULT_SIZE, DEFAULT_WINDOWS

    if triage_model is None:
        raise ValueError("the triage target needs a triage model (a folder written by `ctfm train classify`)")
    model, config, name = load_triage(triage_model)
    prep = config.get("_preprocessing") or {}
    tin = triage_preprocess(image, size=prep.get("size", DEFAULT_SIZE), windows=prep.get("windows", DEFAULT_WINDOWS),
                            spacing=prep.get("spacing", TRIAGE_SPACING), orientation=prep.get("orientation", "SPL"))
    s, p, ell = tin.geometry.shape
    x = torch.from_numpy(tin.array.reshape(tin.windows, s, p, ell)).to(device)
    runner = hold(model.to(device))

    def objective(b):
        return torch.sigmoid(network(runner, b.reshape(b.shape[0], 1, tin.windows * s, p, ell)).float().reshape(-1))

    notes = [f"triage probability of {name}: {tin.windows} HU windows of a {s}x{p}x{ell} grid at "
             f"{'x'.join(f'{v:g}' for v in tin.geometry.spacing)} mm, occluded together"]
    return Problem(x, lambda b: objective(b)[:, None], lambda v: v[:, 0], objective, tin.geometry, tin.to_input,
                   runner.model, notes)


# --- regions -------------------------------------------------------------------------------------


def _corners(region) -> np.ndarray:
    lo, hi = region
    return np.array([[(lo, hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])


def index_box(geometry: Geometry, region, dilation: int) -> tuple:
    """Voxel index range ``(start, end)`` (end exclusive) of the grid whose centres may lie in the LPS
    box, grown by ``dilation`` voxels (what linear interpolation onto the input grid reads), clipped."""
    idx = geometry.physical_to_index(_corners(region))
    start = np.ceil(idx.min(axis=0) - 1e-6).astype(int) - dilation
    end = np.floor(idx.max(axis=0) + 1e-6).astype(int) + 1 + dilation
    shape = np.asarray(geometry.shape)
    return np.clip(start, 0, shape), np.clip(end, 0, shape)
