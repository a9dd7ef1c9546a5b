"""The core's layers: inference never imports the training package, and the core never imports Slicer,
Qt, CTK or VTK (read from the source, so a lazy import inside a function counts too)."""

import ast
import functools
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "CTFM" / "CTFMLib"


@functools.lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    """A source file's syntax tree, parsed once for all the checks here (each then takes milliseconds)."""
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_modules(path: Path):
    package = path.relative_to(CORE.parent).with_suffix("").parts[:-1]  # ("CTFMLib", ...)
    for node in ast.walk(parsed(path)):
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
        tree = parsed(path)
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


# The import circles the core may have (each a sorted tuple of module names). The image/dicom/dicom_write facade is
# by design: read_image/write_image dispatch to the DICOM modules, which build Images. (The triage_model <-> weights
# circle went with issue 18's model store: networks builds a TriageModel like any network, so weights loads it
# without importing triage_model.)
KNOWN_CIRCLES = {
    ("CTFMLib.dicom", "CTFMLib.dicom_write", "CTFMLib.image"),
}


def core_import_graph() -> dict:
    """``{module: {CTFMLib modules it imports}}`` from the source: module-level and function-level imports,
    relative and absolute. ``from X import Y`` counts as importing X.Y when that is a module, else X; a parent
    package's ``__init__`` that Python runs on the way is not counted (it is not a dependency of the code)."""
    files = {}
    for path in CORE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges = set()
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    edges.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
        graph[module] = {name for name in edges if name in files and name != module}
    return graph


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of ``graph`` (iterative: no recursion limit)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_import_circles_in_the_core_are_only_the_known_ones():
    """Modules that import each other (directly or round a loop, lazily inside functions too) cannot be read,
    tested or moved one at a time; a new circle means a function lives on the wrong side of a layer."""
    circles = {tuple(sorted(c)) for c in strongly_connected(core_import_graph()) if len(c) > 1}
    assert circles == KNOWN_CIRCLES, ("new import circles: " + "; ".join(" <-> ".join(c) for c in sorted(
        circles - KNOWN_CIRCLES)) + " | known circles gone (remove them from KNOWN_CIRCLES): "
        + "; ".join(" <-> ".join(c) for c in sorted(KNOWN_CIRCLES - circles)))


RUNTIME_NAMES = {"select_device", "rank_device", "cpu_supports_bf16", "default_precision", "resolve_precision",
                 "RunOptions", "Runner", "run_options"}


def test_device_and_precision_live_only_in_runtime():
    """One home answers "which device, which precision" (CTFMLib/runtime.py): no other file of the extension
    defines its names, so no command resolves ``auto`` its own way."""
    runtime = CORE / "runtime.py"
    offenders = []
    for folder in ("CTFM", "CTFMSegment", "CTFMRetrieve", "CTFMTrain"):
        for path in (REPO / folder).rglob("*.py"):
            if path == runtime:
                continue
            for node in ast.walk(parsed(path)):
                defines = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                if defines and node.name in RUNTIME_NAMES:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name}")
    assert offenders == []
    defined = {node.name for node in parsed(runtime).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert RUNTIME_NAMES - {"default_precision"} <= defined  # the policy is resolve_precision


# The CTFMSlicer modules every CT-FM module may use (CTFMSlicer/__init__.py lists them); the others are the hub's
# sections, which CT-FM Segment and CT-FM Retrieve must not reach into.
SHARED_SLICER = {"CTFMSlicer", "CTFMSlicer.nodes", "CTFMSlicer.process", "CTFMSlicer.jobs", "CTFMSlicer.running",
                 "CTFMSlicer.widget", "CTFMSlicer.inapp", "CTFMSlicer.dependencies"}


def test_segment_and_retrieve_import_only_the_shared_slicer_modules():
    offenders = []
    for folder in ("CTFMSegment", "CTFMRetrieve"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(parsed(path)):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("CTFMSlicer"):
                    names = [node.module] if node.module != "CTFMSlicer" else [
                        f"CTFMSlicer.{a.name}" if a.name[0].islower() else "CTFMSlicer" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("CTFMSlicer")]
                else:
                    continue
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n not in SHARED_SLICER]
    assert offenders == []
    listed = (REPO / "CTFM" / "CTFMSlicer" / "__init__.py").read_text(encoding="utf-8")
    assert all(f":mod:`.{name.split('.')[1]}`" in listed for name in SHARED_SLICER - {"CTFMSlicer"})
