"""A ``ctfm`` command on a volume node in a child process: stage the volume, run, read the result, clean up.

Triage, saliency and retrieval searches share this shape: the volume is written to a new temporary
folder (world geometry, :func:`CTFMSlicer.nodes.stage_volume`), the child may write its outputs
there too, the result is read once the child exited successfully, and the folder goes in every case
(done, failed, cancelled). No Qt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .nodes import stage_volume
from .process import ProcessRunner, ctfm_cli_command, failure_text, remove_work_folder


def start_volume_command(volumeNode, prefix: str, arguments: Callable, read_result: Callable, what: str,
                         on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None) -> ProcessRunner:
    """Run ``ctfm`` (with JSON progress) on ``volumeNode``; returns the runner.

    ``arguments(work, source)``: the command's arguments, given the temporary folder and the staged
    input file in it. ``read_result(work, stdout_lines, result)``: ``(output, message)`` after a
    successful exit, before ``work`` is removed; an ``OSError``/``ValueError`` it raises becomes
    "``what`` finished but its result cannot be read: ...". ``on_done(output_or_None, message)``:
    None with "Cancelled." or the child's error when it did not succeed.
    """
    work, source = stage_volume(volumeNode, prefix=prefix)
    try:
        args = arguments(Path(work), Path(source))
    except BaseException:
        remove_work_folder(work)
        raise
    stdout = []

    def line(stream, text):
        if stream == "stdout":
            stdout.append(text)

    def finished(result):
        output, message = None, None
        try:
            if result.ok:
                try:
                    output, message = read_result(work, stdout, result)
                except (OSError, ValueError) as e:
                    output, message = None, f"{what} finished but its result cannot be read: {e}"
            elif result.cancelled:
                message = "Cancelled."
            else:
                message = failure_text(result.stderr_tail, result.describe())
        finally:
            remove_work_folder(work)
        if on_done:
            on_done(output, message)

    return ProcessRunner(ctfm_cli_command(*args), on_progress=on_progress, on_line=line, on_done=finished)
