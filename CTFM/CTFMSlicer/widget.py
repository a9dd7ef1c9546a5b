"""The parameter-node plumbing every CT-FM module widget shares (Slicer's scripted-module template).

A widget class lists :class:`ParameterNodeWidgetMixin` before
``ScriptedLoadableModuleWidget`` and ``VTKObservationMixin``; in ``setup()``
it calls :meth:`loadModuleUI`, sets ``self.logic``, calls
:meth:`observeSceneClose` and :meth:`initializeParameterNode`; it defines
``_updateState()``, which runs whenever the parameter node changes. Long work
started as a :class:`CTFMSlicer.process.ProcessRunner` is handed to
:meth:`followRunner`, which polls it from the GUI thread; closing the scene or
the module cancels it. Each kind of job a panel runs has one :class:`JobControls`
(its button, which reads Cancel meanwhile, progress bar and status line). Qt is
imported only inside the methods that need it, so the package stays importable
without the application.
"""

import logging

import slicer
import vtk

from .running import JOBS, JobBusyError, RunnerFollower


class ParameterNodeWidgetMixin:
    """Connects ``self.ui`` to the logic's parameter node and follows scene close."""

    _parameterNode = None
    _parameterNodeGuiTag = None
    _follower = None
    _pollTimer = None
    _job = None  # the JobControls whose job runs (one per panel; JOBS keeps it to one across modules)
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

    def prepareJob(self, what: str, childPackages: bool = False) -> None:
        """Before starting a job: refuse while another CT-FM job or an install runs (:class:`JobBusyError`,
        whose message says what runs), then make sure PyTorch and CT-FM's packages are installed, holding
        the job slot meanwhile: Slicer's pip install processes GUI events, so a second click could
        otherwise start a second install into the same folder (Slicer 5.6-5.10 ``logProcessOutput``)."""
        message = self.jobBusyMessage()
        if message:
            raise JobBusyError(message)
        from CTFMSlicer.dependencies import ensure_child_packages, ensure_dependencies

        with JOBS.installing(what):
            ensure_dependencies()
            if childPackages:  # a job whose child writes DICOM: highdicom in the children's own folder
                ensure_child_packages()

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


def _tr(text: str) -> str:
    """``text`` translated where Slicer's i18n is present (not in slicer-core, which the tests use)."""
    try:
        from slicer.i18n import translate
    except ImportError:
        return text
    return translate("JobControls", text)


class LogStatus:
    """A status "label" that appends each message to a plain-text log (CT-FM Segment's log box), so that
    the panel's :class:`JobControls` reports there; clearing it adds nothing."""

    def __init__(self, textEdit):
        self._textEdit = textEdit
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value
        if value:
            self._textEdit.appendPlainText(value)


class JobControls:
    """The controls of one kind of job in a panel: its button, progress bar and status label.

    Every CT-FM panel runs its long work the same way, so users meet one behaviour: the button that
    started a job reads Cancel (and the label "Cancelling..." after a click), the bar is busy until a
    fraction arrives, the panel's other job buttons are disabled with a tooltip naming the running job,
    and at the end the button reads its idle text again, the bar hides and a failure shows in the label
    (and the log, unless it was cancelled). The widgets are Qt objects in Slicer; only their ``text``,
    ``toolTip``, ``enabled``, ``visible``, ``value`` and ``setRange`` are used.

    ``name`` names the job in the other buttons' tooltip; ``what`` describes it in the one CT-FM job
    slot and in failure logs (default ``CT-FM: <name>``). ``lock``: widgets disabled while it runs (its
    inputs); ``messagesInBar``: progress messages go into the bar's text instead of the label.
    """

    def __init__(self, widget, name: str, button, bar, label, idleText=None, *, what=None, cancelling=None,
                 runningToolTip=None, lock=(), waitCursor=False, messagesInBar=False):
        self.widget, self.name = widget, name
        self.button, self.bar, self.label = button, bar, label
        self.idleText = button.text if idleText is None else idleText
        self.what = what or f"CT-FM: {name}"
        self.cancelling = cancelling or _tr("Cancelling...")
        self.runningToolTip, self.lock = runningToolTip, tuple(lock)
        self.waitCursor, self.messagesInBar = waitCursor, messagesInBar
        self.runner = None  # what launch started, while it runs

    @property
    def running(self) -> bool:
        return self.widget._job is self

    def refresh(self, problem, idleToolTip: str) -> None:
        """Enable the button unless ``problem`` (a sentence, shown as its tooltip) or another job of the
        panel runs; the running job's own button stays as it is (Cancel, enabled)."""
        running = self.widget._job
        if running is self:
            return
        if running is not None:
            self.button.enabled = False
            self.button.toolTip = _tr("Another CT-FM job is running ({job}); wait for it or cancel it.").format(
                job=running.name)
            return
        self.button.enabled = not problem
        self.button.toolTip = problem or idleToolTip

    def launch(self, failureTitle: str, start, what=None, prepare: bool = True, follow: bool = True,
               childPackages: bool = False) -> None:
        """The button's click: cancel the running job, else start one.

        ``start()`` returns the job's runner; it is called inside an error display titled ``failureTitle``
        after :meth:`ParameterNodeWidgetMixin.prepareJob` (``prepare=False``: only the one-job check) and
        with the controls already showing the job, since a runner may report its end while it starts.
        A :class:`CTFMSlicer.process.ProcessRunner` is polled by the widget (``follow``); another runner
        (a CLI run that reports through its node) only holds the job slot. ``what`` overrides the
        description for this run; ``childPackages``: the child writes DICOM, so the packages only children use
        are installed first (:func:`CTFMSlicer.dependencies.ensure_child_packages`).
        """
        if self.running:
            self.cancel()
            return
        what = what or self.what
        self.label.text = ""
        with slicer.util.tryWithErrorDisplay(failureTitle, waitCursor=self.waitCursor):
            if prepare:
                self.widget.prepareJob(what, childPackages=childPackages)
            else:
                busy = JOBS.busy_message()  # any job: this one does not run, and the panel's others count too
                if busy:
                    raise JobBusyError(busy)
            self._show(True)
            try:
                runner = start()
            except Exception:
                self._show(False)
                raise
            if not self.running:  # it ended while it started
                return
            self.runner = runner
            if follow:
                self.widget.followRunner(runner, what)
            else:
                JOBS.take(self.widget, runner, what)

    def cancel(self) -> None:
        """Stop the running job; its end arrives through the runner's ``on_done``, which calls :meth:`finish`."""
        self.label.text = self.cancelling
        if self.runner is not None:
            self.runner.cancel()

    def progress(self, fraction, message: str = "") -> None:
        """A runner's ``on_progress``: the bar at ``fraction`` (busy when None), the message in the label."""
        self.widget.showFraction(self.bar, fraction)
        if self.messagesInBar:
            self.bar.format = f"{message} %p%" if message else "%p%"
        elif message:
            self.label.text = message

    def finish(self, ok: bool, message: str, log: bool = True) -> None:
        """The job ended (call first in its ``on_done``): idle controls, and ``message`` in the label (a
        failure's first line; the whole of it in the log unless it was cancelled or ``log`` is False)."""
        if self.running:
            self.widget._runner = None
        self.runner = None
        self._show(False)
        if ok:
            self.label.text = message
            return
        self.label.text = message.splitlines()[0] if message else _tr("Failed.")
        if log and message and message != "Cancelled.":
            logging.error(f"{self.what} failed: {message}")

    def _show(self, running: bool) -> None:
        if running:
            self.widget._job = self
        elif self.running:
            self.widget._job = None
        bar = self.bar
        bar.visible = running
        bar.setRange(0, 0 if running else 100)  # busy until the runner reports a fraction
        bar.value = 0
        if self.messagesInBar:
            bar.format = "%p%"
        self.button.text = _tr("Cancel") if running else self.idleText
        if running and self.runningToolTip:
            self.button.toolTip = self.runningToolTip
        self.button.enabled = True
        for widget in self.lock:
            widget.enabled = not running  # a run keeps the values it started with
        self.widget._updateState()


def forget_packages(*packages: str) -> None:
    """Drop ``packages`` from ``sys.modules`` so that the next import reads their edited files. The job slot
    (:mod:`CTFMSlicer.running`) stays: every module, reloaded or not, must keep sharing the same one."""
    import sys

    for name in list(sys.modules):
        if name.split(".")[0] in packages and name != "CTFMSlicer.running":
            del sys.modules[name]
