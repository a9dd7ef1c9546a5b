"""CT-FM pretraining as a training task: intra-sample SimCLR on crops of preprocessed CT scans.

Each step draws ``run.scans_per_step`` scans; each scan gives
``pretrain.crops_per_scan`` random crops of ``pretrain.crop_size`` voxels and
two augmented views per crop (:mod:`.views`). The model is the CT-FM encoder,
the global average of its deepest map, and a projection head (Linear-ReLU-Linear,
no batch norm); the loss is NT-Xent within each scan (:mod:`.losses`).
The exported model is the encoder alone, in the published layout, so it is
used like the released CT-FM feature extractor.

A step's crops go through the encoder in micro-batches of ``pretrain.micro_batch``
crops (``"auto"``: the most that fit the memory budget, :mod:`.memory`) with the
exact gradient of the whole step's loss (:meth:`PretrainTask.backward`, the
"gradient cache" technique). The encoder's batch norms (``networks.SegResBlock``)
then see micro-batches: each is normalised by its own statistics, and running
statistics are updated once per micro-batch.

The config is a plain dict with the sections ``pretrain``, ``model``, ``run``
(and ``optim``, read by the trainer) as ``CTFMLib.train.config.DEFAULTS["pretrain"]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch import nn

from .common import ProjectionModel, config_section, pass_order_index, seeded_model
from .config import derived_projection
from .losses import ntxent_within_scan
from .trainer import unwrap
from .views import scan_views, view_config

# Tags mixed into the seeds, so the scan order, the training crops and the validation crops never share a stream.
_ORDER, _SAMPLE, _VALIDATION = 1, 2, 3


class VolumeSource(Protocol):
    """Indexable preprocessed scans: ``len()`` and ``[i]`` -> float32 ``(D, H, W)`` in ``[0, 1]`` (may be memory-mapped)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def _full(z: torch.Tensor) -> torch.Tensor:
    """Half-precision projections (autocast) in float32 for the loss; float32 and float64 as they are."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _need(section: dict, where: str, key: str):
    if key not in section:
        raise ValueError(f"the pretraining config lacks {where}.{key}; build the config with "
                         f"CTFMLib.train.config.load_config(path, 'pretrain')")
    return section[key]




class PretrainTask:
    """The pretraining :class:`Task` (see ``trainer.Task``): data, model, loss, validation and export.

    ``volumes``: preprocessed scans (float32 ``(D, H, W)`` in ``[0, 1]``, SPL at
    ``pretrain.spacing``), a list of arrays or any :class:`VolumeSource` such as
    a scan cache view. Crops are padded with 0 where a scan is smaller.
    """

    def __init__(self, config: dict, volumes: Sequence[np.ndarray] | VolumeSource, micro_batch: Optional[int] = None):
        """``micro_batch``: crops per forward pass as :func:`.memory.plan_micro_batch` chose it (``0``: all at
        once); ``None``: from ``pretrain.micro_batch`` (``"auto"`` is planned here)."""
        self.config = config
        pre, model, run = (config_section(config, k, "pretrain") for k in ("pretrain", "model", "run"))
        self.n_crops = int(_need(pre, "pretrain", "crops_per_scan"))
        if self.n_crops < 2:
            raise ValueError(f"pretrain.crops_per_scan must be at least 2 (crops are each other's negatives), "
                             f"got {self.n_crops}")
        self.crop_size = tuple(int(s) for s in _need(pre, "pretrain", "crop_size"))
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"pretrain.crop_size must be 3 positive voxel counts (D, H, W), got {pre['crop_size']}")
        self.temperature = float(_need(pre, "pretrain", "temperature"))
        if self.temperature <= 0:
            raise ValueError(f"pretrain.temperature must be positive, got {self.temperature}")
        self.views = view_config(pre.get("views"))
        self.init_filters = int(_need(model, "model", "init_filters"))
        self.blocks_down = [int(b) for b in _need(model, "model", "blocks_down")]
        if self.init_filters < 1 or not self.blocks_down or min(self.blocks_down) < 1:
            raise ValueError(f"model.init_filters must be >= 1 and model.blocks_down a non-empty list of block counts "
                             f">= 1, got {self.init_filters} and {self.blocks_down}")
        deepest = self.init_filters * 2 ** (len(self.blocks_down) - 1)
        projection = _need(pre, "pretrain", "projection")
        if projection is None:  # derived from the encoder, as load_config does
            projection = derived_projection({"init_filters": self.init_filters, "blocks_down": self.blocks_down})
        self.projection = [int(d) for d in projection]
        if len(self.projection) < 2 or self.projection[0] != deepest:
            raise ValueError(
                f"pretrain.projection {self.projection} must start with the encoder's deepest channel count "
                f"{deepest} (model.init_filters {self.init_filters} * 2**(len(model.blocks_down) - 1)) and have an "
                f"output size; e.g. [{deepest}, {max(deepest // 2, 1)}, {max(deepest // 4, 1)}]")
        self.seed = int(run.get("seed", 0))
        if self.seed < 0:
            raise ValueError(f"run.seed must be a non-negative integer, got {self.seed}")
        self.scans_per_step = int(_need(run, "run", "scans_per_step"))
        if self.scans_per_step < 1:
            raise ValueError(f"run.scans_per_step must be at least 1, got {self.scans_per_step}")
        self.volumes = volumes
        if len(volumes) == 0:
            raise ValueError("no scans to pretrain on: the data source gave no usable volume")
        if micro_batch is None:
            micro_batch = pre.get("micro_batch", "auto")
            if micro_batch == "auto":
                from .memory import plan_micro_batch

                micro_batch = plan_micro_batch(config, device=str(run.get("device", "cpu"))).micro_batch
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, (int, type(None))) or (micro_batch or 0) < 0:
            raise ValueError(f"pretrain.micro_batch must be 'auto', null or a whole number >= 0, not {micro_batch!r}")
        self.micro_batch = int(micro_batch or 0)  # 0: every crop of a step in one pass

    # --- model --------------------------------------------------------------------------

    def encoder_config(self) -> dict:
        """The exported encoder's ``config.json`` (MONAI constructor arguments + the preprocessing it expects)."""
        pre = self.config["pretrain"]
        return {"architecture": "SegResEncoder", "spatial_dims": 3, "in_channels": 1,
                "init_filters": self.init_filters, "blocks_down": list(self.blocks_down),
                # Keys starting with "_" are notes: network builders ignore them.
                "_preprocessing": {"orientation": "SPL", "spacing": list(pre.get("spacing", [3, 1, 1])),
                                   "hu_range": list(pre.get("hu_range", [-1024, 2048]))}}

    def build_model(self) -> ProjectionModel:
        """Encoder + head on the CPU, initialised from ``run.seed`` (or ``model.weights`` for the encoder)."""
        model = seeded_model(self.seed, self.init_filters, self.blocks_down, self.config["model"].get("weights"),
                             lambda encoder: ProjectionModel(encoder, self.projection))
        # Not channels-last: on CPU oneDNN's channels-last conv3d backward is 2-3x faster but its weight gradients
        # are ~1e-3 off (relative, vs float64; the default layout: 1e-6), which breaks 1-process == N-process runs.
        return model

    # --- data ---------------------------------------------------------------------------

    def scan_index(self, step: int, slot: int) -> int:
        """Which volume fills ``slot`` of global step ``step``: a seeded permutation per pass over the data."""
        g = step * self.scans_per_step + slot
        return pass_order_index(self.seed, _ORDER, g, len(self.volumes))

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict:
        """Rank ``rank``'s share of step ``step``: ``{"views": (S, 2, n_crops, 1, D, H, W) float32, "scans": [...]}``.

        The global step has ``scans_per_step`` slots; rank ``r`` takes slots
        ``r*S .. (r+1)*S - 1`` with ``S = scans_per_step / world``. Each slot's
        scan, crops and views depend only on (seed, step, slot), so any split over
        processes, and any resume, sees the same data.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} processes")
        if self.scans_per_step % world:
            raise ValueError(f"run.scans_per_step={self.scans_per_step} cannot be split evenly over {world} "
                             f"processes; set it to a multiple of {world}")
        share = self.scans_per_step // world
        slots = range(rank * share, (rank + 1) * share)
        scans = [self.scan_index(step, s) for s in slots]
        views = [self._scan_views(i, np.random.default_rng([self.seed, _SAMPLE, step, s])) for i, s in zip(scans, slots)]
        return {"views": torch.from_numpy(np.stack(views)[:, :, :, None]), "scans": scans}

    def _scan_views(self, index: int, rng: np.random.Generator) -> np.ndarray:
        volume = self.volumes[index]
        if getattr(volume, "ndim", 0) != 3:
            raise ValueError(f"scan {index} is not a 3-D volume (shape {getattr(volume, 'shape', None)}); "
                             "pretraining needs preprocessed (D, H, W) arrays")
        return scan_views(volume, self.n_crops, self.crop_size, rng, self.views)

    # --- loss, validation, export -----------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        """NT-Xent within each scan, averaged over the batch's scans (and their anchors); every crop in one pass."""
        views = batch["views"].to(device, non_blocking=True)
        x = views.reshape((-1, 1) + tuple(views.shape[-3:]))  # (S*2*n, 1, D, H, W), order [scan][view][crop]
        return ntxent_within_scan(model(x), self.n_crops, self.temperature)

    def step_work(self, world: int = 1) -> dict:
        """Voxels one process puts through the network per step, for the expected time (:mod:`CTFMLib.costs`):
        ``train`` with gradients, ``forward`` without (the gradient cache's first pass, when micro-batched)."""
        crops = self.scans_per_step // max(1, world) * 2 * self.n_crops
        voxels = float(crops * math.prod(self.crop_size))
        return {"train": voxels, "forward": voxels if len(self.chunks(crops)) > 1 else 0.0}

    def chunks(self, n: int) -> list:
        """``[(start, end), ...]``: ``n`` crops in passes of at most ``micro_batch``, as even as possible
        (so that no batch norm sees a lone leftover crop)."""
        if not self.micro_batch or self.micro_batch >= n:
            return [(0, n)]
        passes = math.ceil(n / self.micro_batch)
        bounds = [round(i * n / passes) for i in range(passes + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def backward(self, model: nn.Module, batch: dict, device, scale: Callable = lambda loss: loss,
                 autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """The step's loss (detached) after accumulating ``d scale(loss) / d weights`` into the ``.grad`` s,
        ``micro_batch`` crops per pass (the trainer's optional ``Task.backward``).

        The contrastive loss ties every crop of a scan to every other, so it cannot be split into a sum over
        micro-batches. Instead ("gradient cache", Gao et al. 2021): (1) every crop's projection ``z`` is
        computed without keeping activations, a micro-batch at a time; (2) the loss of the whole step and its
        gradient ``dz`` are computed on ``z``; (3) each micro-batch is forwarded again with activations and
        back-propagated from its rows of ``dz``. The result is the gradient of the whole step, as one pass
        gives it, when the network's output for a crop does not depend on the other crops of its pass (the
        batch norms in eval mode); in train mode each micro-batch is normalised by its own statistics.
        Running statistics are updated once per micro-batch (pass (1) leaves them as they were). Under DDP
        only the last pass synchronises gradients (``no_sync`` for the others), so they are reduced once.
        """
        views = batch["views"].to(device, non_blocking=True)
        x = views.reshape((-1, 1) + tuple(views.shape[-3:]))  # (S*2*n, 1, D, H, W), order [scan][view][crop]
        chunks = self.chunks(x.shape[0])
        if len(chunks) == 1:
            with autocast():
                loss = ntxent_within_scan(model(x), self.n_crops, self.temperature)
            scale(loss).backward()
            return loss.detach()
        net = unwrap(model)
        running = {name: b.detach().clone() for name, b in net.named_buffers()}
        with torch.no_grad(), autocast():
            z = torch.cat([_full(model(x[a:b])) for a, b in chunks])
        with torch.no_grad():  # pass (1) must not count in the running statistics
            for name, b in net.named_buffers():
                b.copy_(running[name])
        del running
        z.requires_grad_(True)
        loss = ntxent_within_scan(z, self.n_crops, self.temperature)  # float32, outside autocast
        (dz,) = torch.autograd.grad(scale(loss), z)
        no_sync = getattr(model, "no_sync", None)
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                with autocast():
                    part = model(x[a:b])
                _full(part).backward(dz[a:b])
        return loss.detach()

    @torch.no_grad()
    def validate(self, model: nn.Module, device) -> dict:
        """Loss and top-1 positive retrieval on fixed views of one scan, in eval mode (running batch-norm stats).

        ``val_top1``: fraction of views whose most similar other view (of the same
        scan) is the other view of the same crop; chance is ``1 / (2 n - 1)``.
        """
        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            index = self.scan_index(0, 0)
            views = self._scan_views(index, np.random.default_rng([self.seed, _VALIDATION]))
            x = torch.from_numpy(views.reshape((-1, 1) + self.crop_size)).to(device)
            z = torch.cat([net(x[a:b]).float() for a, b in self.chunks(x.shape[0])])  # eval mode: as one pass
            loss = ntxent_within_scan(z, self.n_crops, self.temperature)
            zn = torch.nn.functional.normalize(z, dim=1)
            sim = zn @ zn.T
            sim.fill_diagonal_(float("-inf"))
            group = 2 * self.n_crops
            target = (torch.arange(group, device=sim.device) + self.n_crops) % group
            top1 = (sim.argmax(dim=1) == target).float().mean()
        finally:
            net.train(was_training)
        return {"val_loss": float(loss), "val_top1": float(top1)}

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the encoder alone (``config.json`` + ``model.safetensors``), loadable with ``load_model``."""
        from ..weights import save_pretrained

        save_pretrained(unwrap(model).encoder, Path(folder), self.encoder_config())
