"""Wording shared by every command's messages (no torch, nothing heavy).

One CLI style: a command prints its result as sentences, or with ``--json`` as ONE JSON object, the last
line of stdout (:func:`print_result`); other lines a person reads (expected times, notes, "skipped") go
through :func:`say`, which moves them to stderr under ``--json`` so that stdout holds the object alone.
Progress is always on stderr.

Axis orders are always named. Sizes of an image as ITK and Slicer show it are ``(x, y, z)``: columns,
rows, slices (:func:`size`, e.g. ``512x512x120 voxels (x, y, z)``); a working grid of the models is
``(S, P, L)`` (superior, posterior, left: the SPL orientation the models read), spacings likewise; a JSON
field holding a size or spacing sits beside an ``axes`` field (``"xyz"`` or ``"SPL"``).
"""

from __future__ import annotations

import json
import sys
from typing import Iterable, Optional

__all__ = ["count", "size", "spacing", "say", "print_result", "IMAGE_AXES", "GRID_AXES", "EXIT_ERROR"]

EXIT_ERROR = 2  # a refused input: one line on stderr (`ctfm: error: ...`) and this exit status

IMAGE_AXES = "xyz"  # an image's own voxel axes, as ITK and Slicer give its size
GRID_AXES = "SPL"  # the models' working grids (CTFMLib.segment_plan.ORIENTATION, CTFMLib.embed)
_NAMES = {"xyz": "(x, y, z)", "SPL": "(S, P, L)"}


def count(n: int, noun: str, plural: Optional[str] = None) -> str:
    """``1 structure``, ``2 structures``, ``0 patches``: the number and the noun in agreement."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def size(shape: Iterable, axes: str = IMAGE_AXES) -> str:
    """``122x101x112 voxels (x, y, z)``: a size with its axis order named (``axes``: ``xyz`` or ``SPL``)."""
    return "x".join(str(int(v)) for v in shape) + f" voxels {_NAMES.get(axes, '(' + ', '.join(axes) + ')')}"


def spacing(values: Iterable, axes: str = IMAGE_AXES) -> str:
    """``0.8x0.8x2.5 mm (x, y, z)``: a voxel size with its axis order named."""
    return "x".join(f"{float(v):g}" for v in values) + f" mm {_NAMES.get(axes, '(' + ', '.join(axes) + ')')}"


def _json_mode(args) -> bool:
    return bool(getattr(args, "json", False))


def say(args, text: str) -> None:
    """A line for a person: on stdout, or on stderr under ``--json`` (where stdout holds only the result)."""
    print(text, file=sys.stderr if _json_mode(args) else sys.stdout, flush=True)


def print_result(args, result: dict, *sentences: str) -> None:
    """A command's result: ``sentences`` on stdout, or under ``--json`` ``result`` as one JSON object, one line."""
    if _json_mode(args):
        print(json.dumps(result, default=str), flush=True)
        return
    for sentence in sentences:
        print(sentence, flush=True)
