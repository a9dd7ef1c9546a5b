"""How much memory a pretraining step needs, known before any scan is read, and the micro-batch that fits.

The published recipe forwards 2 scans x 2 views x 15 crops of 32 x 128 x 128 voxels through a 32-filter
encoder per step: all at once that keeps ~100 GB of activations for the backward pass, and a CPU run
died with a traceback. :class:`~.pretrain.PretrainTask` therefore runs a step in micro-batches of crops
(exact gradients, see its ``backward``), and this module picks how many crops one forward pass may take.

The estimate, as :mod:`CTFMLib.saliency.budget` does it: the bytes the encoder's forward pass keeps for
its backward pass are measured on a small input (autograd's saved-tensor hooks, each storage counted
once, the weights not counted) and scaled by the crop's voxels and the filters; a forward + backward
pass of ``m`` crops peaks at about ``(m + 1)`` times that (the saved activations, plus the gradients and
work buffers of the layer being differentiated; measured with ``ru_maxrss`` on the published encoder:
~28 bytes per voxel and filter per crop beyond the first, this counts 33). On top: the model, its
gradients and AdamW's two moments (4 copies of the weights), the step's input array (twice: the views
are stacked from per-scan arrays), and the process itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from .config import ConfigError

__all__ = ["PretrainMemoryError", "MemoryPlan", "activation_bytes_per_voxel", "parameter_count",
           "default_budget_gb", "plan_micro_batch"]

PROBE_SHAPE = (16, 32, 32)  # voxels; the per-voxel cost is the same from 16 x 32 x 32 to 32 x 64 x 64 (+-1 %)
PROBE_FILTERS = 8  # the probe's encoder width; the activations grow linearly with the filters (measured 4-32)
PROCESS_BYTES = 400 << 20  # the interpreter, torch and the scan cache's bookkeeping
WEIGHT_COPIES = 4  # weights, gradients, AdamW's exp_avg and exp_avg_sq


class PretrainMemoryError(ConfigError):
    """One pretraining step would need more memory than allowed; the one-line message says what it needs."""


@dataclass
class MemoryPlan:
    """``micro_batch`` crops per forward pass (``crops`` per step and process); bytes of the estimate."""

    micro_batch: int
    crops: int
    peak_bytes: int
    budget_bytes: int
    per_crop_bytes: int
    fixed_bytes: int

    @property
    def passes(self) -> int:
        return math.ceil(self.crops / self.micro_batch)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        gb = 2 ** 30
        largest = math.ceil(self.crops / self.passes)  # PretrainTask.chunks makes the passes as even as it can
        how = ("all at once" if self.passes == 1 else
               f"in {self.passes} micro-batches of up to {largest} crops (pretrain.micro_batch {self.micro_batch})")
        return (f"{self.crops} crops a step {how}; estimated peak memory {self.peak_bytes / gb:.1f} GB of "
                f"{self.budget_bytes / gb:.1f} GB allowed")


def _encoder_model(init_filters: int, blocks_down, projection, device="cpu"):
    from ..networks import SegResEncoder
    from .common import ProjectionModel

    encoder = SegResEncoder(init_filters=init_filters, in_channels=1, blocks_down=list(blocks_down))
    dims = [encoder.out_channels] + [int(d) for d in list(projection)[1:]]
    return ProjectionModel(encoder, dims).to(device)


def activation_bytes_per_voxel(init_filters: int, blocks_down, projection) -> float:
    """Bytes the projection model's forward pass keeps for the backward pass, per input voxel of one crop,
    at ``init_filters``: measured on a :data:`PROBE_FILTERS`-filter copy and a :data:`PROBE_SHAPE` input,
    then scaled by ``init_filters / PROBE_FILTERS`` (never below the probe itself)."""
    filters = min(int(init_filters), PROBE_FILTERS)
    with torch.random.fork_rng(devices=[]):
        model = _encoder_model(filters, blocks_down, [filters * 2 ** (len(blocks_down) - 1), *list(projection)[1:]])
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    x = torch.zeros((1, 1) + PROBE_SHAPE)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / float(np.prod(PROBE_SHAPE)) * max(1.0, int(init_filters) / filters)


def parameter_count(init_filters: int, blocks_down, projection) -> int:
    """Weights of the projection model (encoder + head), counted without allocating them (meta device)."""
    model = _encoder_model(int(init_filters), blocks_down, projection, device="meta")
    return sum(p.numel() for p in model.parameters())


def default_budget_gb(device: str = "cpu") -> float:
    """85 % of the memory available to the device the network runs on: the GPU's free memory on CUDA, else
    the host's (:func:`CTFMLib.segment.default_memory_budget_gb`), shared by the processes of this machine."""
    device = str(device or "cpu").lower()
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = int(os.environ.get("LOCAL_RANK", "0")) if index is None else index
        free, _ = torch.cuda.mem_get_info(index)
        return 0.85 * free / 2 ** 30
    from ..segment import default_memory_budget_gb

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return default_memory_budget_gb() / local


def _crops_per_process(config: dict, world: int) -> int:
    return int(config["run"]["scans_per_step"]) // max(1, world) * 2 * int(config["pretrain"]["crops_per_scan"])


def plan_micro_batch(config: dict, budget_gb: Optional[float] = None, world: int = 1,
                     device: str = "cpu") -> MemoryPlan:
    """The crops per forward pass for ``config`` (``pretrain.micro_batch``: ``"auto"``, a number, or
    ``0``/``None`` for all at once) within ``budget_gb`` (default ``run.max_memory_gb``, else
    :func:`default_budget_gb`). Raises :class:`PretrainMemoryError` (one line) when even one crop, or the
    micro-batch asked for, does not fit."""
    pre, model, run = config["pretrain"], config["model"], config["run"]
    filters, blocks = int(model["init_filters"]), [int(b) for b in model["blocks_down"]]
    projection = pre.get("projection") or [filters * 2 ** (len(blocks) - 1), 1]
    crop = [int(s) for s in pre["crop_size"]]
    voxels = int(np.prod(crop))
    crops = _crops_per_process(config, world)
    if budget_gb is None:
        budget_gb = run.get("max_memory_gb")
    where = "--max-memory-gb" if budget_gb is not None else "--max-memory-gb (run.max_memory_gb)"
    if budget_gb is None:
        budget_gb = default_budget_gb(device)
    budget = budget_gb * 2 ** 30
    per_crop = int(math.ceil(activation_bytes_per_voxel(filters, blocks, projection) * voxels))
    fixed = int(WEIGHT_COPIES * 4 * parameter_count(filters, blocks, projection)
                + 2 * 4 * crops * voxels + PROCESS_BYTES)

    def peak(m: int) -> int:
        return fixed + per_crop * (m + 1)

    fits = int(min(crops, max(0, (budget - fixed) // per_crop - 1)))
    asked = pre.get("micro_batch", "auto")
    gb = 2 ** 30
    if fits < 1:
        raise PretrainMemoryError(
            f"pretraining needs about {peak(1) / gb:.1f} GB for one crop of {'x'.join(map(str, crop))} with "
            f"{filters} filters (of which {fixed / gb:.1f} GB for the model, its optimizer state and the step's "
            f"input); {budget_gb:.1f} GB are available: lower pretrain.crop_size or model.init_filters, or set "
            f"{where}")
    if asked == "auto":
        chosen = fits
    else:
        chosen = crops if not asked else min(int(asked), crops)
        if chosen > fits:
            said = f"pretrain.micro_batch {asked}" if asked else "pretrain.micro_batch 0 (all crops at once)"
            raise PretrainMemoryError(
                f"{said} needs about {peak(chosen) / gb:.1f} GB for {chosen} crops of {'x'.join(map(str, crop))} "
                f"per pass with {filters} filters; {budget_gb:.1f} GB are available: set pretrain.micro_batch to "
                f"{fits} or 'auto', lower pretrain.crop_size or model.init_filters, or set {where}")
    largest = math.ceil(crops / math.ceil(crops / chosen))  # the passes are made as even as they can be
    return MemoryPlan(micro_batch=chosen, crops=crops, peak_bytes=peak(largest), budget_bytes=int(budget),
                      per_crop_bytes=per_crop, fixed_bytes=fixed)
