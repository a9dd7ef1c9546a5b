"""PostgreSQL URLs of retrieval indexes: telling them from folders, and showing them without their password.

Apart from :mod:`CTFMLib.retrieval.backends` (which opens either kind) so that the PostgreSQL index can use it too
without an import circle; no torch, no psycopg.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["SCHEMES", "display", "is_database"]

SCHEMES = ("postgresql://", "postgres://")


def is_database(target) -> bool:
    """Whether ``target`` is a PostgreSQL URL (not looking up ``env:``; see :func:`resolve`)."""
    return isinstance(target, str) and target.lower().startswith(SCHEMES)


def display(target) -> str:
    """``target`` as it may be shown and stored: a folder as given, a URL without its password."""
    text = os.fspath(target)
    if not is_database(text):
        return text
    parts = urlsplit(text)
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret = [k for k, _ in query if k.lower() == "password"]  # libpq also takes ?password=
    if parts.password is None and not secret:
        return text
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}@{netloc.rsplit('@', 1)[1]}"
    if secret:
        query = urlencode([(k, v) for k, v in query if k.lower() != "password"], safe="/")
    else:
        query = parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
