"""The one CT-FM job that runs in this Slicer at a time, whichever module started it. No Qt.

A child process may take the GPU and most of the memory, so the CT-FM modules share one
:data:`JOBS` slot: a module asks :meth:`JobSlot.busy_message` before it starts anything, and
registers what it starts with :meth:`JobSlot.take`; the first-use install of PyTorch and CT-FM's
packages is guarded the same way (:meth:`JobSlot.installing`), because Slicer's pip install
processes GUI events and a second click would start a second install into the same folder.

:class:`RunnerFollower` is what a module's poll timer does on each tick. A run's ``on_done``
(called from inside its ``poll``) may start the next run at once, as the Segment panel's
out-of-memory retry does; the follower then goes on with the new runner instead of stopping.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["JobBusyError", "JobSlot", "JOBS", "RunnerFollower"]


class JobBusyError(RuntimeError):
    """Another CT-FM job (or the install of CT-FM's packages) is running; the message says which."""


class JobSlot:
    """At most one CT-FM child process (or package install) at a time, with a description of it."""

    def __init__(self):
        self.runner = None
        self.owner = None
        self.what = ""
        self._installing: Optional[str] = None

    def _running(self) -> bool:
        # A runner whose process ended is done even before its last poll delivered on_done:
        # the retry started from that on_done may take the slot.
        return self.runner is not None and self.runner.running

    def busy_message(self, owner=None) -> Optional[str]:
        """Why ``owner`` may not start a job now (None: it may). Its own running job does not count:
        the module's button cancels that one."""
        if self._installing:
            return f"CT-FM's Python packages are being installed ({self._installing}); wait for the install to finish."
        if self._running() and self.owner is not owner:
            return f"Another CT-FM job is running: {self.what}. Wait for it or cancel it there."
        return None

    def take(self, owner, runner, what: str) -> None:
        """Record ``runner`` (just started by ``owner``, which asked :meth:`busy_message` first: the GUI
        thread does both, so nothing can start in between) as the running job, described by ``what``."""
        self.runner, self.owner, self.what = runner, owner, what

    def release(self, runner) -> None:
        """Forget ``runner`` when it is the recorded job (a later job keeps the slot)."""
        if self.runner is runner:
            self.runner, self.owner, self.what = None, None, ""

    @contextmanager
    def installing(self, what: str) -> Iterator[None]:
        """Hold the slot while CT-FM's packages are installed for ``what``; a second request meanwhile
        (another click, another module) raises :class:`JobBusyError` instead of starting a second install."""
        message = self.busy_message()
        if message:
            raise JobBusyError(message)
        self._installing = what
        try:
            yield
        finally:
            self._installing = None


JOBS = JobSlot()


class RunnerFollower:
    """The runner a module follows, polled once per timer tick from the GUI thread."""

    def __init__(self, slot: Optional[JobSlot] = None):
        self.runner = None
        self.slot = slot

    def tick(self) -> bool:
        """Poll the followed runner (its callbacks run here); returns whether to keep polling.

        When the runner finished, its ``on_done`` ran inside ``poll`` and may have followed a new
        runner: polling goes on for that one."""
        runner = self.runner
        if runner is None:
            return False
        if runner.poll():
            return True
        if self.slot is not None:
            self.slot.release(runner)
        if self.runner is runner:
            self.runner = None
        return self.runner is not None
