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


REPO = CORE.parents[1]
PROJECT = [REPO / name for name in ("CTFM", "CTFMSegment", "CTFMRetrieve", "CTFMTrain", "Testing")]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def test_no_private_name_is_imported_across_files():
    """A leading underscore means "only this file uses it": a name another file needs is made public where it is
    defined. Fails on ``from X import _name`` and on ``X._name`` where X is a project module (lazy imports inside
    functions too); names from outside the project (torch's ``_BatchNorm``) are not ours to rename."""
    files = [p for root in PROJECT for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    dotted = {}  # file -> its module name as imported, e.g. CTFMLib.retrieval.search
    for path in files:
        root = next(r for r in PROJECT if r in path.parents)
        parts = path.relative_to(root).with_suffix("").parts
        dotted[path] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules = set(dotted.values())
    offenders = []
    for path in files:
        where = path.relative_to(REPO)
        package = dotted[path].split(".") if path.name == "__init__.py" else dotted[path].split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}  # local name -> the project module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                if source not in modules:
                    continue
                for alias in node.names:
                    if is_private(alias.name):
                        offenders.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
                    elif f"{source}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:  # `import a.b` binds a, `import a.b as c` binds c to a.b
                    name = alias.name if alias.asname else alias.name.split(".")[0]
                    if name in modules:
                        bound[alias.asname or name] = name
        for node in ast.walk(tree):  # X._name, X.sub._name
            if isinstance(node, ast.Attribute):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.insert(0, value.attr)
                    value = value.value
                if not (isinstance(value, ast.Name) and value.id in bound):
                    continue
                module = bound[value.id]
                for attr in chain:
                    if is_private(attr):
                        offenders.append(f"{where}:{node.lineno}: {module}.{attr}")
                        break
                    if f"{module}.{attr}" not in modules:
                        break
                    module = f"{module}.{attr}"
    assert not offenders, "make these public where they are defined:\n" + "\n".join(sorted(set(offenders)))
