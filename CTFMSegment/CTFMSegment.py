"""CT-FM Segment module: whole-body and tumour segmentation with CT-FM models.

The widget stays thin: it binds the .ui to :class:`CTFMSegmentParameterNode`
and calls :class:`CTFMSegmentLogic`, whose work lives in ``CTFMSegmentLib``
(no Qt). Inference runs as ``ctfm segment`` in a child process followed by a
QTimer, so Slicer never freezes and Cancel kills the whole process tree; the
segmentation node is made only once the child succeeded.
"""

import os
import sys
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

from CTFMLib.text import count as count_of  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic as CTFMSegmentCoreLogic  # noqa: E402
from CTFMSegmentLib.models import DEFAULT_QUALITY, FOLDER, MODELS, QUALITIES, SPACINGS, WHOLE_BODY  # noqa: E402
from CTFMSegmentLib.output import is_out_of_memory  # noqa: E402
from CTFMSegmentLib.plan import plan_summary  # noqa: E402
from CTFMSlicer import CITATION  # noqa: E402
from CTFMSlicer.process import DEVICES  # noqa: E402
from CTFMSlicer.widget import JobControls, LogStatus, ParameterNodeWidgetMixin  # noqa: E402

# The module help links here (EXTENSION_HOMEPAGE in the top-level CMakeLists.txt): Slicer's
# getDefaultModuleDocumentationLink() would link to a page of Slicer's manual that does not exist.
DOCUMENTATION_URL = "https://github.com/project-lighter/SlicerCTFM#in-3d-slicer"


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
        self.parent.helpText += "<p>" + _("For more information, see the {link_start}documentation{link_end}.").format(
            link_start=f'<a href="{DOCUMENTATION_URL}">', link_end="</a>") + "</p>"
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
    computeStatistics - also measure each structure (volume, HU, centroid, box, border) into a table node
      "<volume> CT-FM statistics" shown in a table view. Off by default: the table view changes the layout,
      and most runs are read on the images; whoever wants organ volumes ticks it once per scene.
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
    computeStatistics: bool = False
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
        self._segmentJob = None  # the segment button's JobControls
        self._exportJob = None  # the Export DICOM SEG button's

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFMSegment.ui")

        self.logic = CTFMSegmentLogic()
        self._loadTerminology()

        self.observeSceneClose()

        ui = self.ui
        # The log is the status line; the inputs of a running segmentation are fixed (changing them would mislead).
        self._segmentJob = JobControls(self, "segmentation", ui.segmentButton, ui.segmentProgressBar,
                                       LogStatus(ui.logTextEdit), _("Segment"), what=_("CT-FM Segment"),
                                       runningToolTip=_("Stop the segmentation."), messagesInBar=True,
                                       lock=(ui.inputsCollapsibleButton, ui.outputsCollapsibleButton))
        ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self._exportJob = JobControls(self, "DICOM SEG export", ui.exportDicomSegButton, ui.segmentProgressBar,
                                      LogStatus(ui.logTextEdit), _("Export DICOM SEG"), what=_("CT-FM Segment: DICOM SEG"),
                                      runningToolTip=_("Stop the export."), messagesInBar=True,
                                      lock=(ui.inputsCollapsibleButton, ui.outputsCollapsibleButton))
        ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)

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

        terminologies = getattr(slicer.modules, "terminologies", None)
        if terminologies is not None:  # None: the Terminologies module is disabled
            load_terminology(terminologies.logic())

    # --- state -------------------------------------------------------------------

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        folderModel = bool(p) and p.model == FOLDER
        self.ui.modelFolderLabel.visible = folderModel
        self.ui.modelFolderPathLineEdit.visible = folderModel
        # fast always works at 3 mm: the spacing choice does not apply to it
        self.ui.spacingComboBox.enabled = not (p and p.quality == "fast")
        self._refreshPlan()
        if not self._segmentJob.running:  # a running job's problems are for the next run
            problems = self.logic.parameterProblems(p) if p else [_("No parameter node")]
            self._segmentJob.refresh("\n".join(problems), _("Segment the input volume."))
        if self._exportJob is not None and not self._exportJob.running:
            problem = self.logic.exportProblem(p.outputSegmentation, p.inputVolume) if p else _("No parameter node")
            self._exportJob.refresh(problem, _("Write the output segmentation as a DICOM SEG of the input CT's series "
                                               "and add it to the DICOM database."))

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
        if self._segmentJob.running:  # the button reads "Cancel" while a segmentation runs
            self._segmentJob.cancel()
            return
        p = self._parameterNode
        problems = self.logic.parameterProblems(p)
        if problems:
            self._log("\n".join(problems))
            return
        volume, output, show3D, statistics = p.inputVolume, p.outputSegmentation, p.show3D, p.computeStatistics

        def start():
            self._log(_("Segmenting '{volume}' with {model} ({quality} quality, {spacing} spacing, device {device})...").format(
                volume=volume.GetName(), model=p.model if p.model != FOLDER else str(p.modelFolder), quality=p.quality,
                spacing=p.spacing, device=p.device))
            return self.logic.startSegmentation(
                volume, p.model, p.modelFolder, p.quality, p.device, p.structures, spacing=p.spacing,
                statistics=statistics, on_progress=self._segmentJob.progress,
                on_line=lambda stream, text: self._log(text),
                on_done=lambda result, message, log: self._onDone(result, message, log, volume, output, show3D))

        self._segmentJob.launch(_("Failed to start the segmentation."), start,
                                what=_("CT-FM Segment: segmenting '{volume}'").format(volume=volume.GetName()))

    def _onDone(self, result, message: str, log: str, volume, output, show3D: bool) -> None:
        # the log already holds the child's output: a failure adds its message, a success the segments found
        self._segmentJob.finish(result is not None, message if result is None else "", log=False)
        if result is None:
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
        if result.statistics is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to create the statistics table."), waitCursor=True):
                table = self.logic.statisticsTableNode(result.statistics, volume)
                self._showTable(table)
                self._log(_("Statistics of {structures} in '{name}'.").format(
                    structures=count_of(table.GetNumberOfRows(), "structure"), name=table.GetName()))

    # --- DICOM SEG export ------------------------------------------------------------

    def onExportDicomSeg(self) -> None:
        """Write the output segmentation as a DICOM SEG (``ctfm export-seg`` in a child process); it goes into the
        DICOM database, or, where that fails, to a file the user chooses."""
        if self._exportJob.running:
            self._exportJob.cancel()
            return
        p = self._parameterNode
        segmentation, volume = p.outputSegmentation, p.inputVolume

        def start():
            self._log(_("Exporting '{segmentation}' as a DICOM SEG of '{volume}'...").format(
                segmentation=segmentation.GetName(), volume=volume.GetName()))
            return self.logic.startDicomSegExport(
                segmentation, volume, on_progress=self._exportJob.progress, on_line=lambda stream, text: self._log(text),
                on_done=lambda result, message, log: self._onExported(result, message, log, volume))

        self._exportJob.launch(_("Failed to export the DICOM SEG."), start, childPackages=True,
                               what=_("CT-FM Segment: exporting a DICOM SEG of '{volume}'").format(volume=volume.GetName()))

    def _onExported(self, result, message: str, log: str, volume) -> None:
        self._exportJob.finish(result is not None, message if result is None else "", log=False)
        if result is None:
            if message != "Cancelled.":
                slicer.util.errorDisplay(message.split("\n")[0], windowTitle=_("CT-FM Segment"), detailedText=log or message)
            return
        if result.in_database:
            self._log(_("The DICOM SEG is in the DICOM database, with the study of '{volume}'. {message}").format(
                volume=volume.GetName(), message=message))
            return
        from CTFMSegmentLib.dicom_export import copy_seg

        # No database to add it to: the SEG is in the work folder until this returns
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save the DICOM SEG"),
                                              f"{volume.GetName()} segmentation.dcm", _("DICOM SEG (*.dcm)"))
        if not path:
            self._log(_("The DICOM SEG was not saved."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the DICOM SEG."), waitCursor=True):
            copy_seg(result.path, path, overwrite=True)  # the dialog asked before replacing a file
            self._log(_("Saved the DICOM SEG to {path}. {message}").format(path=path, message=message))

    @staticmethod
    def _showTable(table) -> None:
        """Switch to a layout with a table view (as Segment Statistics does) and show ``table`` there."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window)
            return
        tables = getattr(slicer.modules, "tables", None)
        if tables is not None:
            layoutManager.setLayout(tables.logic().GetLayoutWithTable(layoutManager.layout))
        elif layoutManager.tableViewCount == 0:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

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
# CTFMSegmentTest: in Testing/Python/CTFMSegmentTest.py
#


def __getattr__(name):
    """``CTFMSegmentTest``, the in-app tests, from Testing/Python/CTFMSegmentTest.py (PEP 562): Test and Reload and Test
    look it up here (:func:`CTFMSlicer.inapp.in_app_test_class`)."""
    from CTFMSlicer.inapp import in_app_test_class

    return in_app_test_class(__file__, __name__, name)
