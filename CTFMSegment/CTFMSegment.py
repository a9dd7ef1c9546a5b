"""CT-FM Segment module: whole-body and tumour segmentation with CT-FM models.

This version lays out the panel and checks the inputs; running a model
arrives in a later version, and the Segment button says so.
"""

import os
import sys
from pathlib import Path
from typing import Annotated


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

from CTFMSegmentLib.logic import MODELS, NOT_AVAILABLE_MESSAGE, QUALITIES, SEGMENTATION_AVAILABLE  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic as CTFMSegmentCoreLogic  # noqa: E402
from CTFMSlicer.logic import DEVICES  # noqa: E402
from CTFMSlicer.widget import ParameterNodeWidgetMixin  # noqa: E402

CITATION = (
    "S. Pai, I. Hadzic, D. Bontempi, K. Bressem, B. H. Kann, A. Fedorov, R. H. Mak, H. J. W. L. Aerts: "
    "Vision Foundation Models for Computed Tomography (CT-FM). arXiv:2501.09001, 2025."
)


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
            "Segment CT volumes with CT-FM models: the whole-body model (117 structures) or a model "
            "fine-tuned from CT-FM in a local folder. This version checks the inputs; running the models "
            "arrives in a later version."
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
    model - whole-body, or folder (a model in modelFolder).
    modelFolder - a folder holding config.json and model.safetensors.
    quality - full or fast.
    device - auto, cpu, cuda or mps.
    outputSegmentation - where the result goes (a new segmentation when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(list(MODELS))] = "whole-body"
    modelFolder: Path
    quality: Annotated[str, Choice(list(QUALITIES))] = "full"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTFMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTFMSegmentLogic()

        self.observeSceneClose()

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)

        self.initializeParameterNode()


    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        folderModel = bool(p) and p.model == "folder"
        self.ui.modelFolderLabel.visible = folderModel
        self.ui.modelFolderPathLineEdit.visible = folderModel
        problems = self.logic.parameterProblems(p) if p else [_("No parameter node")]
        self.ui.segmentButton.enabled = not problems
        self.ui.segmentButton.toolTip = "\n".join(problems) if problems else _("Segment the input volume.")

    def onSegment(self) -> None:
        problems = self.logic.parameterProblems(self._parameterNode)
        if problems:
            self._log("\n".join(problems))
            return
        if not SEGMENTATION_AVAILABLE:
            # Honest placeholder: the inputs are valid, but no model runs in this version.
            self._log(NOT_AVAILABLE_MESSAGE)
            slicer.util.infoDisplay(NOT_AVAILABLE_MESSAGE, windowTitle=_("CT-FM Segment"))

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)


#
# CTFMSegmentLogic
#


class CTFMSegmentLogic(ScriptedLoadableModuleLogic, CTFMSegmentCoreLogic):
    """Slicer's module logic plus CTFMSegmentLib's input checks."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTFMSegmentParameterNode(super().getParameterNode())

    def parameterProblems(self, parameterNode) -> list:
        return self.inputProblems(parameterNode.inputVolume, parameterNode.model, parameterNode.modelFolder, parameterNode.quality)


#
# CTFMSegmentTest
#


class CTFMSegmentTest(ScriptedLoadableModuleTest):
    """Tests that need a real Slicer (not run by pytest). From the repository root:

        Slicer --no-splash --no-main-window --testing --additional-module-paths CTFM CTFMSegment CTFMRetrieve CTFMTrain \\
          --python-code "import slicer.testing; slicer.testing.runUnitTest(['CTFMSegment'], 'CTFMSegment')"

    or ctest (py_CTFMSegment) in an extension build, or Reload and Test in developer mode; see Testing/SlicerTests.md.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_InputChecks, self.test_SegmentButtonState):
            self.setUp()
            test()

    def test_InputChecks(self):
        """Volumes and model folders are checked before anything runs."""
        import tempfile

        import numpy as np

        self.delayDisplay("Input checks")
        logic = CTFMSegmentLogic()
        self.assertTrue(logic.inputProblems(None, "whole-body"))
        volume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="ct")
        self.assertEqual(logic.inputProblems(volume, "whole-body"), [])
        vector = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8, 3), dtype=np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
        self.assertTrue(logic.inputProblems(vector, "whole-body"))
        with tempfile.TemporaryDirectory() as folder:
            self.assertTrue(logic.inputProblems(volume, "folder", Path(folder)))  # empty folder
            for name in ("config.json", "model.safetensors"):
                (Path(folder) / name).write_bytes(b"{}")
            self.assertEqual(logic.inputProblems(volume, "folder", Path(folder)), [])

    def test_SegmentButtonState(self):
        """The Segment button follows the parameter node; without a model it does not create a segmentation."""
        import numpy as np

        self.delayDisplay("Segment button")
        widget = slicer.modules.ctfmsegment.widgetRepresentation().self()
        widget.initializeParameterNode()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = None
        self.assertFalse(widget.ui.segmentButton.enabled)
        parameterNode.inputVolume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), dtype=np.int16), name="ct")
        self.assertTrue(widget.ui.segmentButton.enabled)
        parameterNode.model = "folder"
        self.assertFalse(widget.ui.segmentButton.enabled)  # no model folder chosen
        self.assertEqual(widget.ui.modelComboBox.currentText, "folder")
        self.assertFalse(widget.ui.segmentProgressBar.visible)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
