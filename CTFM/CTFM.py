"""CT-FM hub module: models, embeddings, and (later) triage and saliency.

The widget stays thin: it binds the .ui to :class:`CTFMParameterNode` and
calls :class:`CTFMLogic`, whose work lives in ``CTFMSlicer`` (no Qt) and
``CTFMLib`` (no Slicer).
"""

import logging
import os
import sys
import unittest
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTFMSlicer import CITATION
from CTFMSlicer.logic import DEFAULT_WEIGHTS, DEVICES, EMBED_MODES
from CTFMSlicer.logic import CTFMLogic as CTFMCoreLogic
from CTFMSlicer.widget import ParameterNodeWidgetMixin

CACHE_FOLDER_SETTING = "CTFM/CacheFolder"



#
# CTFM
#


class CTFM(ScriptedLoadableModule):
    """The CT-FM hub module (see ScriptedLoadableModule in Slicer's Base/Python/slicer)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT-FM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "CT-FM")]
        self.parent.dependencies = []
        self.parent.contributors = ["CT-FM Slicer extension contributors"]
        self.parent.helpText = _(
            "CT-FM, a 3D foundation model for computed tomography, in 3D Slicer: manage the models, "
            "compute embeddings of CT volumes (whole volume, scan patches, or around a point). "
            "Triage and saliency maps arrive in later versions. Segmentation and similar-case retrieval "
            "are in the CT-FM Segment and CT-FM Retrieve modules."
        )
        self.parent.acknowledgementText = _(
            "CT-FM was developed by the AIM Program (Mass General Brigham, Harvard Medical School, Maastricht University). "
            "If you use it, please cite: {citation}"
        ).format(citation=CITATION)


#
# CTFMParameterNode
#


@parameterNodeWrapper
class CTFMParameterNode:
    """The hub module's state, saved with the scene.

    inputVolume - the volume to embed.
    weights - model source: Hugging Face repo id, catalogue id, or a local folder or file.
    embedMode - volume, scan or point.
    pointList - point mode embeds around its first control point.
    device - auto, cpu, cuda or mps.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    weights: str = DEFAULT_WEIGHTS
    embedMode: Annotated[str, Choice(list(EMBED_MODES))] = "volume"
    pointList: vtkMRMLMarkupsFiducialNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"


#
# CTFMWidget
#


class CTFMWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The hub module's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._observedPointList = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFM.ui")

        self.logic = CTFMLogic()

        self.observeSceneClose()

        self._setupModels()
        self.ui.computeEmbeddingButton.connect("clicked(bool)", self.onComputeEmbedding)

        self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload & Test: re-import CTFMLib and CTFMSlicer too, not only this file."""
        _forgetPackages()
        ScriptedLoadableModuleWidget.onReload(self)

    # --- models section ----------------------------------------------------------

    def _setupModels(self) -> None:
        # A remembered model folder applies to this session (and the processes it starts)
        # unless CTFM_CACHE was set before Slicer started.
        remembered = qt.QSettings().value(CACHE_FOLDER_SETTING)
        if remembered and not os.environ.get("CTFM_CACHE"):
            os.environ["CTFM_CACHE"] = str(remembered)
        from CTFMLib.cache import ctfm_home

        self.ui.cacheFolderPathLineEdit.currentPath = str(ctfm_home())
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)
        self._fillModelsTable()

    def _fillModelsTable(self) -> None:
        table = self.ui.modelsTableWidget
        try:
            rows = self.logic.catalogRows()
        except Exception as e:  # a broken catalogue must not break the module panel
            logging.error(f"CT-FM: cannot read the model catalogue: {e}")
            rows = [{"title": _("Model catalogue unreadable: {error}").format(error=e), "task": "", "repo_id": ""}]
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, key in enumerate(("title", "task", "repo_id")):
                item = qt.QTableWidgetItem(str(row.get(key, "")))
                item.setToolTip(row.get("id", ""))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    def onCacheFolderChanged(self, path: str) -> None:
        if not path:
            return
        os.environ["CTFM_CACHE"] = path
        qt.QSettings().setValue(CACHE_FOLDER_SETTING, path)

    # --- parameter node ----------------------------------------------------------

    def _observePointList(self, pointList) -> None:
        """Placing or deleting the point changes whether Compute is possible; the parameter node does not see that."""
        if pointList is self._observedPointList:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        if self._observedPointList is not None:
            for event in events:
                self.removeObserver(self._observedPointList, event, self._updateState)
        self._observedPointList = pointList
        if pointList is not None:
            for event in events:
                self.addObserver(pointList, event, self._updateState)

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self._observePointList(p.pointList if p else None)
        pointMode = bool(p) and p.embedMode == "point"
        self.ui.pointListLabel.visible = pointMode
        self.ui.pointListSelector.visible = pointMode
        if self._runner is not None:
            return
        problem = self.logic.embeddingInputProblem(p.inputVolume, p.weights, p.embedMode, p.pointList) if p else _("No parameter node")
        self.ui.computeEmbeddingButton.enabled = problem is None
        self.ui.computeEmbeddingButton.toolTip = problem or _("Compute the CT-FM embedding of the input volume.")

    # --- embedding ---------------------------------------------------------------

    def onComputeEmbedding(self) -> None:
        if self._runner is not None:  # the button reads "Cancel" while an embedding runs
            self.ui.embeddingStatusLabel.text = _("Cancelling...")
            self.cancelRunner()
            return
        from CTFMSlicer.dependencies import ensure_dependencies

        p = self._parameterNode
        self.ui.embeddingStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the embedding."), waitCursor=False):
            ensure_dependencies()
            pointRAS = self.logic.firstPointRAS(p.pointList) if p.embedMode == "point" else None
            volumeName = p.inputVolume.GetName()
            # The work runs in a child process: Slicer stays responsive and Cancel kills the process tree.
            self.followRunner(self.logic.startEmbedding(
                p.inputVolume, p.weights, p.embedMode, pointRAS, p.device,
                on_progress=self._onProgress,
                on_done=lambda embedding, message: self._onEmbeddingDone(embedding, message, volumeName),
            ))
            self._setRunning(True)

    def _onEmbeddingDone(self, embedding, message: str, volumeName: str) -> None:
        self._runner = None
        self._setRunning(False)
        if embedding is None:
            self.ui.embeddingStatusLabel.text = message.splitlines()[0] if message else _("Failed.")
            if message and message != "Cancelled.":
                logging.error(f"CT-FM embedding failed: {message}")
            return
        table = self.logic.embeddingTableNode(embedding, name=f"{volumeName} CT-FM embedding")
        self.ui.embeddingStatusLabel.text = _(
            "{size}-value embedding stored in table '{table}' (norm {norm:.3f})."
        ).format(size=embedding.size, table=table.GetName(), norm=float((embedding**2).sum() ** 0.5))

    def _setRunning(self, running: bool) -> None:
        self.ui.embeddingProgressBar.visible = running
        self.ui.embeddingProgressBar.setRange(0, 100)
        self.ui.embeddingProgressBar.value = 0
        self.ui.computeEmbeddingButton.text = _("Cancel") if running else _("Compute embedding")
        self.ui.computeEmbeddingButton.enabled = True
        if not running:
            self._updateState()

    def _onProgress(self, fraction, message: str = "") -> None:
        """Progress from the child process (delivered in the GUI thread by the poll timer)."""
        bar = self.ui.embeddingProgressBar
        self.showFraction(bar, fraction)
        if message:
            self.ui.embeddingStatusLabel.text = message


#
# CTFMLogic
#


class CTFMLogic(ScriptedLoadableModuleLogic, CTFMCoreLogic):
    """Slicer's module logic plus CTFMSlicer's embedding logic (usable from scripts without the widget)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTFMParameterNode(super().getParameterNode())


#
# CTFMTest
#


class CTFMTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer (not run by pytest). From the repository root:

        Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
          --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFM'], 'CTFM')"

    or ctest (py_CTFM) in an extension build, or Reload and Test in developer mode; see Testing/SlicerTests.md.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_VolumeNodeRoundTrip,
            self.test_ParentTransform,
            self.test_ModuleWidgetState,
            self.test_EmbedVolume,
            self.test_TrainCLICheck,
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
        self.assertFalse(widget.ui.embeddingProgressBar.visible)

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

    def test_TrainCLICheck(self):
        """The CTFMTrain CLI's environment check runs from Slicer and reports progress."""
        import tempfile

        from CTFMSlicer.dependencies import torch_is_sufficient

        if not hasattr(slicer.modules, "ctfmtrain"):
            self.skipTest("the CTFMTrain CLI module is not loaded (CLI modules disabled?)")
        self.delayDisplay("CTFMTrain environment check")
        with tempfile.TemporaryDirectory() as folder:
            parameters = {"task": "check", "outputDirectory": folder, "device": "cpu", "maxSteps": 0}
            cliNode = slicer.cli.runSync(slicer.modules.ctfmtrain, None, parameters)
            try:
                if torch_is_sufficient():
                    self.assertEqual(cliNode.GetStatus(), cliNode.Completed, cliNode.GetErrorText())
                else:
                    self.assertTrue(cliNode.GetStatus() & cliNode.ErrorsMask)
                self.assertIn("Python", cliNode.GetOutputText())
            finally:
                slicer.mrmlScene.RemoveNode(cliNode)


def _forgetPackages():
    """Drop CTFMLib/CTFMSlicer from sys.modules so Reload picks up their edits too."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("CTFMLib", "CTFMSlicer"):
            del sys.modules[name]
