"""The in-app tests (ScriptedLoadableModuleTest classes), checked from their source with ``ast``.

They need the Slicer application, so nothing here runs them. What made them fail in the
documented ways of running them (ctest, ``--no-main-window``, Reload and Test) was visible in
their source, and is checked here:

- where they live: ``<Module>/Testing/Python/<Module>Test.py``, as in Slicer's module template,
  each registered with ``slicer_add_python_unittest``; the module files define none and hand the
  class to ``ScriptedLoadableModule.runTest`` through their module-level ``__getattr__``;
- no test reads ``.visible`` (False whenever the panel is off screen or the section collapsed);
- a test that needs PyTorch or slice views skips, with a reason, where they are missing
  (see :func:`need_before_guard` for what counts);
- ``runTest`` (Reload and Test runs it outside a unittest runner) reports a skip instead of failing.
"""

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("CTFM", "CTFMSegment", "CTFMRetrieve")
# Where the extension's own packages and module files live, to tell whether importing one imports torch.
PACKAGES = {"CTFMLib": REPO / "CTFM", "CTFMSlicer": REPO / "CTFM", "CTFMSegmentLib": REPO / "CTFMSegment",
            "CTFMRetrieveLib": REPO / "CTFMRetrieve", **{m: REPO / m for m in MODULES}}


def in_app_test_file(module: str) -> Path:
    return REPO / module / "Testing" / "Python" / f"{module}Test.py"


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def in_app_classes(tree: ast.Module) -> list:
    return [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            and any(ast.unparse(b).endswith("ScriptedLoadableModuleTest") for b in c.bases)]


# --- what importing a module imports ----------------------------------------------------------------


def _module_file(dotted: str) -> Optional[Path]:
    parts = dotted.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = PACKAGES[parts[0]].joinpath(*parts)
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _optional(node: ast.Try) -> bool:
    """``try: import x`` / ``except ImportError``: the module works without x."""
    return any(h.type is None or re.search(r"ImportError|ModuleNotFoundError|Exception", ast.unparse(h.type))
               for h in node.handlers)


def _imports_at_import_time(path: Path, dotted: str) -> set:
    """The modules ``path`` (module ``dotted``) imports when it is imported: not those inside functions,
    ``if TYPE_CHECKING:`` blocks or ``try``/``except ImportError``."""
    package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Try) and _optional(node):
            for child in node.orelse + node.finalbody:
                visit(child)
            return
        found.update(imported_modules(node, package))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(parse(path))
    return found


def imported_modules(node: ast.AST, package: str = "") -> set:
    """The modules an ``import`` statement loads (``from a import b`` loads ``a.b`` too when it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    return {module} | {f"{module}.{a.name}" for a in node.names if _module_file(f"{module}.{a.name}")}


@lru_cache(maxsize=None)
def _loads(dotted: str) -> frozenset:
    """What ``import dotted`` loads directly: its parent package, and what its file (if it is one of
    this repository's) imports when it is imported."""
    path = _module_file(dotted)
    parent = {dotted.rpartition(".")[0]} - {""}
    return frozenset(parent | (_imports_at_import_time(path, dotted) if path else set()))


def imports_torch(dotted: str) -> bool:
    """Whether ``import dotted`` imports torch: torch itself, or a module of this repository that
    imports it when it is imported, directly or through other modules and parent packages."""
    seen, todo = set(), [dotted]
    while todo:
        name = todo.pop()
        if name == "torch" or name.startswith("torch."):
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(_loads(name))
    return False


# --- "needs X" and "skips without X" -------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    what: str
    condition: str  # a guard's condition mentions this
    uses: Callable[[ast.AST], bool]


# Needs PyTorch: an import of torch, or of a module of this repository that imports torch when imported.
# Needs slice views (no layout manager with --no-main-window, hence no slice widgets, slice nodes or
# slice composite nodes): one of these attributes, or a node class name "vtkMRMLSlice...".
SLICE_VIEW_ATTRIBUTES = {"layoutManager", "sliceWidget", "sliceView", "sliceWidgetNames"}
TORCH = Need("PyTorch", "torch", lambda n: any(imports_torch(m) for m in imported_modules(n)))
SLICE_VIEWS = Need(
    "slice views", "layoutManager",
    lambda n: (isinstance(n, ast.Attribute) and n.attr in SLICE_VIEW_ATTRIBUTES)
    or (isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("vtkMRMLSlice")),
)


def skips_with_reason(statements) -> bool:
    """``self.skipTest(reason)`` or ``raise unittest.SkipTest(reason)`` with a reason that is not empty."""
    for node in (n for s in statements for n in ast.walk(s)):
        if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("self.skipTest", "unittest.SkipTest", "SkipTest")
                and node.args and not (isinstance(node.args[0], ast.Constant) and not node.args[0].value)):
            return True
    return False


def need_before_guard(function: ast.FunctionDef, need: Need, helpers: dict) -> Optional[int]:
    """The line where ``function`` first needs ``need`` before any guard has run, or None.

    It needs it on a line that uses it (``need.uses``) or calls a helper of the same file (a
    method through ``self.``/``cls.``/the class name, or a function) that needs it unguarded.
    A guard is an ``if`` whose condition mentions ``need.condition`` and whose body skips with
    a reason, or a call of a helper that runs such a guard before any need. The body of any other
    ``if`` whose condition mentions ``need.condition`` runs only where the need is met (e.g.
    ``if slicer.app.layoutManager():``), so it is not looked at. Order is source order.
    """
    return _events(function, need, helpers)[0]


def _helper_called(call: ast.Call, helpers: dict) -> Optional[str]:
    """The helper of the same file a call runs: ``self.f()``, ``cls.f()``, ``SomeTest.f()`` or ``f()``."""
    match = re.fullmatch(r"(?:self\.|cls\.|\w+Test\.)?(\w+)", ast.unparse(call.func))
    return match.group(1) if match and match.group(1) in helpers else None


def _events(function, need, helpers, _calling=()):
    """(line of the first unguarded need or None, whether ``function`` runs a guard)."""
    events = []
    calling = _calling + (function.name,)  # the helpers on the way here: a recursive call adds nothing

    def visit(node):
        if isinstance(node, ast.If) and need.condition in ast.unparse(node.test):
            if skips_with_reason(node.body):
                events.append((node.lineno, "guard"))
            for child in node.orelse:
                visit(child)
            return
        if need.uses(node):
            events.append((node.lineno, "need"))
        callee = _helper_called(node, helpers) if isinstance(node, ast.Call) else None
        if callee is not None and callee not in calling:
            line, guards = _events(helpers[callee], need, helpers, calling)
            if line is not None:
                events.append((node.lineno, "need"))
            elif guards:
                events.append((node.lineno, "guard"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in function.body:
        visit(statement)
    events.sort()
    first_guard = next((line for line, kind in events if kind == "guard"), None)
    first_need = next((line for line, kind in events if kind == "need"), None)
    unguarded = first_need if first_need is not None and (first_guard is None or first_need < first_guard) else None
    return unguarded, first_guard is not None


def helpers_of(tree: ast.Module, cls: ast.ClassDef) -> dict:
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    functions.update({f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)})
    return functions


def unguarded_tests(tree: ast.Module, need: Need) -> list:
    """``Class.test_method:line`` for every test method that needs ``need`` before it skips without it."""
    found = []
    for cls in in_app_classes(tree):
        helpers = helpers_of(tree, cls)
        for method in (f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")):
            line = need_before_guard(method, need, helpers)
            if line is not None:
                found.append(f"{cls.name}.{method.name}:{line}")
    return found


def visible_reads(tree: ast.Module) -> list:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "visible"
            and isinstance(n.ctx, ast.Load)]


# --- the checks on this repository ----------------------------------------------------------------------


def all_python_files():
    """The repository's .py files outside hidden folders (.venv, .git) and build trees."""
    for top in REPO.iterdir():
        if top.name.startswith(".") or top.name.startswith("build"):
            continue
        if top.is_dir():
            yield from (p for p in top.rglob("*.py") if "__pycache__" not in p.parts)
        elif top.suffix == ".py":
            yield top


def test_in_app_test_classes_live_under_testing_python():
    homes = {}
    for path in all_python_files():
        for cls in in_app_classes(parse(path)):
            homes[cls.name] = path.relative_to(REPO)
    assert homes == {f"{m}Test": in_app_test_file(m).relative_to(REPO) for m in MODULES}


@pytest.mark.parametrize("module", MODULES)
def test_module_files_hand_the_moved_class_to_run_test(module, tmp_path):
    """The module file defines no test class; its ``__getattr__`` loads Testing/Python/<Module>Test.py anew."""
    source = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert not in_app_classes(tree) and "ScriptedLoadableModuleTest" not in source
    getattr_def = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__")
    # Run that function alone, as if the module file were in tmp_path next to a Testing/Python/<Module>Test.py.
    namespace = {"__file__": str(tmp_path / f"{module}.py"), "__name__": module}
    exec(compile(ast.Module([getattr_def], []), module, "exec"), namespace)
    lookup = namespace["__getattr__"]
    with pytest.raises(AttributeError):  # ScriptedLoadableModule.runTest: "Test case class not found"
        lookup(f"{module}Test")
    tests = tmp_path / "Testing" / "Python" / f"{module}Test.py"
    tests.parent.mkdir(parents=True)
    tests.write_text(f"class {module}Test:\n    version = 1\n")
    assert lookup(f"{module}Test").version == 1
    tests.write_text(f"class {module}Test:\n    version = 2\n")
    assert lookup(f"{module}Test").version == 2  # Reload and Test runs the edited file
    with pytest.raises(AttributeError):
        lookup("SomethingElse")


@pytest.mark.parametrize("module", MODULES)
def test_test_file_is_registered_with_ctest(module):
    """<Module>/CMakeLists.txt -> Testing/ -> Python/ -> slicer_add_python_unittest(SCRIPT <Module>Test.py)."""
    folder = REPO / module
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(rf"^add_subdirectory\({module}\)$", top, re.MULTILINE)
    own = (folder / "CMakeLists.txt").read_text()
    assert re.search(rf"set\(MODULE_NAME {module}\)", own)
    assert re.search(r"if\(BUILD_TESTING\)\s*(#[^\n]*\n\s*)*add_subdirectory\(Testing\)\s*endif\(\)", own)
    assert (folder / "Testing" / "CMakeLists.txt").read_text().split() == ["add_subdirectory(Python)"]
    python = (folder / "Testing" / "Python" / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    listed = re.findall(r"^\s*slicer_add_python_unittest\(\s*SCRIPT\s+(\S+?)\s*\)", python, re.MULTILINE)
    on_disk = sorted(p.name for p in (folder / "Testing" / "Python").glob("*.py"))
    assert sorted(listed) == on_disk == [f"{module}Test.py"]


@pytest.mark.parametrize("module", MODULES)
def test_no_test_reads_visible(module):
    """``visible`` is ``isVisible()``: False off screen (ctest, --no-main-window) and in collapsed sections."""
    assert visible_reads(parse(in_app_test_file(module))) == [], "use isHidden()"


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("need", [TORCH, SLICE_VIEWS], ids=lambda n: n.what)
def test_tests_skip_where_what_they_need_is_missing(module, need):
    assert unguarded_tests(parse(in_app_test_file(module)), need) == []


@pytest.mark.parametrize("module", MODULES)
def test_test_files_load_without_torch(module):
    tree = parse(in_app_test_file(module))
    top_level = [m for node in tree.body for m in imported_modules(node)]
    assert top_level and not [m for m in top_level if imports_torch(m)]


@pytest.mark.parametrize("module", MODULES)
def test_run_test_reports_skips(module):
    """Reload and Test calls runTest outside a unittest runner: a SkipTest must not end it as a failure."""
    cls = in_app_classes(parse(in_app_test_file(module)))[0]
    run_test = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    handlers = [h for n in ast.walk(run_test) if isinstance(n, ast.Try) for h in n.handlers]
    assert any(h.type is not None and ast.unparse(h.type) == "unittest.SkipTest" for h in handlers)


@pytest.mark.parametrize("module", MODULES)
def test_widgets_the_tests_use_exist(module):
    from test_ui_files import parse_ui

    tree = parse(in_app_test_file(module))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"}
    assert used and not used - set(parse_ui(REPO / module / "Resources" / "UI" / f"{module}.ui").widgets)


def test_the_checks_would_have_caught_the_old_tests():
    """Shapes of what the review found (slicer-audit B6), so that the checks above cannot pass vacuously."""
    old = ast.parse('''
class CTFMRetrieveTest(ScriptedLoadableModuleTest):
    def test_AddFindAndShow(self):
        from CTFMLib.image import Image
        weights = self._tinyEncoder("folder")
    @staticmethod
    def _tinyEncoder(folder):
        import torch
class CTFMTest(ScriptedLoadableModuleTest):
    def _requireTorch(self):
        if not torch_is_sufficient():
            self.skipTest("no PyTorch")
    def test_TriageSection(self):
        self._requireTorch()
        from CTFMLib.triage import triage_image
        composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    def test_Reasonless(self):
        if not torch_is_sufficient():
            self.skipTest("")
        from CTFMLib.networks import build_encoder
    def test_TrainSectionCheck(self):
        self.assertTrue(widget.ui.trainProgressBar.visible)
''')
    def names(found):
        return [f.split(":")[0] for f in found]

    assert names(unguarded_tests(old, TORCH)) == ["CTFMRetrieveTest.test_AddFindAndShow", "CTFMTest.test_Reasonless"]
    assert names(unguarded_tests(old, SLICE_VIEWS)) == ["CTFMTest.test_TriageSection"]
    assert len(visible_reads(old)) == 1
    fixed = ast.parse('''
class CTFMTest(ScriptedLoadableModuleTest):
    def test_TriageSection(self):
        if slicer.app.layoutManager():
            composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
        if slicer.app.layoutManager() is None:
            self.skipTest("no slice views")
        slicer.app.layoutManager().sliceWidget("Red")
''')
    assert unguarded_tests(fixed, SLICE_VIEWS) == []
    assert imports_torch("CTFMLib.networks") and not imports_torch("CTFMSlicer.dependencies")
