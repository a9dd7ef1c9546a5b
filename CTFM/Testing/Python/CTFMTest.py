"""In-app tests of the CT-FM hub module: they need a real 3D Slicer, so pytest does not run them.

Three ways to run them (see Testing/SlicerTests.md):

- ctest: ``py_CTFMTest``, registered by ``slicer_add_python_unittest`` in
  ``CTFM/Testing/Python/CMakeLists.txt``;
- Slicer from the repository root::

    Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
      --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFM/Testing/Python'], 'CTFMTest')"

- Reload and Test in developer mode: ``CTFM.py`` hands this class to ``ScriptedLoadableModule.runTest``.

Each test skips itself, with the reason, when what it needs is missing: PyTorch and CT-FM's
packages, the CTFMTrain CLI, or the slice views (absent with ``--no-main-window``).
"""

import os
import unittest
from pathlib import Path

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from CTFM import CTFMLogic
from CTFMSlicer.models import NOT_PUBLISHED


class CTFMTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer; the file's docstring says how to run them."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_VolumeNodeRoundTrip,
            self.test_ParentTransform,
            self.test_ModuleWidgetState,
            self.test_EmbedVolume,
            self.test_TrainSectionCheck,
            self.test_TrainSectionCancel,
            self.test_ModelsSection,
            self.test_TriageSection,
            self.test_SaliencySection,
        ):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # Reload and Test calls runTest outside a unittest runner
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    @staticmethod
    def _obliqueImage(dtype="int16"):
        import numpy as np

        from CTFMLib.image import Image

        rng = np.random.default_rng(7)
        angle = np.deg2rad(25.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        array = rng.integers(-1000, 2000, size=(21, 18, 11)).astype(dtype)
        return Image(array, spacing=(0.8, 0.9, 2.5), origin=(-12.0, 30.5, 100.0), direction=rotation)

    def test_VolumeNodeRoundTrip(self):
        """Image -> volume node -> Image keeps voxels and geometry; the node holds the RAS matrix."""
        import numpy as np

        from CTFMSlicer.nodes import image_from_volume_node, volume_node_from_image

        self.delayDisplay("Volume node round trip")
        for dtype in ("int16", "float32"):
            image = self._obliqueImage(dtype)
            node = volume_node_from_image(image, name=f"roundtrip-{dtype}")
            ijkToRAS = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(ijkToRAS)
            expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
            self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(ijkToRAS), expected, atol=1e-9))
            # Slicer's own array view is [k, j, i].
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(node), image.array.transpose(2, 1, 0)))
            back = image_from_volume_node(node)
            self.assertEqual(back.array.dtype, image.array.dtype)
            self.assertTrue(np.array_equal(back.array, image.array))
            self.assertTrue(back.geometry.same_grid(image.geometry, atol=1e-9))

    def test_ParentTransform(self):
        """A linear parent transform moves the image in world coordinates."""
        import numpy as np

        from CTFMSlicer.nodes import image_from_volume_node, volume_node_from_image

        self.delayDisplay("Parent transform")
        image = self._obliqueImage()
        node = volume_node_from_image(image, name="transformed")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        shift = np.eye(4)
        shift[:3, 3] = (10.0, -5.0, 2.0)  # RAS mm
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        node.SetAndObserveTransformNodeID(transform.GetID())
        moved = image_from_volume_node(node)
        self.assertTrue(np.allclose(moved.origin, image.origin + np.array([-10.0, 5.0, 2.0]), atol=1e-9))
        self.assertTrue(np.allclose(moved.direction, image.direction, atol=1e-9))

    def test_ModuleWidgetState(self):
        """The Compute button follows the parameter node."""
        import numpy as np

        self.delayDisplay("Module widget")
        widget = slicer.modules.ctfm.widgetRepresentation().self()
        widget.initializeParameterNode()  # setUp closed the scene, which drops the parameter node
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = None
        self.assertFalse(widget.ui.computeEmbeddingButton.enabled)
        volume = slicer.util.addVolumeFromArray(np.zeros((8, 9, 10), dtype=np.int16), name="empty")
        parameterNode.inputVolume = volume
        self.assertTrue(widget.ui.computeEmbeddingButton.enabled)
        parameterNode.embedMode = "point"
        self.assertEqual(widget.ui.embedModeComboBox.currentText, "point")
        self.assertFalse(widget.ui.computeEmbeddingButton.enabled)  # no point list yet
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
        parameterNode.pointList = points
        self.assertFalse(widget.ui.computeEmbeddingButton.enabled)  # no point placed yet
        points.AddControlPoint([0.0, 0.0, 0.0])
        self.assertTrue(widget.ui.computeEmbeddingButton.enabled)
        points.RemoveAllControlPoints()
        self.assertFalse(widget.ui.computeEmbeddingButton.enabled)
        self.assertTrue(widget.ui.embeddingProgressBar.isHidden())

    def test_EmbedVolume(self):
        """embedVolume on a tiny random-weights encoder equals CTFMLib's embedding of the same Image."""
        import tempfile

        import numpy as np

        from CTFMSlicer.dependencies import missing_requirements, read_requirements, torch_is_sufficient
        from CTFMSlicer.nodes import volume_node_from_image

        if not torch_is_sufficient() or missing_requirements(read_requirements()):
            self.skipTest("PyTorch and CT-FM's Python packages are not installed (CTFM module: Compute embedding installs them)")
        import torch

        from CTFMLib.embed import embed_image
        from CTFMLib.networks import build_encoder
        from CTFMLib.weights import save_pretrained

        self.delayDisplay("Embedding with a tiny random model")
        torch.manual_seed(0)
        config = {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1]}
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(build_encoder({k: v for k, v in config.items() if k != "architecture"}), folder, config)
            image = self._obliqueImage("float32")
            node = volume_node_from_image(image, name="embed")
            logic = CTFMLogic()
            embedding = logic.embedVolume(node, weights=folder, device="cpu")
            reference = embed_image(image, weights=folder, device="cpu")
            self.assertEqual(embedding.shape, (8,))  # 4 filters doubled once
            self.assertTrue(np.all(np.isfinite(embedding)))
            self.assertTrue(np.allclose(embedding, reference, atol=1e-5))
            table = logic.embeddingTableNode(embedding)
            self.assertEqual(table.GetNumberOfRows(), 8)

            self.delayDisplay("The same embedding from the widget, computed in a child process")
            import time

            widget = slicer.modules.ctfm.widgetRepresentation().self()
            widget.initializeParameterNode()
            parameterNode = widget.logic.getParameterNode()
            parameterNode.inputVolume = node
            parameterNode.weights = folder
            parameterNode.embedMode = "volume"
            parameterNode.device = "cpu"
            widget.ui.computeEmbeddingButton.click()
            self.assertEqual(widget.ui.computeEmbeddingButton.text, "Cancel")
            deadline = time.time() + 120
            while widget._runner is not None and time.time() < deadline:
                slicer.app.processEvents()
                time.sleep(0.05)
            self.assertIsNone(widget._runner)
            tables = slicer.util.getNodesByClass("vtkMRMLTableNode")
            fromWidget = slicer.util.arrayFromTableColumn(tables[-1], "value")
            self.assertTrue(np.allclose(fromWidget, reference, atol=1e-5))

    def _trainWidget(self):
        """The module widget with a fresh parameter node, or skip when the CTFMTrain CLI is not loaded."""
        if not hasattr(slicer.modules, "ctfmtrain"):
            self.skipTest("the CTFMTrain CLI module is not loaded (CLI modules disabled?)")
        widget = slicer.modules.ctfm.widgetRepresentation().self()
        widget.initializeParameterNode()
        return widget, widget.logic.getParameterNode()

    @staticmethod
    def _waitForTraining(widget, seconds: float, until=None) -> float:
        """Process events while the Train section's run goes on (or until ``until()``); return the seconds waited."""
        import time

        started = time.time()
        while widget._trainRun.running and time.time() - started < seconds and not (until and until()):
            slicer.app.processEvents()
            time.sleep(0.05)
        return time.time() - started

    def test_TrainSectionCheck(self):
        """The Train section starts the CTFMTrain check with slicer.cli.run, without blocking, and follows it."""
        import tempfile

        from CTFMSlicer.dependencies import torch_is_sufficient

        self.delayDisplay("Train section: environment check")
        widget, p = self._trainWidget()
        with tempfile.TemporaryDirectory() as folder:
            p.trainTask = "check"
            p.trainConfigFile = Path()
            p.trainOutputFolder = Path(folder)
            p.trainDevice = "cpu"
            p.trainResume = False
            p.trainMaxSteps = 0
            self.assertTrue(widget.ui.trainButton.enabled, widget.ui.trainButton.toolTip)
            widget.ui.trainButton.click()
            run = widget._trainRun
            # click() returned while the CLI is still scheduled or running: Slicer was not blocked.
            self.assertTrue(run.running and run.node.IsBusy(), run.node.GetStatusString())
            self.assertEqual(widget.ui.trainButton.text, "Cancel")
            # isHidden, not visible: the panel is off screen under ctest and the Train section is collapsed
            self.assertFalse(widget.ui.trainProgressBar.isHidden())
            self._waitForTraining(widget, 300)
            self.assertFalse(run.running, "the check did not finish within 300 s")
            if torch_is_sufficient():
                self.assertEqual(run.node.GetStatus(), run.node.Completed, run.node.GetErrorText())
                self.assertEqual(run.outcome, "completed")
                self.assertIn("ready", widget.ui.trainStatusLabel.text)
            else:
                self.assertTrue(run.node.GetStatus() & run.node.ErrorsMask)
                self.assertEqual(run.outcome, "failed")
                self.assertIn("PyTorch", run.message)
            self.assertEqual(widget.ui.trainButton.text, "Start")
            self.assertTrue(widget.ui.trainProgressBar.isHidden())
            self.assertNotIn("<filter-", run.node.GetOutputText())  # Slicer strips the progress elements

    @staticmethod
    def _bodyScan(seed: int):
        """A 48 x 48 x 60 CT of a cylinder of soft tissue in air, 2 mm voxels (passes CT-FM's scan filters)."""
        import numpy as np

        from CTFMLib.image import Image

        rng = np.random.default_rng(seed)
        i, j = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 48), indexing="ij")
        body = np.repeat(((i**2 + j**2) < 0.6)[:, :, None], 60, axis=2)
        array = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 10.0, body.shape)
        return Image(array.astype(np.int16), spacing=(2.0, 2.0, 2.0))

    def test_TrainSectionCancel(self):
        """A tiny pretraining started from the Train section stops with status Cancelled after Cancel."""
        import json
        import tempfile

        from CTFMSlicer.dependencies import missing_requirements, read_requirements, torch_is_sufficient
        from CTFMSlicer.train import CHECKPOINT, writeStarterConfig

        if not torch_is_sufficient() or missing_requirements(read_requirements()):
            self.skipTest("PyTorch and CT-FM's Python packages are not installed "
                          "(CTFM module: Compute embedding installs them)")
        from CTFMLib.image import write_image

        self.delayDisplay("Train section: tiny pretraining, then Cancel")
        widget, p = self._trainWidget()
        with tempfile.TemporaryDirectory() as folder:
            scans = Path(folder) / "scans"
            scans.mkdir()
            for seed in (1, 2):
                write_image(self._bodyScan(seed), scans / f"ct{seed}.nii.gz")
            config = writeStarterConfig("pretrain", Path(folder) / "pretrain.json", [scans])
            settings = json.loads(config.read_text())
            settings["data"]["workers"] = 0
            settings["model"].update(init_filters=4, blocks_down=[1, 1, 1])
            settings["optim"].update(lr=1e-3, warmup_steps=1, max_steps=100000)  # runs until cancelled
            settings["run"].update(device="cpu", checkpoint_every=1, log_every=1, scans_per_step=2)
            settings["pretrain"].update(crops_per_scan=3, crop_size=[8, 16, 16], projection=[16, 16, 8])
            config.write_text(json.dumps(settings))
            out = Path(folder) / "run"
            p.trainTask = "pretrain"
            p.trainConfigFile = config
            p.trainOutputFolder = out
            p.trainDevice = "cpu"
            p.trainResume = False
            p.trainMaxSteps = 0
            self.assertTrue(widget.ui.trainButton.enabled, widget.ui.trainButton.toolTip)
            widget.ui.trainButton.click()
            run = widget._trainRun
            self._waitForTraining(widget, 300, until=lambda: (out / CHECKPOINT).is_file())
            self.assertTrue(run.running, f"training ended before it was cancelled: {run.message}\n{run.details}")
            self.assertTrue((out / CHECKPOINT).is_file(), "no checkpoint within 300 s")
            widget.ui.trainButton.click()  # the button reads Cancel: cliNode.Cancel()
            waited = self._waitForTraining(widget, 60)
            self.assertFalse(run.running, "still running 60 s after Cancel")
            self.assertEqual(run.node.GetStatus(), run.node.Cancelled, run.node.GetStatusString())
            self.assertLess(waited, 60)
            self.assertEqual(run.outcome, "cancelled")
            self.assertIn("tick Resume", widget.ui.trainStatusLabel.text)
            # the output folder now holds a run: starting again needs Resume
            self.assertFalse(widget.ui.trainButton.enabled)
            p.trainResume = True
            self.assertTrue(widget.ui.trainButton.enabled, widget.ui.trainButton.toolTip)


    # --- models, triage and saliency sections ---------------------------------------------------

    def _hubWidget(self):
        widget = slicer.modules.ctfm.widgetRepresentation().self()
        widget.initializeParameterNode()  # setUp closed the scene, which drops the parameter node
        return widget, widget.logic.getParameterNode()

    def _requireTorch(self):
        from CTFMSlicer.dependencies import missing_requirements, read_requirements, torch_is_sufficient

        if not torch_is_sufficient() or missing_requirements(read_requirements()):
            self.skipTest("PyTorch and CT-FM's Python packages are not installed "
                          "(CTFM module: Compute embedding installs them)")

    @staticmethod
    def _waitForJob(widget, seconds: float) -> float:
        """Process events while a section's child process runs; return the seconds waited."""
        import time

        started = time.time()
        while widget._runner is not None and time.time() - started < seconds:
            slicer.app.processEvents()
            time.sleep(0.05)
        return time.time() - started

    @staticmethod
    def _headScan(name="head"):
        """A 64 x 64 x 40 head CT at 3 mm (skull around brain, a hyperdense blob on the left) as a volume node."""
        import numpy as np

        from CTFMLib.image import Image
        from CTFMSlicer.nodes import volume_node_from_image

        i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in (64, 64, 40)], indexing="ij")
        r = i**2 + j**2 + k**2
        hu = np.where(r < 0.7, 1000.0, -1000.0)
        hu = np.where(r < 0.55, 35.0, hu)
        hu = np.where((i - 0.3) ** 2 + j**2 + k**2 < 0.02, 75.0, hu)
        image = Image(hu.astype(np.int16), spacing=(3.0, 3.0, 3.0), origin=(-95.0, -95.0, -60.0))
        return volume_node_from_image(image, name=name)

    @staticmethod
    def _tinyTriageModel(folder):
        """A random-weights TriageModel folder as `ctfm train classify` exports it (4 filters, 16 x 32 x 32 input)."""
        import torch

        from CTFMLib.networks import TriageModel, build_encoder
        from CTFMLib.triage_model import DEFAULT_WINDOWS
        from CTFMLib.weights import save_pretrained

        torch.manual_seed(0)
        encoderConfig = {"architecture": "SegResEncoder", "spatial_dims": 3, "in_channels": 1, "init_filters": 4,
                         "blocks_down": [1, 1, 1]}
        model = TriageModel(build_encoder({k: v for k, v in encoderConfig.items() if k != "architecture"}), hidden=0)
        config = {"architecture": "TriageModel", "encoder": encoderConfig, "head": [model.encoder.out_channels, 1],
                  "mode": "full", "threshold": 0.4, "threshold_source": "default",
                  "_preprocessing": {"orientation": "SPL", "input": "HU", "size": [16, 32, 32],
                                     "windows": [list(w) for w in DEFAULT_WINDOWS], "stack_axis": "S"}}
        return save_pretrained(model.eval(), folder, config)

    def test_ModelsSection(self):
        """Model statuses in the table, Download refused where nothing is published, offline failure, Remove."""
        import tempfile

        self._requireTorch()
        from CTFMLib.networks import build_encoder
        from CTFMLib.weights import save_pretrained

        self.delayDisplay("Models section")
        widget, _p = self._hubWidget()
        saved = {k: os.environ.get(k) for k in ("CTFM_CACHE", "HF_HUB_OFFLINE")}
        try:
            with tempfile.TemporaryDirectory() as folder:
                os.environ["CTFM_CACHE"] = str(Path(folder) / "cache")  # this session only; the setting is untouched
                os.environ["HF_HUB_OFFLINE"] = "1"  # the test never downloads
                widget._fillModelsTable()
                table = widget.ui.modelsTableWidget
                ids = [row["id"] for row in widget._modelRows]
                self.assertEqual(table.rowCount, len(ids))
                status = lambda model: table.item(ids.index(model), 2).text()  # noqa: E731
                self.assertEqual(status("ct_fm_feature_extractor"), "not on this computer")
                self.assertEqual(status("msd_lung_tumor"), "train with CT-FM Train")

                table.selectRow(ids.index("msd_lung_tumor"))
                self.assertFalse(widget.ui.downloadModelButton.enabled)
                self.assertIn("CTFMTrain", widget.ui.downloadModelButton.toolTip)
                table.selectRow(ids.index("ct_fm_feature_extractor"))
                self.assertTrue(widget.ui.downloadModelButton.enabled)
                self.assertFalse(widget.ui.removeModelButton.enabled)

                widget.ui.downloadModelButton.click()  # offline: the child fails and says how to get the model
                self.assertEqual(widget.ui.downloadModelButton.text, "Cancel")
                self.assertFalse(widget.ui.triageButton.enabled)  # one job at a time
                self._waitForJob(widget, 120)
                self.assertIsNone(widget._runner)
                self.assertIn("not on this computer", widget.ui.modelsStatusLabel.text)
                self.assertIn("import", widget.ui.modelsStatusLabel.text)
                self.assertEqual(widget.ui.downloadModelButton.text, "Download")

                encoder = Path(folder) / "encoder"
                save_pretrained(build_encoder({"init_filters": 4, "blocks_down": [1, 1]}), encoder,
                                {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1]})
                # Other weights under the published id: refused, then imported when the user confirms.
                from CTFMLib.weights import NotPublishedError

                with self.assertRaises(NotPublishedError):
                    widget.logic.importModel(encoder, "ct_fm_feature_extractor")
                widget.logic.importModel(encoder, "ct_fm_feature_extractor", force=True)
                widget._fillModelsTable()
                self.assertEqual(status("ct_fm_feature_extractor"), NOT_PUBLISHED)
                self.assertTrue(widget.ui.removeModelButton.enabled)  # the selection survived the refresh
                widget.removeSelectedModel(confirm=False)  # what Remove does once confirmed
                self.assertEqual(status("ct_fm_feature_extractor"), "not on this computer")
                self.assertIn("Removed", widget.ui.modelsStatusLabel.text)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            widget._fillModelsTable()

    def test_TriageSection(self):
        """Run triage with a saliency map from the section: verdict, table row, heatmap over the volume.

        Without slice views (--no-main-window) it skips, with the reason, after the checks that need none.
        """
        import tempfile

        import numpy as np

        self._requireTorch()
        from CTFMLib.triage import triage_image
        from CTFMSlicer.nodes import image_from_volume_node

        self.delayDisplay("Triage section with a tiny random triage model")
        widget, p = self._hubWidget()
        with tempfile.TemporaryDirectory() as folder:
            model = self._tinyTriageModel(Path(folder) / "triage")
            volume = self._headScan()
            p.triageVolume = volume
            p.triageModel = "folder"
            p.triageModelFolder = Path()
            self.assertFalse(widget.ui.triageButton.enabled)
            self.assertIn("folder", widget.ui.triageButton.toolTip)
            p.triageModelFolder = model
            p.triageSaliency = True
            p.triageSaliencyMethod = "gradient"
            p.device = "cpu"
            self.assertTrue(widget.ui.triageButton.enabled, widget.ui.triageButton.toolTip)
            widget.ui.triageButton.click()
            self.assertEqual(widget.ui.triageButton.text, "Cancel")
            self._waitForJob(widget, 180)
            self.assertIsNone(widget._runner, "triage did not finish within 180 s")
            reference = triage_image(image_from_volume_node(volume), str(model), device="cpu")
            self.assertTrue(widget.ui.triageStatusLabel.text.startswith(reference.decision),
                            widget.ui.triageStatusLabel.text)
            table = slicer.mrmlScene.GetFirstNodeByName("CT-FM triage")
            self.assertEqual(table.GetNumberOfRows(), 1)
            self.assertAlmostEqual(float(slicer.util.arrayFromTableColumn(table, "probability")[0]),
                                   reference.probability, places=5)
            heat = slicer.mrmlScene.GetFirstNodeByName("head triage saliency")
            self.assertIsNotNone(heat)
            matrices = []
            for node in (heat, volume):
                m = vtk.vtkMatrix4x4()
                node.GetIJKToRASMatrix(m)
                matrices.append(slicer.util.arrayFromVTKMatrix(m))
            self.assertTrue(np.array_equal(*matrices))
            # the Saliency section's controls act on the map
            p.saliencyThreshold = 0.55
            self.assertAlmostEqual(heat.GetDisplayNode().GetLowerThreshold(), 0.55)
            # With --no-main-window there is no layout manager, hence no slice views and no slice composite nodes.
            if slicer.app.layoutManager() is None:
                self.skipTest("no slice views (--no-main-window): the heatmap's place in the slice views is not checked")
            composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
            self.assertEqual(composite.GetForegroundVolumeID(), heat.GetID())
            self.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
            self.assertAlmostEqual(composite.GetForegroundOpacity(), p.saliencyOpacity)
            p.saliencyOpacity = 0.8
            self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.8)

    def test_SaliencySection(self):
        """A point-target map in a cube from the section, its peak markup; then Cancel of an occlusion map."""
        import tempfile

        import numpy as np

        self._requireTorch()
        from CTFMLib.networks import build_encoder
        from CTFMLib.weights import save_pretrained

        self.delayDisplay("Saliency section with a tiny random encoder")
        widget, p = self._hubWidget()
        with tempfile.TemporaryDirectory() as folder:
            encoder = Path(folder) / "encoder"
            save_pretrained(build_encoder({"init_filters": 4, "blocks_down": [1, 1, 1]}), encoder,
                            {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1, 1]})
            volume = self._headScan()
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
            p.saliencyVolume = volume
            p.saliencyTarget = "point"
            p.saliencyWeights = str(encoder)
            p.saliencyPointSource = "markup"
            p.saliencyPointList = points
            p.saliencyMethod = "gradient"
            p.saliencyRegion = "cube"
            p.saliencyCubeMm = 48.0
            p.device = "cpu"
            # isHidden, not visible: the panel is off screen under ctest and the Saliency section is collapsed
            self.assertFalse(widget.ui.saliencyPointListSelector.isHidden() or widget.ui.saliencyCubeDoubleSpinBox.isHidden())
            self.assertTrue(widget.ui.saliencyRoiSelector.isHidden() and widget.ui.saliencyClassNameLineEdit.isHidden())
            self.assertFalse(widget.ui.saliencyButton.enabled)  # no point placed yet
            points.AddControlPoint([30.0, 10.0, 0.0])  # RAS x > 0: LPS x < 0, which must not read as an option
            self.assertTrue(widget.ui.saliencyButton.enabled, widget.ui.saliencyButton.toolTip)
            widget.ui.saliencyButton.click()
            self._waitForJob(widget, 180)
            self.assertIsNone(widget._runner, "the saliency map did not finish within 180 s")
            heat = slicer.mrmlScene.GetFirstNodeByName("head point saliency")
            self.assertIsNotNone(heat, widget.ui.saliencyStatusLabel.text)
            values = slicer.util.arrayFromVolume(heat)
            self.assertTrue(values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0)
            peak = slicer.mrmlScene.GetFirstNodeByName("head point saliency peak")
            position = np.array(peak.GetNthControlPointPositionWorld(0))
            self.assertLessEqual(np.abs(position - [30.0, 10.0, 0.0]).max(), 24.0 + 1e-3)  # inside the cube
            self.assertEqual(heat.GetDisplayNode().GetColorNodeID(), "vtkMRMLPETProceduralColorNodePET-Heat")

            self.delayDisplay("Saliency section: Cancel")
            p.saliencyTarget = "embedding"
            p.saliencyRegion = "whole"
            p.saliencyMethod = "occlusion"
            widget.ui.saliencyButton.click()
            self.assertEqual(widget.ui.saliencyButton.text, "Cancel")
            widget.ui.saliencyButton.click()
            waited = self._waitForJob(widget, 30)
            self.assertIsNone(widget._runner)
            self.assertLess(waited, 30)
            self.assertEqual(widget.ui.saliencyStatusLabel.text, "Cancelled.")
            self.assertEqual(widget.ui.saliencyButton.text, "Compute saliency map")
