"""CTFMSlicer.process.ProcessRunner with real child processes (no Qt, no Slicer needed)."""

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from CTFMSlicer.process import STDERR_TAIL_LINES, ProcessRunner, ctfm_cli_command

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="process-group checks use POSIX signals and /proc")


def python_child(code: str) -> list:
    return [sys.executable, "-c", textwrap.dedent(code)]


def poll_until(runner, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.poll()
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False


class Recorder:
    def __init__(self):
        self.progress, self.lines, self.done = [], [], []

    def kwargs(self):
        return {
            "on_progress": lambda f, m: self.progress.append((f, m)),
            "on_line": lambda stream, text: self.lines.append((stream, text)),
            "on_done": self.done.append,
        }


def test_progress_lines_are_parsed_and_other_lines_passed_on():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import sys
            from CTFMLib.progress import JsonLines
            report = JsonLines(sys.stderr)
            print("starting", flush=True)
            for i in range(5):
                report(i / 4, f"step {i}")
            report(None, "finishing")
            print("plain stderr line", file=sys.stderr, flush=True)
            print("done", flush=True)
            """
        ),
        **rec.kwargs(),
    )
    result = runner.wait(timeout=30)
    assert result.ok and result.returncode == 0 and not result.cancelled
    assert rec.progress == [(0.0, "step 0"), (0.25, "step 1"), (0.5, "step 2"), (0.75, "step 3"), (1.0, "step 4"), (None, "finishing")]
    assert ("stdout", "starting") in rec.lines and ("stdout", "done") in rec.lines
    assert ("stderr", "plain stderr line") in rec.lines
    assert not any(text.startswith("{") for _, text in rec.lines)  # progress is not echoed as a line
    assert rec.done == [result]
    assert runner.poll() is False and rec.done == [result]  # on_done exactly once


def test_poll_delivers_output_while_the_process_runs():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import sys, time
            print("first", flush=True)
            time.sleep(30)
            """
        ),
        **rec.kwargs(),
    )
    try:
        poll_until(runner, lambda: ("stdout", "first") in rec.lines)
        assert runner.running and runner.poll() is True and rec.done == []
    finally:
        runner.cancel()
    runner.wait(timeout=10)


@POSIX_ONLY
def test_cancel_kills_the_whole_process_tree():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import os, subprocess, sys, time
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print(f"pids {os.getpid()} {grandchild.pid}", flush=True)
            time.sleep(120)
            """
        ),
        **rec.kwargs(),
    )
    poll_until(runner, lambda: any(text.startswith("pids") for _, text in rec.lines))
    child, grandchild = (int(p) for p in next(t for _, t in rec.lines if t.startswith("pids")).split()[1:])
    assert child == runner.pid and pid_alive(child) and pid_alive(grandchild)

    started = time.monotonic()
    runner.cancel()
    poll_until(runner, lambda: bool(rec.done), timeout=10)
    deadline = time.monotonic() + 5
    while (pid_alive(child) or pid_alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child) and not pid_alive(grandchild)
    assert time.monotonic() - started < 8
    assert rec.done[0].cancelled and not rec.done[0].ok
    assert rec.done[0].describe() == "Cancelled."


@POSIX_ONLY
def test_cancel_escalates_when_terminate_is_ignored():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ignoring SIGTERM", flush=True)
            time.sleep(120)
            """
        ),
        **rec.kwargs(),
    )
    poll_until(runner, lambda: ("stdout", "ignoring SIGTERM") in rec.lines)
    started = time.monotonic()
    runner.cancel(grace=0.5)
    result = runner.wait(timeout=10)
    assert result.cancelled
    assert result.returncode == -9  # SIGKILL
    assert time.monotonic() - started < 5


def test_cancel_after_the_process_ended_is_not_a_cancel():
    runner = ProcessRunner([sys.executable, "-c", "print('quick')"])
    runner.process.wait(timeout=30)
    runner.cancel()  # before poll() noticed the exit
    result = runner.wait(timeout=30)
    assert result.ok and not result.cancelled


@POSIX_ONLY
def test_done_is_reported_when_a_detached_grandchild_keeps_the_pipes_open(monkeypatch):
    import CTFMSlicer.process as process

    monkeypatch.setattr(process, "PIPE_GRACE_SECONDS", 0.5)
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import subprocess, sys
            # A new session escapes the group that cancel() signals; it inherits stdout/stderr.
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
            print(f"detached {p.pid}", flush=True)
            """
        ),
        **rec.kwargs(),
    )
    try:
        poll_until(runner, lambda: bool(rec.done), timeout=10)
        assert rec.done[0].returncode == 0
    finally:
        for _, text in rec.lines:
            if text.startswith("detached"):
                os.kill(int(text.split()[1]), 9)


def test_failure_reports_exit_code_and_stderr_tail():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import sys
            for i in range(100):
                print(f"log line {i}", file=sys.stderr)
            print("ValueError: the real reason", file=sys.stderr)
            sys.exit(3)
            """
        ),
        **rec.kwargs(),
    )
    result = runner.wait(timeout=30)
    assert result.returncode == 3 and not result.ok and not result.cancelled
    tail = result.stderr_tail.splitlines()
    assert len(tail) == STDERR_TAIL_LINES
    assert tail[-1] == "ValueError: the real reason"
    assert tail[0] == f"log line {100 - STDERR_TAIL_LINES + 1}"
    assert "exit code 3" in result.describe() and "the real reason" in result.describe()


def test_undecodable_output_does_not_stop_the_reader():
    rec = Recorder()
    runner = ProcessRunner(
        python_child(
            """
            import sys
            sys.stdout.buffer.write(b"bad \\xff\\xfe bytes\\n")
            sys.stdout.buffer.write(b"after\\n")
            """
        ),
        **rec.kwargs(),
    )
    assert runner.wait(timeout=30).ok
    texts = [t for _, t in rec.lines]
    assert texts[0].startswith("bad ") and "\ufffd" in texts[0]
    assert texts[1] == "after"


def test_child_imports_the_same_ctfmlib(tmp_path):
    import CTFMLib

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rec = Recorder()
    runner = ProcessRunner(python_child("import CTFMLib; print(CTFMLib.__file__)"), env=env, cwd=str(tmp_path), **rec.kwargs())
    assert runner.wait(timeout=30).ok
    assert Path(rec.lines[0][1]).resolve() == Path(CTFMLib.__file__).resolve()


def test_start_later_and_bad_executable():
    runner = ProcessRunner([sys.executable, "-c", "pass"], start=False)
    assert runner.pid is None and runner.poll() is False
    runner.start()
    assert runner.wait(timeout=30).ok
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    with pytest.raises(FileNotFoundError):
        ProcessRunner(["/nonexistent/ctfm-python"])


@pytest.mark.slow
def test_ctfm_cli_command_runs_the_cli_with_json_progress(tmp_path):
    # A real CLI call through the runner: the command line must be one ctfm accepts.
    info = ProcessRunner(ctfm_cli_command("info", "--json")).wait(timeout=120)
    assert info.ok, info.stderr_tail
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    result = ProcessRunner(ctfm_cli_command("embed", tmp_path / "junk.nii.gz", "--out", tmp_path / "e.npy")).wait(120)
    assert result.returncode == 2 and "corrupt" in result.stderr_tail


def test_a_redrawn_progress_line_arrives_as_a_terminal_shows_it():
    """Hugging Face / tqdm downloads redraw one line with carriage returns: the log gets the last state, not
    one very long line."""
    lines = []
    runner = ProcessRunner(python_child(r"""
        import sys
        sys.stderr.write("model.safetensors:  10%|#  |\rmodel.safetensors:  60%|### |\rmodel.safetensors: 100%|####|\r\n")
        print("done\r")
    """), on_line=lambda stream, text: lines.append((stream, text)))
    runner.wait(timeout=30)
    assert sorted(lines) == [("stderr", "model.safetensors: 100%|####|"), ("stdout", "done")]
