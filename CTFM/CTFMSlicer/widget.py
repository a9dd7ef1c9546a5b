"""The parameter-node plumbing every CT-FM module widget shares (Slicer's scripted-module template).

A widget class lists :class:`ParameterNodeWidgetMixin` before
``ScriptedLoadableModuleWidget`` and ``VTKObservationMixin``; in ``setup()``
it calls :meth:`loadModuleUI`, sets ``self.logic``, calls
:meth:`observeSceneClose` and :meth:`initializeParameterNode`; it defines
``_updateState()``, which runs whenever the parameter node changes. Long work
started as a :class:`CTFMSlicer.process.ProcessRunner` is handed to
:meth:`followRunner`, which polls it from the GUI thread; closing the scene or
the module cancels it. Qt is imported only inside the methods that need it, so
the package stays importable without the application.
"""

import slicer
import vtk

from .running import JOBS, JobBusyError, RunnerFollower


class ParameterNodeWidgetMixin:
    """Connects ``self.ui`` to the logic's parameter node and follows scene close."""

    _parameterNode = None
    _parameterNodeGuiTag = None
    _follower = None
    _pollTimer = None
    POLL_INTERVAL_MS = 100

    @property
    def _runner(self):
        """The child process doing the module's long work, while one runs (set to None when it is done)."""
        return None if self._follower is None else self._follower.runner

    @_runner.setter
    def _runner(self, runner) -> None:
        if self._follower is None:
            self._follower = RunnerFollower(JOBS)
        self._follower.runner = runner

    def loadModuleUI(self, uiFile: str) -> None:
        """Load ``Resources/UI/<uiFile>`` into the panel as ``self.ui``, with the scene set."""
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{uiFile}"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

    def jobBusyMessage(self):
        """Why this module may not start a job now (another module's job or an install runs), or None."""
        return JOBS.busy_message(self)

    def prepareJob(self, what: str) -> None:
        """Before starting a job: refuse while another CT-FM job or an install runs (:class:`JobBusyError`,
        whose message says what runs), then make sure PyTorch and CT-FM's packages are installed, holding
        the job slot meanwhile: Slicer's pip install processes GUI events, so a second click could
        otherwise start a second install into the same folder (Slicer 5.6-5.10 ``logProcessOutput``)."""
        message = self.jobBusyMessage()
        if message:
            raise JobBusyError(message)
        from CTFMSlicer.dependencies import ensure_dependencies

        with JOBS.installing(what):
            ensure_dependencies()

    def followRunner(self, runner, what: str = "") -> None:
        """Poll ``runner`` every 100 ms in the GUI thread, where its callbacks may touch Qt and MRML;
        it holds the one CT-FM job slot (:data:`CTFMSlicer.running.JOBS`), described by ``what``."""
        self._runner = runner
        JOBS.take(self, runner, what or self.moduleName)
        if self._pollTimer is None:
            self._pollTimer = self._newPollTimer()
        self._pollTimer.start()

    def _newPollTimer(self):
        import qt

        timer = qt.QTimer()
        timer.setInterval(self.POLL_INTERVAL_MS)
        timer.connect("timeout()", self._pollRunner)
        return timer

    def _pollRunner(self) -> None:
        # A run's on_done may start the next run (the out-of-memory retry): the follower then goes on.
        if self._follower is None or not self._follower.tick():
            self._pollTimer.stop()

    def onReload(self) -> None:
        """Developer mode's Reload: re-import CTFMLib, CTFMSlicer and the module's own ``<Module>Lib`` too, not
        only the module file."""
        forget_packages("CTFMLib", "CTFMSlicer", f"{self.moduleName}Lib")
        import slicer.ScriptedLoadableModule as scripted

        scripted.ScriptedLoadableModuleWidget.onReload(self)

    @staticmethod
    def showFraction(bar, fraction) -> None:
        """A progress bar at ``fraction`` (0..1), or busy (no fraction known)."""
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 100)
            bar.value = round(100 * fraction)

    def cancelRunner(self) -> None:
        """Stop the running child process tree; its ``on_done`` follows from the next poll."""
        if self._runner is not None:
            self._runner.cancel()

    def observeSceneClose(self) -> None:
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self) -> None:
        self.cancelRunner()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._blankUnsetPathsSoon)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRunner()  # its result would belong to a scene that is gone
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._blankUnsetPathsSoon)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._blankUnsetPathsSoon)
            self._blankUnsetPathsSoon()
        self._updateState()

    def _updateState(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def _blankUnsetPathsSoon(self, caller=None, event=None) -> None:
        import qt

        qt.QTimer.singleShot(0, self._blankUnsetPaths)  # after the parameter node has written the widgets

    def _blankUnsetPaths(self) -> None:
        """Show an unset path parameter as an empty box, not ".": the wrapper's unset ``Path`` is ``Path()``,
        which its ctkPathLineEdit connector writes as ``str(Path())`` (guiConnectors.py, Slicer 5.6 to main).
        Blanking writes the same "." back, which SetParameter ignores (no Modified, so no loop)."""
        import ctk

        for widget in vars(self.ui).values() if hasattr(self, "ui") else ():
            if isinstance(widget, ctk.ctkPathLineEdit) and widget.currentPath == ".":
                widget.currentPath = ""


def forget_packages(*packages: str) -> None:
    """Drop ``packages`` from ``sys.modules`` so that the next import reads their edited files. The job slot
    (:mod:`CTFMSlicer.running`) stays: every module, reloaded or not, must keep sharing the same one."""
    import sys

    for name in list(sys.modules):
        if name.split(".")[0] in packages and name != "CTFMSlicer.running":
            del sys.modules[name]
