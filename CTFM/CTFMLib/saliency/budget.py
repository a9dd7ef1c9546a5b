"""How much memory a saliency run needs, known before it starts, and the refusal when it is too much.

A gradient run keeps every activation the backward pass needs, for the whole network input: on a
256 x 256 x 108 head CT at native spacing the class target's SegResNetDS needs tens of GB, and the
run used to end with the kernel killing the process. The bytes the forward pass saves for the
backward pass are measured here on a small input of the same network (autograd's saved-tensor
hooks, each storage counted once) and scaled by the input's voxels: the network's activations
grow linearly with its input. An occlusion run does forward passes only, several occluded copies
at a time; its peak is the segmentation's per-voxel forward cost
(:data:`CTFMLib.segment_plan.FORWARD_BYTES`) per filter of the network's widest level.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["SaliencyMemoryError", "saved_bytes_per_voxel", "estimate_peak_bytes", "check_memory"]

PROBE_SHAPE = (32, 64, 64)  # divisible by 32: every level of the encoders and SegResNetDS exists
# The interpreter, torch, the image and its preprocessed copies. 900 MB: a class-gradient run in a clean CI
# checkout peaked 0.14 GB above the estimate with 600 MB (2.74 GB against 2.6; 2.2-2.4 GB elsewhere), and an
# estimate under the peak is the unsafe side.
PROCESS_BYTES = 900 * 2**20
# Peak of a forward + backward pass: the saved activations, the activation gradients the backward holds
# beside them, and the output's chain (logits, softmax, and their gradients: 4 float32 per output channel).
# Measured (ru_maxrss) on SegResNetDS with 118 outputs at 0.3 to 1 million voxels: 16 filters need
# 1.5 x saved + the output chain; 32 filters less (this estimate is ~40% high there; refusing is the safe side).
BACKWARD_FACTOR = 1.5
OUTPUT_CHAIN_FLOATS = 2


class SaliencyMemoryError(ValueError):
    """The run would need more memory than allowed; the message names cheaper settings."""


def saved_bytes_per_voxel(model: torch.nn.Module, channels: int) -> tuple:
    """``(bytes the forward pass of model keeps for its backward pass, output channels)`` per input voxel,
    measured on a small input (each saved storage counted once)."""
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a sparse one)
            pass
        return t

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros((1, channels) + PROBE_SHAPE, device=device, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        outputs = int(out.shape[1]) if out.dim() == 5 else 0  # a map per voxel (segmentation), else a vector
        del out
    return sum(storages.values()) / float(np.prod(PROBE_SHAPE)), outputs


def estimate_peak_bytes(model: torch.nn.Module, x_shape, method: str, batch: int) -> int:
    """Peak memory (bytes) of running ``method`` on a network input of shape ``x_shape`` (C, D, H, W),
    ``batch`` copies (occluded copies or gradient steps) per pass."""
    from ..segment_plan import FORWARD_BYTES

    # The network may see the input's channels folded into its first axis (triage: HU windows stacked along
    # S): what scales is the number of input values per network input channel.
    first = _first_conv(model)
    channels = int(first.in_channels) if first is not None else int(x_shape[0])
    voxels = int(np.prod(x_shape)) // channels
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = 4 * int(np.prod(x_shape))
    if method == "gradient":
        saved, outputs = saved_bytes_per_voxel(model, channels)
        per_voxel = BACKWARD_FACTOR * saved + 4 * OUTPUT_CHAIN_FLOATS * outputs
        work = per_voxel * voxels * batch + 3 * inputs * batch  # and the input, its gradient
    else:
        filters = int(getattr(model, "init_filters", 0) or (first.out_channels if first is not None else 32))
        work = FORWARD_BYTES["fp32"] * filters * voxels * batch + inputs * (batch + 1)
    return int(work + 2 * parameters + PROCESS_BYTES)


def _first_conv(model: torch.nn.Module) -> Optional[torch.nn.Conv3d]:
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv3d)), None)


def check_memory(model: torch.nn.Module, x_shape, method: str, batch: int, target: str, budget_gb: float,
                 has_region: bool) -> Optional[int]:
    """Refuse (:class:`SaliencyMemoryError`) before allocating when the estimate exceeds ``budget_gb``;
    returns the estimate (bytes), or None where the network cannot be probed (a fixed input size)."""
    try:
        needed = estimate_peak_bytes(model, x_shape, method, batch)
    except (RuntimeError, ValueError, TypeError, IndexError):  # the probe's shape does not suit this network
        return None
    if needed / 2**30 <= budget_gb:
        return needed
    grid = "x".join(str(int(n)) for n in x_shape[1:])
    cheaper = []
    if not has_region and target != "point":
        cheaper.append("a cube around a point (--cube MM with --center X,Y,Z) or a box (--roi)")
    if target in ("embedding", "class"):
        cheaper.append("a coarser grid (--spacing 3)")
    if batch > 1:
        cheaper.append("--batch-size 1")
    advice = "; ".join(cheaper) if cheaper else "a smaller input"
    raise SaliencyMemoryError(
        f"{method} saliency of the {target} target on a {grid} network input needs about {needed / 2**30:.1f} GB "
        f"of memory, more than the {budget_gb:.1f} GB allowed: use {advice}, or allow more with --max-memory-gb")
