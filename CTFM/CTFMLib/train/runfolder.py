"""The output folder of a training run: which folders ``ctfm train --out`` may write into, and its marker.

A run writes ``config.json``, ``metrics.csv``, ``checkpoints/``, ``data/``, ``tensorboard/`` and ``model/``
into its folder, replacing files of those names. So a run only starts in

- a folder that does not exist yet (it is created),
- an empty folder (``.DS_Store``, ``Thumbs.db``, ``desktop.ini`` and CT-FM's own ``.ctfm-tmp-*`` leftovers
  do not count), or
- an earlier run of the SAME task: a folder holding :data:`MARKER` (``ctfm-run.json``), which every run
  writes first, before anything else (atomically, never replacing one): the task, the CT-FM version and
  the creation time.

Anything else is refused before anything is written, naming what the folder holds; a run of another task
is refused naming that task; a file is refused. Runs made before the marker existed (no ``ctfm-run.json``)
are recognised by their checkpoints: a folder whose ``checkpoints/`` holds a readable CT-FM training
checkpoint (``last.pt`` or ``step_*.pt``, which store the configuration and so the task) of the same task
is accepted and gets the marker; one of another task is refused naming it; one whose checkpoints cannot
be read is refused like any other non-empty folder. Reading a checkpoint needs torch, so the caller
passes the reader (:func:`CTFMLib.train.trainer.checkpoint_task`); without one (the Slicer hub checks
folders without torch) such a folder is reported as ``"legacy?"`` and the training process decides.

This module imports no torch.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..files import (
    TEMP_PREFIX,
    FileSafetyError,
    OutputExistsError,
    WriteError,
    atomic_write_text,
    describe_os_error,
    remove_tree,
)

__all__ = ["MARKER", "MARKER_FORMAT", "RunFolder", "RunFolderError", "inspect_run_folder", "claim_run_folder",
           "read_marker", "remove_temporaries", "has_checkpoints"]

MARKER = "ctfm-run.json"
MARKER_FORMAT = "ctfm-train-run"
# Files the operating system puts into any folder a user opened: they do not make a folder "used".
IGNORED = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
CHECKPOINTS = "checkpoints"


class RunFolderError(FileSafetyError):
    """The output folder of a training run cannot be used; the message says what it holds and what to do."""


@dataclass
class RunFolder:
    """A checked output folder. ``state``: ``"new"`` (does not exist), ``"empty"``, ``"run"`` (has the
    marker of this task), ``"legacy"`` (an earlier run of this task without the marker, recognised by its
    checkpoint) or ``"legacy?"`` (checkpoints that were not read: no reader was given)."""

    path: Path
    task: str
    state: str
    marker: Optional[dict] = None


def has_checkpoints(folder) -> bool:
    """Whether ``folder/checkpoints`` holds ``last.pt`` or a numbered ``step_*.pt``."""
    ckpt = Path(folder) / CHECKPOINTS
    return ckpt.is_dir() and ((ckpt / "last.pt").is_file() or any(ckpt.glob("step_*.pt")))


def read_marker(folder) -> dict:
    """The marker of a run folder; :class:`RunFolderError` when it is unreadable or not a CT-FM marker."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read ({type(e).__name__}): choose an empty or new output "
                             "folder") from None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("task"), str):
        raise RunFolderError(f"{path} is not a CT-FM run marker: choose an empty or new output folder")
    return marker


def _contents(folder: Path) -> list:
    """The entries that make a folder non-empty, sorted (folders with a trailing ``/``)."""
    out = []
    for entry in os.scandir(folder):
        if entry.name in IGNORED or entry.name.startswith(TEMP_PREFIX):
            continue
        out.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return sorted(out)


def _listing(names: list, limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect_run_folder(path, task: str, legacy_task: Optional[Callable] = None) -> RunFolder:
    """Whether a ``task`` run may write into ``path`` (see the module's rules); raises :class:`RunFolderError`.

    ``legacy_task(folder)`` returns the task of the checkpoint in ``folder/checkpoints`` (``None`` when
    none can be read); it is only called for a non-empty folder without a marker.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "a link to nothing" if path.is_symlink() and not path.exists() else "a file"
        raise RunFolderError(f"the output folder {path} is {kind}: give a folder (a new or empty one, or an earlier "
                             f"{task} run to resume)")
    if not path.exists():
        return RunFolder(path, task, "new")
    try:
        names = _contents(path)
    except OSError as e:
        raise RunFolderError(f"the output folder {path} cannot be listed ({e.strerror or e}): choose another "
                             "folder") from None
    if not names:
        return RunFolder(path, task, "empty")
    if MARKER in names:
        marker = read_marker(path)
        if marker["task"] != task:
            raise RunFolderError(f"{path} holds a CT-FM {marker['task']} run ({MARKER}), not a {task} run: choose "
                                 f"an empty or new output folder for this {task} run")
        return RunFolder(path, task, "run", marker)
    if has_checkpoints(path):
        if legacy_task is None:
            return RunFolder(path, task, "legacy?")
        found = legacy_task(path)
        if found == task:
            return RunFolder(path, task, "legacy")
        if found:
            raise RunFolderError(f"{path} holds a CT-FM {found} run (its checkpoints say so), not a {task} run: "
                                 f"choose an empty or new output folder for this {task} run")
    raise RunFolderError(f"{path} holds {_listing(names)} and is not a CT-FM {task} run: choose an empty or new "
                         "output folder")


def claim_run_folder(path, task: str, legacy_task: Optional[Callable] = None) -> RunFolder:
    """:func:`inspect_run_folder`, then create the folder and write its marker (when it has none).

    The marker is written without replacing one: when another process of the same job (``torchrun``)
    wrote it first, the folder is inspected again and accepted if that marker names this task.
    """
    info = inspect_run_folder(path, task, legacy_task)
    if info.state == "run":
        return info
    from .. import __version__

    marker = {"format": MARKER_FORMAT, "task": task, "ctfm_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if info.state.startswith("legacy"):
        marker["note"] = "an earlier run, recognised by its checkpoint, marked when it was continued"
    created = [p for p in [info.path, *info.path.parents] if not os.path.lexists(p)]
    try:
        try:
            info.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunFolderError(f"the output folder {info.path} is a file: give a folder") from None
        except OSError as e:  # a full or read-only disk, no permission
            raise WriteError(e.errno, describe_os_error(e, info.path / MARKER)) from None
        atomic_write_text(info.path / MARKER, json.dumps(marker, indent=1) + "\n", overwrite=False)
    except OutputExistsError:
        return inspect_run_folder(path, task, legacy_task)
    except BaseException:
        for folder in created:  # innermost first; only the folders made here, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return RunFolder(info.path, task, info.state, marker)


def remove_temporaries(folder, root, legacy=(".*.tmp*",)) -> list:
    """Remove what a killed writer left directly in ``folder`` (which lies inside the run folder ``root``,
    or is it): CT-FM's private ``.ctfm-tmp-*`` folders, and files matching the ``legacy`` patterns (the
    ``.NAME.tmpPID`` names of older versions). Returns what was removed. Call it only where no other
    process writes at the time."""
    folder, root = Path(folder), Path(root)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            remove_tree(entry, root, "temporary folder")
        elif not entry.is_dir() and any(fnmatch.fnmatchcase(entry.name, p) for p in legacy):
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(entry)
    return removed
