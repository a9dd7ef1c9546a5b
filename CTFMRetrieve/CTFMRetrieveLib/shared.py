"""A shared index (a PostgreSQL database, :mod:`CTFMLib.retrieval.backends`) seen from Slicer.

The index is given as ``postgresql://user@host/db?schema=NAME`` or ``env:NAME`` (the URL in an environment
variable) and handed to the ``ctfm index`` children as their INDEX, like a folder. Secrets stay out of the scene:
a URL with a password is refused (libpq reads the password from ``PGPASSWORD`` or a password file), so the URL
the parameter node keeps is the URL itself; the password file is this workstation's (the panel keeps it in
QSettings) and reaches the children as ``PGPASSFILE``. Only the children talk to the database, with psycopg and
pgvector, which they import from Slicer's own Python: this module checks they are installed without importing
them. No Qt.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from CTFMLib.retrieval import backends
from CTFMSlicer.process import ProcessRunner, ctfm_cli_command, failure_text, last_json_object

__all__ = ["PASSWORD_REFUSAL", "REQUIREMENTS", "child_environment", "is_shared", "packages_problem", "problem",
           "scene_only_volume_problem", "scene_text", "start_info"]

# What a shared index needs in Slicer's Python (the children import it from there).
REQUIREMENTS = ("psycopg[binary]>=3.1", "pgvector>=0.2")
PASSWORD_REFUSAL = "leave the password out of the URL: put it in a password file or PGPASSWORD"


def is_shared(target) -> bool:
    """Whether ``target`` names a database (a ``postgresql://`` URL or ``env:NAME``), not a folder."""
    return isinstance(target, str) and (backends.is_database(target.strip())
                                        or target.strip().startswith(backends.ENV_PREFIX))


def scene_text(target) -> str:
    """What the scene may keep of a shared index's URL: the URL without its password (a folder: as it is)."""
    return backends.display(target or "")


def problem(target, password_file=None) -> Optional[str]:
    """Why ``target`` cannot be used as a shared index (one sentence), or None; nothing is connected to."""
    text = target.strip()
    if backends.is_database(text) and urlsplit(text).password:  # an empty one ("user:@host") is no secret
        return f"{backends.display(text)}: {PASSWORD_REFUSAL}."
    try:
        url = backends.resolve(text)
    except ValueError as e:
        return f"{e}."
    if not backends.is_database(url):
        return f"{text} holds a folder, not a postgresql:// URL: choose 'folder' as the index for a folder."
    if urlsplit(url).path.strip("/") == "":
        return f"{backends.display(url)} names no database: postgresql://user@host/database?schema=NAME."
    if password_file is not None and str(password_file).strip() not in ("", "."):
        if not Path(password_file).expanduser().is_file():
            return f"The password file {password_file} does not exist; choose it again or clear it."
    return None


def packages_problem(requirements=REQUIREMENTS) -> Optional[str]:
    """The packages a shared index needs that Slicer's Python lacks (one sentence), or None (metadata only)."""
    from CTFMSlicer.dependencies import missing_requirements

    missing = missing_requirements(requirements)
    if not missing:
        return None
    listed = " ".join(f'"{r}"' for r in missing)
    return (f"A shared index needs {' and '.join(missing)}: install them into Slicer's Python (Python console: "
            f"slicer.util.pip_install('{listed}')) and try again.")


@contextlib.contextmanager
def child_environment(password_file=None):
    """While starting a child: ``PGPASSFILE`` set to ``password_file`` (when given), restored afterwards.

    The children copy the environment when they start; Slicer's own environment is left as it was."""
    if password_file is None or str(password_file).strip() in ("", "."):
        yield
        return
    previous = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(Path(password_file).expanduser())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = previous


def scene_only_volume_problem(node) -> str:
    """Why a volume that exists only in the scene cannot go into a shared index."""
    return (f"Volume '{node.GetName()}' exists only in this scene, and a shared index refers to files every "
            "workstation can reach: save it and add a folder on shared storage instead.")


def start_info(target, password_file=None, on_done: Optional[Callable] = None) -> ProcessRunner:
    """``ctfm index info TARGET --json`` in a child; ``on_done(info_or_None, message)`` (the child's error)."""
    stdout = []

    def line(stream, text):
        if stream == "stdout":
            stdout.append(text)

    def finished(result):
        info = last_json_object(stdout) if result.ok else None
        message = "" if info is not None else ("Cancelled." if result.cancelled else
                                               failure_text(result.stderr_tail, result.describe()))
        if on_done:
            on_done(info, message)

    with child_environment(password_file):
        return ProcessRunner(ctfm_cli_command("index", "info", target.strip(), "--json"), on_line=line,
                             on_done=finished)
