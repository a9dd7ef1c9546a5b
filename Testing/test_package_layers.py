"""The core's layers: inference never imports the training package, and the core never imports Slicer,
Qt, CTK or VTK (read from the source, so a lazy import inside a function counts too)."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "CTFM" / "CTFMLib"


def imported_modules(path: Path):
    package = path.relative_to(CORE.parent).with_suffix("").parts[:-1]  # ("CTFMLib", ...)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                yield ".".join(base + ((node.module,) if node.module else ()))
            else:
                yield node.module or ""


def test_inference_never_imports_training():
    offenders = []
    for path in CORE.rglob("*.py"):
        relative = path.relative_to(CORE)
        if relative.parts[0] == "train" or relative.name == "cli.py":  # the CLI dispatches to training too
            continue
        offenders += [f"{relative}: {name}" for name in imported_modules(path)
                      if name == "CTFMLib.train" or name.startswith("CTFMLib.train.")]
    assert offenders == []


def test_the_core_imports_no_slicer_qt_ctk_or_vtk():
    offenders = [f"{path.relative_to(CORE)}: {name}" for path in CORE.rglob("*.py") for name in imported_modules(path)
                 if name.split(".")[0] in ("slicer", "qt", "ctk", "vtk")]
    assert offenders == []
