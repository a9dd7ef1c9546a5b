"""A real MRML scene for tests, from ``slicer-core`` (Slicer's libraries without the application).

``slicer-core`` gives the MRML node classes and the module logics, but no
``slicer.app`` and so no ``slicer.mrmlScene``: :func:`mrml_scene` builds what
Slicer's startup builds for the code under test - an application logic with
the module logics that volume, segmentation and table code relies on
registered (Colors first, because new display nodes look up their default
colour table through it) - and installs the scene as ``slicer.mrmlScene``.

    from ctfm_testing.mrml import mrml_scene_fixture  # registers the "mrml_scene" fixture
    def test_something(mrml_scene): ...
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

# Registration order matters: later logics find earlier ones through the application logic.
MODULE_LOGICS = (
    ("Colors", "vtkSlicerColorLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
)


@contextlib.contextmanager
def scene_with_logics():
    """Yield a fresh ``vtkMRMLScene`` installed as ``slicer.mrmlScene``, with Slicer's module logics."""
    previous = getattr(slicer, "mrmlScene", None)
    with tempfile.TemporaryDirectory(prefix="ctfm-mrml-") as home:
        # The Colors logic reads default colour files from <home>/<share>/ColorFiles; an empty
        # folder gives the built-in tables without an error about a missing installation.
        (Path(home) / "share" / "ColorFiles").mkdir(parents=True)
        scene = slicer.vtkMRMLScene()
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetHomeDirectory(home)
        app_logic.SetShareDirectory("share")
        app_logic.SetTemporaryPath(home)
        app_logic.SetMRMLScene(scene)
        logics = {}
        for name, class_name in MODULE_LOGICS:
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(app_logic)
            logic.SetMRMLScene(scene)
            app_logic.SetModuleLogic(name, logic)
            logics[name] = logic
        scene.ctfm_logics = logics  # keep them alive (and reachable) as long as the scene
        slicer.mrmlScene = scene
        try:
            yield scene
        finally:
            scene.Clear(True)
            # The logics are not detached one by one (the Segmentations logic logs a warning
            # when it is); they go with the last references to them, as at Slicer's exit.
            del scene.ctfm_logics
            for name, _ in MODULE_LOGICS:
                app_logic.SetModuleLogic(name, None)
            logics.clear()
            slicer.mrmlScene = previous


@pytest.fixture(name="mrml_scene")
def mrml_scene_fixture():
    """A fresh MRML scene (``slicer.mrmlScene``) with the module logics registered."""
    with scene_with_logics() as scene:
        yield scene
