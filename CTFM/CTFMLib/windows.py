"""Where sliding windows go on a volume: MONAI's layout, without torch (the Slicer panel plans with it).

``SlidingWindowInferer(roi_size, overlap)`` pads an axis shorter than the window with zeros
(``diff // 2`` before, the rest after), starts windows every ``int(roi * (1 - overlap))`` voxels
(the whole window when it equals the padded size) and puts the last one flush with the far edge.
:mod:`CTFMLib.sliding_window` blends over this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["scan_interval", "window_starts", "WindowPlan", "plan_windows"]


def scan_interval(size: int, roi: int, overlap: float) -> int:
    """MONAI's step between window starts along one axis (``size`` already padded to at least ``roi``)."""
    if roi == size:
        return int(roi)
    interval = int(roi * (1 - overlap))
    return interval if interval > 0 else 1


def window_starts(size: int, roi: int, interval: int) -> list:
    """Window starts along one axis, as MONAI's ``dense_patch_slices``: the last one is flush with the end."""
    count = 1
    for d in range(int(math.ceil(float(size) / interval))):
        if d * interval + roi >= size:
            count = d + 1
            break
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


@dataclass
class WindowPlan:
    """Where the windows go on a (padded) volume."""

    shape: tuple  # the volume's own shape (D, H, W)
    roi: tuple
    pad_before: tuple
    padded_shape: tuple
    starts: tuple  # per axis, the window starts on the padded volume

    @property
    def n_windows(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def z_groups(self) -> list:
        """``[(z, [(y, x), ...]), ...]``: windows grouped by their start along axis 0, in MONAI's order."""
        return [(z, [(y, x) for y in self.starts[1] for x in self.starts[2]]) for z in self.starts[0]]

    def crop(self) -> tuple:
        """Slices that take the volume's own extent out of the padded one."""
        return tuple(slice(b, b + n) for b, n in zip(self.pad_before, self.shape))


def plan_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> WindowPlan:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    shape, roi = tuple(int(s) for s in shape), tuple(int(r) for r in roi)
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    before = tuple((p - s) // 2 for s, p in zip(shape, padded))
    starts = tuple(tuple(window_starts(p, r, scan_interval(p, r, overlap))) for p, r in zip(padded, roi))
    return WindowPlan(shape, roi, before, padded, starts)
