"""Learning-rate schedule: linear warmup, then cosine decay to 0 at ``max_steps``.

Steps are counted as optimizer updates: update ``s`` (0-based) uses ``lr * lr_factor(s, ...)``.

- warmup, ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (the last warmup update runs at the full lr,
  the first one already moves the weights);
- then ``0.5 * (1 + cos(pi * (s - warmup_steps) / (max_steps - warmup_steps)))``: 1 at ``s = warmup_steps``,
  0 at ``s = max_steps`` (and 0 after it).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The multiplier of the base learning rate for update ``step`` (0-based); see the module docstring."""
    step, warmup_steps, max_steps = int(step), max(int(warmup_steps), 0), max(int(max_steps), 1)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return 0.0
    decay = max(max_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """A ``LambdaLR`` following :func:`lr_factor`; call ``scheduler.step()`` once after each update.

    Its ``state_dict`` holds only counters, so a checkpoint restores it exactly; the factor is
    computed from ``warmup_steps``/``max_steps`` given here (a resumed run may change ``max_steps``).
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, max_steps))
