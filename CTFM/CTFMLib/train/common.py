"""What every training task builds the same way: its config sections, its seeded model, its sample order.

Also :class:`ProjectionModel`, pretraining's model: :mod:`.memory` measures it to plan the micro-batch that
:mod:`.pretrain` then uses, so it lives here, below both, rather than in either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..networks import SegResEncoder, global_average


def config_section(config: dict, name: str, task: str) -> dict:
    """``config[name]``, or a TypeError saying how to build a complete ``task`` config."""
    section = config.get(name)
    if not isinstance(section, dict):
        raise TypeError(f"the {task} config lacks its '{name}' section; build the config with "
                        f"CTFMLib.train.config.load_config(path, {task!r})")
    return section


def seeded_model(seed: int, init_filters: int, blocks_down: list, weights: Optional[str],
                 wrap: Callable[[SegResEncoder], nn.Module]) -> nn.Module:
    """``wrap(encoder)`` on the CPU, initialised from ``seed`` without touching the caller's random state;
    with ``weights`` (any ``weights.load_model`` source) the encoder is then loaded strictly from them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = wrap(SegResEncoder(init_filters=init_filters, in_channels=1, blocks_down=blocks_down))
    if weights:
        from ..weights import load_model

        loaded, info = load_model(weights, expect="SegResEncoder")
        got = (int(info.config.get("init_filters", -1)), [int(b) for b in info.config.get("blocks_down", [])])
        if got != (init_filters, list(blocks_down)):
            raise ValueError(f"model.weights {weights} holds an encoder with init_filters {got[0]}, blocks_down "
                             f"{got[1]}; set model.init_filters and model.blocks_down to those values")
        model.encoder.load_state_dict(loaded.state_dict(), strict=True)
    return model


def pass_order_index(seed: int, tag: int, slot: int, n: int) -> int:
    """The item at global ``slot`` when each pass over ``n`` items follows its own seeded permutation."""
    order = np.random.default_rng([seed, tag, slot // n]).permutation(n)
    return int(order[slot % n])


class ProjectionModel(nn.Module):
    """Encoder -> global average of the deepest map -> MLP head; ``(B, 1, D, H, W)`` -> ``(B, dims[-1])``.

    The head is ``Linear(dims[0], dims[1])``, ReLU, ``Linear(dims[1], dims[2])``
    (and so on for longer ``dims``), without batch norm, as upstream CT-FM.
    """

    def __init__(self, encoder: SegResEncoder, dims: Sequence[int] = (512, 256, 128)):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2:
            raise ValueError(f"the projection needs at least [input, output] sizes, got {dims}")
        if dims[0] != encoder.out_channels:
            raise ValueError(f"the projection head takes {dims[0]} features but the encoder gives "
                             f"{encoder.out_channels}; start pretrain.projection with {encoder.out_channels}")
        self.encoder = encoder
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(global_average(self.encoder(x)[-1]))
