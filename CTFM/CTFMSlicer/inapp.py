"""Where each module's in-app tests come from (no Slicer, no Qt needed here).

Slicer's Test and Reload-and-Test (``ScriptedLoadableModule.runTest``, 5.6 to main) look
``<ModuleName>Test`` up in the module file's namespace. The classes live in
``<Module>/Testing/Python/<Module>Test.py`` (Slicer's template layout; CMake installs the file with the
module, so the relative path holds in build and install trees); each module file's PEP 562
``__getattr__`` hands the look-up to :func:`in_app_test_class`.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["in_app_test_class"]


def in_app_test_class(module_file: str, module_name: str, name: str):
    """``<Module>Test`` from ``Testing/Python/<Module>Test.py`` beside ``module_file``, executed anew at each
    look-up (so Reload and Test runs the edited tests); AttributeError for any other name or a missing file."""
    expected = os.path.splitext(os.path.basename(module_file))[0] + "Test"
    path = os.path.join(os.path.dirname(os.path.abspath(module_file)), "Testing", "Python", f"{name}.py")
    if name != expected or not os.path.isfile(path):
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    spec = importlib.util.spec_from_file_location(name, path)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    return getattr(tests, name)
