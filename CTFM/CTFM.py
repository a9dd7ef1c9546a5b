"""CT-FM hub module: models, embeddings, training, and (later) triage and saliency.

The widget stays thin: it binds the .ui to :class:`CTFMParameterNode` and
calls :class:`CTFMLogic` and ``CTFMSlicer.train``, whose work lives in
``CTFMSlicer`` (no Qt) and ``CTFMLib`` (no Slicer). The Train section runs the
CTFMTrain CLI module with ``slicer.cli.run`` (Slicer stays responsive) and
cancels it with the CLI node's ``Cancel()``.
"""

import logging
import os
import sys
import unittest
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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
from CTFMSlicer.train import (
    MAX_STEPS_LIMIT,
    SOURCE_HINTS,
    SOURCE_KINDS,
    TRAIN_TASKS,
    TRAINING_TASKS,
    TrainRun,
    TrainSetupError,
    givenPath,
    trainModule,
    trainRequest,
    writeStarterConfig,
)
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
            "compute embeddings of CT volumes (whole volume, scan patches, or around a point), and pretrain or "
            "fine-tune CT-FM (Train: runs the CT-FM Train CLI module in the background). "
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
    trainTask - the Train section's task: pretrain, segment, classify or check (the environment).
    trainConfigFile - its training configuration (JSON or YAML); empty (".") for none.
    trainOutputFolder - where checkpoints, metrics and the trained model go; empty (".") for none.
    trainDevice - auto, cpu, cuda or mps for training.
    trainResume - continue from the output folder's last checkpoint.
    trainMaxSteps - stop after this many steps; 0 follows the configuration's schedule.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    weights: str = DEFAULT_WEIGHTS
    embedMode: Annotated[str, Choice(list(EMBED_MODES))] = "volume"
    pointList: vtkMRMLMarkupsFiducialNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    trainTask: Annotated[str, Choice(list(TRAIN_TASKS))] = "check"
    trainConfigFile: Path
    trainOutputFolder: Path
    trainDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    trainResume: bool = False
    trainMaxSteps: Annotated[int, WithinRange(0, MAX_STEPS_LIMIT)] = 0


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
        self._trainRun = None  # the CTFMTrain run the Train section follows
        self._trainNode = None  # its CLI node, reused by the next run
        self._trainMessage = ""  # the last outcome, shown while the section's values stay as they were
        self._trainMessageFor = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFM.ui")

        self.logic = CTFMLogic()

        self.observeSceneClose()

        self._setupModels()
        self.ui.computeEmbeddingButton.connect("clicked(bool)", self.onComputeEmbedding)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.createTrainConfigButton.connect("clicked(bool)", self.onCreateTrainConfig)
        self.ui.openTrainOutputButton.connect("clicked(bool)", self.onOpenTrainOutput)

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
        self._updateTrainState(p)
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


    # --- train section ---------------------------------------------------------------

    @staticmethod
    def _trainValues(p) -> tuple:
        return (p.trainTask, str(p.trainConfigFile), str(p.trainOutputFolder), p.trainDevice, p.trainResume,
                p.trainMaxSteps)

    @staticmethod
    def _trainRequest(p):
        return trainRequest(p.trainTask, p.trainConfigFile, p.trainOutputFolder, p.trainDevice, p.trainResume,
                            p.trainMaxSteps)

    def _trainRunning(self) -> bool:
        return self._trainRun is not None and self._trainRun.running

    def _updateTrainState(self, p) -> None:
        out = givenPath(p.trainOutputFolder) if p else None
        self.ui.openTrainOutputButton.enabled = out is not None and out.is_dir()
        if self._trainRunning():
            return
        problem, notes = _("No parameter node"), []
        if p:
            try:
                problem, notes = None, self._trainRequest(p).notes
            except TrainSetupError as e:
                problem = str(e)
        self.ui.trainButton.enabled = problem is None
        self.ui.trainButton.toolTip = problem or _(
            "Start the CT-FM Train CLI module in the background; the button then cancels it.")
        if self._trainMessage and p and self._trainValues(p) == self._trainMessageFor:
            self.ui.trainStatusLabel.text = self._trainMessage
        else:
            self.ui.trainStatusLabel.text = problem or " ".join(notes)

    def onTrain(self) -> None:
        if self._trainRunning():  # the button reads "Cancel" while a run goes on
            self.ui.trainStatusLabel.text = _("Cancelling...")
            self._trainRun.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=False):
            request = self._trainRequest(p)
            if request.parameters["task"] != "check":  # the check reports what is missing instead
                from CTFMSlicer.dependencies import ensure_dependencies

                ensure_dependencies()
            node = self._trainNode
            if node is not None and not slicer.mrmlScene.IsNodePresent(node):
                node = None  # left with a closed scene
            self._trainRun = TrainRun(trainModule(), request, on_progress=self._onTrainProgress,
                                      on_done=self._onTrainDone, node=node)
            self._trainMessage = ""
            self._setTrainRunning(True)
            try:
                self._trainNode = self._trainRun.start()  # returns at once; the CLI runs in Slicer's CLI thread
            except Exception:
                self._trainRun = None
                self._setTrainRunning(False)
                raise

    def _onTrainProgress(self, fraction, message: str) -> None:
        self.showFraction(self.ui.trainProgressBar, fraction)
        self.ui.trainStatusLabel.text = message

    def _onTrainDone(self, outcome: str, message: str, details: str) -> None:
        p = self._parameterNode
        self._trainMessage = message
        self._trainMessageFor = self._trainValues(p) if p else None
        self._setTrainRunning(False)
        self.ui.trainStatusLabel.text = message
        if outcome == "failed":
            logging.error(f"CT-FM Train: {message}\n{details}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(message, windowTitle=_("CT-FM Train"), detailedText=details or message)
        else:
            logging.info(f"CT-FM Train: {message}")

    def _setTrainRunning(self, running: bool) -> None:
        bar = self.ui.trainProgressBar
        bar.visible = running
        bar.setRange(0, 0 if running else 100)  # busy until the CLI reports a fraction
        bar.value = 0
        self.ui.trainButton.text = _("Cancel") if running else _("Start")
        self.ui.trainButton.enabled = True
        for widget in (self.ui.trainTaskComboBox, self.ui.trainConfigFilePathLineEdit, self.ui.createTrainConfigButton,
                       self.ui.trainOutputFolderPathLineEdit, self.ui.trainDeviceComboBox, self.ui.trainResumeCheckBox,
                       self.ui.trainMaxStepsSpinBox):
            widget.enabled = not running  # a run keeps the values it started with
        if not running:
            self._updateState()

    def onCreateTrainConfig(self) -> None:
        """Ask for the training data and a file name; write the task's default configuration there."""
        p = self._parameterNode
        task = p.trainTask
        if task not in TRAINING_TASKS:
            self.ui.trainStatusLabel.text = _("Choose the task to configure first: pretrain, segment or classify.")
            return
        parent = slicer.util.mainWindow()
        start = str(givenPath(p.trainOutputFolder) or Path.home())
        title = _("Training data ({task}): {hint}").format(task=task, hint=SOURCE_HINTS[task])
        if SOURCE_KINDS[task] == "folder":
            source = qt.QFileDialog.getExistingDirectory(parent, title, start)
        else:
            source = qt.QFileDialog.getOpenFileName(parent, title, start, _("CSV files (*.csv);;All files (*)"))
        if not source:
            return
        target = qt.QFileDialog.getSaveFileName(parent, _("Save the {task} configuration as").format(task=task),
                                                os.path.join(start, f"ctfm-{task}.json"), _("JSON files (*.json)"))
        if not target:
            return
        # The dialog asked before overwriting what the user named; never overwrite a name it did not see.
        confirmed = target.lower().endswith(".json")
        if not confirmed:
            target += ".json"
        with slicer.util.tryWithErrorDisplay(_("Failed to write the configuration."), waitCursor=False):
            path = writeStarterConfig(task, target, [source], overwrite=confirmed)
            p.trainConfigFile = path
            self._trainMessage = _(
                "Wrote {path} with the default settings for {task}; edit it to change the schedule (optim.max_steps), "
                "the model or the data."
            ).format(path=path, task=task)
            self._trainMessageFor = self._trainValues(p)
            self._updateState()

    def onOpenTrainOutput(self) -> None:
        folder = givenPath(self._parameterNode.trainOutputFolder) if self._parameterNode else None
        if folder is not None and folder.is_dir():
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _cancelTraining(self) -> None:
        if self._trainRunning():
            self._trainRun.cancel()

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelTraining()  # its CLI node leaves with the scene; the checkpoints stay for Resume
        super().onSceneStartClose(caller, event)

    def cleanup(self) -> None:
        self._cancelTraining()
        if self._trainRun is not None:
            self._trainRun.close()
        super().cleanup()


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
            self.test_TrainSectionCheck,
            self.test_TrainSectionCancel,
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
            self.assertTrue(widget.ui.trainProgressBar.visible)
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
            self.assertFalse(widget.ui.trainProgressBar.visible)
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


def _forgetPackages():
    """Drop CTFMLib/CTFMSlicer from sys.modules so Reload picks up their edits too."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("CTFMLib", "CTFMSlicer"):
            del sys.modules[name]
