"""What every training task builds the same way: its config sections, its seeded model, its sample order."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..networks import SegResEncoder


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
