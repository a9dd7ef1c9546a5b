"""Where CT-FM keeps models on this computer.

- ``CTFM_CACHE`` (environment), when set, holds everything: imported models in
  ``$CTFM_CACHE/models`` and Hugging Face downloads in ``$CTFM_CACHE/hub``.
- Otherwise imported models go to ``$XDG_CACHE_HOME/ctfm/models`` (default
  ``~/.cache/ctfm/models``) and downloads to Hugging Face's own cache, which
  honours ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


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
    """A folder name for a repo id (``owner/name`` -> ``owner--name``)."""
    return repo_id.replace("/", "--")
