"""Test harness: the import paths of the extension's packages and of the test helpers; the rest is the
``ctfm_testing.plugin`` pytest plugin (fixtures, isolated model store, ``run_ctfm``)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("CTFM", "CTFMSegment", "CTFMRetrieve", "Testing"):
    p = str(ROOT / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

pytest_plugins = ["ctfm_testing.plugin"]
