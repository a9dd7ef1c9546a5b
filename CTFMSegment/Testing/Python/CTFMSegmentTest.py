"""In-app tests of the CT-FM Segment module: they need a real 3D Slicer, so pytest does not run them.

Three ways to run them (see Testing/SlicerTests.md):

- ctest: ``py_CTFMSegmentTest``, registered by ``slicer_add_python_unittest`` in
  ``CTFMSegment/Testing/Python/CMakeLists.txt``;
- Slicer from the repository root::

    Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
      --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFMSegment/Testing/Python'], 'CTFMSegmentTest')"

- Reload and Test in developer mode: ``CTFMSegment.py`` hands this class to ``ScriptedLoadableModule.runTest``.

The tests that run a segmentation skip themselves, with the reason, when PyTorch or CT-FM's
packages are missing.
"""

import unittest
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from CTFMSegment import CTFMSegmentLogic
from CTFMSegmentLib.models import DEFAULT_QUALITY, FOLDER, QUALITIES, WHOLE_BODY


class CTFMSegmentTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer; the file's docstring says how to run them."""

    LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left"}

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_InputChecks,
            self.test_SegmentButtonState,
            self.test_SegmentFromWidget,
            self.test_CancelLeavesSceneUnchanged,
        ):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # Reload and Test calls runTest outside a unittest runner
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _bodyVolume(shape_kji, spacing, name):
        """A synthetic CT: a soft-tissue cylinder with a bright 'spine' in air (numpy view [k, j, i])."""
        import numpy as np

        k, j, i = np.indices(shape_kji, dtype=np.float32)
        centre_j, centre_i = (shape_kji[1] - 1) / 2.0, (shape_kji[2] - 1) / 2.0
        radius = 0.4 * min(shape_kji[1], shape_kji[2])
        voxels = np.full(shape_kji, -1000, dtype=np.int16)
        voxels[((j - centre_j) ** 2 + (i - centre_i) ** 2) < radius**2] = 40
        voxels[((j - centre_j - 0.5 * radius) ** 2 + (i - centre_i) ** 2) < (0.15 * radius) ** 2] = 700
        node = slicer.util.addVolumeFromArray(voxels, name=name)
        node.SetSpacing(*spacing)
        return node

    def _skipUnlessSegmentationRuns(self):
        from CTFMSlicer.dependencies import missing_requirements, read_requirements, torch_is_sufficient

        if not torch_is_sufficient() or missing_requirements(read_requirements()):
            self.skipTest("PyTorch and CT-FM's Python packages are not installed (Segment installs them)")
        from CTFMLib.cli import build_parser

        subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
        if "segment" not in subcommands:
            self.skipTest("this CTFMLib has no `ctfm segment` command")

    def _tinyModel(self, folder):
        """A small random-weights SegResNetDS with three labels, in the published layout."""
        import torch

        from CTFMLib.networks import build_network
        from CTFMLib.weights import save_pretrained

        torch.manual_seed(0)
        config = {"architecture": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1], "out_channels": 1 + len(self.LABELS)}
        save_pretrained(build_network(config), folder, config, labels=dict(self.LABELS))
        return folder

    def _widget(self):
        widget = slicer.modules.ctfmsegment.widgetRepresentation().self()
        widget.initializeParameterNode()  # setUp closed the scene, which drops the parameter node
        return widget, widget.logic.getParameterNode()

    @staticmethod
    def _waitWhileRunning(widget, seconds):
        import time

        deadline = time.time() + seconds
        while widget._runner is not None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)

    # --- tests -----------------------------------------------------------------------

    def test_InputChecks(self):
        """Volumes, model folders, devices and structure names are checked before anything runs."""
        import tempfile

        import numpy as np

        self.delayDisplay("Input checks")
        logic = CTFMSegmentLogic()
        self.assertTrue(logic.inputProblems(None, WHOLE_BODY))
        volume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="ct")
        self.assertEqual(logic.inputProblems(volume, WHOLE_BODY), [])
        self.assertEqual(logic.inputProblems(volume, WHOLE_BODY, structures="liver, spleen"), [])
        self.assertTrue(any("livr" in p and "liver" in p for p in logic.inputProblems(volume, WHOLE_BODY, structures="livr")))
        self.assertTrue(logic.inputProblems(volume, WHOLE_BODY, device="tpu"))
        vector = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8, 3), dtype=np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
        self.assertTrue(logic.inputProblems(vector, WHOLE_BODY))
        with tempfile.TemporaryDirectory() as folder:
            self.assertTrue(logic.inputProblems(volume, FOLDER, Path(folder)))  # empty folder
            for name in ("config.json", "model.safetensors"):
                (Path(folder) / name).write_bytes(b"{}")
            self.assertEqual(logic.inputProblems(volume, FOLDER, Path(folder)), [])

    def test_SegmentButtonState(self):
        """The Segment button follows the parameter node; the model folder row shows only for folder models."""
        import numpy as np

        self.delayDisplay("Segment button")
        widget, parameterNode = self._widget()
        parameterNode.inputVolume = None
        self.assertFalse(widget.ui.segmentButton.enabled)
        parameterNode.inputVolume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="ct")
        parameterNode.model = WHOLE_BODY
        self.assertTrue(widget.ui.segmentButton.enabled)
        # the plan (ctfm segment --plan, without torch): computed on the next turns of the event loop
        parameterNode.quality = "standard"
        for _quality in QUALITIES:
            widget._computeNextPlan()
        plan = widget.ui.planSummaryLabel.text
        self.assertIn("Expected time", plan)
        self.assertTrue(all(f"{quality} " in plan for quality in QUALITIES), plan)
        self.assertTrue(widget.ui.spacingComboBox.enabled)
        parameterNode.quality = "fast"
        self.assertFalse(widget.ui.spacingComboBox.enabled)  # fast always works at 3 mm
        parameterNode.quality = DEFAULT_QUALITY
        parameterNode.structures = "liver, nonsense"
        self.assertFalse(widget.ui.segmentButton.enabled)
        self.assertIn("nonsense", widget.ui.segmentButton.toolTip)
        parameterNode.structures = "liver"
        self.assertTrue(widget.ui.segmentButton.enabled)
        parameterNode.model = FOLDER
        self.assertFalse(widget.ui.segmentButton.enabled)  # no model folder chosen
        self.assertEqual(widget.ui.modelComboBox.currentText, FOLDER)
        # isHidden, not visible: with --no-main-window the panel itself is never shown
        self.assertFalse(widget.ui.modelFolderPathLineEdit.isHidden())
        self.assertTrue(widget.ui.segmentProgressBar.isHidden())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)

    def test_SegmentFromWidget(self):
        """Segment a small synthetic CT with a tiny random model through the panel: one segmentation, tagged segments."""
        import tempfile

        self._skipUnlessSegmentationRuns()
        self.delayDisplay("Segmenting with a tiny random model")
        with tempfile.TemporaryDirectory() as folder:
            self._tinyModel(folder)
            volume = self._bodyVolume((24, 48, 48), (2.0, 2.0, 3.0), "ct")
            widget, parameterNode = self._widget()
            parameterNode.inputVolume = volume
            parameterNode.model = FOLDER
            parameterNode.modelFolder = Path(folder)
            parameterNode.quality = "full"
            parameterNode.device = "cpu"
            parameterNode.structures = ""
            parameterNode.outputSegmentation = None
            self.assertTrue(widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip)
            widget.ui.segmentButton.click()
            self.assertEqual(widget.ui.segmentButton.text, "Cancel")
            self.assertFalse(widget.ui.segmentProgressBar.isHidden())
            self._waitWhileRunning(widget, 300)
            self.assertIsNone(widget._runner, "the segmentation did not finish in 5 minutes")
            self.assertEqual(widget.ui.segmentButton.text, "Segment")
            nodes = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
            self.assertEqual(len(nodes), 1, widget.ui.logTextEdit.toPlainText())
            segmentation = nodes[0]
            self.assertIs(parameterNode.outputSegmentation, segmentation)
            names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertTrue(set(names) <= set(self.LABELS.values()), names)
            self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
            hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
            self.assertEqual(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)),
                             hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume)))

    def test_CancelLeavesSceneUnchanged(self):
        """Cancel stops the child within seconds and adds nothing to the scene."""
        import tempfile
        import time

        self._skipUnlessSegmentationRuns()
        self.delayDisplay("Cancelling a segmentation")
        with tempfile.TemporaryDirectory() as folder:
            self._tinyModel(folder)
            volume = self._bodyVolume((200, 320, 320), (1.0, 1.0, 1.0), "big")  # minutes of work for a CPU
            widget, parameterNode = self._widget()
            parameterNode.inputVolume = volume
            parameterNode.model = FOLDER
            parameterNode.modelFolder = Path(folder)
            parameterNode.device = "cpu"
            parameterNode.structures = ""
            nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
            widget.ui.segmentButton.click()
            self._waitWhileRunning(widget, 3)
            self.assertIsNotNone(widget._runner, "the segmentation ended before it could be cancelled")
            runner = widget._runner
            started = time.time()
            widget.ui.segmentButton.click()  # reads "Cancel"
            self._waitWhileRunning(widget, 10)
            self.assertIsNone(widget._runner)
            self.assertLess(time.time() - started, 5.0)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
            self.assertIn("Cancelled.", widget.ui.logTextEdit.toPlainText())
            self.assertFalse(runner.running)
