"""How long network work takes on this computer: a short measurement, kept per device and thread count.

Printed estimates used to be figures measured on other CPUs and were 1.6-3.8x off. Here the
published CT-FM encoder (SegResEncoder, 32 filters) is timed once on this computer, on one
24 x 128 x 128 patch (the embedding patch), for each kind of work a command does:

- ``forward``: inference (embeddings, occlusion saliency, retrieval);
- ``input_gradient``: forward + backward to the input (gradient saliency);
- ``train``: forward + backward to the parameters, two patches in training mode (training).

Each kind is measured the first time a command needs it (a warm-up pass, then two timed: 2-15 s)
and kept in ``<CT-FM cache>/costs.json`` under the processor, device kind, precision, thread count
and PyTorch version (``CTFM_COSTS_FILE`` names another file); a measurement older than :data:`STALE_DAYS` days is taken again. Costs of
other networks and inputs scale with their convolution work: multiply-adds per input voxel
(:func:`flops_per_voxel`, counted on the meta device) times voxels, relative to the measured encoder.

This module imports no torch; :func:`measure` and :func:`flops_per_voxel` import it when called.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = [
    "KINDS", "STALE_DAYS", "cpu_name", "PROBE_SHAPE", "Costs", "Rate", "rate", "measure", "flops_per_voxel", "reference_flops",
    "network_seconds", "duration",
]  # fmt: skip

KINDS = ("forward", "input_gradient", "train")
STALE_DAYS = 30
PROBE_SHAPE = (24, 128, 128)
TRAIN_BATCH = 2
# Before a kind is measured (a caller that must not wait): 2 threads of an Intel Xeon (AMX), fp32,
# seconds per million voxels of the published encoder; CPU figures scale with 2 / threads.
GENERIC = {"forward": 1.8, "input_gradient": 5.5, "train": 6.0}
GENERIC_THREADS = 2


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what platform knows: part of every timing key."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _torch_version() -> str:
    """PyTorch's version without importing it (the Slicer GUI plans without torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def duration(seconds: float) -> str:
    """``40 s``, ``3 min``, ``1.5 h``: how long, as people say it."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Rate:
    """Seconds per million input voxels of the published encoder for one kind of work."""

    kind: str
    seconds_per_mvoxel: float
    measured: bool  # False: the generic figure (not yet measured here)


class Costs:
    """``costs.json`` in the CT-FM cache: ``{key: {kind: {"s_per_mvoxel": x, "at": epoch seconds}}}``.
    Written atomically; an unreadable file counts as empty (it is measured again)."""

    NAME = "costs.json"
    ENVIRONMENT = "CTFM_COSTS_FILE"  # another file (the test suite keeps one for the session)

    def __init__(self, path: Optional[Path] = None):
        if path is None:
            from .cache import ctfm_home

            path = os.environ.get(self.ENVIRONMENT) or ctfm_home() / self.NAME
        self.path = Path(path)

    @staticmethod
    def key(device: str, precision: str, threads: int) -> str:
        return f"{cpu_name()}|{str(device).split(':')[0]}|{precision}|{int(threads)}|torch {_torch_version()}"

    def _read(self) -> dict:
        from .files import read_json_object

        return read_json_object(self.path)

    def get(self, key: str, kind: str, now: Optional[float] = None) -> Optional[float]:
        """The kept figure, or None when absent, malformed or older than :data:`STALE_DAYS`."""
        entry = self._read().get(key, {})
        entry = entry.get(kind) if isinstance(entry, dict) else None
        if not isinstance(entry, dict):
            return None
        value, at = entry.get("s_per_mvoxel"), entry.get("at")
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            return None
        if not isinstance(at, (int, float)) or (now or time.time()) - at > STALE_DAYS * 86400 or at > (now or time.time()) + 86400:
            return None
        return float(value)

    def put(self, key: str, kind: str, value: float, now: Optional[float] = None) -> None:
        from .files import atomic_write_text

        if not (value > 0 and math.isfinite(value)):
            return
        data = self._read()
        entry = data.get(key) if isinstance(data.get(key), dict) else {}
        entry[kind] = {"s_per_mvoxel": round(float(value), 5), "at": round(now or time.time(), 1)}
        data[key] = entry
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError:
            pass  # a cache that cannot be written means measuring again next time, nothing worse


def _autocast(device, precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(kind: str, device="cpu", precision: str = "fp32") -> float:
    """Seconds per million voxels of ``kind`` work of the published encoder, timed now on ``device``."""
    import torch

    from .networks import build_encoder

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    model = build_encoder().to(device)
    batch = TRAIN_BATCH if kind == "train" else 1
    x = torch.rand((batch, 1) + PROBE_SHAPE, generator=generator).to(device)

    def once():
        if kind == "forward":
            model.eval()
            with torch.inference_mode(), _autocast(device, precision):
                model(x)
        elif kind == "input_gradient":
            model.eval()
            xi = x.clone().requires_grad_(True)
            with _autocast(device, precision):
                model(xi)[-1].float().mean().backward(inputs=[xi])
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                model(x)[-1].float().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()  # the first pass builds the convolution kernels for this shape
    best = math.inf  # the better of two rounds: one disturbed round does not set the figure for a month
    rounds = 2
    for _ in range(rounds):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best / (batch * math.prod(PROBE_SHAPE) / 1e6)


def rate(kind: str, device="cpu", precision: str = "fp32", threads: Optional[int] = None,
         costs: Optional[Costs] = None, measure_now: bool = True,
         announce: Optional[Callable[[str], None]] = None) -> Rate:
    """This computer's :class:`Rate` for ``kind``: kept, else measured now (``announce`` is told first),
    else (``measure_now=False``) the generic figure."""
    import torch

    threads = int(threads or torch.get_num_threads())
    costs = costs or Costs()
    device = str(device)
    key = Costs.key(device, precision, threads)
    kept = costs.get(key, kind)
    if kept is not None:
        return Rate(kind, kept, True)
    if measure_now:
        if announce:
            announce(f"measuring this computer's speed for {kind.replace('_', ' ')} work (once a month, a few seconds)")
        value = measure(kind, device, precision)
        costs.put(key, kind, value)
        return Rate(kind, value, True)
    generic = GENERIC[kind] * (GENERIC_THREADS / max(1, threads) if device.startswith("cpu") else 0.1)
    return Rate(kind, generic, False)


def flops_per_voxel(model, in_channels: Optional[int] = None, shape=(32, 64, 64)) -> float:
    """Multiply-adds of ``model``'s convolutions and linear layers per input voxel, counted on the meta device
    (no memory, no time): the work that makes a network slow, to scale a measured rate to another network.
    The network runs with meta stand-ins for its weights (``torch.func.functional_call``): it is not copied,
    and its mode and weights are left as they were."""
    import torch
    from torch import nn
    from torch.func import functional_call

    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        out = output[0] if isinstance(output, (list, tuple)) else output
        if isinstance(module, nn.Conv3d):
            k = math.prod(module.kernel_size) * module.in_channels // module.groups
            total += k * out.numel()
        elif isinstance(module, nn.ConvTranspose3d):
            k = math.prod(module.kernel_size) * module.out_channels // module.groups
            total += k * inputs[0].numel()
        elif isinstance(module, nn.Linear):
            total += module.in_features * out.numel()

    if in_channels is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv3d)), None)
        in_channels = first.in_channels if first is not None else 1
    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            functional_call(model, stand_ins, (torch.zeros((1, in_channels) + tuple(shape), device="meta"),))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total / math.prod(shape)


_REFERENCE: dict = {}


def reference_flops() -> float:
    """:func:`flops_per_voxel` of the published encoder (the network the rates are measured on)."""
    if "encoder" not in _REFERENCE:
        from .networks import build_encoder, meta_network

        _REFERENCE["encoder"] = flops_per_voxel(meta_network(build_encoder))
    return _REFERENCE["encoder"]


def network_seconds(rate_: Rate, voxels: float, model=None, flops: Optional[float] = None) -> float:
    """Seconds for ``voxels`` input voxels through ``model`` (or a network of ``flops`` per voxel; default:
    the published encoder) at ``rate_``."""
    if flops is None and model is not None:
        try:
            flops = flops_per_voxel(model)
        except Exception:  # noqa: BLE001 - a network the meta device cannot run (it makes tensors of its own)
            flops = None  # counted as the published encoder
    factor = 1.0 if flops is None else flops / reference_flops()
    return rate_.seconds_per_mvoxel * factor * float(voxels) / 1e6

