"""CT-FM Retrieve module: find cases similar to a CT volume by their CT-FM embeddings.

This version lays out the panel, checks the inputs and shows results as a
table; searching an index arrives in a later version, and the Find similar
button says so.
"""

import os
import sys
from pathlib import Path
from typing import Annotated


import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
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

from CTFMRetrieveLib.logic import NOT_AVAILABLE_MESSAGE, RESULT_COLUMNS, RETRIEVAL_AVAILABLE  # noqa: E402
from CTFMRetrieveLib.logic import CTFMRetrieveLogic as CTFMRetrieveCoreLogic  # noqa: E402
from CTFMSlicer import CITATION  # noqa: E402
from CTFMSlicer.widget import ParameterNodeWidgetMixin  # noqa: E402



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
            "Find cases similar to a CT volume in an index of CT-FM embeddings. This version checks the "
            "inputs; searching the index arrives in a later version."
        )
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

    indexPath - the index of embedded cases.
    inputVolume - the query volume.
    numberOfResults - how many similar cases to list.
    resultsTable - the ranked results (case, similarity).
    """

    indexPath: Path
    inputVolume: vtkMRMLScalarVolumeNode
    numberOfResults: Annotated[int, WithinRange(1, 100)] = 10
    resultsTable: vtkMRMLTableNode


#
# CTFMRetrieveWidget
#


class CTFMRetrieveWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The retrieval module's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.loadModuleUI("CTFMRetrieve.ui")

        self.logic = CTFMRetrieveLogic()

        self.observeSceneClose()

        self.ui.findSimilarButton.connect("clicked(bool)", self.onFindSimilar)

        self.initializeParameterNode()


    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        problems = self.logic.inputProblems(p.indexPath, p.inputVolume) if p else [_("No parameter node")]
        self.ui.findSimilarButton.enabled = not problems
        self.ui.findSimilarButton.toolTip = "\n".join(problems) if problems else _("Search the index for similar cases.")
        self.ui.resultsTableView.setMRMLTableNode(p.resultsTable if p else None)

    def onFindSimilar(self) -> None:
        p = self._parameterNode
        problems = self.logic.inputProblems(p.indexPath, p.inputVolume)
        if problems:
            self.ui.statusLabel.text = "\n".join(problems)
            return
        if not RETRIEVAL_AVAILABLE:
            # Honest placeholder: the inputs are valid, but no search runs in this version.
            self.ui.statusLabel.text = NOT_AVAILABLE_MESSAGE
            slicer.util.infoDisplay(NOT_AVAILABLE_MESSAGE, windowTitle=_("CT-FM Retrieve"))


#
# CTFMRetrieveLogic
#


class CTFMRetrieveLogic(ScriptedLoadableModuleLogic, CTFMRetrieveCoreLogic):
    """Slicer's module logic plus CTFMRetrieveLib's input checks and results table."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTFMRetrieveParameterNode(super().getParameterNode())


#
# CTFMRetrieveTest
#


class CTFMRetrieveTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer (not run by pytest). From the repository root:

        Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
          --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFMRetrieve'], 'CTFMRetrieve')"

    or ctest (py_CTFMRetrieve) in an extension build, or Reload and Test in developer mode; see Testing/SlicerTests.md.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_ResultsTable, self.test_FindSimilarButtonState):
            self.setUp()
            test()

    def test_ResultsTable(self):
        """Results are ranked by decreasing similarity and shown in the table view."""
        self.delayDisplay("Results table")
        logic = CTFMRetrieveLogic()
        table = logic.resultsTableNode([("case-b", 0.2), ("case-a", 0.9), ("case-c", 0.5)])
        self.assertEqual([table.GetColumnName(c) for c in range(table.GetNumberOfColumns())], list(RESULT_COLUMNS))
        self.assertEqual([table.GetCellText(r, 1) for r in range(3)], ["case-a", "case-c", "case-b"])
        self.assertEqual([table.GetCellText(r, 0) for r in range(3)], ["1", "2", "3"])
        widget = slicer.modules.ctfmretrieve.widgetRepresentation().self()
        widget.initializeParameterNode()
        widget.logic.getParameterNode().resultsTable = table
        self.assertEqual(widget.ui.resultsTableView.mrmlTableNode(), table)

    def test_FindSimilarButtonState(self):
        """Find similar needs an existing index and a query volume."""
        import tempfile

        import numpy as np

        self.delayDisplay("Find similar button")
        widget = slicer.modules.ctfmretrieve.widgetRepresentation().self()
        widget.initializeParameterNode()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="query")
        self.assertFalse(widget.ui.findSimilarButton.enabled)  # no index yet
        with tempfile.TemporaryDirectory() as folder:
            parameterNode.indexPath = Path(folder)
            self.assertTrue(widget.ui.findSimilarButton.enabled)
        self.assertFalse(widget.ui.retrieveProgressBar.visible)
