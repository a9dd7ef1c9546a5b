"""The modules the Slicer layer imports at start-up load without PyTorch (issue 18's fitness test): Slicer
starts before the PyTorch extension has installed torch, and a GUI that plans, checks configurations and
lists models must not wait for it. Checked by importing them in a child process where ``import torch`` fails."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TORCH_FREE = [
    "CTFMLib.catalog", "CTFMLib.cache", "CTFMLib.labels", "CTFMLib.progress", "CTFMLib.files", "CTFMLib.text",
    "CTFMLib.costs", "CTFMLib.ct_check", "CTFMLib.segment_plan", "CTFMLib.image", "CTFMLib.train.config",
    "CTFMLib.model_store", "CTFMLib.statistics", "CTFMLib.dicom_seg", "CTFMLib.dicom_pmap", "CTFMLib.dicom_sr",
    "CTFMLib.retrieval.backends", "CTFMLib.retrieval.urls", "CTFMLib.ranks",
]

BLOCKER = r"""
import importlib, sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")


sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, sys.argv[1])
failed = []
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed.append(f"{name}: {e}")
print("\n".join(failed))
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    run = subprocess.run([sys.executable, "-c", BLOCKER, str(ROOT / "CTFM"), module],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", run.stdout


def test_the_blocker_blocks_torch():
    """The check can fail: a module that imports torch is reported."""
    run = subprocess.run([sys.executable, "-c", BLOCKER, str(ROOT / "CTFM"), "CTFMLib.embed"],
                         capture_output=True, text=True, timeout=120)
    assert "CTFMLib.embed: torch is blocked" in run.stdout, run


def test_the_model_store_imports_torch_nowhere_not_even_lazily():
    """The Slicer panels call the model store on every change: not one of its functions may import torch, nor the
    modules that do (weights: that would also be a new circle with it), however deep inside a function."""
    import ast

    imported = set()
    for node in ast.walk(ast.parse((ROOT / "CTFM" / "CTFMLib" / "model_store.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
            imported.update(("." * node.level) + alias.name for alias in node.names if not node.module)
    torch_like = {"torch", "safetensors", ".weights", ".networks", ".triage_model", "CTFMLib.weights"}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "safetensors") or name in torch_like}
    assert ".cache" in imported  # the check reads the real module (a renamed file would leave nothing to check)
