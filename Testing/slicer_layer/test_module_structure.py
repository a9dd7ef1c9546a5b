"""The extension's skeleton: module classes (ast), CMake registration, packages importable without Qt, icons.

The CMake files are configured for real with a stub Slicer package that
records what each Slicer macro receives (and fails, like the real macros, on
a listed file that does not exist); no Slicer build is needed.
"""

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("CTFM", "CTFMSegment", "CTFMRetrieve")
ADAPTER_PACKAGES = {"CTFM": "CTFMSlicer", "CTFMSegment": "CTFMSegmentLib", "CTFMRetrieve": "CTFMRetrieveLib"}


def classes(module_name):
    tree = ast.parse((REPO / module_name / f"{module_name}.py").read_text(encoding="utf-8"))
    return {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}, tree


def bases(cls: ast.ClassDef):
    return [ast.unparse(b) for b in cls.bases]


def in_app_test_classes(module_name):
    """The classes of the module's in-app test file, <Module>/Testing/Python/<Module>Test.py."""
    path = REPO / module_name / "Testing" / "Python" / f"{module_name}Test.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}


# --- module files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_file_has_the_scripted_module_classes(name):
    found, _ = classes(name)
    assert bases(found[name]) == ["ScriptedLoadableModule"]
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in found[f"{name}ParameterNode"].decorator_list)
    assert {"ScriptedLoadableModuleWidget", "VTKObservationMixin", "ParameterNodeWidgetMixin"} <= set(bases(found[f"{name}Widget"]))
    assert bases(found[f"{name}Logic"])[0] == "ScriptedLoadableModuleLogic"
    # the test class lives in Testing/Python/ (Slicer's module template); the module file hands it to
    # ScriptedLoadableModule.runTest through its module-level __getattr__
    assert f"{name}Test" not in found
    assert bases(in_app_test_classes(name)[f"{name}Test"]) == ["ScriptedLoadableModuleTest"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("name", MODULES)
def test_module_metadata(name):
    found, tree = classes(name)
    init = next(f for f in found[name].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {ast.unparse(t) for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets}
    assert {"self.parent.title", "self.parent.categories", "self.parent.contributors", "self.parent.helpText", "self.parent.acknowledgementText"} <= assigned
    categories = next(n.value for n in ast.walk(init) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "self.parent.categories")
    assert "'CT-FM'" in ast.unparse(categories)
    # the acknowledgement cites the paper (the citation text is shared in CTFMSlicer)
    acknowledgement = next(n.value for n in ast.walk(init) if isinstance(n, ast.Assign)
                           and ast.unparse(n.targets[0]) == "self.parent.acknowledgementText")
    assert "CITATION" in ast.unparse(acknowledgement)
    # the help ends with a link to the documentation on the extension's homepage (Slicer's
    # getDefaultModuleDocumentationLink() would point into Slicer's own manual)
    appended = [n for n in ast.walk(init) if isinstance(n, ast.AugAssign) and ast.unparse(n.target) == "self.parent.helpText"]
    assert len(appended) == 1 and "DOCUMENTATION_URL" in ast.unparse(appended[0].value)
    url = next(ast.literal_eval(n.value) for n in tree.body
               if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "DOCUMENTATION_URL")
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert url.startswith(homepage + "#")
    anchor = url.split("#", 1)[1]
    assert anchor in {github_anchor(line) for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")}
    shared = (REPO / "CTFM" / "CTFMSlicer" / "__init__.py").read_text(encoding="utf-8")
    assert "arXiv:2501.09001" in shared and "Pai" in shared


@pytest.mark.parametrize("name", MODULES)
def test_slicer_tests_run_every_test_method(name):
    """runTest (Reload & Test) calls every test_ method; unittest discovery (ctest) finds them by name."""
    test_class = in_app_test_classes(name)[f"{name}Test"]
    methods = {f.name for f in test_class.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    assert methods
    run_test = next(f for f in test_class.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.attr for n in ast.walk(run_test) if isinstance(n, ast.Attribute) and n.attr.startswith("test_")}
    assert called == methods
    set_up = [f for f in test_class.body if isinstance(f, ast.FunctionDef) and f.name == "setUp"]
    assert set_up and "mrmlScene.Clear" in ast.unparse(set_up[0])


@pytest.mark.parametrize("name", [*MODULES, "CTFMTrain"])
def test_only_the_module_file_is_at_the_top_of_its_folder(name):
    """Slicer takes every top-level .py of a module folder for a module; helpers live in packages."""
    assert sorted(p.name for p in (REPO / name).glob("*.py")) == [f"{name}.py"]


@pytest.mark.parametrize("name", MODULES)
def test_module_files_have_no_shebang(name):
    """Slicer loads a .py starting with "#!" as a CLI (qSlicerUtils::isCLIScriptedExecutable), not as a module."""
    assert not (REPO / name / f"{name}.py").read_text(encoding="utf-8").startswith("#!")


def test_adapter_packages_import_without_qt(tmp_path):
    """CTFMSlicer, CTFMSegmentLib and CTFMRetrieveLib work where there is no Qt and no Slicer application."""
    blocker = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = ("qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "PySide6", "torch")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked import of {name}")
        sys.meta_path.insert(0, Block())
        import pkgutil, importlib
        for package in ("CTFMSlicer", "CTFMSegmentLib", "CTFMRetrieveLib"):
            module = importlib.import_module(package)
            for info in pkgutil.iter_modules(module.__path__):
                importlib.import_module(f"{package}.{info.name}")
        print("imported", sorted(m for m in sys.modules if m.startswith(("CTFMSlicer", "CTFMSegmentLib", "CTFMRetrieveLib"))))
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / m) for m in MODULES)
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for module in ("CTFMSlicer.nodes", "CTFMSlicer.logic", "CTFMSlicer.process", "CTFMSlicer.dependencies", "CTFMSegmentLib.logic", "CTFMRetrieveLib.logic"):
        assert module in result.stdout


# --- icons ------------------------------------------------------------------------------------


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


@pytest.mark.parametrize(
    "icon",
    ["Resources/CTFM.png", "CTFM/Resources/Icons/CTFM.png", "CTFMSegment/Resources/Icons/CTFMSegment.png", "CTFMRetrieve/Resources/Icons/CTFMRetrieve.png"],
)
def test_icons_are_small_128px_pngs(icon):
    width, height, size = png_size(REPO / icon)
    assert (width, height) == (128, 128)
    assert size < 50_000


# --- CMake, configured with a stub Slicer ---------------------------------------------------------

STUB_SLICER_CONFIG = r"""
# Stub of Slicer's CMake package: records each macro call to ${CTFM_RECORD}.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(Slicer_CLIMODULES_BIN_DIR lib/Slicer-5.8/cli-modules)
set(Slicer_INSTALL_CLIMODULES_BIN_DIR ${Slicer_CLIMODULES_BIN_DIR})

function(_ctfm_record)
  string(REPLACE ";" "," _line "${ARGN}")
  file(APPEND "${CTFM_RECORD}" "${_line}\n")
endfunction()

function(_ctfm_require_files kind)
  foreach(f ${ARGN})
    if(NOT IS_ABSOLUTE "${f}")
      set(f "${CMAKE_CURRENT_SOURCE_DIR}/${f}")
    endif()
    if(NOT EXISTS "${f}")
      message(FATAL_ERROR "${kind}: nonexistent file ${f}")
    endif()
  endforeach()
endfunction()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  _ctfm_require_files(SCRIPTS ${MY_SCRIPTS})
  _ctfm_require_files(RESOURCES ${MY_RESOURCES})
  _ctfm_record("module|${MY_NAME}|${MY_WITH_GENERIC_TESTS}|${CMAKE_CURRENT_SOURCE_DIR}|${MY_SCRIPTS}|${MY_RESOURCES}")
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  _ctfm_require_files(SCRIPT ${MY_SCRIPT})
  _ctfm_record("unittest|${CMAKE_CURRENT_SOURCE_DIR}|${MY_SCRIPT}|${BUILD_TESTING}")
endmacro()

macro(SlicerMacroBuildScriptedCLI)
  cmake_parse_arguments(MY "NO_INSTALL;VERBOSE" "NAME;FOLDER" "" ${ARGN})
  _ctfm_require_files(CLI ${MY_NAME}.py ${MY_NAME}.xml)
  _ctfm_record("cli|${MY_NAME}|${CMAKE_CURRENT_SOURCE_DIR}")
endmacro()
"""
STUB_CPACK = r"""
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  _ctfm_record("meta|${var}|${${var}}")
endforeach()
"""


@pytest.fixture(scope="module")
def cmake_record(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    stub = root / "stub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text("option(BUILD_TESTING \"\" ON)\n")
    (stub / "GenerateConfig.cmake").write_text("")
    (stub / "CPack.cmake").write_text(STUB_CPACK)
    record = root / "record.txt"
    build = root / "build"
    result = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}", f"-DCTFM_RECORD={record}"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split("|") for line in record.read_text().splitlines()]
    return lines, build


def test_cmake_extension_metadata(cmake_record):
    lines, _ = cmake_record
    meta = {fields[1]: fields[2] for fields in lines if fields[0] == "meta"}
    assert all(meta[k] for k in meta), meta
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split(",")
    assert meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert meta["EXTENSION_ICONURL"].endswith("Resources/CTFM.png")


@pytest.mark.parametrize("name", MODULES)
def test_cmake_registers_each_module_with_its_tests(cmake_record, name):
    lines, _ = cmake_record
    modules = {fields[1]: fields for fields in lines if fields[0] == "module"}
    _, _, generic_tests, source_dir, scripts, resources = modules[name]
    assert generic_tests == "TRUE"  # WITH_GENERIC_TESTS
    assert Path(source_dir) == REPO / name
    scripts, resources = set(scripts.split(",")), set(resources.split(","))
    assert f"{name}.py" in scripts
    assert f"Testing/Python/{name}Test.py" in scripts  # installed next to the module for Reload and Test
    package = ADAPTER_PACKAGES[name]
    expected = {str(p.relative_to(REPO / name)) for p in (REPO / name / package).glob("*.py")}
    assert expected and expected <= scripts
    assert {f"Resources/UI/{name}.ui", f"Resources/Icons/{name}.png"} <= resources
    unittests = [fields for fields in lines if fields[0] == "unittest" and Path(fields[1]).is_relative_to(REPO / name)]
    assert [(Path(f[1]), f[2], f[3]) for f in unittests] == [(REPO / name / "Testing" / "Python", f"{name}Test.py", "ON")]


def test_cmake_installs_all_of_ctfmlib_and_the_catalogue(cmake_record):
    lines, build = cmake_record
    scripts = set(next(f for f in lines if f[0] == "module" and f[1] == "CTFM")[4].split(","))
    ctfmlib = {str(p.relative_to(REPO / "CTFM")) for p in (REPO / "CTFM" / "CTFMLib").rglob("*.py")}
    assert ctfmlib and ctfmlib <= scripts
    resources = set(next(f for f in lines if f[0] == "module" and f[1] == "CTFM")[5].split(","))
    assert {"Resources/requirements-slicer.txt", "Resources/requirements-child.txt"} <= resources
    copied = build / "lib" / "Slicer-5.8" / "qt-scripted-modules" / "CTFMLib" / "resources" / "Models.json"
    assert copied.read_bytes() == (REPO / "Resources" / "Models.json").read_bytes()
    install_script = (build / "CTFM" / "cmake_install.cmake").read_text()
    assert "qt-scripted-modules/CTFMLib/resources" in install_script and "Models.json" in install_script


def test_cmake_registers_the_scripted_cli(cmake_record):
    lines, _ = cmake_record
    assert [(f[1], Path(f[2])) for f in lines if f[0] == "cli"] == [("CTFMTrain", REPO / "CTFMTrain")]
    first_line = (REPO / "CTFMTrain" / "CTFMTrain.py").read_text(encoding="utf-8").splitlines()[0]
    assert first_line == "#!/usr/bin/env python-real"


# --- finding the CTFM packages from the other modules ------------------------------------------


def _path_helper(module_name, file_path):
    """Run the module's _addCTFMPackagesToPath as if the module file were at ``file_path``; return the sys.path it builds."""
    import types

    tree = ast.parse((REPO / module_name / f"{module_name}.py").read_text(encoding="utf-8"))
    helper = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "_addCTFMPackagesToPath")
    fake_sys = types.SimpleNamespace(path=[])
    namespace = {"__file__": str(file_path), "os": os, "sys": fake_sys}
    exec(compile(ast.Module([helper], []), str(file_path), "exec"), namespace)
    namespace["_addCTFMPackagesToPath"]()
    return fake_sys.path


@pytest.mark.parametrize("name", ["CTFMSegment", "CTFMRetrieve"])
def test_other_modules_find_the_ctfm_packages(name, tmp_path):
    # Source tree: the module's own folder and the sibling CTFM folder.
    assert set(_path_helper(name, REPO / name / f"{name}.py")) == {str(REPO / name), str(REPO / "CTFM")}
    # Installed: one qt-scripted-modules folder holds everything.
    installed = tmp_path / "qt-scripted-modules"
    (installed / "CTFMSlicer").mkdir(parents=True)
    assert _path_helper(name, installed / f"{name}.py") == [str(installed)]
