"""The CT-FM networks in plain PyTorch, state-dict compatible with MONAI.

:class:`SegResEncoder` and :class:`SegResNetDS` reproduce MONAI's classes of the
same names (``monai.networks.nets.segresnet_ds``, isotropic kernels, batch norm,
ReLU, transposed-convolution upsampling): same module tree, so the same
parameter names and shapes, and the same arithmetic. The published CT-FM
weights therefore load strictly and give MONAI's outputs, without making MONAI
a run-time dependency of the Slicer extension. The test suite checks both
against MONAI itself.

:class:`TriageModel` (``"architecture": "TriageModel"``) is the scan classifier ``ctfm train classify``
exports: an encoder and a small head, built and checked here like the others (:func:`triage_parts`), so
loading it needs neither the training package nor a loader of its own.

CT-FM's encoder: ``SegResEncoder(spatial_dims=3, in_channels=1,
init_filters=32, blocks_down=(1, 2, 2, 4, 4))``, 77,760,992 parameters; its
embedding is the global average of the deepest (512-channel) feature map.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .model_store import TRIAGE_ARCHITECTURE

CTFM_ENCODER_CONFIG = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]}


class SegResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))
        return x + identity


def _check_3d(spatial_dims: int) -> None:
    if spatial_dims != 3:
        raise ValueError(f"CT-FM networks are 3-D; spatial_dims={spatial_dims} is not supported")


class SegResEncoder(nn.Module):
    """Encoder returning the feature map of every level, finest first.

    Level ``i`` has ``init_filters * 2**i`` channels at ``1 / 2**i`` resolution
    (stride-2 convolutions, padding 1, so odd sizes are fine).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 32,
        in_channels: int = 1,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        act: str = "relu",
        norm: str = "batch",
        **unused,
    ):
        super().__init__()
        _check_3d(spatial_dims)
        _check_supported(act=act, norm=norm, **unused)
        self.in_channels = in_channels
        self.init_filters = init_filters
        self.blocks_down = tuple(blocks_down)
        self.conv_init = nn.Conv3d(in_channels, init_filters, kernel_size=3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        filters = init_filters
        for i, n_blocks in enumerate(self.blocks_down):
            level = nn.ModuleDict()
            level["blocks"] = nn.Sequential(*[SegResBlock(filters) for _ in range(n_blocks)])
            if i < len(self.blocks_down) - 1:
                level["downsample"] = nn.Conv3d(filters, 2 * filters, kernel_size=3, stride=2, padding=1, bias=False)
            else:
                level["downsample"] = nn.Identity()
            self.layers.append(level)
            filters *= 2
        self.out_channels = filters // 2

    def forward(self, x: torch.Tensor) -> list:
        outputs = []
        x = self.conv_init(x)
        for level in self.layers:
            x = level["blocks"](x)
            outputs.append(x)
            x = level["downsample"](x)
        return outputs

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, out_channels)``: global average of the deepest map."""
        return global_average(self(x)[-1])


def global_average(features: torch.Tensor) -> torch.Tensor:
    """Average over all spatial axes, kept in float32 for a stable mean under autocast."""
    return features.float().mean(dim=tuple(range(2, features.ndim)))


class TriageModel(nn.Module):
    """Encoder -> global average of the deepest map -> ``Linear(C, hidden)`` - ReLU - ``Linear(hidden, 1)``.

    ``hidden = 0``: the head is one ``Linear(C, 1)`` (a linear probe). ``forward``: ``(B, 1, D, H, W)``
    -> logits ``(B,)``; with ``embedded=True`` the input is already the embedding ``(B, C)`` (the global
    average) and only the head runs. ``frozen=True`` fixes the encoder: its parameters do not require
    gradients, its batch norms stay in eval mode (running statistics) even when the model is put in
    training mode, and its forward runs without autograd.
    """

    def __init__(self, encoder: SegResEncoder, hidden: int = 256, frozen: bool = False):
        super().__init__()
        self.encoder = encoder
        hidden, channels = int(hidden), encoder.out_channels
        if hidden < 0:
            raise ValueError(f"the head's hidden size must be >= 0 (0 = a linear head), got {hidden}")
        self.head = (nn.Linear(channels, 1) if hidden == 0 else
                     nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)))
        self.frozen = bool(frozen)
        if self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> TriageModel:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        if embedded:
            return self.head(x).squeeze(-1)
        if self.frozen:
            with torch.no_grad():
                features = global_average(self.encoder(x)[-1])
        else:
            features = global_average(self.encoder(x)[-1])
        return self.head(features).squeeze(-1)


class SegResNetDS(nn.Module):
    """Encoder-decoder with deep supervision, as MONAI's ``SegResNetDS``.

    In eval mode returns the full-resolution logits ``(B, out_channels, ...)``;
    in train mode with ``dsdepth > 1`` a list of logits, finest first.
    Input sizes must be divisible by ``2 ** (len(blocks_down) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 32,
        in_channels: int = 1,
        out_channels: int = 2,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] | None = None,
        dsdepth: int = 1,
        act: str = "relu",
        norm: str = "batch",
        upsample_mode: str = "deconv",
        resolution=None,
        **unused,
    ):
        super().__init__()
        _check_3d(spatial_dims)
        _check_supported(act=act, norm=norm, upsample_mode=upsample_mode, resolution=resolution, **unused)
        self.out_channels = out_channels
        self.dsdepth = max(int(dsdepth), 1)
        self.encoder = SegResEncoder(init_filters=init_filters, in_channels=in_channels, blocks_down=blocks_down)
        n_up = len(self.encoder.blocks_down) - 1
        self.blocks_up = tuple(blocks_up) if blocks_up is not None else (1,) * n_up
        self.up_layers = nn.ModuleList()
        filters = init_filters * 2**n_up
        for i in range(n_up):
            filters //= 2
            level = nn.ModuleDict()
            level["upsample"] = _Deconv(2 * filters, filters)
            level["blocks"] = nn.Sequential(*[SegResBlock(filters) for _ in range(self.blocks_up[i])])
            if len(self.blocks_up) - i <= self.dsdepth:
                level["head"] = nn.Conv3d(filters, out_channels, kernel_size=1, bias=True)
            else:
                level["head"] = nn.Identity()
            self.up_layers.append(level)
        if n_up == 0:
            raise ValueError("SegResNetDS needs at least two encoder levels")

    def shape_factor(self) -> int:
        return 2 ** (len(self.encoder.blocks_down) - 1)

    def forward(self, x: torch.Tensor):
        f = self.shape_factor()
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be divisible by {f}")
        skips = self.encoder(x)
        skips.reverse()
        x = skips.pop(0)
        outputs = []
        for i, level in enumerate(self.up_layers):
            x = level["upsample"](x)
            x = x + skips.pop(0)
            x = level["blocks"](x)
            if len(self.up_layers) - i <= self.dsdepth:
                outputs.append(level["head"](x))
        outputs.reverse()
        if not self.training or len(outputs) == 1:
            return outputs[0]
        return outputs


class _Deconv(nn.Module):
    """MONAI ``UpSample(mode="deconv", kernel_size=3, scale_factor=2)``: its parameter lives at ``deconv``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.deconv = nn.ConvTranspose3d(
            in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(x)


def _check_supported(act="relu", norm="batch", upsample_mode="deconv", resolution=None, head_module=None,
                     anisotropic_scales=None, preprocess=None, **rest):
    """Refuse configurations this re-implementation does not reproduce, instead of silently differing."""
    problems = []
    if str(act).lower() != "relu":
        problems.append(f"act={act!r}")
    if str(norm).lower() != "batch":
        problems.append(f"norm={norm!r}")
    if str(upsample_mode).lower() != "deconv":
        problems.append(f"upsample_mode={upsample_mode!r}")
    for name, value in (("resolution", resolution), ("head_module", head_module),
                        ("anisotropic_scales", anisotropic_scales), ("preprocess", preprocess)):
        if value is not None:
            problems.append(f"{name}={value!r}")
    # Hugging Face mixins may add bookkeeping keys; anything else is an unknown option.
    unknown = [k for k in rest if not k.startswith("_") and k not in ("architectures", "model_type", "task", "labels")]
    problems += [f"{k}={rest[k]!r}" for k in unknown]
    if problems:
        raise ValueError("unsupported network options: " + ", ".join(problems))


ARCHITECTURES = {"SegResEncoder": SegResEncoder, "SegResNetDS": SegResNetDS, TRIAGE_ARCHITECTURE: TriageModel}


def architecture_of(config: dict) -> str:
    """Which network a Hugging Face ``config.json`` describes.

    CT-FM's configs carry only constructor arguments: ``out_channels`` marks
    the segmentation network, its absence the feature extractor.
    """
    name = config.get("architecture") or config.get("_class_name")
    if name:
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
        return name
    return "SegResNetDS" if "out_channels" in config else "SegResEncoder"


def build_network(config: dict) -> nn.Module:
    """Build the network a ``config.json`` describes (constructor arguments as MONAI names them)."""
    name = architecture_of(config)
    if name == TRIAGE_ARCHITECTURE:  # an encoder and a head: TriageModel(encoder, hidden), as training builds it
        encoder, hidden = triage_parts(config)
        return TriageModel(build_network(encoder), hidden, frozen=False)
    kwargs = {k: v for k, v in config.items() if k not in ("architecture", "_class_name")}
    if "blocks_down" in kwargs:
        kwargs["blocks_down"] = tuple(kwargs["blocks_down"])
    return ARCHITECTURES[name](**kwargs)


# --- checking a config before anything is built ----------------------------------------------

# The biggest published CT-FM network (whole-body SegResNetDS) has about 87 million parameters. One
# billion parameters (4 GB of float32 weights, more again while loading) is over ten times that and
# still fits a workstation; a config asking for more is a typo or a hostile file, refused before
# any memory is allocated.
MAX_PARAMETERS = 1_000_000_000
# Ranges a config.json value must lie in. They hold every CT-FM network with room to spare
# (published: in_channels 1, init_filters 32, five levels of 1-4 blocks, 118 classes).
CONFIG_LIMITS = {"in_channels": (1, 4), "init_filters": (1, 128), "levels": (1, 8), "blocks": (1, 16),
                 "blocks_up": (0, 16), "out_channels": (1, 1024)}
_ENCODER_KEYS = {"spatial_dims", "in_channels", "init_filters", "blocks_down", "act", "norm"}
_SEGMENTER_KEYS = _ENCODER_KEYS | {"out_channels", "blocks_up", "dsdepth", "upsample_mode", "resolution",
                                   "head_module", "anisotropic_scales", "preprocess"}
_NOTE_KEYS = {"architecture", "_class_name", "architectures", "model_type", "task", "labels"}


def _whole(config: dict, key: str, default, low: int, high: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number, not {value!r}"[:200])
    if not low <= value <= high:
        raise ValueError(f"{key} = {value} is outside {low}..{high}")
    return value


def _block_list(config: dict, key: str, default, levels: tuple, blocks: tuple) -> list:
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} must be a list of whole numbers (blocks per level), not {value!r}"[:200])
    if not levels[0] <= len(value) <= levels[1]:
        raise ValueError(f"{key} must list {levels[0]}..{levels[1]} levels, not {len(value)}")
    for n in value:
        if isinstance(n, bool) or not isinstance(n, int) or not blocks[0] <= n <= blocks[1]:
            raise ValueError(f"{key} = {list(value)!r} must hold whole numbers {blocks[0]}..{blocks[1]}"[:200])
    return list(value)


def validate_config(config) -> str:
    """Check a ``config.json`` before any network is built; returns its architecture name.

    Types and ranges (:data:`CONFIG_LIMITS`), keys the constructor knows (keys starting with ``_``
    and Hugging Face bookkeeping are notes), and options this re-implementation does not reproduce.
    Every problem is a one-line ``ValueError``; nothing is allocated.
    """
    if not isinstance(config, dict):
        raise ValueError(f"a network config is a JSON object, not {type(config).__name__}")
    name = architecture_of(config)
    if name == TRIAGE_ARCHITECTURE:  # its other keys (threshold, metrics, preprocessing) are notes
        triage_parts(config)
        return name
    allowed = _SEGMENTER_KEYS if name == "SegResNetDS" else _ENCODER_KEYS
    unknown = sorted(str(k) for k in config if k not in allowed and k not in _NOTE_KEYS and not str(k).startswith("_"))
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ValueError(f"unknown {name} options: {shown}")
    spatial = config.get("spatial_dims", 3)
    if spatial != 3 or isinstance(spatial, bool):
        raise ValueError(f"CT-FM networks are 3-D; spatial_dims={spatial!r} is not supported"[:200])
    _whole(config, "in_channels", 1, *CONFIG_LIMITS["in_channels"])
    _whole(config, "init_filters", 32, *CONFIG_LIMITS["init_filters"])
    levels = _block_list(config, "blocks_down", (1, 2, 2, 4), CONFIG_LIMITS["levels"], CONFIG_LIMITS["blocks"])
    for key in ("act", "norm", "upsample_mode"):
        if key in config and not isinstance(config[key], str):
            raise ValueError(f"{key} must be a name, not {config[key]!r}"[:200])
    if name == "SegResNetDS":
        n_up = len(levels) - 1
        if n_up < 1:
            raise ValueError("SegResNetDS needs at least two encoder levels (blocks_down)")
        _whole(config, "out_channels", 2, *CONFIG_LIMITS["out_channels"])
        if config.get("blocks_up") is not None:
            up = _block_list(config, "blocks_up", None, (n_up, n_up), CONFIG_LIMITS["blocks_up"])
            if len(up) != n_up:
                raise ValueError(f"blocks_up must list {n_up} levels")
        _whole(config, "dsdepth", 1, 1, n_up)
    kwargs = {k: v for k, v in config.items() if k in allowed}
    kwargs.pop("spatial_dims", None)
    for key in ("in_channels", "init_filters", "blocks_down", "out_channels", "blocks_up", "dsdepth"):
        kwargs.pop(key, None)
    _check_supported(**kwargs)
    return name


def triage_parts(config: dict) -> tuple:
    """``(encoder config, hidden size)`` of a :class:`TriageModel` config (``hidden`` 0: a linear head), checked.

    The encoder (``"encoder"``, keys starting with ``_`` are notes) must be a valid :class:`SegResEncoder` config;
    ``"head"`` lists the layer sizes ``[C, 1]`` or ``[C, hidden, 1]`` with ``C`` the encoder's output channels
    (default ``[C, 256, 1]``). Every problem is a one-line ``ValueError``; nothing is allocated.
    """
    encoder = config.get("encoder")
    if not isinstance(encoder, dict):
        raise ValueError(f"a {TRIAGE_ARCHITECTURE} config needs an encoder (a JSON object of its network settings)")
    encoder = {k: v for k, v in encoder.items() if not str(k).startswith("_")}
    try:
        kind = validate_config(encoder)
        if kind != "SegResEncoder":
            raise ValueError(f"it describes a {kind}, not a SegResEncoder")
    except ValueError as e:
        raise ValueError(f"the encoder does not describe a supported network: {e}") from None
    channels = encoder.get("init_filters", 32) * 2 ** (len(encoder.get("blocks_down", (1, 2, 2, 4))) - 1)
    head = config.get("head") or [channels, 256, 1]
    whole = isinstance(head, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in head)
    if not whole or len(head) not in (2, 3) or head[0] != channels or head[-1] != 1 or \
            (len(head) == 3 and not 1 <= head[1] <= 65536):
        raise ValueError(f"head {str(head)[:80]} is neither [C, 1] (linear) nor [C, hidden, 1] (hidden 1..65536) "
                         f"with C = {channels}, the encoder's output; re-export the model")
    return encoder, head[1] if len(head) == 3 else 0


def meta_network(build) -> nn.Module:
    """``build()`` on the meta device: the module tree with every tensor's shape and dtype, no memory."""
    with torch.device("meta"):
        return build()


def state_layout(model: nn.Module) -> dict:
    """``{state-dict name: (shape, floating)}`` of a (meta) network."""
    return {k: (tuple(v.shape), bool(v.is_floating_point())) for k, v in model.state_dict().items()}


def check_network_size(model: nn.Module, what: str = "the network") -> int:
    """Number of parameters and buffers of a (meta) network; ``ValueError`` past :data:`MAX_PARAMETERS`."""
    total = sum(int(v.numel()) for v in model.state_dict().values())
    if total > MAX_PARAMETERS:
        raise ValueError(f"{what} would have {total:,} parameters ({total * 4 / 1e9:.1f} GB), more than the "
                         f"{MAX_PARAMETERS:,} CT-FM allows: the config is wrong")
    return total


def probe_size(model: nn.Module) -> int:
    """The smallest cube edge (voxels) every level of ``model``'s encoder accepts, at least 4."""
    encoder = model if isinstance(model, SegResEncoder) else getattr(model, "encoder", None)
    levels = len(encoder.blocks_down) if isinstance(encoder, SegResEncoder) else 1
    factor = 2 ** max(levels - 1, 0)
    return factor * max(1, -(-4 // factor))


def build_encoder(config: dict | None = None) -> SegResEncoder:
    """The CT-FM encoder (or a smaller one for tests, from ``config``)."""
    return SegResEncoder(**{**CTFM_ENCODER_CONFIG, **(config or {})})
