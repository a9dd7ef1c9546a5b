"""CT-FM hub module: models, embeddings, triage, saliency maps and training.

The widget stays thin: it binds the .ui to :class:`CTFMParameterNode` and
calls :class:`CTFMLogic` and ``CTFMSlicer.train``, whose work lives in
``CTFMSlicer`` (no Qt) and ``CTFMLib`` (no Slicer). Model downloads,
embeddings, triage and saliency maps run as ``ctfm`` child processes (one at a
time; the section's button cancels its run), followed from a QTimer. The Train
section runs the CTFMTrain CLI module with ``slicer.cli.run`` (Slicer stays
responsive) and cancels it with the CLI node's ``Cancel()``.
"""

import logging
import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTFMSlicer import CITATION
from CTFMSlicer.logic import DEFAULT_WEIGHTS, EMBED_MODES
from CTFMSlicer.logic import CTFMLogic as CTFMCoreLogic
from CTFMSlicer.models import NOT_PUBLISHED, TRAIN_YOURSELF, download_problem
from CTFMSlicer.overlay import (
    DEFAULT_OPACITY,
    DEFAULT_THRESHOLD,
    TRIAGE_TABLE_NAME,
    heatmap_layers,
    set_heatmap_threshold,
)
from CTFMSlicer.process import DEVICES
from CTFMSlicer.saliency import (
    DEFAULT_SEGMENTATION_MODEL,
    MAX_CUBE_MM,
    METHODS,
    MIN_CUBE_MM,
    POINT_SOURCES,
    REGIONS,
    TARGETS,
    target_label,
)
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
from CTFMSlicer.triage import FOLDER as TRIAGE_FOLDER
from CTFMSlicer.triage import triage_model_choices
from CTFMSlicer.widget import JobControls, ParameterNodeWidgetMixin

CACHE_FOLDER_SETTING = "CTFM/CacheFolder"

# The module help links here (EXTENSION_HOMEPAGE in the top-level CMakeLists.txt): Slicer's
# getDefaultModuleDocumentationLink() would link to a page of Slicer's manual that does not exist.
DOCUMENTATION_URL = "https://github.com/project-lighter/SlicerCTFM#in-3d-slicer"


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
            "compute embeddings of CT volumes (whole volume, scan patches, or around a point), triage head CTs "
            "with a model trained in CT-FM Train, show saliency maps (which voxels drive an embedding, a "
            "segmentation class or a triage decision) over the volume, and pretrain or fine-tune CT-FM (Train: "
            "runs the CT-FM Train CLI module in the background). Segmentation and similar-case retrieval "
            "are in the CT-FM Segment and CT-FM Retrieve modules."
        )
        self.parent.helpText += "<p>" + _("For more information, see the {link_start}documentation{link_end}.").format(
            link_start=f'<a href="{DOCUMENTATION_URL}">', link_end="</a>") + "</p>"
        self.parent.acknowledgementText = _(
            "CT-FM was developed by the AIM Program (Mass General Brigham, Harvard Medical School, Maastricht University). "
            "If you use it, please cite: {citation}"
        ).format(citation=CITATION)
        # Every CT-FM module's child processes (CT-FM Segment and Retrieve too, whose panels may be
        # opened first) must find the models where the user chose to keep them.
        applyRememberedModelFolder()


def applyRememberedModelFolder() -> None:
    """The model folder chosen in the Models section applies to this session and the processes it starts,
    unless CTFM_CACHE was set before Slicer started."""
    remembered = qt.QSettings().value(CACHE_FOLDER_SETTING)
    if remembered and not os.environ.get("CTFM_CACHE"):
        os.environ["CTFM_CACHE"] = str(remembered)


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
    triageVolume - the head CT to triage.
    triageModel - "folder" (triageModelFolder) or a catalogue triage model's id.
    triageModelFolder - a triage model folder (CT-FM Train classify's <output>/model).
    triageSaliency, triageSaliencyMethod - also compute a saliency map of the decision, and how.
    saliencyVolume - the volume to explain.
    saliencyTarget - embedding, point, class or triage: what the map explains.
    saliencyWeights - the encoder (targets embedding and point).
    saliencySegmentationModel, saliencyClassName - the segmentation model and class (target class).
    saliencyTriageModelFolder - the triage model folder (target triage).
    saliencyPointSource - markup (saliencyPointList's first control point) or crosshair: the point of
        target point and of the cube region.
    saliencyMethod - occlusion or gradient.
    saliencyRegion - whole, cube (saliencyCubeMm around the point) or roi (the box around saliencyRoi).
    saliencyOpacity, saliencyThreshold - how the heatmap shows over the volume (0..1).
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
    triageVolume: vtkMRMLScalarVolumeNode
    triageModel: Annotated[str, Choice(list(triage_model_choices()))] = TRIAGE_FOLDER
    triageModelFolder: Path
    triageSaliency: bool = False
    triageSaliencyMethod: Annotated[str, Choice(list(METHODS))] = "gradient"
    saliencyVolume: vtkMRMLScalarVolumeNode
    saliencyTarget: Annotated[str, Choice(list(TARGETS))] = "embedding"
    saliencyWeights: str = DEFAULT_WEIGHTS
    saliencySegmentationModel: str = DEFAULT_SEGMENTATION_MODEL
    saliencyClassName: str = ""
    saliencyTriageModelFolder: Path
    saliencyPointSource: Annotated[str, Choice(list(POINT_SOURCES))] = "markup"
    saliencyPointList: vtkMRMLMarkupsFiducialNode
    saliencyMethod: Annotated[str, Choice(list(METHODS))] = "occlusion"
    saliencyRegion: Annotated[str, Choice(list(REGIONS))] = "whole"
    saliencyCubeMm: Annotated[float, WithinRange(MIN_CUBE_MM, MAX_CUBE_MM)] = 64.0
    saliencyRoi: vtkMRMLMarkupsROINode
    saliencyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_OPACITY
    saliencyThreshold: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_THRESHOLD


#
# CTFMWidget
#


class CTFMWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The hub module's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._observedMarkups = []
        self._jobs = {}  # section -> its JobControls
        self._heatmapNode = None  # the heatmap the opacity and threshold controls apply to
        self._heatmapShown = None  # (node id, opacity, threshold) last applied
        self._modelRows = []
        self._trainRun = None  # the CTFMTrain run the Train section follows
        self._trainNode = None  # its CLI node, reused by the next run
        self._trainMessage = ""  # the last outcome, shown while the section's values stay as they were
        self._trainMessageFor = None
        self._trainCheckKey = None  # the inputs (and file stamps) the last check of the Train section was for
        self._trainCheckResult = (None, [])

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFM.ui")

        self.logic = CTFMLogic()

        self.observeSceneClose()

        self._setupJobs()
        self._setupModels()
        self.ui.computeEmbeddingButton.connect("clicked(bool)", self.onComputeEmbedding)
        self.ui.triageButton.connect("clicked(bool)", self.onTriage)
        self.ui.saliencyButton.connect("clicked(bool)", self.onSaliency)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.createTrainConfigButton.connect("clicked(bool)", self.onCreateTrainConfig)
        self.ui.openTrainOutputButton.connect("clicked(bool)", self.onOpenTrainOutput)

        self.initializeParameterNode()

    def _setupJobs(self) -> None:
        """One JobControls per section that runs jobs. One job runs at a time (they compete for the same
        CPU/GPU memory); meanwhile the other sections' buttons are disabled and the running section's
        button reads Cancel."""
        ui = self.ui
        self._jobs = {
            "embedding": JobControls(self, "embedding", ui.computeEmbeddingButton, ui.embeddingProgressBar,
                                     ui.embeddingStatusLabel, _("Compute embedding")),
            "models": JobControls(self, "models", ui.downloadModelButton, ui.modelsProgressBar, ui.modelsStatusLabel,
                                  _("Download"), what=_("CT-FM: download")),
            "triage": JobControls(self, "triage", ui.triageButton, ui.triageProgressBar, ui.triageStatusLabel,
                                  _("Run triage")),
            "saliency": JobControls(self, "saliency", ui.saliencyButton, ui.saliencyProgressBar,
                                    ui.saliencyStatusLabel, _("Compute saliency map"), what=_("CT-FM: saliency map")),
            "train": JobControls(self, "training", ui.trainButton, ui.trainProgressBar, ui.trainStatusLabel, _("Start"),
                                 lock=(ui.trainTaskComboBox, ui.trainConfigFilePathLineEdit, ui.createTrainConfigButton,
                                       ui.trainOutputFolderPathLineEdit, ui.trainDeviceComboBox,
                                       ui.trainResumeCheckBox, ui.trainMaxStepsSpinBox)),
        }

    # --- models section ----------------------------------------------------------

    def _setupModels(self) -> None:
        applyRememberedModelFolder()
        from CTFMLib.cache import ctfm_home

        self.ui.cacheFolderPathLineEdit.currentPath = str(ctfm_home())
        # The path box emits currentPathChanged on every keystroke: a typed path is taken when editing
        # finishes (Enter, or focus leaves); Browse and programmatic changes at once.
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self._onCacheFolderPathChanged)
        self._cacheFolderTyping().connect("editingFinished()", lambda: self.onCacheFolderChanged(
            self.ui.cacheFolderPathLineEdit.currentPath))
        self.ui.modelsTableWidget.connect("itemSelectionChanged()", self._updateModelButtons)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self._fillModelsTable()

    def _fillModelsTable(self) -> None:
        table = self.ui.modelsTableWidget
        selected = self._selectedModel()
        try:
            self._modelRows = self.logic.modelRows()
        except Exception as e:  # a broken catalogue or model folder must not break the module panel
            logging.error(f"CT-FM: cannot list the models: {e}")
            self._modelRows = []
            self.ui.modelsStatusLabel.text = _("Model catalogue unreadable: {error}").format(error=e)
        table.clearSelection()
        table.clearContents()
        table.setRowCount(len(self._modelRows))
        for r, row in enumerate(self._modelRows):
            for c, key in enumerate(("title", "task", "status", "repo_id")):
                item = qt.QTableWidgetItem(str(row.get(key, "")))
                item.setToolTip(row.get("how_to") or row["id"])
                table.setItem(r, c, item)
            if selected is not None and row["id"] == selected["id"]:
                table.selectRow(r)
        table.resizeColumnsToContents()
        self._updateModelButtons()

    def _selectedModel(self):
        rows = [index.row() for index in self.ui.modelsTableWidget.selectionModel().selectedRows()]
        return self._modelRows[rows[0]] if len(rows) == 1 and rows[0] < len(self._modelRows) else None

    def _updateModelButtons(self) -> None:
        row = self._selectedModel()
        removable = row is not None and row["status"] in ("imported", "downloaded", NOT_PUBLISHED)
        self.ui.removeModelButton.enabled = removable and self._job is None
        self.ui.importModelButton.enabled = self._job is None
        self._jobs["models"].refresh(download_problem(row), _(
            "Download the selected model from Hugging Face into the model folder (runs in the background; "
            "the button then cancels it)."))

    def _cacheFolderTyping(self):
        """The line edit inside the model-folder path box (ctkPathLineEdit::comboBox, CTK since 2012)."""
        return self.ui.cacheFolderPathLineEdit.comboBox().lineEdit()

    def _onCacheFolderPathChanged(self, path: str) -> None:
        if not self._cacheFolderTyping().hasFocus():  # Browse or code, not a keystroke
            self.onCacheFolderChanged(path)

    def onCacheFolderChanged(self, path: str) -> None:
        """Use ``path`` as the model folder from now on (this session, the processes it starts, later sessions)."""
        if not path or path == os.environ.get("CTFM_CACHE"):
            return
        os.environ["CTFM_CACHE"] = path
        qt.QSettings().setValue(CACHE_FOLDER_SETTING, path)
        self._fillModelsTable()

    def onDownloadModel(self) -> None:
        row = self._selectedModel()

        def start():
            problem = download_problem(row)
            if problem:
                raise ValueError(problem)
            self.ui.modelsStatusLabel.text = _("Downloading {model}...").format(model=row["title"])
            return self.logic.startDownload(row["id"], on_progress=self._jobs["models"].progress,
                                            on_done=self._onDownloadDone)

        self._jobs["models"].launch(_("Failed to start the download."), start)

    def _onDownloadDone(self, ok: bool, message: str) -> None:
        self._jobs["models"].finish(ok, message)
        self._fillModelsTable()

    def onImportModel(self) -> None:
        row = self._selectedModel()
        # A model users train themselves is imported under its catalogue id; any other model under its own name.
        modelId = row["id"] if row is not None and row["status"] == TRAIN_YOURSELF else None
        title = _("Import a CT-FM model: its config.json (the model folder) or a .zip")
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), title, str(Path.home()),
                                              _("CT-FM model (config.json *.zip);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            self.prepareJob(_("CT-FM: import a model"))
            from CTFMLib.weights import NotPublishedError

            try:
                folder = self.logic.importModel(path, modelId)
            except NotPublishedError as e:
                question = _("{reason}\n\nImport it anyway? It will be shown as \"{status}\".").format(
                    reason=str(e).split(" Import it under another id")[0], status=NOT_PUBLISHED)
                if not slicer.util.confirmYesNoDisplay(question):
                    return
                folder = self.logic.importModel(path, modelId, force=True)
            self.ui.modelsStatusLabel.text = _("Imported into {folder}.").format(folder=folder)
            self._fillModelsTable()

    def onRemoveModel(self) -> None:
        self.removeSelectedModel(confirm=not slicer.app.testingEnabled())

    def removeSelectedModel(self, confirm: bool = True) -> None:
        """Remove the selected model's files (after asking, with ``confirm``) and refresh the table."""
        row = self._selectedModel()
        if row is None:
            return
        if confirm and not slicer.util.confirmYesNoDisplay(
                _("Remove {model} from this computer?").format(model=row["title"])):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to remove the model."), waitCursor=True):
            self.prepareJob(_("CT-FM: remove a model"))
            removed = self.logic.removeModel(row["id"])
            self.ui.modelsStatusLabel.text = (_("Removed {folders}.").format(folders=", ".join(removed)) if removed
                                              else _("{model}: nothing to remove.").format(model=row["title"]))
            self._fillModelsTable()

    # --- parameter node ----------------------------------------------------------

    def initializeParameterNode(self) -> None:
        super().initializeParameterNode()
        first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        p = self._parameterNode
        if first and p:
            if not p.triageVolume:
                p.triageVolume = first
            if not p.saliencyVolume:
                p.saliencyVolume = first

    def _observeMarkups(self, nodes) -> None:
        """Placing, moving or deleting points and ROIs changes what can run; the parameter node does not see that."""
        nodes = [n for n in nodes if n is not None]
        if nodes == self._observedMarkups:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
                  slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
        for node in self._observedMarkups:
            for event in events:
                self.removeObserver(node, event, self._updateState)
        self._observedMarkups = nodes
        for node in nodes:
            for event in events:
                self.addObserver(node, event, self._updateState)

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self._updateTrainState(p)
        self._observeMarkups([p.pointList, p.saliencyPointList, p.saliencyRoi] if p else [])
        self._updateEmbeddingState(p)
        self._updateTriageState(p)
        self._updateSaliencyState(p)
        self._updateModelButtons()
        self._applyHeatmapDisplay(p)

    # --- embedding ---------------------------------------------------------------

    def _updateEmbeddingState(self, p) -> None:
        pointMode = bool(p) and p.embedMode == "point"
        self.ui.pointListLabel.visible = pointMode
        self.ui.pointListSelector.visible = pointMode
        problem = (self.logic.embeddingInputProblem(p.inputVolume, p.weights, p.embedMode, p.pointList) if p
                   else _("No parameter node"))
        self._jobs["embedding"].refresh(problem, _("Compute the CT-FM embedding of the input volume."))

    def onComputeEmbedding(self) -> None:
        def start():
            p = self._parameterNode
            pointRAS = self.logic.firstPointRAS(p.pointList) if p.embedMode == "point" else None
            volumeName = p.inputVolume.GetName()
            return self.logic.startEmbedding(
                p.inputVolume, p.weights, p.embedMode, pointRAS, p.device,
                on_progress=self._jobs["embedding"].progress,
                on_done=lambda embedding, message: self._onEmbeddingDone(embedding, message, volumeName))

        self._jobs["embedding"].launch(_("Failed to compute the embedding."), start)

    def _onEmbeddingDone(self, embedding, message: str, volumeName: str) -> None:
        self._jobs["embedding"].finish(embedding is not None, message)
        if embedding is None:
            return
        table = self.logic.embeddingTableNode(embedding, name=f"{volumeName} CT-FM embedding")
        self.ui.embeddingStatusLabel.text = _(
            "{size}-value embedding stored in table '{table}' (norm {norm:.3f})."
        ).format(size=embedding.size, table=table.GetName(), norm=float((embedding**2).sum() ** 0.5))

    # --- triage ------------------------------------------------------------------

    def _updateTriageState(self, p) -> None:
        folder = bool(p) and p.triageModel == TRIAGE_FOLDER
        self.ui.triageModelFolderLabel.visible = folder
        self.ui.triageModelFolderPathLineEdit.visible = folder
        withSaliency = bool(p) and p.triageSaliency
        self.ui.triageSaliencyMethodLabel.visible = withSaliency
        self.ui.triageSaliencyMethodComboBox.visible = withSaliency
        problem = (self.logic.triageInputProblem(p.triageVolume, p.triageModel, p.triageModelFolder) if p
                   else _("No parameter node"))
        self._jobs["triage"].refresh(problem, _("Triage the volume in the background; the button then cancels it."))

    def onTriage(self) -> None:
        def start():
            p = self._parameterNode
            volume, method = p.triageVolume, p.triageSaliencyMethod
            return self.logic.startTriage(
                volume, p.triageModel, p.triageModelFolder, p.device, p.triageSaliency, method,
                on_progress=self._jobs["triage"].progress,
                on_done=lambda output, message: self._onTriageDone(output, message, volume, method))

        self._jobs["triage"].launch(_("Failed to start triage."), start)

    def _onTriageDone(self, output, message: str, volume, method: str) -> None:
        self._jobs["triage"].finish(output is not None, message)
        if output is None:
            return
        if not slicer.mrmlScene.IsNodePresent(volume):
            self.ui.triageStatusLabel.text = _("The volume was removed while triage ran.")
            return
        existing = slicer.mrmlScene.GetFirstNodeByName(TRIAGE_TABLE_NAME)
        table = self.logic.triageTableNode(output, volume.GetName(),
                                           node=existing if existing and existing.IsA("vtkMRMLTableNode") else None)
        text = _("{summary} Added to table '{table}'.").format(summary=output.summary(), table=table.GetName())
        if output.saliency is not None:
            heat = self._showHeatmap(output.saliency, volume, f"{volume.GetName()} triage saliency",
                                     {"target": "triage", "method": method})
            text += " " + _("Saliency map: '{heatmap}'.").format(heatmap=heat.GetName())
        self.ui.triageStatusLabel.text = text

    # --- saliency ----------------------------------------------------------------

    def _saliencyValues(self, p) -> dict:
        """The section's values as CTFMLogic.saliencyRequest keywords."""
        return {"target": p.saliencyTarget, "method": p.saliencyMethod, "weights": p.saliencyWeights,
                "segmentationModel": p.saliencySegmentationModel, "className": p.saliencyClassName,
                "triageModelFolder": p.saliencyTriageModelFolder, "pointSource": p.saliencyPointSource,
                "pointList": p.saliencyPointList, "region": p.saliencyRegion, "cubeMm": p.saliencyCubeMm,
                "roiNode": p.saliencyRoi, "device": p.device}

    def _updateSaliencyState(self, p) -> None:
        target = p.saliencyTarget if p else "embedding"
        region = p.saliencyRegion if p else "whole"
        needsPoint = target == "point" or region == "cube"
        rows = {
            "saliencyWeights": target in ("embedding", "point"),
            "saliencySegmentationModel": target == "class",
            "saliencyClassName": target == "class",
            "saliencyTriageModel": target == "triage",
            "saliencyPointSource": needsPoint,
            "saliencyPointList": needsPoint and bool(p) and p.saliencyPointSource == "markup",
            "saliencyCube": region == "cube",
            "saliencyRoi": region == "roi",
        }
        fields = {"saliencyWeights": self.ui.saliencyWeightsLineEdit,
                  "saliencySegmentationModel": self.ui.saliencySegmentationModelLineEdit,
                  "saliencyClassName": self.ui.saliencyClassNameLineEdit,
                  "saliencyTriageModel": self.ui.saliencyTriageModelFolderPathLineEdit,
                  "saliencyPointSource": self.ui.saliencyPointSourceComboBox,
                  "saliencyPointList": self.ui.saliencyPointListSelector,
                  "saliencyCube": self.ui.saliencyCubeDoubleSpinBox,
                  "saliencyRoi": self.ui.saliencyRoiSelector}
        labels = {"saliencyWeights": self.ui.saliencyWeightsLabel,
                  "saliencySegmentationModel": self.ui.saliencySegmentationModelLabel,
                  "saliencyClassName": self.ui.saliencyClassNameLabel,
                  "saliencyTriageModel": self.ui.saliencyTriageModelLabel,
                  "saliencyPointSource": self.ui.saliencyPointSourceLabel,
                  "saliencyPointList": self.ui.saliencyPointListLabel,
                  "saliencyCube": self.ui.saliencyCubeLabel,
                  "saliencyRoi": self.ui.saliencyRoiLabel}
        for name, shown in rows.items():
            fields[name].visible = shown
            labels[name].visible = shown
        problem = (self.logic.saliencyInputProblem(p.saliencyVolume, **self._saliencyValues(p)) if p
                   else _("No parameter node"))
        self._jobs["saliency"].refresh(problem, _(
            "Compute the saliency map in the background; the button then cancels it."))

    def onSaliency(self) -> None:
        def start():
            p = self._parameterNode
            volume = p.saliencyVolume
            request = self.logic.saliencyRequest(**self._saliencyValues(p))
            name = f"{volume.GetName()} {target_label(p.saliencyTarget, p.saliencyClassName)} saliency"
            return self.logic.startSaliency(
                volume, request, on_progress=self._jobs["saliency"].progress,
                on_done=lambda output, message: self._onSaliencyDone(output, message, volume, name, request))

        self._jobs["saliency"].launch(_("Failed to start the saliency map."), start)

    def _onSaliencyDone(self, output, message: str, volume, name: str, request: dict) -> None:
        self._jobs["saliency"].finish(output is not None, message)
        if output is None:
            return
        if not slicer.mrmlScene.IsNodePresent(volume):
            self.ui.saliencyStatusLabel.text = _("The volume was removed while the map was computed.")
            return
        heat = self._showHeatmap(output, volume, name, {"target": request["target"], "method": request["method"]})
        self.ui.saliencyStatusLabel.text = _(
            "{message} Heatmap '{heatmap}', its peak marked in '{heatmap} peak'."
        ).format(message=message, heatmap=heat.GetName())

    def _showHeatmap(self, output, volume, name: str, attributes: dict):
        """Add the map and its peak to the scene and lay the map over the volume in the slice views."""
        p = self._parameterNode
        heat, _peak = self.logic.showHeatmap(output, volume, name, threshold=p.saliencyThreshold, attributes=attributes)
        slicer.util.setSliceViewerLayers(**heatmap_layers(heat, volume, p.saliencyOpacity))
        self._heatmapNode = heat
        self._heatmapShown = (heat.GetID(), p.saliencyOpacity, p.saliencyThreshold)
        return heat

    def _applyHeatmapDisplay(self, p) -> None:
        """The opacity and threshold controls act on the last heatmap shown (only when they changed)."""
        heat = self._heatmapNode
        if p is None or heat is None:
            return
        if not slicer.mrmlScene.IsNodePresent(heat):
            self._heatmapNode = self._heatmapShown = None
            return
        shown = (heat.GetID(), p.saliencyOpacity, p.saliencyThreshold)
        if shown == self._heatmapShown:
            return
        previous = self._heatmapShown
        self._heatmapShown = shown
        if previous is None or previous[2] != p.saliencyThreshold:
            set_heatmap_threshold(heat, p.saliencyThreshold)
        if previous is None or previous[1] != p.saliencyOpacity:
            slicer.util.setSliceViewerLayers(foregroundOpacity=p.saliencyOpacity)

    # --- train section ---------------------------------------------------------------

    @staticmethod
    def _trainValues(p) -> tuple:
        return (p.trainTask, str(p.trainConfigFile), str(p.trainOutputFolder), p.trainDevice, p.trainResume,
                p.trainMaxSteps)

    @staticmethod
    def _trainRequest(p):
        return trainRequest(p.trainTask, p.trainConfigFile, p.trainOutputFolder, p.trainDevice, p.trainResume,
                            p.trainMaxSteps)

    def _trainCheck(self, p) -> tuple:
        """``(problem or None, notes)`` of the Train section's inputs. Checking parses the configuration file,
        so it runs again only when an input, the configuration file or the output folder changed, not on
        every parameter-node modification."""
        if not p:
            return _("No parameter node"), []
        key = self._trainValues(p) + tuple(_fileStamp(givenPath(path)) for path in (p.trainConfigFile, p.trainOutputFolder))
        if key != self._trainCheckKey:
            try:
                self._trainCheckResult = None, self._trainRequest(p).notes
            except TrainSetupError as e:
                self._trainCheckResult = str(e), []
            self._trainCheckKey = key
        return self._trainCheckResult

    def _trainRunning(self) -> bool:
        return self._trainRun is not None and self._trainRun.running

    def _updateTrainState(self, p) -> None:
        out = givenPath(p.trainOutputFolder) if p else None
        self.ui.openTrainOutputButton.enabled = out is not None and out.is_dir()
        if self._jobs["train"].running:
            return
        problem, notes = self._trainCheck(p)
        self._jobs["train"].refresh(problem, _(
            "Start the CT-FM Train CLI module in the background; the button then cancels it."))
        if self._trainMessage and p and self._trainValues(p) == self._trainMessageFor:
            self.ui.trainStatusLabel.text = self._trainMessage
        else:
            self.ui.trainStatusLabel.text = problem or " ".join(notes)

    def onTrain(self) -> None:
        def start():
            node = self._trainNode
            if node is not None and not slicer.mrmlScene.IsNodePresent(node):
                node = None  # left with a closed scene
            self._trainRun = TrainRun(trainModule(), self._trainRequest(p), on_progress=self._jobs["train"].progress,
                                      on_done=self._onTrainDone, node=node)
            self._trainMessage = ""
            self._trainNode = self._trainRun.start()  # returns at once; the CLI runs in Slicer's CLI thread
            return self._trainRun

        p = self._parameterNode
        # The check reports what is missing instead of installing it; the CLI node reports, nothing polls it.
        self._jobs["train"].launch(_("Failed to start training."), start,
                                   what=_("CT-FM: training ({task})").format(task=p.trainTask),
                                   prepare=p.trainTask != "check", follow=False)

    def _onTrainDone(self, outcome: str, message: str, details: str) -> None:
        p = self._parameterNode
        self._trainMessage = message
        self._trainMessageFor = self._trainValues(p) if p else None
        self._jobs["train"].finish(outcome != "failed", message, log=False)
        self.ui.trainStatusLabel.text = message
        if outcome == "failed":
            logging.error(f"CT-FM Train: {message}\n{details}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(message, windowTitle=_("CT-FM Train"), detailedText=details or message)
        else:
            logging.info(f"CT-FM Train: {message}")

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
# CTFMTest: in Testing/Python/CTFMTest.py
#


def __getattr__(name):
    """``CTFMTest``, the in-app tests, from Testing/Python/CTFMTest.py (PEP 562): Test and Reload and Test
    look it up here (:func:`CTFMSlicer.inapp.in_app_test_class`)."""
    from CTFMSlicer.inapp import in_app_test_class

    return in_app_test_class(__file__, __name__, name)


def _fileStamp(path):
    """What changes when a file or a folder's entries change (None when there is no such path)."""
    try:
        stat = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_mtime_ns, stat.st_size)
