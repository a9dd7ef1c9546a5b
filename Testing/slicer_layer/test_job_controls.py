"""CTFMSlicer.widget.JobControls: the job button, progress bar and status line every CT-FM panel shares.

PythonQt (Slicer's Qt binding) cannot run here, so the button, bar and label are small plain-Python
stand-ins with the attributes JobControls uses (``text``, ``toolTip``, ``enabled``, ``visible``,
``value``, ``setRange``); the jobs are REAL child processes run by ``CTFMSlicer.process.ProcessRunner``
and polled as the panel's timer would. The in-app tests (Testing/Python in each module) check the real
widgets inside Slicer.
"""

import logging
import sys
import textwrap
import time
import types

import pytest
import slicer

from CTFMSlicer.process import ProcessRunner, failure_text
from CTFMSlicer.running import JOBS, JobBusyError
from CTFMSlicer.widget import JobControls, LogStatus, ParameterNodeWidgetMixin


class Button:
    def __init__(self, text):
        self.text, self.toolTip, self.enabled = text, "", True


class Bar:
    def __init__(self):
        self.visible, self.value, self.range, self.format = False, 0, (0, 100), "%p%"

    def setRange(self, low, high):
        self.range = (low, high)

    @property
    def busy(self):
        return self.range == (0, 0)


class Label:
    def __init__(self):
        self.text = ""


class Timer:
    """The panel's poll timer (a QTimer in Slicer); the test calls the poll itself."""

    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


IDLE_TIP = "Run it in the background; the button then cancels it."


class Panel(ParameterNodeWidgetMixin):
    """A module panel with job sections; ``_updateState`` refreshes every section, as the modules do."""

    def __init__(self, name, *sections):
        self.moduleName = name
        self.jobs = {section: JobControls(self, section, Button(f"Run {section}"), Bar(), Label(), f"Run {section}")
                     for section in sections}

    def _newPollTimer(self):
        return Timer()

    def _updateState(self, caller=None, event=None):
        for jobs in self.jobs.values():
            jobs.refresh(None, IDLE_TIP)

    def pollUntil(self, condition, seconds=30.0):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "the condition was not met in time"
            if self._pollTimer is not None and self._pollTimer.active:
                self._pollRunner()
            time.sleep(0.02)

    def pollUntilStopped(self):
        self.pollUntil(lambda: not self._pollTimer.active)


def child(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


# Reports "busy" (no fraction), then half-way, then runs until it is cancelled.
HALFWAY_THEN_WAIT = """
    import sys, time
    from CTFMLib.progress import JsonLines
    report = JsonLines(sys.stderr)
    report(None, "starting")
    time.sleep(0.5)
    report(0.5, "halfway")
    time.sleep(60)
"""


def start_child(jobs, code):
    """A start() for JobControls.launch: the child reports to the controls and ends them, as the logics do."""
    return lambda: ProcessRunner(
        child(code), on_progress=jobs.progress,
        on_done=lambda result: jobs.finish(result.ok, failure_text(result.stderr_tail, result.describe())))


@pytest.fixture(autouse=True)
def no_job_left(monkeypatch):
    # Slicer's error display (around every start) asks the application whether it is testing: here it is.
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    yield
    if JOBS.runner is not None and JOBS.runner.running:
        JOBS.runner.cancel()
    JOBS.runner = JOBS.owner = None


def test_start_progress_cancel_and_end():
    """Start: the button reads Cancel, the bar is busy until a fraction arrives; a click cancels
    ("Cancelling..."); the end gives the button its idle text back and hides the bar."""
    panel = Panel("CTFM", "embedding")
    jobs = panel.jobs["embedding"]
    button, bar, label = jobs.button, jobs.bar, jobs.label
    label.text = "the last run's outcome"
    jobs.launch("Failed to start.", start_child(jobs, HALFWAY_THEN_WAIT))
    assert (button.text, button.enabled, bar.visible, bar.busy) == ("Cancel", True, True, True)
    assert label.text in ("", "starting") and jobs.running and JOBS.runner is jobs.runner
    panel.pollUntil(lambda: label.text == "halfway")
    assert (bar.range, bar.value, bar.visible) == ((0, 100), 50, True)
    assert button.text == "Cancel"

    jobs.launch("Failed to start.", start_child(jobs, HALFWAY_THEN_WAIT))  # the click on Cancel
    assert label.text == "Cancelling..."
    panel.pollUntilStopped()
    assert (button.text, button.enabled, bar.visible) == ("Run embedding", True, False)
    assert label.text == "Cancelled."
    assert not jobs.running and panel._job is None and panel._runner is None and JOBS.runner is None


def test_other_buttons_name_the_running_job_while_it_runs():
    panel = Panel("CTFM", "triage", "saliency")
    triage, saliency = panel.jobs["triage"], panel.jobs["saliency"]
    panel._updateState()
    assert saliency.button.enabled and saliency.button.toolTip == IDLE_TIP
    triage.launch("Failed to start triage.", start_child(triage, HALFWAY_THEN_WAIT))
    try:
        assert not saliency.button.enabled
        assert "Another CT-FM job is running (triage)" in saliency.button.toolTip
        assert triage.button.enabled and triage.button.text == "Cancel"
        panel._updateState()  # a parameter change meanwhile changes nothing
        assert not saliency.button.enabled and triage.button.enabled
        with pytest.raises(JobBusyError, match="triage"):  # a script's click on the disabled button
            saliency.launch("Failed to start the saliency map.", start_child(saliency, HALFWAY_THEN_WAIT))
    finally:
        triage.cancel()
    # the second job was refused: nothing of it started, its controls stayed idle
    assert saliency.runner is None and saliency.button.text == "Run saliency" and not saliency.bar.visible
    panel.pollUntilStopped()
    assert saliency.button.enabled and saliency.button.toolTip == IDLE_TIP


def test_a_failing_child_puts_its_error_sentence_in_the_label(caplog):
    panel = Panel("CTFMRetrieve", "search")
    jobs = panel.jobs["search"]
    sentence = "the index at /data/index is not a CT-FM index; choose an empty folder or an index folder."
    code = f"""
        import sys
        print("loading the index", file=sys.stderr)
        print("ctfm: error: {sentence}", file=sys.stderr)
        sys.exit(2)
    """
    with caplog.at_level(logging.ERROR):
        jobs.launch("Failed to search the index.", start_child(jobs, code))
        panel.pollUntilStopped()
    assert jobs.label.text == sentence
    assert (jobs.button.text, jobs.bar.visible, jobs.button.enabled) == ("Run search", False, True)
    assert any(sentence in record.getMessage() for record in caplog.records)


def test_another_modules_job_is_refused_with_its_name_and_nothing_starts():
    segment, hub = Panel("CTFMSegment", "segmentation"), Panel("CTFM", "embedding")
    seg, emb = segment.jobs["segmentation"], hub.jobs["embedding"]
    seg.launch("Failed to start the segmentation.", start_child(seg, HALFWAY_THEN_WAIT),
               what="CT-FM Segment: segmenting 'CT chest'")
    started = []
    try:
        with pytest.raises(JobBusyError, match="segmenting 'CT chest'"):
            emb.launch("Failed to compute the embedding.", lambda: started.append(1))
    finally:
        seg.cancel()
    assert not started and not emb.running and emb.button.text == "Run embedding" and not emb.bar.visible
    segment.pollUntilStopped()
    assert seg.button.text == "Run segmentation" and JOBS.runner is None


def test_a_job_that_ends_while_it_starts_leaves_the_controls_idle():
    """A runner may report its end from inside start() (a CLI run Slicer could not schedule): the
    controls must not stay at Cancel, and nothing is followed."""
    panel = Panel("CTFM", "training")
    jobs = panel.jobs["training"]

    def start():
        runner = start_child(jobs, "print('checked')")()
        runner.wait(timeout=30)  # delivers on_done, i.e. finish(), before start() returns
        return runner

    jobs.launch("Failed to start training.", start)
    assert not jobs.running and jobs.button.text == "Run training" and not jobs.bar.visible
    assert panel._pollTimer is None and JOBS.runner is None


class Log:
    """CT-FM Segment's log box (a QPlainTextEdit)."""

    def __init__(self):
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)


def test_segment_reports_in_its_log_and_its_progress_in_the_bar():
    """CT-FM Segment's controls: progress messages in the bar's text, its inputs locked while it runs,
    and Cancelling... / Cancelled. appended to the log (starting adds no empty line)."""
    panel, log, inputs = Panel("CTFMSegment"), Log(), Button("Inputs")
    jobs = JobControls(panel, "segmentation", Button("Segment"), Bar(), LogStatus(log), what="CT-FM Segment",
                       runningToolTip="Stop the segmentation.", messagesInBar=True, lock=(inputs,))
    panel.jobs = {"segmentation": jobs}
    jobs.launch("Failed to start the segmentation.", start_child(jobs, HALFWAY_THEN_WAIT))
    assert jobs.button.toolTip == "Stop the segmentation." and not inputs.enabled and log.lines == []
    panel.pollUntil(lambda: jobs.bar.format == "halfway %p%")
    assert jobs.bar.value == 50 and log.lines == []
    jobs.launch("Failed to start the segmentation.", start_child(jobs, HALFWAY_THEN_WAIT))
    panel.pollUntilStopped()
    assert log.lines == ["Cancelling...", "Cancelled."]
    assert inputs.enabled and jobs.button.text == "Segment" and jobs.bar.format == "%p%"
