"""CT-FM Retrieve module: find cases and places similar to the current view in an index of CT-FM embeddings.

The panel binds its .ui to a parameter node and calls :class:`CTFMRetrieveLib.logic.CTFMRetrieveLogic`;
adding cases and searching run as ``ctfm index`` child processes (Slicer stays responsive; the
button that started the work reads Cancel and kills the process tree).
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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

from CTFMRetrieveLib import shared  # noqa: E402
from CTFMRetrieveLib.logic import CTFMRetrieveLogic as CTFMRetrieveCoreLogic  # noqa: E402
from CTFMSlicer import CITATION  # noqa: E402
from CTFMSlicer.nodes import QueryPlaceObserver  # noqa: E402
from CTFMSlicer.widget import JobControls, ParameterNodeWidgetMixin  # noqa: E402

# The module help links here (EXTENSION_HOMEPAGE in the top-level CMakeLists.txt): Slicer's
# getDefaultModuleDocumentationLink() would link to a page of Slicer's manual that does not exist.
DOCUMENTATION_URL = "https://github.com/project-lighter/SlicerCTFM#in-3d-slicer"
PASSWORD_FILE_SETTING = "CTFMRetrieve/PasswordFile"  # the workstation's, never the scene's


#
# CTFMRetrieve
#


class CTFMRetrieve(ScriptedLoadableModule):
    """The CT-FM retrieval module (see ScriptedLoadableModule in Slicer's Base/Python/slicer)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT-FM Retrieve")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "CT-FM")]
        self.parent.dependencies = ["CTFM"]  # its CTFMLib and CTFMSlicer packages
        self.parent.contributors = ["CT-FM Slicer extension contributors"]
        self.parent.helpText = _(
            "Find cases similar to a CT volume, or the places in them most like the one under the crosshair or "
            "inside an ROI, in an index of CT-FM embeddings. Create an index by choosing an empty folder and adding "
            "loaded volumes or a folder of scans; double-click a result to load the case with the crosshair on the "
            "matched place. A shared index in a PostgreSQL database (postgresql://user@host/db?schema=NAME; the "
            "password in a password file or PGPASSWORD, never in the scene) needs psycopg and pgvector in Slicer's "
            "Python. The same index works from the command line: ctfm index add|query|info."
        )
        self.parent.helpText += "<p>" + _("For more information, see the {link_start}documentation{link_end}.").format(
            link_start=f'<a href="{DOCUMENTATION_URL}">', link_end="</a>") + "</p>"
        self.parent.acknowledgementText = _(
            "CT-FM was developed by the AIM Program (Mass General Brigham, Harvard Medical School, Maastricht University). "
            "If you use it, please cite: {citation}"
        ).format(citation=CITATION)


#
# CTFMRetrieveParameterNode
#


@parameterNodeWrapper
class CTFMRetrieveParameterNode:
    """The retrieval module's state, saved with the scene.

    indexLocation - folder (indexPath) or database (indexUrl, a shared index).
    indexPath - the index folder (an empty or new folder for a new index).
    indexUrl - postgresql://user@host/db?schema=NAME or env:NAME; never with a password (the panel takes it out;
        the password file is the workstation's setting, not the scene's).
    weights - the encoder of a new index (model id, folder or file; empty: the published feature extractor).
    addFolder - a folder of scans (or a file, or a CSV list) to add.
    inputVolume - the query volume.
    queryMode - crosshair (the place around the crosshair), roi (a markups ROI) or scan (the whole scan).
    queryRoi - the region for roi mode.
    numberOfResults - how many cases to list.
    excludeQueryCase - leave out the indexed case the query volume came from.
    thumbnails - draw an axial picture of each match.
    device - where embeddings are computed.
    resultsTable - the ranked results.
    """

    indexLocation: Annotated[str, Choice(["folder", "database"])] = "folder"
    indexPath: Path
    indexUrl: str = ""
    weights: str = ""
    addFolder: Path
    inputVolume: vtkMRMLScalarVolumeNode
    queryMode: Annotated[str, Choice(["crosshair", "roi", "scan"])] = "crosshair"
    queryRoi: vtkMRMLMarkupsROINode
    numberOfResults: Annotated[int, WithinRange(1, 100)] = 10
    excludeQueryCase: bool = True
    thumbnails: bool = True
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    resultsTable: vtkMRMLTableNode


#
# CTFMRetrieveWidget
#


class CTFMRetrieveWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The retrieval module's panel: Index, Find similar, Similar cases."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._jobs = {}  # button name -> its JobControls
        self._statisticsFor = None  # the index (folder or URL) the statistics line describes
        self._statisticsRunner = None  # the child reading a shared index's statistics

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFMRetrieve.ui")
        self.logic = CTFMRetrieveLogic()
        self.observeSceneClose()
        # "Find similar" depends on where the crosshair or the ROI is, which the parameter node does not see;
        # they move often (Shift + mouse move), so the state is refreshed at most every 200 ms.
        self._placeTimer = qt.QTimer()
        self._placeTimer.setSingleShot(True)
        self._placeTimer.setInterval(200)
        self._placeTimer.connect("timeout()", self._updateState)
        self._placeObserver = QueryPlaceObserver(self._placeTimer.start)
        ui = self.ui
        # A shared index: the password file is this workstation's setting (the children get it as PGPASSFILE),
        # and what the database holds is read by a child once the URL has not changed for a moment.
        ui.passwordFilePathLineEdit.currentPath = qt.QSettings().value(PASSWORD_FILE_SETTING, "") or ""
        self.logic.passwordFile = ui.passwordFilePathLineEdit.currentPath or None
        ui.passwordFilePathLineEdit.connect("currentPathChanged(QString)", self.onPasswordFileChanged)
        self._statisticsTimer = qt.QTimer()
        self._statisticsTimer.setSingleShot(True)
        self._statisticsTimer.setInterval(700)
        self._statisticsTimer.connect("timeout()", self._readSharedStatistics)
        self._statisticsPoll = qt.QTimer()
        self._statisticsPoll.setInterval(100)
        self._statisticsPoll.connect("timeout()", self._pollStatistics)
        # Both add buttons add to the index (one progress bar and status line); the one clicked reads Cancel.
        adding = {"name": _("adding cases"), "what": _("CT-FM Retrieve: adding cases to the index"),
                  "cancelling": _("Cancelling... (cases added so far stay in the index)"), "waitCursor": True}
        self._jobs = {
            "addVolumes": JobControls(self, button=ui.addVolumesButton, bar=ui.indexProgressBar,
                                      label=ui.indexStatusLabel, **adding),
            "addFolder": JobControls(self, button=ui.addFolderButton, bar=ui.indexProgressBar,
                                     label=ui.indexStatusLabel, **adding),
            "findSimilar": JobControls(self, _("searching"), ui.findSimilarButton, ui.retrieveProgressBar,
                                       ui.statusLabel, what=_("CT-FM Retrieve: searching for similar cases"),
                                       waitCursor=True),
        }
        self.ui.addVolumesButton.connect("clicked(bool)", self.onAddVolumes)
        self.ui.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.ui.refreshStatisticsButton.connect("clicked(bool)", lambda: self.updateStatistics(force=True))
        self.ui.findSimilarButton.connect("clicked(bool)", self.onFindSimilar)
        self.ui.showResultButton.connect("clicked(bool)", self.onShowResult)
        # The view may sort rows: act on the selected table row (a double-click selects it), not the view's row.
        self.ui.resultsTableView.connect("doubleClicked(QModelIndex)", lambda index: self.onShowResult())
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelected)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        super().cleanup()
        self._placeObserver.stop()
        self._placeTimer.stop()
        self._stopStatistics()
        if self.logic:
            self.logic.clearThumbnails()

    def enter(self) -> None:
        # Add loaded volumes is possible only once there are volumes: followed while the panel is shown.
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            if not self.hasObserver(slicer.mrmlScene, event, self._updateState):
                self.addObserver(slicer.mrmlScene, event, self._updateState)
        super().enter()

    def exit(self) -> None:
        super().exit()
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            if self.hasObserver(slicer.mrmlScene, event, self._updateState):
                self.removeObserver(slicer.mrmlScene, event, self._updateState)
        self._placeObserver.stop()

    # --- state -------------------------------------------------------------------------

    def _indexTarget(self):
        """The index the panel works on: the folder (a Path) or the shared index's URL (a str)."""
        p = self._parameterNode
        if not p:
            return None
        return p.indexUrl if p.indexLocation == "database" else p.indexPath

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        database = bool(p) and p.indexLocation == "database"
        for widget in (self.ui.indexPathLabel, self.ui.indexPathLineEdit):
            widget.visible = not database
        for widget in (self.ui.indexUrlLabel, self.ui.indexUrlLineEdit, self.ui.passwordFileLabel,
                       self.ui.passwordFilePathLineEdit):
            widget.visible = database
        if p and shared.scene_text(p.indexUrl) != p.indexUrl:
            qt.QTimer.singleShot(0, self._keepPasswordOutOfScene)  # after the line edit has written it
        target = self._indexTarget()
        self.ui.queryRoiLabel.visible = self.ui.queryRoiSelector.visible = bool(p) and p.queryMode == "roi"
        if p and self.parent.isEntered:
            self._placeObserver.observe(slicer.mrmlScene, p.queryRoi if p.queryMode == "roi" else None,
                                        crosshair=p.queryMode == "crosshair")
        table = p.resultsTable if p else None
        if self.ui.resultsTableView.mrmlTableNode() != table:  # re-setting would drop the selection
            self.ui.resultsTableView.setMRMLTableNode(table)
        self.updateStatistics()
        self._updateShowButton()
        addProblem = self.logic.indexProblem(target, forAdding=True) if p else _("No parameter node")
        volumes = self.logic.volumesToAdd()
        self._jobs["addVolumes"].refresh(addProblem or (self.logic.addVolumesProblem(target, volumes) if volumes else
                                                        _("Load CT volumes first.")),
                                         _("Embed the scene's CT volumes and add them to the index."))
        folderProblem = None if (p and p.addFolder and str(p.addFolder) not in ("", ".")) else _("Choose a folder.")
        self._jobs["addFolder"].refresh(
            addProblem or folderProblem,
            _("Embed every scan in the folder and add it to the index (already indexed scans are skipped)."))
        problems = self.logic.queryProblems(target, p.inputVolume, p.queryMode, p.queryRoi) if p else [
            _("No parameter node")]
        self._jobs["findSimilar"].refresh("\n".join(problems), _("Search the index; the button then cancels the search."))

    def updateStatistics(self, force: bool = False) -> None:
        """The Holds: line, read again when the index changed (or ``force``); a shared index's by a child."""
        target = self._indexTarget()
        if force or target != self._statisticsFor:
            self._statisticsFor = target
            self._stopStatistics()
            if shared.is_shared(target) and not self.logic.indexProblem(target):
                self.ui.indexStatisticsLabel.text = _("Reading the shared index...")
                if force:
                    self._readSharedStatistics()
                else:
                    self._statisticsTimer.start()  # typing a URL starts no child per key
            else:
                self.ui.indexStatisticsLabel.text = self.logic.indexStatisticsText(target)

    def _readSharedStatistics(self) -> None:
        target = self._statisticsFor

        def show(text):
            if target == self._statisticsFor:  # not a URL changed since
                self.ui.indexStatisticsLabel.text = text

        self._statisticsRunner = self.logic.startIndexStatistics(target, show)
        if self._statisticsRunner is not None:
            self._statisticsPoll.start()

    def _pollStatistics(self) -> None:
        if self._statisticsRunner is None or not self._statisticsRunner.poll():
            self._statisticsPoll.stop()
            self._statisticsRunner = None

    def _stopStatistics(self) -> None:
        self._statisticsTimer.stop()
        self._statisticsPoll.stop()
        if self._statisticsRunner is not None:
            self._statisticsRunner.cancel()
            self._statisticsRunner = None

    def onPasswordFileChanged(self, path: str) -> None:
        qt.QSettings().setValue(PASSWORD_FILE_SETTING, path)
        self.logic.passwordFile = path or None
        self.updateStatistics(force=True)
        self._updateState()

    def _keepPasswordOutOfScene(self) -> None:
        """A URL typed with its password: refused in the status line, and only the URL without it is kept."""
        p = self._parameterNode
        if p and shared.scene_text(p.indexUrl) != p.indexUrl:
            refusal = self.logic.indexProblem(p.indexUrl)
            p.indexUrl = shared.scene_text(p.indexUrl)
            self.ui.indexStatusLabel.text = refusal

    def _ensureSharedPackages(self, target) -> None:
        """A shared index's children import psycopg and pgvector from Slicer's Python: offer to install them."""
        if shared.is_shared(target):
            from CTFMSlicer.dependencies import ensure_packages

            ensure_packages(list(shared.REQUIREMENTS))

    # --- jobs --------------------------------------------------------------------------

    def _startAdd(self, key: str, volumeNodes=(), folders=()) -> None:
        p, jobs, target = self._parameterNode, self._jobs[key], self._indexTarget()

        def start():
            self._ensureSharedPackages(target)
            return self.logic.startAdd(target, volumeNodes, folders, p.weights, p.device, on_progress=jobs.progress,
                                       on_done=lambda outcome, message: self._onAddDone(jobs, outcome, message))

        jobs.launch(_("Failed to add cases to the index."), start)

    def onAddVolumes(self) -> None:
        self._startAdd("addVolumes", volumeNodes=self.logic.volumesToAdd())

    def onAddFolder(self) -> None:
        self._startAdd("addFolder", folders=[self._parameterNode.addFolder])

    def _onAddDone(self, jobs, outcome, message: str) -> None:
        jobs.finish(outcome is not None, message)
        self.updateStatistics(force=True)

    def onFindSimilar(self) -> None:
        p, jobs, target = self._parameterNode, self._jobs["findSimilar"], self._indexTarget()

        def start():
            self._ensureSharedPackages(target)
            return self.logic.startQuery(target, p.inputVolume, p.queryMode, p.queryRoi, p.numberOfResults,
                                         p.excludeQueryCase, p.thumbnails, p.device, on_progress=jobs.progress,
                                         on_done=self._onQueryDone)

        jobs.launch(_("Failed to search the index."), start)

    def _onQueryDone(self, hits, message: str) -> None:
        self._jobs["findSimilar"].finish(hits is not None, message)
        if hits is None:
            return
        p = self._parameterNode
        table = p.resultsTable
        p.resultsTable = self.logic.resultsTableNode(hits, tableNode=table if table else None)
        self.ui.resultsTableView.setMRMLTableNode(p.resultsTable)
        self.onResultSelected()

    # --- results -----------------------------------------------------------------------

    def _selectedRow(self):
        """The table node's row (0-based) of the view's current cell, through the view's sorting; None if none."""
        view = self.ui.resultsTableView
        index = view.currentIndex()
        if not index.isValid() or view.mrmlTableNode() is None:
            return None
        return self.logic.resultRowOfViewRow(view.mrmlTableNode(), view.sortFilterProxyModel().mapToSource(index).row())

    def _updateShowButton(self) -> None:
        self.ui.showResultButton.enabled = self._selectedRow() is not None

    def onResultSelected(self) -> None:
        self._updateShowButton()
        row, table = self._selectedRow(), self._parameterNode.resultsTable if self._parameterNode else None
        thumbnail = self.logic.resultOfRow(table, row)["thumbnail"] if row is not None and table else None
        if thumbnail and os.path.isfile(thumbnail):
            self.ui.thumbnailLabel.setPixmap(qt.QPixmap(thumbnail))
        else:
            self.ui.thumbnailLabel.clear()

    def onShowResult(self) -> None:
        row = self._selectedRow()
        if row is not None:
            self.showResult(row)

    def showResult(self, row: int) -> None:
        """Load the row's case (or switch to it), show it, and put the crosshair on the matched place."""
        table = self._parameterNode.resultsTable
        with slicer.util.tryWithErrorDisplay(_("Failed to load the case."), waitCursor=True):
            node, ras = self.logic.showResult(table, row)
            slicer.util.setSliceViewerLayers(background=node, fit=False)  # the logic centred the views on the match
            self.ui.statusLabel.text = _("Showing {case} at R {r:.1f}, A {a:.1f}, S {s:.1f} mm.").format(
                case=node.GetName(), r=ras[0], a=ras[1], s=ras[2])


#
# CTFMRetrieveLogic
#


class CTFMRetrieveLogic(ScriptedLoadableModuleLogic, CTFMRetrieveCoreLogic):
    """Slicer's module logic plus CTFMRetrieveLib's index, search and results."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        CTFMRetrieveCoreLogic.__init__(self)

    def getParameterNode(self):
        return CTFMRetrieveParameterNode(super().getParameterNode())


#
# CTFMRetrieveTest: in Testing/Python/CTFMRetrieveTest.py
#


def __getattr__(name):
    """``CTFMRetrieveTest``, the in-app tests, from Testing/Python/CTFMRetrieveTest.py (PEP 562): Test and Reload and Test
    look it up here (:func:`CTFMSlicer.inapp.in_app_test_class`)."""
    from CTFMSlicer.inapp import in_app_test_class

    return in_app_test_class(__file__, __name__, name)
