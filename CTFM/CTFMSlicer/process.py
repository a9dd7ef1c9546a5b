"""Run long CT-FM work in a child process and follow it from the GUI.

Slicer's GUI thread must not block for minutes, and PyTorch work that crashes
or is cancelled must not take Slicer down. So long jobs run as
``python -m CTFMLib.cli ... --progress json`` (or any other command line) in
a child process. Reader threads put its output lines in a queue; the widget
calls :meth:`ProcessRunner.poll` from a ``QTimer`` to drain the queue in the
GUI thread, where the callbacks may touch Qt and MRML. No Qt here, so the
runner is tested without an application.

Cancel kills the whole process tree: the child starts in its own session
(POSIX) or process group (Windows), and cancel signals that group, so
workers the child spawned (data loaders, downloads) go too.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from CTFMLib.files import is_inside, remove_tree
from CTFMLib.progress import parse_json_progress

# The --device choices of every ctfm command the modules run (``auto``: CUDA, else MPS, else CPU).
DEVICES = ("auto", "cpu", "cuda", "mps")
STDERR_TAIL_LINES = 40
# After the child exits, how long its output pipes may stay open (held by a detached
# grandchild) before the run is reported as done anyway.
PIPE_GRACE_SECONDS = 5.0


def temporary_root() -> str:
    """Where child processes' work folders go: Slicer's temporary folder (its Application Settings, which
    users point at a large drive) inside Slicer, else the system's temporary folder."""
    import tempfile

    try:
        import slicer

        path = slicer.app.temporaryPath  # Slicer 5.6 to main; no application under slicer-core
    except (ImportError, AttributeError):
        path = None
    if path and os.path.isdir(path):
        return str(path)
    return tempfile.gettempdir()


def work_folder(prefix: str) -> Path:
    """A new private folder (mode 0700) in :func:`temporary_root` for one child process's files."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=temporary_root()))


def remove_work_folder(folder) -> None:
    """Remove a :func:`work_folder` (only ever a folder inside a temporary folder: Slicer's or the system's)."""
    import tempfile

    if folder is None:
        return
    roots = [temporary_root(), tempfile.gettempdir()]
    root = next((r for r in roots if is_inside(folder, r)), roots[0])
    try:
        remove_tree(folder, root, "work folder")
    except OSError:  # already gone, or a file still open on Windows: the system cleans its temp folder
        pass


@dataclass
class ProcessResult:
    """How a child process ended."""

    returncode: Optional[int]
    cancelled: bool
    stderr_tail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def describe(self) -> str:
        """One human-readable sentence (plus the stderr tail on failure)."""
        if self.cancelled:
            return "Cancelled."
        if self.ok:
            return f"Finished in {self.seconds:.1f} s."
        text = f"Failed with exit code {self.returncode}."
        return f"{text}\n{self.stderr_tail}" if self.stderr_tail else text


def python_executable() -> str:
    """The interpreter for child processes: Slicer's ``PythonSlicer`` launcher when present.

    Inside Slicer ``sys.executable`` is already ``PythonSlicer`` (qSlicerCoreApplication sets it); a
    ``python-real`` (Slicer's bare interpreter, which needs the environment the launcher sets up) next to
    a ``PythonSlicer`` is replaced by it, so both lead to the launcher.
    """
    here = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = here / name
        if candidate.is_file():
            return str(candidate)
    return shutil.which("PythonSlicer") or sys.executable


def ctfm_cli_command(*args: str) -> list:
    """``[python, -m, CTFMLib.cli, --progress, json, *args]``: a CT-FM CLI call reporting JSON progress.

    ``--progress`` is an option of ``ctfm`` itself, so it comes before the sub-command.
    """
    return [python_executable(), "-m", "CTFMLib.cli", "--progress", "json", *[str(a) for a in args]]


def _ctfmlib_parent() -> str:
    """The folder holding the CTFMLib package, so the child imports the same copy as Slicer."""
    import CTFMLib

    return str(Path(CTFMLib.__file__).resolve().parent.parent)


class ProcessRunner:
    """A child process whose output is parsed into progress, lines and a final result.

    Callbacks (all optional, all called from :meth:`poll` / :meth:`wait`, never
    from a reader thread):

    - ``on_progress(fraction_or_None, message)`` for each JSON progress line
      (:class:`CTFMLib.progress.JsonLines`), on either stream;
    - ``on_line(stream, text)`` for every other line, ``stream`` being
      ``"stdout"`` or ``"stderr"``;
    - ``on_done(result)`` once, with a :class:`ProcessResult`, after the
      process ended and all its output was delivered.
    """

    def __init__(
        self,
        args: Sequence[str],
        on_progress: Optional[Callable] = None,
        on_line: Optional[Callable] = None,
        on_done: Optional[Callable] = None,
        env: Optional[dict] = None,
        cwd: Optional[str] = None,
        start: bool = True,
    ):
        self.args = [str(a) for a in args]
        self.on_progress = on_progress
        self.on_line = on_line
        self.on_done = on_done
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self._queue: "queue.Queue" = queue.Queue()
        self._readers: list = []
        self._stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._done_reported = False
        self._started_at = 0.0
        self._ended_at: Optional[float] = None
        self.result: Optional[ProcessResult] = None
        if start:
            self.start()

    # --- lifecycle ---------------------------------------------------------------

    def _environment(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive when written, not when a buffer fills
        env.setdefault("PYTHONIOENCODING", "utf-8")
        # The child must import the CTFMLib this process uses (Slicer adds module folders to
        # sys.path at run time, which a child would not inherit).
        try:
            parent = _ctfmlib_parent()
        except ImportError:
            parent = None
        # First of all, the packages only children use (DICOM writers and their pydicom 3), which Slicer's own
        # Python must not see (CTFMSlicer.dependencies.child_site).
        from .dependencies import child_site

        site = child_site()
        first = [str(p) for p in (site, parent) if p and (p != site or site.is_dir())]
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
        if first:
            env["PYTHONPATH"] = os.pathsep.join([*first, *paths])
        return env

    def start(self) -> "ProcessRunner":
        if self.process is not None:
            raise RuntimeError("the process was already started")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session and process group: cancel kills the tree
        self._started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._environment(),
            cwd=self.cwd,
            **kwargs,
        )
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"ctfm-{name}")
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, name: str, stream) -> None:
        # Bytes, decoded leniently: a child's stray non-UTF-8 output must not stop the reader.
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            # Progress bars (Hugging Face downloads, tqdm) redraw one line with "\r": keep what a terminal shows.
            text = next((part for part in reversed(text.split("\r")) if part.strip()), "")
            self._queue.put((name, text))
        stream.close()

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    # --- output -----------------------------------------------------------------

    def poll(self) -> bool:
        """Deliver queued output to the callbacks; ``True`` while more may come.

        Calls ``on_done`` (once) when the process has exited and its output
        is drained.
        """
        while True:
            try:
                name, text = self._queue.get_nowait()
            except queue.Empty:
                break
            self._deliver(name, text)
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        now = time.monotonic()
        self._ended_at = self._ended_at or now
        readers_busy = any(r.is_alive() for r in self._readers)
        if readers_busy and now - self._ended_at < PIPE_GRACE_SECONDS:
            return True
        # Readers are done (or gave up waiting for a pipe a detached process holds): drain, then report.
        while not self._queue.empty():
            self._deliver(*self._queue.get_nowait())
        self._report_done()
        return False

    def _deliver(self, name: str, text: str) -> None:
        if name == "stderr":
            self._stderr_tail.append(text)
        parsed = parse_json_progress(text)
        if parsed is not None:
            if self.on_progress:
                self.on_progress(*parsed)
        elif self.on_line:
            self.on_line(name, text)

    def _report_done(self) -> None:
        if self._done_reported:
            return
        self._done_reported = True
        self._ended_at = self._ended_at or time.monotonic()
        self.result = ProcessResult(
            returncode=self.process.returncode,
            cancelled=self.cancelled,
            stderr_tail=self.stderr_tail,
            seconds=self._ended_at - self._started_at,
        )
        if self.on_done:
            self.on_done(self.result)

    def wait(self, timeout: Optional[float] = None) -> ProcessResult:
        """Block until the process ends (``subprocess.TimeoutExpired`` after ``timeout`` s), deliver everything."""
        if self.process is None:
            raise RuntimeError("the process was not started")
        self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5.0)
        self.poll()
        if self.result is None:  # a reader is stuck on a pipe a detached grandchild holds open
            self._report_done()
        return self.result

    # --- cancel -----------------------------------------------------------------

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the process and everything it started (terminate, then kill after ``grace`` seconds)."""
        if self.process is None or self._done_reported:
            return
        # A process that already ended was not cancelled; what it left behind is still cleaned up.
        self.cancelled = self.process.poll() is None
        if os.name == "nt":
            self._kill_tree_windows()
        else:
            self._kill_group_posix(grace)
        try:
            self.process.wait(timeout=grace + 2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._ended_at = self._ended_at or time.monotonic()

    def _kill_group_posix(self, grace: float) -> None:
        pgid = self.process.pid  # start_new_session made the child its group's leader
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _kill_tree_windows(self) -> None:
        # taskkill /T walks the tree from the pid; /F because console jobs ignore polite requests.
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
        )


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, already dead, do not count)."""
    if os.path.isdir("/proc/self"):
        # Linux: a killed grandchild stays a zombie until some init reaps it, which in
        # containers may be never; signal 0 would call it alive.
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- reading a child's output ------------------------------------------------------------


def failure_text(stderr_tail: str, fallback: str) -> str:
    """The child's own error sentence (its ``ctfm: error:`` line), else ``fallback``."""
    lines = [line.strip() for line in (stderr_tail or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ctfm: "):
            return line[len("ctfm: "):].removeprefix("error: ")
    return fallback


def last_json_object(lines: Sequence[str]) -> Optional[dict]:
    """The last line of ``lines`` that is a JSON object (the CLI's result line), or None.

    Progress lines (``{"progress": ...}``) never count.
    """
    for line in reversed(list(lines)):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "progress" not in value:
            return value
    return None


def coordinates(values: Sequence[float]) -> str:
    """``x,y,z`` (or six numbers) with full precision, for the command line."""
    numbers = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if not all(np.isfinite(numbers)):
        raise ValueError(f"coordinates must be finite numbers, got {numbers}")
    return ",".join(repr(v) for v in numbers)
