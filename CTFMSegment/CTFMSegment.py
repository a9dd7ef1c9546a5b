"""CT-FM Segment module: whole-body and tumour segmentation with CT-FM models.

The widget stays thin: it binds the .ui to :class:`CTFMSegmentParameterNode`
and calls :class:`CTFMSegmentLogic`, whose work lives in ``CTFMSegmentLib``
(no Qt). Inference runs as ``ctfm segment`` in a child process followed by a
QTimer, so Slicer never freezes and Cancel kills the whole process tree; the
segmentation node is made only once the child succeeded.
"""

import os
import sys
import unittest
from pathlib import Path
from typing import Annotated

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
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


def _addCTFMPackagesToPath():
    """Make CTFMLib/CTFMSlicer (shipped with the CTFM module) importable here too.

    In an installed extension every module sits in one qt-scripted-modules folder; in
    the source tree (--additional-module-paths) they sit in the sibling CTFM folder,
    which Slicer may not have added to sys.path yet when this file is loaded.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    sibling = os.path.join(os.path.dirname(here), "CTFM")
    for folder in (here, sibling):
        if folder not in sys.path and (folder == here or os.path.isdir(os.path.join(folder, "CTFMSlicer"))):
            sys.path.insert(0, folder)


_addCTFMPackagesToPath()

from CTFMSegmentLib.logic import CTFMSegmentLogic as CTFMSegmentCoreLogic  # noqa: E402
from CTFMSegmentLib.models import DEFAULT_QUALITY, FOLDER, MODELS, QUALITIES, SPACINGS, WHOLE_BODY  # noqa: E402
from CTFMSegmentLib.output import is_out_of_memory  # noqa: E402
from CTFMSegmentLib.plan import plan_summary  # noqa: E402
from CTFMSlicer import CITATION  # noqa: E402
from CTFMSlicer.logic import DEVICES  # noqa: E402
from CTFMSlicer.widget import ParameterNodeWidgetMixin  # noqa: E402



#
# CTFMSegment
#


class CTFMSegment(ScriptedLoadableModule):
    """The CT-FM segmentation module (see ScriptedLoadableModule in Slicer's Base/Python/slicer)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT-FM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "CT-FM")]
        self.parent.dependencies = ["CTFM"]  # its CTFMLib and CTFMSlicer packages
        self.parent.contributors = ["CT-FM Slicer extension contributors"]
        self.parent.helpText = _(
            "Segment CT volumes with CT-FM models: the whole-body model (117 TotalSegmentator structures), "
            "tumour models trained with CT-FM Train, or any CT-FM segmentation model in a local folder. "
            "The model runs in a separate process: Slicer stays responsive and Cancel stops it at once. "
            "The result is a segmentation with named, coloured segments carrying standard (DICOM/SNOMED) terminology."
        )
        self.parent.acknowledgementText = _(
            "CT-FM was developed by the AIM Program (Mass General Brigham, Harvard Medical School, Maastricht University). "
            "If you use it, please cite: {citation}"
        ).format(citation=CITATION)


#
# CTFMSegmentParameterNode
#


@parameterNodeWrapper
class CTFMSegmentParameterNode:
    """The segmentation module's state, saved with the scene.

    inputVolume - the CT volume to segment.
    model - whole-body, a tumour model of the catalogue, or folder (a model in modelFolder).
    modelFolder - a folder holding config.json and model.safetensors (and labels.json).
    quality - full (the model card's window overlap; the default), standard (overlap 0.5, faster, labels
      differ on a few % of voxels) or fast (3 mm, for CPUs).
    spacing - model (resample to the spacing the model was trained at) or native (the input's voxels).
    device - auto, cpu, cuda or mps.
    structures - comma-separated structure names to keep (empty: all).
    show3D - also build the 3D surfaces of the segments.
    outputSegmentation - where the result goes (a new segmentation when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(list(MODELS))] = WHOLE_BODY
    modelFolder: Path
    quality: Annotated[str, Choice(list(QUALITIES))] = DEFAULT_QUALITY
    spacing: Annotated[str, Choice(list(SPACINGS))] = "model"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    structures: str = ""
    show3D: bool = True
    outputSegmentation: vtkMRMLSegmentationNode


#
# CTFMSegmentWidget
#


class CTFMSegmentWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The segmentation module's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._planTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFMSegment.ui")

        self.logic = CTFMSegmentLogic()
        self._loadTerminology()

        self.observeSceneClose()

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)

        # Plans are computed on the next turns of the event loop, one preset at a time (see _refreshPlan).
        self._planTimer = qt.QTimer()
        self._planTimer.setSingleShot(True)
        self._planTimer.setInterval(0)
        self._planTimer.connect("timeout()", self._computeNextPlan)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._planTimer is not None:
            self._planTimer.stop()
        ParameterNodeWidgetMixin.cleanup(self)

    def _loadTerminology(self) -> None:
        """Make CT-FM's codes browsable in Slicer's terminology selector (names and colours work without)."""
        from CTFMSegmentLib.segmentation import load_terminology

        try:
            load_terminology(slicer.modules.terminologies.logic())
        except AttributeError:  # Terminologies module disabled
            pass

    def onReload(self) -> None:
        """Reload & Test: re-import CTFMSegmentLib too, not only this file."""
        for name in list(sys.modules):
            if name.split(".")[0] == "CTFMSegmentLib":
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # --- state -------------------------------------------------------------------

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        folderModel = bool(p) and p.model == FOLDER
        self.ui.modelFolderLabel.visible = folderModel
        self.ui.modelFolderPathLineEdit.visible = folderModel
        # fast always works at 3 mm: the spacing choice does not apply to it
        self.ui.spacingComboBox.enabled = not (p and p.quality == "fast")
        self._refreshPlan()
        if self._runner is not None:
            return
        problems = self.logic.parameterProblems(p) if p else [_("No parameter node")]
        self.ui.segmentButton.enabled = not problems
        self.ui.segmentButton.toolTip = "\n".join(problems) if problems else _("Segment the input volume.")

    # --- the plan ---------------------------------------------------------------------

    def _planInputs(self):
        """``(volume, model, modelFolder, spacing, device)`` to plan for, or None where nothing can be planned."""
        p = self._parameterNode
        if not p or p.inputVolume is None:
            return None
        # The structure subset does not change the plan: only the inputs it reads must be usable.
        if self.logic.inputProblems(p.inputVolume, p.model, p.modelFolder, p.quality, p.device, None, p.spacing):
            return None
        return p.inputVolume, p.model, p.modelFolder, p.spacing, p.device

    def _refreshPlan(self) -> None:
        """Show the plan of the current inputs (what ``ctfm segment --plan`` prints), from the cache or on demand.

        Cheap on every parameter change: the cache key reads no voxels. A plan reads the volume's
        voxels (about 0.5 s per preset for a 512x512x300 CT), so it is computed only when its key
        changes (another volume or model, new voxels, a moved grid, another spacing or device), on
        the next turns of the event loop, one preset at a time, the chosen quality first: the panel
        shows "Planning..." at once and never stalls for more than one preset. Changing only the
        quality shows the presets already computed.
        """
        inputs = self._planInputs()
        label = self.ui.planSummaryLabel
        if inputs is None:
            label.text, label.toolTip = "", _("The plan appears once a volume and a usable model are chosen.")
            return
        try:
            _key, plans = self.logic.cachedPlans(*inputs)
        except ValueError as e:  # the volume cannot be planned (e.g. a sheared parent transform)
            label.text, label.toolTip = _("No plan: {reason}").format(reason=e), ""
            return
        label.text, label.toolTip = plan_summary(plans, self._parameterNode.quality)
        if any(plan is None for plan in plans.values()):
            self._planTimer.start()

    def _computeNextPlan(self) -> None:
        """Compute one missing preset of the current inputs (the chosen quality first), then show what there is."""
        inputs = self._planInputs()
        if inputs is None:
            return
        try:
            key, plans = self.logic.cachedPlans(*inputs)
        except ValueError:
            return self._refreshPlan()
        missing = [q for q in (self._parameterNode.quality, *QUALITIES) if plans.get(q, 0) is None]
        if missing:
            volume, model, modelFolder, spacing, device = inputs
            self.logic.planCache.compute(key, volume, model, modelFolder, missing[0], spacing, device)
        self._refreshPlan()

    # --- segmentation --------------------------------------------------------------

    def onSegment(self) -> None:
        if self._runner is not None:  # the button reads "Cancel" while a segmentation runs
            self._log(_("Cancelling..."))
            self.cancelRunner()
            return
        p = self._parameterNode
        problems = self.logic.parameterProblems(p)
        if problems:
            self._log("\n".join(problems))
            return
        from CTFMSlicer.dependencies import ensure_dependencies

        volume, output, show3D = p.inputVolume, p.outputSegmentation, p.show3D
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=False):
            ensure_dependencies()
            self._log(_("Segmenting '{volume}' with {model} ({quality} quality, {spacing} spacing, device {device})...").format(
                volume=volume.GetName(), model=p.model if p.model != FOLDER else str(p.modelFolder), quality=p.quality,
                spacing=p.spacing, device=p.device))
            self.followRunner(self.logic.startSegmentation(
                volume, p.model, p.modelFolder, p.quality, p.device, p.structures, spacing=p.spacing,
                on_progress=self._onProgress,
                on_line=lambda stream, text: self._log(text),
                on_done=lambda result, message, log: self._onDone(result, message, log, volume, output, show3D),
            ))
            self._setRunning(True)


    def _onDone(self, result, message: str, log: str, volume, output, show3D: bool) -> None:
        self._runner = None
        self._setRunning(False)
        if result is None:
            self._log(message)
            if message == "Cancelled.":
                return
            if is_out_of_memory(log):
                self._offerFallback(message, log)
                return
            slicer.util.errorDisplay(message.split("\n")[0], windowTitle=_("CT-FM Segment"), detailedText=log or message)
            return
        if volume.GetScene() is not slicer.mrmlScene:
            self._log(_("The input volume was removed while it was segmented; the result is discarded."))
            return
        if output is not None and output.GetScene() is not slicer.mrmlScene:
            output = None  # removed meanwhile: make a new one
        with slicer.util.tryWithErrorDisplay(_("Failed to create the segmentation."), waitCursor=True):
            node = self.logic.segmentationNodeFromLabels(
                result.labels, result.label_infos, volume, name=f"{volume.GetName()} segmentation", node=output, show3D=show3D
            )
            if self._parameterNode:
                self._parameterNode.outputSegmentation = node
            count = node.GetSegmentation().GetNumberOfSegments()
            self._log(_("{count} segments in '{name}'. {message}").format(count=count, name=node.GetName(), message=message))

    def _offerFallback(self, message: str, log: str) -> None:
        """Out of memory: offer the CPU (when a GPU failed) or fast mode instead of a bare error."""
        p = self._parameterNode
        choices = []
        if p and p.device != "cpu":
            choices.append((_("Run on the CPU"), "device", "cpu"))
        if p and p.quality != "fast":
            choices.append((_("Fast mode"), "quality", "fast"))
        text = _("The segmentation ran out of memory.")
        if choices:
            text += " " + _("Run it on the CPU (slower; the computer usually has more memory than the GPU), "
                            "or in fast mode (3 mm, much less memory)?")
        self._log(text)
        if slicer.app.testingEnabled() or not choices:
            slicer.util.errorDisplay(text, windowTitle=_("CT-FM Segment"), detailedText=log or message)
            return
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Warning)
        box.setWindowTitle(_("CT-FM Segment"))
        box.setText(text)
        box.setDetailedText(log or message)
        buttons = [(box.addButton(label, qt.QMessageBox.AcceptRole), name, value) for label, name, value in choices]
        box.addButton(qt.QMessageBox.Close)
        box.exec_()
        for button, name, value in buttons:
            if box.clickedButton() == button:
                setattr(p, name, value)
                self.onSegment()
                return

    def _setRunning(self, running: bool) -> None:
        bar = self.ui.segmentProgressBar
        bar.visible = running
        bar.setRange(0, 100)
        bar.value = 0
        bar.format = "%p%"
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.segmentButton.toolTip = _("Stop the segmentation.") if running else ""
        self.ui.segmentButton.enabled = True
        # The inputs of a running segmentation are fixed; changing them would only mislead.
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if not running:
            self._updateState()

    def _onProgress(self, fraction, message: str = "") -> None:
        """Progress from the child process (delivered in the GUI thread by the poll timer)."""
        bar = self.ui.segmentProgressBar
        self.showFraction(bar, fraction)
        bar.format = f"{message} %p%" if message else "%p%"

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)


#
# CTFMSegmentLogic
#


class CTFMSegmentLogic(ScriptedLoadableModuleLogic, CTFMSegmentCoreLogic):
    """Slicer's module logic plus CTFMSegmentLib's segmentation logic (usable from scripts without the widget)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTFMSegmentParameterNode(super().getParameterNode())

    def parameterProblems(self, parameterNode) -> list:
        p = parameterNode
        return self.inputProblems(p.inputVolume, p.model, p.modelFolder, p.quality, p.device, p.structures, p.spacing)


#
# CTFMSegmentTest
#


class CTFMSegmentTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer (not run by pytest). From the repository root:

        Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
          --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFMSegment'], 'CTFMSegment')"

    or ctest (py_CTFMSegment) in an extension build, or Reload and Test in developer mode; see Testing/SlicerTests.md.
    """

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
