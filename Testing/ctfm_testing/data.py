"""Where the real CT test data lives, and skipping tests cleanly when it is absent.

The data is not part of the repository: it is found at the folder named by the
environment variable ``CTFM_TEST_DATA``, else at ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "CTFM_TEST_DATA"


def shared_data_dir() -> Optional[Path]:
    """The shared test data folder, or ``None`` when it is not there."""
    configured = os.environ.get(ENV_VAR)
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def require_shared_data(*relative: str) -> Path:
    """The shared data folder (or a path inside it); skips the calling test when absent."""
    import pytest

    base = shared_data_dir()
    if base is None:
        where = os.environ.get(ENV_VAR) or str(REPO_ROOT.parent / "shared" / "data")
        pytest.skip(f"real CT test data not found at {where} (set {ENV_VAR} to the shared data folder)")
    path = base.joinpath(*relative)
    if not path.exists():
        pytest.skip(f"the shared test data at {base} lacks {Path(*relative)}")
    return path
