"""Command-line value types and an argument parser whose refusals are one line.

Every number a user types is checked when it is parsed, so a wrong value is refused before any
image is read or any model loaded: ``type=positive_int`` and friends raise
``argparse.ArgumentTypeError`` with the reason, and :class:`Parser` prints it as
``ctfm embed: error: argument --threads: ... (see ctfm embed --help)`` and exits 2.
Torch-free: the Slicer modules build command lines with the same rules.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

__all__ = [
    "Parser", "positive_int", "non_negative_int", "positive_float", "memory_gb", "fraction", "spacing_mm",
    "SPACING_RANGE_MM", "parse_point", "parse_numbers",
]  # fmt: skip

# Voxel sizes a CT can have (mm): finer than 0.05 mm or coarser than 50 mm is a unit mistake or a broken header.
SPACING_RANGE_MM = (0.05, 50.0)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a usage error in one line (exit 2) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text, kind, what):
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def positive_int(text) -> int:
    """A whole number >= 1 (threads, batch sizes, steps, sizes)."""
    value = _number(text, int, "must be a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def non_negative_int(text) -> int:
    """A whole number >= 0 (0 meaning "no limit" where the option says so)."""
    value = _number(text, int, "must be a whole number of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return value


def positive_float(text) -> float:
    """A finite number > 0 (millimetres, scales)."""
    value = _number(text, float, "must be a number above 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def memory_gb(text) -> float:
    """A memory budget in GB: finite and > 0."""
    value = _number(text, float, "must be a memory size in GB above 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a memory size in GB above 0, not {text!r}")
    return value


def fraction(text) -> float:
    """A number in [0, 1) (overlaps)."""
    value = _number(text, float, "must be a number from 0 up to (not including) 1")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 up to (not including) 1, not {text!r}")
    return value


def spacing_mm(text) -> float:
    """A voxel size in mm within :data:`SPACING_RANGE_MM`."""
    low, high = SPACING_RANGE_MM
    what = f"must be a voxel size in mm from {low:g} to {high:g}"
    value = _number(text, float, what)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def parse_numbers(text, n: int, what: str) -> np.ndarray:
    """``n`` finite numbers separated by commas (or semicolons); ``ValueError`` naming ``what`` otherwise."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}, not {text!r}")
    return np.asarray(values)


def parse_point(text) -> np.ndarray:
    """A point X,Y,Z in mm: three finite numbers."""
    return parse_numbers(text, 3, "a point is three numbers X,Y,Z in mm (finite)")

