"""One progress protocol for every long call.

A progress callback is any callable ``callback(fraction, message)`` where
``fraction`` is in [0, 1] (or ``None`` when unknown) and ``message`` a short
human-readable status. A callback cancels the work by raising
:class:`Cancelled`; long loops call the callback often enough that cancel
takes effect within one step.

Renderers: :class:`ConsoleBar` (the ``ctfm`` CLI), :class:`FilterProgress`
(Slicer CLI modules' ``<filter-progress>`` lines), :class:`JsonLines` (a child
process reporting to the Slicer GUI). :func:`subrange` maps a sub-task onto a
slice of its parent's range.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TextIO

ProgressCallback = Callable[[Optional[float], str], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop the work it reports on."""


class Terminated(BaseException):
    """SIGTERM arrived (what Slicer's Cancel and schedulers send).

    A ``BaseException``, like ``KeyboardInterrupt``: it unwinds through ``except Exception`` (a batch's
    per-input error handling) and every ``finally``, so temporary files are removed on the way out.
    """

    exit_code = 128 + signal.SIGTERM


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated` where the program is.

    Further SIGTERMs are ignored once the first arrived, so the cleanup it starts is not cut short
    (a caller that must stop at once sends SIGKILL, as CT-FM's process runner does after a grace time).
    Code that stops gracefully itself (the training loop) installs its own handler inside.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Estimate(str):
    """A progress message that is an expected duration: ``expected time: about 40 s (detail)``.

    Sent as ``callback(None, Estimate(seconds, detail))``, so it travels through every callback and
    :func:`subrange` unchanged; ``.seconds`` is the number. :class:`ConsoleBar` writes it as a line of its
    own (on stderr with the progress: stdout keeps the results a script reads), :class:`JsonLines` adds
    ``"expected_seconds"``; ``--progress none`` says nothing, so a refusal stays one line.
    """

    seconds: float

    def __new__(cls, seconds: float, detail: str = ""):
        from .costs import duration

        text = f"expected time: about {duration(seconds)}" + (f" ({detail})" if detail else "")
        message = super().__new__(cls, text)
        message.seconds = float(seconds)
        return message


def null_progress(fraction: Optional[float], message: str = "") -> None:
    """A callback that ignores progress."""


def subrange(callback: Optional[ProgressCallback], start: float, end: float) -> ProgressCallback:
    """Report a sub-task's [0, 1] progress as [start, end] of ``callback``."""
    parent = callback or null_progress

    def report(fraction: Optional[float], message: str = "") -> None:
        parent(None if fraction is None else start + (end - start) * min(max(fraction, 0.0), 1.0), message)

    return report


class ConsoleBar:
    """A single-line text progress bar on a terminal (or plain lines when not a tty)."""

    def __init__(self, stream: Optional[TextIO] = None, width: int = 30, min_interval: float = 0.1):
        self._stream = stream
        self.width = width
        self.min_interval = min_interval
        self._last = 0.0
        self._last_message = None
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @property
    def stream(self) -> TextIO:
        """The given stream, else ``sys.stderr`` as it is now (a caller may have redirected it)."""
        return self._stream or sys.stderr

    def __call__(self, fraction: Optional[float], message: str = "") -> None:
        now = time.monotonic()
        done = fraction is not None and fraction >= 1.0
        if not done and now - self._last < self.min_interval and message == self._last_message:
            return
        self._last = now
        self._last_message = message
        if fraction is None:
            bar, pct = "?" * self.width, "  ?%"
        else:
            filled = int(round(self.width * min(max(fraction, 0.0), 1.0)))
            bar, pct = "#" * filled + "-" * (self.width - filled), f"{100 * fraction:3.0f}%"
        line = f"[{bar}] {pct} {message}"
        if isinstance(message, Estimate):  # a line to keep, not a state of the bar
            self.stream.write(("\r" + " " * 120 + "\r" if self._tty else "") + str(message) + "\n")
            self.stream.flush()
            return
        if self._tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if done:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class FilterProgress:
    """Slicer Execution Model progress: ``<filter-progress>`` and ``<filter-comment>`` lines on stdout."""

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def __call__(self, fraction: Optional[float], message: str = "") -> None:
        if message:
            self.stream.write(f"<filter-comment>{message}</filter-comment>\n")
        if fraction is not None:
            self.stream.write(f"<filter-progress>{min(max(fraction, 0.0), 1.0):.4f}</filter-progress>\n")
        self.stream.flush()


class JsonLines:
    """Machine-readable progress, one JSON object a line: ``{"progress": f, "message": m}``."""

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __call__(self, fraction: Optional[float], message: str = "") -> None:
        line = {"progress": fraction, "message": str(message)}
        if isinstance(message, Estimate):
            line["expected_seconds"] = round(message.seconds, 1)
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()


def parse_json_progress(line: str):
    """Parse a :class:`JsonLines` line; returns ``(fraction, message)`` or ``None`` for other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "progress" not in obj:
        return None
    return obj["progress"], obj.get("message", "")


RENDERERS = {"bar": ConsoleBar, "json": JsonLines, "filter": FilterProgress}


def make_renderer(kind: str) -> ProgressCallback:
    """The callback for a ``--progress`` choice: bar, json, filter or none."""
    if kind == "none":
        return null_progress
    return RENDERERS[kind]()
