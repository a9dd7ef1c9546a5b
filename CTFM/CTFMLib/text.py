"""Wording shared by every command's messages (no torch, nothing heavy)."""

from __future__ import annotations

from typing import Optional

__all__ = ["count"]


def count(n: int, noun: str, plural: Optional[str] = None) -> str:
    """``1 structure``, ``2 structures``, ``0 patches``: the number and the noun in agreement."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
