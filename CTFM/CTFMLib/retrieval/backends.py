"""Where a retrieval index lives: a folder (the embedded SQLite + vector-file index, the default) or a
PostgreSQL database with the pgvector extension (a shared index for many workstations and cluster nodes).

An index target is what a user types as ``INDEX``:

- a folder: :class:`CTFMLib.retrieval.index.VectorIndex`;
- ``postgresql://user@host:5432/db?schema=ctfm`` (or ``postgres://``):
  :class:`CTFMLib.retrieval.postgres.PostgresIndex`, one index per schema (default ``ctfm``). Leave the password
  out of the URL: libpq reads it from ``PGPASSWORD`` or the password file (``~/.pgpass``, ``PGPASSFILE``), so it
  never shows in a process list, a log or a Slicer scene;
- ``env:NAME``: the URL in environment variable ``NAME`` (e.g. ``env:CTFM_INDEX_URL``).

Torch-free and psycopg-free at import: the Slicer layer imports it at start-up to tell the two apart and to show
a URL without its password (:func:`display`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .urls import SCHEMES, display, is_database

__all__ = ["ENV_PREFIX", "SCHEMES", "display", "exists", "index_class", "is_database", "open_index",
           "open_or_create", "resolve"]

ENV_PREFIX = "env:"

Target = Union[str, os.PathLike]


def resolve(target: Target) -> Union[str, Path]:
    """The URL (a ``str``) or the folder (a ``Path``) that ``target`` names; ``env:NAME`` is looked up.

    Refused in one line (ValueError) when the variable is unset or empty."""
    text = os.fspath(target)
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX):]
        value = os.environ.get(name, "").strip() if name else ""
        if not value:
            raise ValueError(f"{text}: environment variable {name or '(no name)'} is not set; set it to the index's "
                             "postgresql:// URL or give the URL or folder itself")
        return resolve(value)
    if is_database(text):
        return text
    return Path(text).expanduser()


def index_class(target: Target):
    """The index class for a resolved target (imports psycopg only for a database)."""
    if is_database(target):
        from .postgres import PostgresIndex

        return PostgresIndex
    from .index import VectorIndex

    return VectorIndex


def exists(target: Target) -> bool:
    """Whether an index has been created at ``target`` (a database is asked; a folder needs a filled index.sqlite)."""
    target = resolve(target)
    if is_database(target):
        return index_class(target).exists(target)
    from .store import DB_NAME

    db = Path(target) / DB_NAME
    return db.is_file() and db.stat().st_size > 0  # an empty one: a creator died; creating completes it


def open_index(target: Target, **kwargs):
    """``VectorIndex.open`` or ``PostgresIndex.open`` (same keywords: model_id, weights_hash, readonly, timeout)."""
    target = resolve(target)
    return index_class(target).open(target, **kwargs)


def open_or_create(target: Target, model_id: str, weights_hash: str, dim: int, preprocessing=None, **kwargs):
    """The index at ``target``, created atomically when there is none (see ``VectorIndex.open_or_create``)."""
    target = resolve(target)
    return index_class(target).open_or_create(target, model_id, weights_hash, dim, preprocessing, **kwargs)
