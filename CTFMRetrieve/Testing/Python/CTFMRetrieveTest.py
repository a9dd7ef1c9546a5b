"""In-app tests of the CT-FM Retrieve module: they need a real 3D Slicer, so pytest does not run them.

Three ways to run them (see Testing/SlicerTests.md):

- ctest: ``py_CTFMRetrieveTest``, registered by ``slicer_add_python_unittest`` in
  ``CTFMRetrieve/Testing/Python/CMakeLists.txt``;
- Slicer from the repository root::

    Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
      --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFMRetrieve/Testing/Python'], 'CTFMRetrieveTest')"

- Reload and Test in developer mode: ``CTFMRetrieve.py`` hands this class to ``ScriptedLoadableModule.runTest``.

The test that adds to an index and searches it skips itself, with the reason, when PyTorch or
CT-FM's packages are missing.
The logic behind the panel is tested without the application in Testing/slicer_layer/test_retrieve_slicer.py.
"""

import unittest
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from CTFMRetrieve import CTFMRetrieveLogic
from CTFMRetrieveLib.logic import RESULT_COLUMNS


class CTFMRetrieveTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer; the file's docstring says how to run them."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_ResultsTable, self.test_ButtonStates, self.test_SharedIndexUrl, self.test_AddFindAndShow):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # Reload and Test calls runTest outside a unittest runner
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    def _widget(self):
        widget = slicer.modules.ctfmretrieve.widgetRepresentation().self()
        widget.initializeParameterNode()
        return widget

    def _requireTorch(self):
        """Skip unless PyTorch and CT-FM's packages are installed (the encoder and `ctfm index` need them)."""
        from CTFMSlicer.dependencies import missing_requirements, read_requirements, torch_is_sufficient

        if not torch_is_sufficient() or missing_requirements(read_requirements()):
            self.skipTest("PyTorch and CT-FM's Python packages are not installed "
                          "(CT-FM Retrieve: Add loaded volumes installs them)")

    def _wait(self, widget, seconds: float = 300.0) -> None:
        import time

        deadline = time.time() + seconds
        while widget._runner is not None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._runner, "the job did not finish in time")

    def test_ResultsTable(self):
        """Results are ranked by decreasing similarity and shown in the table view, locations in RAS."""
        import numpy as np

        from CTFMRetrieveLib.jobs import QueryHit

        self.delayDisplay("Results table")
        hits = [QueryHit(2, 0.5, 7, "/data/b.nii.gz", None, np.array([10.0, -20.0, 30.0]), "patch"),
                QueryHit(1, 0.9, 3, "/data/a.nrrd", None, np.array([1.0, 2.0, 3.0]), "patch")]
        table = CTFMRetrieveLogic().resultsTableNode(hits)
        self.assertEqual([table.GetColumnName(c) for c in range(table.GetNumberOfColumns())], list(RESULT_COLUMNS))
        self.assertEqual([table.GetCellText(r, 2) for r in range(2)], ["a", "b"])
        self.assertEqual([float(table.GetCellText(1, c)) for c in (3, 4, 5)], [-10.0, 20.0, 30.0])
        widget = self._widget()
        widget.logic.getParameterNode().resultsTable = table
        self.assertEqual(widget.ui.resultsTableView.mrmlTableNode(), table)

    def test_ButtonStates(self):
        """Find similar needs an index and a query volume; adding needs an index folder and volumes."""
        import tempfile

        import numpy as np

        self.delayDisplay("Button states")
        widget = self._widget()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="query")
        parameterNode.queryMode = "scan"
        self.assertFalse(widget.ui.findSimilarButton.enabled)  # no index yet
        with tempfile.TemporaryDirectory() as folder:
            parameterNode.indexPath = Path(folder)
            self.assertTrue(widget.ui.addVolumesButton.enabled)  # an empty folder takes a new index
            self.assertFalse(widget.ui.findSimilarButton.enabled)  # but holds nothing to search yet
        self.assertTrue(widget.ui.retrieveProgressBar.isHidden())  # not visible: off screen under ctest anyway

    def test_SharedIndexUrl(self):
        """A shared index's URL typed with its password: refused in the status line, kept without it in the scene;
        volumes that exist only in the scene cannot be added to it."""
        import numpy as np

        self.delayDisplay("Shared index URL")
        widget = self._widget()
        p = widget.logic.getParameterNode()
        slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="only here")
        p.indexLocation = "database"
        self.assertTrue(widget.ui.indexPathLineEdit.isHidden() and not widget.ui.indexUrlLineEdit.isHidden())
        secret = "n0t-In-The-sc3ne"
        try:
            widget.ui.indexUrlLineEdit.text = f"postgresql://alice:{secret}@127.0.0.1:1/pacs?schema=ctfm"
            slicer.app.processEvents()
            self.assertEqual(p.indexUrl, "postgresql://alice@127.0.0.1:1/pacs?schema=ctfm")
            self.assertIn("leave the password out", widget.ui.indexStatusLabel.text)
            self.assertFalse(widget.ui.addVolumesButton.enabled)
            self.assertIn("shared storage", widget.ui.addVolumesButton.toolTip)
            slicer.mrmlScene.SetSaveToXMLString(1)
            slicer.mrmlScene.Commit()
            scene = slicer.mrmlScene.GetSceneXMLString()
            self.assertNotIn(secret, scene)
            self.assertIn("127.0.0.1:1/pacs", scene)
        finally:
            p.indexLocation = "folder"  # stops reading the (unreachable) index's statistics

    def test_AddFindAndShow(self):
        """Add two phantoms with a tiny random encoder, find the place under the crosshair, double-click the best."""
        import tempfile

        import numpy as np

        self._requireTorch()
        from CTFMLib.image import Image

        self.delayDisplay("Add, find similar, show")
        with tempfile.TemporaryDirectory() as folder:
            weights = self._tinyEncoder(Path(folder) / "encoder")
            widget = self._widget()
            p = widget.logic.getParameterNode()
            rng = np.random.default_rng(0)
            for name in ("case-a", "case-b"):
                hu = np.where(rng.random((48, 48, 30)) > 0.5, 40, -1000).astype(np.int16)
                from CTFMSlicer.nodes import volume_node_from_image

                volume_node_from_image(Image(hu, spacing=np.array([2.0, 2.0, 4.0])), name=name)
            p.indexPath, p.weights, p.device = Path(folder) / "index", str(weights), "cpu"
            widget.ui.addVolumesButton.click()
            self._wait(widget)
            self.assertIn("Added 2", widget.ui.indexStatusLabel.text)
            p.inputVolume, p.queryMode, p.excludeQueryCase = slicer.util.getNode("case-a"), "crosshair", False
            slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode").SetCrosshairRAS(-20.0, -20.0, 20.0)
            widget.ui.findSimilarButton.click()
            self._wait(widget)
            self.assertEqual(p.resultsTable.GetNumberOfRows(), 2, widget.ui.statusLabel.text)
            widget.showResult(0)
            crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode").GetCrosshairRAS()
            row = widget.logic.resultOfRow(p.resultsTable, 0)
            np.testing.assert_allclose(crosshair, row["ras"], atol=1e-6)

    @staticmethod
    def _tinyEncoder(folder):
        """A random-weights 4-filter SegResEncoder in the published layout (CTFMLib's network: no MONAI needed)."""
        import torch

        from CTFMLib.networks import build_encoder
        from CTFMLib.weights import save_pretrained

        torch.manual_seed(0)
        config = {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1, 1, 1]}
        return save_pretrained(build_encoder({"init_filters": 4, "blocks_down": [1, 1, 1, 1]}), folder, config)
