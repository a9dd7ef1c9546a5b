"""Data-parallel training under ``torchrun``: process groups, batch splitting, synchronised batch norm.

``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (and the rendezvous address);
:func:`init_distributed` then joins the group (gloo on the CPU, nccl on CUDA). Each process trains on
``global_batch / world`` samples per step; DDP averages the gradients, and synchronised batch norm
computes the statistics over the whole global batch, so N processes follow the same trajectory as one
process with the global batch.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors, so :class:`CPUSyncBatchNorm` does the same with a
differentiable all-reduce (:func:`all_reduce_sum_autograd`, what the deprecated
``torch.distributed.nn.functional.all_reduce`` does): its backward all-reduces the gradients of the
statistics, so each process gets the gradient of the *global* loss through the shared mean and variance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes; ``local_rank`` picks its GPU."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group and destroys it in shutdown()

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes; a single process (no ``WORLD_SIZE`` > 1) gets ``DistInfo()``.

    An already initialised group (the caller set it up) is used as is and left alone by :func:`shutdown`.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    if not launched_by_torchrun():
        return DistInfo(local_rank=local_rank)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for distributed training but this PyTorch build has no "
                           "torch.distributed; run a single process or install a full PyTorch build")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    global _BN_GROUP
    if info.owns_group and dist.is_available() and dist.is_initialized():
        _BN_GROUP = None
        dist.destroy_process_group()


def per_rank(global_batch: int, world: int) -> int:
    """Samples per process for a global batch; raises ``ValueError`` unless it splits evenly."""
    if global_batch % world:
        raise ValueError(f"run.scans_per_step={global_batch} cannot be split evenly over {world} processes; "
                         f"use a multiple of {world} (or run {global_batch} processes or fewer that divide it)")
    return global_batch // world


def rank_indices(global_batch: int, rank: int, world: int) -> range:
    """The global sample indices (0 .. global_batch-1) that process ``rank`` handles in every step.

    Tasks seed each sample by ``(seed, step, global index)``, so any number of processes sees the same
    global batch.
    """
    n = per_rank(global_batch, world)
    return range(rank * n, (rank + 1) * n)


def all_reduce_sum(values, device) -> list:
    """Sum a few floats over all processes (identity for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # d(sum_r x_r)/dx_q = 1 for every process q: each gets the sum of all processes' output gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_autograd(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``tensor`` over the processes of ``group``, differentiable (the gradient is all-reduced too)."""
    return _AllReduceSum.apply(tensor, group)


# Synchronised batch norm on the CPU gets its own gloo group, so its collectives (also issued inside
# autograd's backward) never interleave with DDP's gradient all-reduces on the default group.
_BN_GROUP = None


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the batches of all processes (any tensor device).

    Same parameters and buffers as ``nn.BatchNormNd`` (state dicts are interchangeable). In training
    mode within an initialised process group of more than one process: mean and biased variance over
    the global batch (two exact all-reduces, accumulated in float64) normalise the input; the running
    mean/variance follow ``nn.BatchNorm`` (momentum, or a cumulative average when ``momentum=None``;
    unbiased variance). Otherwise it is plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = _BN_GROUP if _BN_GROUP is not None else (dist.group.WORLD if dist.is_available() else None)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        sums = all_reduce_sum_autograd(torch.cat([x.sum(dims, dtype=torch.float64), count]), group=group)
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean.to(x.dtype).view(shape)
        var = all_reduce_sum_autograd((centered * centered).sum(dims, dtype=torch.float64), group=group) / n
        y = centered * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every batch norm by a synchronised one: torch's on CUDA, :class:`CPUSyncBatchNorm` elsewhere.

    Parameters and buffers are carried over (same tensors, same names). Call it in every process, in the
    same order (creating the CPU group is collective). Returns the converted module (the root may be new).
    """
    global _BN_GROUP
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if _BN_GROUP is None and dist.is_available() and dist.is_initialized():
        _BN_GROUP = dist.new_group(backend="gloo")
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device=_device_of(module))
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


def _device_of(module: nn.Module):
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return None
