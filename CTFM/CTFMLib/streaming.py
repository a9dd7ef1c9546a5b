"""SegResNetDS decoder features for inference, computed a slab of rows at a time, in place.

The features of a 96x160x160 window are the network's last decoder map (32
channels at full resolution, 315 MB in float32). Run module by module, a
pre-activation residual block holds its input, a normalised copy and two
convolution outputs at once, each freshly allocated, so a window's forward
pass peaks near 1.2 GB and spends a fifth of its time on the kernel's page
faults for those new allocations. Here, in eval mode only:

- each level has one buffer, kept from window to window: the encoder writes a
  level into it, it stays there as the skip connection, and the decoder adds
  its upsampled map into the same buffer and finishes the level there;
- a residual block ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))`` runs over
  slabs of rows along the first axis, in order: the rows of its inner map are
  computed once, a slab ahead of where the result is written back into ``x``,
  and only two of them are carried over to the next slab. Rows of ``x`` are
  overwritten only after every row that reads them is computed;
- ``bn2`` (an affine map in eval mode) is folded into ``conv1``'s weights and bias;
- the weights are kept in the compute dtype (float32 or bfloat16), so nothing
  is cast per call, and every slab is small enough for the C allocator to
  reuse without new page faults.

The result equals the module-by-module forward up to float rounding (the
tests compare both). The returned map is the level-0 buffer itself: the next
call overwrites it, so consume or clone it first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .networks import SegResBlock, SegResNetDS

# Bytes of one slab of rows (the convolution's input or output). Measured on 2 CPU threads:
# 32-channel 3x3x3 convolutions over 4-8 row slabs of a 160x160 plane run at 210 GFLOPS in float32
# and 450 in bfloat16, against 185 and 333 over the whole 96-row map.
SLAB_BYTES = {"cpu": 12 << 20, "cuda": 512 << 20}
MIN_ROWS = 4


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and channels-last layout: the very tensor when it already is (no copy)."""
    t = t.detach().to(dtype)
    return t.contiguous(memory_format=torch.channels_last_3d) if t.ndim == 5 else t


def _folded(conv: nn.Conv3d, norm: nn.BatchNorm3d):
    """Weight and bias of ``norm(conv(x))`` as one convolution (eval-mode batch norm is affine)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1, 1)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


class _Block(nn.Module):
    """A SegResBlock's weights in the compute dtype, ``bn2`` folded into ``conv1``."""

    def __init__(self, block: SegResBlock, dtype: torch.dtype):
        super().__init__()
        n = block.norm1
        for name in ("running_mean", "running_var", "weight", "bias"):
            self.register_buffer(f"bn1_{name}", getattr(n, name).detach().float(), persistent=False)
        self.eps = n.eps
        w1, b1 = _folded(block.conv1, block.norm2)
        self.register_buffer("w1", _cast(w1, dtype), persistent=False)
        self.register_buffer("b1", _cast(b1, dtype), persistent=False)
        self.register_buffer("w2", _cast(block.conv2.weight, dtype), persistent=False)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn1(x))`` as a new tensor, in ``x``'s dtype (float32 statistics, as the module)."""
        return F.batch_norm(x, self.bn1_running_mean, self.bn1_running_var, self.bn1_weight, self.bn1_bias,
                            False, 0.0, self.eps).relu_()


class StreamedFeatures(nn.Module):
    """``SegResNetDS`` (eval mode, batch norm) -> its last decoder map, computed slab by slab.

    ``dtype``: the compute dtype, ``torch.float32`` or ``torch.bfloat16``; inputs
    are cast to it slab by slab and the features are returned in it. Weights the
    network already holds in that dtype and in channels-last layout are shared,
    not copied (``net.to(memory_format=torch.channels_last_3d)`` first saves memory).
    """

    casts_itself = True  # runs in ``dtype`` without autocast (see CTFMLib.runtime.Runner)

    def __init__(self, net: SegResNetDS, dtype: torch.dtype = torch.float32, slab_bytes: Optional[int] = None):
        super().__init__()
        if not isinstance(net, SegResNetDS):
            raise TypeError(f"StreamedFeatures needs a SegResNetDS, not {type(net).__name__}")
        self.dtype = dtype
        self.slab_bytes = slab_bytes
        self.factor = net.shape_factor()
        self.out_channels = net.encoder.init_filters
        with torch.no_grad():
            enc = net.encoder
            self.register_buffer("w_init", _cast(enc.conv_init.weight, dtype), persistent=False)
            self.down_blocks = nn.ModuleList(
                nn.ModuleList(_Block(b, dtype) for b in level["blocks"]) for level in enc.layers)
            downs = [level["downsample"] for level in enc.layers if isinstance(level["downsample"], nn.Conv3d)]
            for i, conv in enumerate(downs):
                self.register_buffer(f"w_down{i}", _cast(conv.weight, dtype), persistent=False)
            self.up_blocks = nn.ModuleList(
                nn.ModuleList(_Block(b, dtype) for b in level["blocks"]) for level in net.up_layers)
            for i, level in enumerate(net.up_layers):
                self.register_buffer(f"w_up{i}", _cast(level["upsample"].deconv.weight, dtype), persistent=False)
        self.n_down = len(downs)
        self._levels = {}  # (level, batch, channels, shape, device) -> the level's buffer, reused across calls

    def _apply(self, fn, *args, **kwargs):
        self._levels = {}  # moved or converted: the buffers are remade on the next call
        return super()._apply(fn, *args, **kwargs)

    # --- helpers ---------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> int:
        """Rows per slab for a map like ``x``: about ``slab_bytes``, at least MIN_ROWS (an even number)."""
        budget = self.slab_bytes or SLAB_BYTES.get(x.device.type, SLAB_BYTES["cuda"])
        row = x.shape[0] * x.shape[1] * x.shape[3] * x.shape[4] * x.element_size()
        rows = max(MIN_ROWS, int(budget // max(1, row)))
        return rows + rows % 2

    def _level(self, index: int, like: torch.Tensor, channels: int, shape) -> torch.Tensor:
        key = (index, like.shape[0], channels, tuple(shape), like.device)
        buf = self._levels.get(key)
        if buf is None:
            stale = [k for k in self._levels if k[0] == index]
            for k in stale:  # a new window size: drop the old buffer before allocating
                del self._levels[k]
            buf = torch.empty((like.shape[0], channels) + tuple(shape), dtype=self.dtype, device=like.device,
                              memory_format=torch.channels_last_3d)
            self._levels[key] = buf
        return buf

    @staticmethod
    def _padded_rows(x: torch.Tensor, lo: int, hi: int) -> tuple:
        """Rows ``lo..hi-1`` of ``x`` clipped to its extent, with how many zero rows pad each end."""
        n = x.shape[2]
        return x[:, :, max(lo, 0):min(hi, n)], max(0, -lo), max(0, hi - n)

    @staticmethod
    def _pad(t: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, 0, top, bottom)) if top or bottom else t

    def _conv_into(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int) -> None:
        """``out = conv3d(x, weight, stride, padding=1)``, a slab of output rows at a time."""
        rows = self._rows(out)
        for a in range(0, out.shape[2], rows):
            b = min(a + rows, out.shape[2])
            t, top, bottom = self._padded_rows(x, a * stride - 1, (b - 1) * stride + 2)
            t = self._pad(t.to(self.dtype), top, bottom)
            out[:, :, a:b] = F.conv3d(t, weight, None, stride, (0, 1, 1))

    def _deconv_add(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        """``out += conv_transpose3d(x, weight, stride 2, padding 1, output_padding 1)``, by slabs.

        Output rows ``a..b-1`` (``a`` even) need input rows ``a/2..b/2``, the last only for row
        ``b-1``; the rows computed beyond ``b`` are incomplete and dropped. A slab has at least
        five input rows (PyTorch runs shorter ones through a slow path); a short last slab
        starts earlier instead and drops the rows before ``a``.
        """
        rows = max(self._rows(out), 8)
        n = x.shape[2]
        for a in range(0, out.shape[2], rows):
            b = min(a + rows, out.shape[2])
            hi = min(b // 2 + 1, n)
            lo = max(0, min(a // 2, hi - 5))
            y = F.conv_transpose3d(x[:, :, lo:hi], weight, None, 2, 1, 1)
            skip = 2 * (a // 2 - lo)
            out[:, :, a:b] += y[:, :, skip:skip + b - a]

    def _block(self, x: torch.Tensor, block: _Block) -> None:
        """``x += conv2(relu(conv1'(relu(bn1(x)))))`` in place, a slab of rows at a time.

        ``h = relu(conv1'(...))`` is computed one slab ahead: writing rows ``a..b-1`` of ``x``
        needs ``h`` rows ``a-1..b``, which need ``x`` rows ``a-2..b+1``, none yet overwritten.
        """
        n = x.shape[2]
        rows = self._rows(x)
        tail, done = None, 0  # h rows [a-1, done) carried over from the previous slab
        for a in range(0, n, rows):
            b = min(a + rows, n)
            c = min(b + 1, n)
            t, top, bottom = self._padded_rows(x, done - 1, c + 1)
            h = F.conv3d(self._pad(block.pre(t), top, bottom), block.w1, block.b1, 1, (0, 1, 1)).relu_()
            if tail is not None:
                h = torch.cat((tail, h), dim=2)
            h0 = max(a - 1, 0)  # the first row h holds
            y = F.conv3d(self._pad(h, int(a == 0), int(b == n)), block.w2, None, 1, (0, 1, 1))
            x[:, :, a:b] += y
            tail = h[:, :, b - 1 - h0:]
            done = c

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected a batch (B, C, D, H, W), got shape {tuple(x.shape)}")
        if any(s % self.factor for s in x.shape[2:]):
            raise ValueError(f"window size {tuple(x.shape[2:])} must be divisible by {self.factor}")
        shape = tuple(x.shape[2:])
        cur = self._level(0, x, self.w_init.shape[0], shape)
        self._conv_into(cur, x, self.w_init, 1)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            for block in blocks:
                self._block(cur, block)
            if i < self.n_down:
                skips.append(cur)
                weight = getattr(self, f"w_down{i}")
                shape = tuple((s + 1) // 2 for s in shape)
                nxt = self._level(i + 1, x, weight.shape[0], shape)
                self._conv_into(nxt, cur, weight, 2)
                cur = nxt
        for i, blocks in enumerate(self.up_blocks):
            skip = skips.pop()
            self._deconv_add(skip, cur, getattr(self, f"w_up{i}"))
            cur = skip
            for block in blocks:
                self._block(cur, block)
        return cur
