"""``ctfm index add`` and ``ctfm index query`` in child processes, and reading back what they report.

Both run as ``python -m CTFMLib.cli --progress json index ...`` through
:class:`CTFMSlicer.process.ProcessRunner`: Slicer stays responsive, Cancel kills the process
tree, and an interrupted add leaves the index consistent (it commits whole scans only; running
the add again skips what is already in). A query's volume is staged as NRRD (world geometry);
points and boxes go to the child in LPS (the caller converts from RAS) and the hits come back
with LPS centres, plus an axial PNG thumbnail each when asked for. No Qt, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from CTFMSlicer.jobs import start_volume_command
from CTFMSlicer.process import (
    DEVICES,
    ProcessRunner,
    coordinates,
    ctfm_cli_command,
    failure_text,
    last_json_object,
    work_folder,
)

QUERY_MODES = ("crosshair", "roi", "scan")
FAILED = re.compile(r"^ctfm: FAILED (.*?): (.*)$")


# --- add ---------------------------------------------------------------------------------


def add_arguments(index, paths: Sequence, weights: Optional[str] = None, device: str = "auto") -> list:
    """``ctfm`` arguments (after ``--progress json``) that add ``paths`` (files, folders, DICOM trees) to ``index``."""
    if not paths:
        raise ValueError("nothing to add: choose volumes or a folder")
    if device not in DEVICES:
        raise ValueError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    args = ["index", "add", str(index), *[str(p) for p in paths], "--device", device, "--json"]
    if weights:
        args += ["--weights", str(weights)]
    return args


@dataclass
class AddOutcome:
    """What an add reported: counts from its summary line and the inputs it could not use (with why)."""

    added: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # [(input, reason)]
    total: int = 0

    def summary(self) -> str:
        text = f"Added {self.added} case(s); {self.skipped} already in the index"
        if self.failed:
            text += f"; {len(self.failed)} failed: " + "; ".join(f"{what} ({why})" for what, why in self.failed[:3])
            if len(self.failed) > 3:
                text += f" and {len(self.failed) - 3} more"
        return text + "."


def parse_add_output(stdout: Sequence[str], stderr: Sequence[str]) -> Optional[AddOutcome]:
    """The outcome from an add's output lines (its ``--json`` summary object, the last stdout line, and the
    ``ctfm: FAILED`` lines on stderr); None when it printed no summary (it did not finish)."""
    summary = last_json_object(stdout)
    if summary is None or "added" not in summary:
        return None
    try:
        outcome = AddOutcome(int(summary["added"]), int(summary.get("already_indexed") or 0), [],
                             int(summary.get("total") or 0))
    except (TypeError, ValueError):
        return None
    reasons = [m.groups() for m in (FAILED.match(line.strip()) for line in stderr) if m]
    named = {what for what, _ in reasons}
    outcome.failed = reasons + [(what, "failed") for what in summary.get("failed") or [] if what not in named]
    outcome.failed += [(what, "not CT-like (left out)") for what in summary.get("not_ct") or []]
    return outcome


def start_add(index, paths: Sequence, weights: Optional[str] = None, device: str = "auto",
              on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None) -> ProcessRunner:
    """Add ``paths`` to ``index`` (created when new) in a child process; returns its runner.

    ``on_done(outcome_or_None, message)``: an :class:`AddOutcome` when the add finished (some inputs
    may have failed: see ``outcome.failed``); None and the error, or "Cancelled.", otherwise.
    """
    args = add_arguments(index, paths, weights, device)
    lines = {"stdout": [], "stderr": []}

    def line(stream, text):
        lines[stream].append(text)

    def finished(result):
        outcome = parse_add_output(lines["stdout"], lines["stderr"])
        if result.cancelled:
            outcome, message = None, "Cancelled."
        elif outcome is not None and result.returncode in (0, 1):  # 1: finished, some inputs failed
            message = outcome.summary()
        else:
            outcome, message = None, failure_text(result.stderr_tail, result.describe())
        if on_done:
            on_done(outcome, message)

    return ProcessRunner(ctfm_cli_command(*args), on_progress=on_progress, on_line=line, on_done=finished)


# --- query -------------------------------------------------------------------------------


@dataclass
class QueryHit:
    """One similar case: ``centre_lps`` is the matched place (patch hits) or the scan's centre (scan hits)."""

    rank: int
    similarity: float
    scan_id: int
    path: str
    series_uid: Optional[str]
    centre_lps: Optional[np.ndarray]
    level: str
    thumbnail: Optional[str] = None

    @property
    def case(self) -> str:
        """A short name for the case: the file name (a DICOM folder: folder name and series)."""
        name = Path(self.path).name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return f"{name} ({self.series_uid[-12:]})" if self.series_uid else name


def query_arguments(index, image, mode: str, point_lps=None, box_lps=None, k: int = 10,
                    exclude_paths: Sequence = (), thumbnails=None, device: str = "auto") -> list:
    """``ctfm`` arguments for one query; ``mode`` crosshair (a point), roi (a box) or scan."""
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown query mode '{mode}'; choose one of {', '.join(QUERY_MODES)}")
    if int(k) < 1:
        raise ValueError("ask for at least one result")
    if device not in DEVICES:
        raise ValueError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    args = ["index", "query", str(index), str(image), "-k", str(int(k)), "--json", "--device", device]
    if mode == "crosshair":
        if point_lps is None:
            raise ValueError("a point query needs a point")
        args.append(f"--point={coordinates(point_lps)}")  # '=': a negative first coordinate is not an option
    elif mode == "roi":
        if box_lps is None:
            raise ValueError("a box query needs a box")
        args.append(f"--box={coordinates(box_lps)}")
    for path in exclude_paths:
        args.append(f"--exclude-scan={path}")
    if thumbnails is not None:
        args += ["--thumbnails", str(thumbnails)]
    return args


def parse_hits(value: Optional[dict]) -> list:
    """:class:`QueryHit` list from the query's JSON; ``ValueError`` naming what is wrong."""
    if not isinstance(value, dict) or not isinstance(value.get("hits"), list):
        raise ValueError("the query printed no results")
    level = (value.get("query") or {}).get("level", "scan")
    hits = []
    for h in value["hits"]:
        try:
            centre = h.get("centre_lps")
            hits.append(QueryHit(int(h["rank"]), float(h["similarity"]), int(h["scan_id"]), str(h["path"]),
                                 h.get("series_uid") or None,
                                 None if centre is None else np.asarray(centre, dtype=np.float64).reshape(3),
                                 level, h.get("thumbnail")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a query result is malformed ({e}): {h}") from None
    return hits


def start_query(volumeNode, index, mode: str, point_lps=None, box_lps=None, k: int = 10,
                exclude_paths: Sequence = (), thumbnails_folder=None, device: str = "auto",
                on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None) -> ProcessRunner:
    """Search ``index`` for places or cases like ``volumeNode``'s in a child process; returns its runner.

    ``thumbnails_folder``: where the child writes one PNG per hit (kept; the caller owns it).
    ``on_done(hits_or_None, message)``: a list of :class:`QueryHit` (possibly empty); None and the
    error, or "Cancelled.", otherwise.
    """
    def arguments(work, source):
        return query_arguments(index, source, mode, point_lps, box_lps, k, exclude_paths, thumbnails_folder, device)

    def read(work, stdout, result):
        hits = parse_hits(last_json_object(stdout))
        found = "places" if mode != "scan" else "cases"
        return hits, (f"{len(hits)} similar {found} found." if hits else "No results: the index holds no other cases.")

    return start_volume_command(volumeNode, "ctfm-retrieve-", arguments, read, "The search", on_progress, on_done)


def new_thumbnails_folder() -> Path:
    return work_folder("ctfm-retrieve-thumbnails-")
