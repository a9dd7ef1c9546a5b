"""Following child processes from a module widget, and one CT-FM job at a time across modules
(CTFMSlicer.running, CTFMSlicer.widget), with real child processes and a real Qt timer (PySide6)."""

import sys
import time

import pytest

from CTFMSlicer.process import ProcessRunner
from CTFMSlicer.running import JOBS, JobBusyError
from CTFMSlicer.widget import ParameterNodeWidgetMixin

QtCore = pytest.importorskip("PySide6.QtCore")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")


@pytest.fixture(autouse=True)
def qt_application():
    # A QApplication, as the other Qt tests use: Qt allows one application object per process, and widget
    # tests abort in a process whose application is only a QCoreApplication.
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


class Panel(ParameterNodeWidgetMixin):
    """A module widget's job handling as the CT-FM modules use it, with PySide6's QTimer for Slicer's."""

    def __init__(self, name):
        self.moduleName = name
        self.log = []

    def _newPollTimer(self):
        return QtCore.QTimer()

    def pollUntilStopped(self, seconds=30.0):
        deadline = time.monotonic() + seconds
        while self._pollTimer.isActive():
            assert time.monotonic() < deadline, "the panel never stopped polling"
            self._pollRunner()
            time.sleep(0.02)


def child(code):
    return [sys.executable, "-c", code]


def test_a_retry_started_as_a_run_ends_is_followed_to_its_end():
    """The Segment panel's out-of-memory retry: the failed run's on_done starts the next run at once
    (inside the old run's poll). The panel must follow the new run: its output and on_done arrive,
    then polling stops and the panel is idle."""
    panel = Panel("CTFMSegment")

    def retry(result):
        panel.log.append(("first", result.returncode))
        panel._runner = None  # as _onDone does before offering the retry
        panel.followRunner(ProcessRunner(child("print('retried run')"), on_line=lambda s, t: panel.log.append(t),
                                         on_done=lambda r: panel.log.append(("second", r.returncode))), "retry")

    panel.followRunner(ProcessRunner(child("import sys; sys.exit(3)"), on_done=retry), "first run")
    panel.pollUntilStopped()
    assert panel.log == [("first", 3), "retried run", ("second", 0)]
    assert panel._runner is None and JOBS.runner is None
    assert panel.jobBusyMessage() is None


def test_one_ct_fm_job_at_a_time_across_modules_says_what_runs():
    segment, retrieve = Panel("CTFMSegment"), Panel("CTFMRetrieve")
    runner = ProcessRunner(child("import time; time.sleep(30)"))
    segment.followRunner(runner, "CT-FM Segment: segmenting 'CT chest'")
    try:
        message = retrieve.jobBusyMessage()
        assert message and "CT-FM Segment: segmenting 'CT chest'" in message
        assert segment.jobBusyMessage() is None  # its own job: its button cancels it
    finally:
        segment.cancelRunner()
    segment.pollUntilStopped()
    assert retrieve.jobBusyMessage() is None and JOBS.runner is None


def test_a_second_install_request_is_refused_while_one_runs():
    segment, hub = Panel("CTFMSegment"), Panel("CTFM")
    with JOBS.installing("CT-FM Segment"):
        assert "being installed (CT-FM Segment)" in hub.jobBusyMessage()
        assert segment.jobBusyMessage() is not None  # its own second click too
        with pytest.raises(JobBusyError, match="being installed"):
            with JOBS.installing("CT-FM"):
                pass
    assert hub.jobBusyMessage() is None
    with JOBS.installing("CT-FM"):  # free again
        pass


def test_prepare_job_refuses_while_another_module_runs_or_installs():
    """Every module's Start goes through prepareJob: another module's job or an install in progress is refused
    with a message naming it, before any install or child process starts."""
    segment, retrieve = Panel("CTFMSegment"), Panel("CTFMRetrieve")
    runner = ProcessRunner(child("import time; time.sleep(30)"))
    segment.followRunner(runner, "CT-FM Segment: segmenting 'CT chest'")
    try:
        with pytest.raises(JobBusyError, match="segmenting 'CT chest'"):
            retrieve.prepareJob("CT-FM Retrieve")
    finally:
        segment.cancelRunner()
    segment.pollUntilStopped()
    with JOBS.installing("CT-FM Segment"):
        with pytest.raises(JobBusyError, match="being installed"):
            retrieve.prepareJob("CT-FM Retrieve")
    retrieve.prepareJob("CT-FM Retrieve")  # nothing runs, and torch and CT-FM's packages are installed here
    assert JOBS.busy_message() is None
