"""Where CT-FM keeps models on this computer.

- ``CTFM_CACHE`` (environment), when set, holds everything: imported models in
  ``$CTFM_CACHE/models`` and Hugging Face downloads in ``$CTFM_CACHE/hub``.
- Otherwise imported models go to ``$XDG_CACHE_HOME/ctfm/models`` (default
  ``~/.cache/ctfm/models``) and downloads to Hugging Face's own cache, which
  honours ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.

Each imported model is one folder in :func:`models_dir`, named by :func:`model_folder_name`
(the only way a model id becomes a path), holding the model's files and ``ctfm-import.json``
(:data:`MARKER_NAME`: its id, where it came from, its checksum, and whether it is the published
model of a catalogue id). Folders starting with ``.`` are imports still being written. This
module imports no torch: the Slicer panel lists models before PyTorch is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

WEIGHTS_NAME = "model.safetensors"
MARKER_NAME = "ctfm-import.json"
IMPORTED = "imported"
NOT_PUBLISHED = "imported, not the published weights"
_MAX_MARKER_BYTES = 1 << 16


def ctfm_home() -> Path:
    root = os.environ.get("CTFM_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "ctfm"


def models_dir() -> Path:
    """Folder of imported (offline) models, one sub-folder per model."""
    return ctfm_home() / "models"


def hub_cache_dir() -> Optional[Path]:
    """``cache_dir`` for huggingface_hub, or ``None`` for its default."""
    root = os.environ.get("CTFM_CACHE")
    return Path(root).expanduser() / "hub" if root else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_folder_name(repo_id: str) -> str:
    """The folder name of a model id (``owner/name`` -> ``owner--name``), or :class:`~CTFMLib.files.FileSafetyError`.

    A model id is a plain name or a Hugging Face ``owner/name``: at most one ``/``, each part a
    :func:`~CTFMLib.files.safe_name` (so no ``.``, ``..``, backslash, drive letter or control
    character), because the folder it names is created, replaced and deleted in :func:`models_dir`.
    """
    from .files import FileSafetyError, safe_name

    if not isinstance(repo_id, str):
        raise FileSafetyError(f"a model id must be text, not {type(repo_id).__name__}")
    parts = repo_id.split("/")
    shown = repr(repo_id) if len(repo_id) <= 80 else repr(repo_id[:77] + "...")
    if len(parts) > 2:
        raise FileSafetyError(f"model id {shown} has more than one '/': use NAME or OWNER/NAME")
    for part in parts:
        safe_name(part, f"model id {shown}" if len(parts) > 1 else "model id")
    return safe_name("--".join(parts), "model id")


def model_folder(repo_id: str) -> Path:
    """Where the imported copy of model ``repo_id`` lives: an entry directly in :func:`models_dir`.

    Refuses (:class:`~CTFMLib.files.FileSafetyError`) any id that could name another place.
    """
    from .files import child_path

    return child_path(models_dir(), model_folder_name(repo_id), "model id")


def imported_model(repo_id: str) -> Optional[Path]:
    """The imported copy of a model id (a folder with weights in :func:`models_dir`), or None.

    A lookup: an id that cannot name a model folder (``..``, a path ...) simply has no import.
    """
    from .files import FileSafetyError

    try:
        folder = model_folder(repo_id)
    except (FileSafetyError, OSError):
        return None
    return folder if not folder.is_symlink() and (folder / WEIGHTS_NAME).is_file() else None


def import_marker(folder) -> Optional[dict]:
    """The ``ctfm-import.json`` of an imported model folder, or None (none, unreadable or not an object)."""
    path = Path(folder) / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def import_status(folder) -> str:
    """:data:`IMPORTED`, or :data:`NOT_PUBLISHED` for weights imported with ``--force`` under a published id."""
    marker = import_marker(folder)
    return NOT_PUBLISHED if marker is not None and marker.get("published") is False else IMPORTED


def imported_models() -> list:
    """``[(model id, folder)]`` of every complete import, sorted by folder name.

    The id is the one the model was imported under (from its marker) when it names the same
    folder, else the folder name (which names it too).
    """
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if (folder.name.startswith(".") or folder.name.endswith(".partial") or folder.is_symlink()
                or not (folder / WEIGHTS_NAME).is_file()):
            continue  # an import being written (.ctfm-tmp-*), an older version's ".partial", a link or a file
        marker = import_marker(folder) or {}
        model_id = marker.get("id")
        try:
            same = isinstance(model_id, str) and model_folder_name(model_id) == folder.name
        except ValueError:
            same = False
        out.append((model_id if same else folder.name, folder))
    return out
