"""Linear probe on cached embeddings: what ``classify.mode = "probe"`` adds to :mod:`.classify`.

The encoder is frozen, so a scan's embedding never changes during training: it is computed once per scan
(:func:`embed_all`: the triage input -> encoder -> global average of the deepest map, ``(C,)`` float32,
in eval mode with the running batch-norm statistics, in fp32 even under autocast, without augmentation:
no flips in probe mode) and the training steps only run the head. The first step computes them (its
``seconds`` in metrics.csv include that), on the trainer's device, with the model's own encoder.

:class:`EmbeddingCache` keeps them in memory and, given a folder, on disk as ``embeddings-<key>.npz``
(one ``(N, C)`` float32 array per set, e.g. ``train`` and ``validation``, plus ``key``). The key is a
BLAKE2b digest of the encoder's whole state (:func:`state_digest`), of the preprocessing and of every
input volume (:func:`arrays_digest`), so other weights, scans, sizes or windows get another file and a
stale cache is never read (the scans are hashed at each run's first step: about a second per GB). Files
are written through :func:`CTFMLib.files.atomic_output`: processes of one ``torchrun`` job, which each
compute the same embeddings, may all write it; an unreadable file is recomputed.

:class:`Standardize` is the probe head's first layer: ``(e - mean) / scale`` with the training
embeddings' mean and standard deviation, so AdamW at an ordinary learning rate fits features of any
scale (a feature may vary by only ~1e-3 between scans, which would need weights ~1e3).
:func:`fold_standardize` merges it into the following ``Linear`` for the export: the same logits from a
plain ``Linear(C, 1)`` on raw embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_output

CACHE_FORMAT = b"ctfm-probe-embeddings-v1"  # changes whenever the way embeddings are computed changes


def state_digest(module: nn.Module) -> str:
    """Hex BLAKE2b of every state entry (name, dtype, shape, bytes), in name order; device independent."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def arrays_digest(arrays: Sequence[np.ndarray]) -> str:
    """Hex BLAKE2b of the arrays in order (shape, dtype, C-order bytes): the identity of the input scans."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(arrays)}|".encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype.str}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def cache_key(*parts: str) -> str:
    h = hashlib.blake2b(CACHE_FORMAT, digest_size=16)
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def embed_all(encoder: nn.Module, volumes: Sequence, prepare: Callable, device, batch: int) -> np.ndarray:
    """``(N, C)`` float32: ``encoder.embed(prepare(v))`` for every volume, ``batch`` at a time, on ``device``.

    ``prepare(volume)`` -> float32 ``(1, D, H, W)``. Eval mode (restored afterwards), autocast off.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        with torch.autocast(device.type, enabled=False):
            for start in range(0, len(volumes), batch):
                x = torch.from_numpy(np.stack([prepare(v) for v in volumes[start:start + batch]]))
                out.append(encoder.embed(x.to(device)).float().cpu().numpy())
    finally:
        encoder.train(was_training)
    if not out:
        return np.zeros((0, int(getattr(encoder, "out_channels", 0))), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


class EmbeddingCache:
    """Embedding sets by key, in memory and (with ``folder``) in ``folder/embeddings-<key>.npz``."""

    def __init__(self, folder=None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict = {}

    def path(self, key: str) -> Path | None:
        return self.folder / f"embeddings-{key}.npz" if self.folder is not None else None

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        """``{set name: (N, C) float32}`` for ``key``: from memory, else the file, else ``compute()`` (saved)."""
        if key in self._memory:
            return self._memory[key]
        sets = self._read(key)
        if sets is None:
            sets = {name: np.asarray(a, dtype=np.float32) for name, a in compute().items()}
            self._write(key, sets)
        self._memory = {key: sets}  # one key at a time: an older encoder's embeddings are not needed again
        return sets

    def _read(self, key: str) -> dict | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) != key:
                    return None
                return {name: f[name].astype(np.float32, copy=False) for name in f.files if name != "key"}
        except Exception:  # noqa: BLE001 - a truncated or foreign file is simply recomputed
            return None

    def _write(self, key: str, sets: dict) -> None:
        path = self.path(key)
        if path is None:
            return
        with atomic_output(path) as tmp, open(tmp, "xb") as f:
            np.savez(f, key=np.array(key), **sets)


class Standardize(nn.Module):
    """``(B, C)`` -> ``(x - mean) / scale`` (buffers, saved in checkpoints; set by :meth:`fit`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    @torch.no_grad()
    def fit(self, embeddings: np.ndarray) -> None:
        """Mean and standard deviation per feature (float64); a constant feature keeps scale 1."""
        e = np.asarray(embeddings, dtype=np.float64)
        mean, sd = e.mean(axis=0), e.std(axis=0)
        self.mean.copy_(torch.from_numpy(mean))
        self.scale.copy_(torch.from_numpy(np.where(sd > 0, sd, 1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


@torch.no_grad()
def fold_standardize(standardize: Standardize, linear: nn.Linear) -> nn.Linear:
    """A ``Linear`` on raw features equal to ``linear(standardize(x))`` (computed in float64)."""
    w = linear.weight.detach().double().cpu() / standardize.scale.double().cpu()
    b = linear.bias.detach().double().cpu() - w @ standardize.mean.double().cpu()
    out = nn.Linear(linear.in_features, linear.out_features)
    out.weight.copy_(w.float())
    out.bias.copy_(b.float())
    return out
