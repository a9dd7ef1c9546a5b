"""What a ``ctfm segment`` child process leaves behind: its label map, its label names, its words.

The child writes ``labels.nrrd`` (the input's grid, double-precision
geometry) and ``labels.labels.json`` ({value: name}); :func:`read_output`
puts the labels exactly on the input's grid and describes each value
(colour, terminology) through ``CTFMLib.labels``. With ``--statistics`` it also
writes ``stats.json`` (:func:`read_statistics`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from CTFMLib.image import Image, ImageError
from CTFMLib.labels import read_sidecar
from CTFMLib.model_store import LABELS_NAME
from CTFMSlicer.nodes import path_is_set

from .models import FOLDER, WHOLE_BODY, model_label_names
from .plan import short_duration

MESSAGE_TAIL_LINES = 20  # of the child's last output lines, the failure message quotes these


@dataclass
class SegmentLabel:
    """A label description shaped like ``CTFMLib.labels.LabelInfo``, for when that module is unavailable."""

    value: int
    name: str
    color: Optional[tuple] = None
    terminology: str = ""
    display_name: str = ""


@dataclass
class SegmentationOutput:
    """What a finished ``ctfm segment`` run produced: labels on the input's grid and their descriptions."""

    labels: Image
    label_infos: list
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    statistics: Optional[dict] = None  # stats.json's {structure: {...}} when the run computed them


def read_statistics(path: Path) -> dict:
    """The ``{structure: {...}}`` a child's ``--statistics`` wrote (ValueError if it is not such an object)."""
    stats = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(stats, dict) or not all(isinstance(s, dict) for s in stats.values()):
        raise ValueError(f"{Path(path).name} does not hold statistics per structure")
    return stats


def describe_labels(names: dict, model: str = WHOLE_BODY, modelFolder=None) -> list:
    """Label descriptions (colour, terminology) for ``{value: name}``.

    ``CTFMLib.labels.load_labels`` knows the TotalSegmentator structures; a
    model folder's own ``labels.json`` may carry colours and terminology of
    its own, which win where value and name agree.
    """
    try:
        from CTFMLib.labels import load_labels
    except ImportError:
        load_labels = None
    mapping = {str(v): n for v, n in names.items()}
    if load_labels is None:
        return [SegmentLabel(int(v), n) for v, n in sorted(names.items())]
    try:
        infos = {int(i.value): i for i in load_labels(mapping)}
    except (OSError, ValueError, TypeError, KeyError):  # names it cannot describe still make segments
        return [SegmentLabel(int(v), n) for v, n in sorted(names.items())]
    if model == FOLDER and path_is_set(modelFolder) and (Path(modelFolder) / LABELS_NAME).is_file():
        try:
            own = load_labels(Path(modelFolder))
        except (OSError, ValueError, TypeError, KeyError):
            own = []
        for info in own:
            if infos.get(int(info.value)) is not None and infos[int(info.value)].name == info.name:
                infos[int(info.value)] = info
    return [infos[v] for v in sorted(infos)]


def read_output(out: Path, grid, model: str = WHOLE_BODY, modelFolder=None) -> SegmentationOutput:
    """The label map a child wrote, put exactly on the input's ``grid`` (a :class:`CTFMLib.image.Geometry`)."""
    from CTFMLib.image import read_image

    labels = read_image(out)
    if not labels.geometry.same_grid(grid, atol=1e-3):
        raise ImageError(f"the segmentation {Path(out).name} is not on the input volume's voxel grid")
    array = np.asarray(labels.array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.rint(array)):
            raise ImageError(f"the segmentation {Path(out).name} holds non-integer labels")
        array = array.astype(np.uint16 if array.max() > 255 else np.uint8)
    names = read_sidecar(out)
    if names is None:
        names = model_label_names(model, modelFolder) or {}
    present = {int(v) for v in np.unique(array)} - {0}
    names = {v: names.get(v, f"label {v}") for v in sorted(present | set(names))}
    labels = Image.from_geometry(array, grid, {"source": "ctfm segment"})
    return SegmentationOutput(labels, describe_labels(names, model, modelFolder))


def failure_message(result, lines, what: str = "Segmentation") -> str:
    """A failed run (of ``what``) in words: its last error line first, then the tail of its output."""
    if result.cancelled:
        return "Cancelled."
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    headline = f"{what} failed (exit code {result.returncode})"
    if errors:
        headline += f": {errors[-1].strip()}"
    tail = lines[-MESSAGE_TAIL_LINES:]
    if errors and tail == [errors[-1]]:
        tail = []  # the headline already says all the child said
    return f"{headline}\n\n" + "\n".join(tail) if tail else headline


_OUT_OF_MEMORY = re.compile(r"out of memory|outofmemoryerror|needs about [\d.]+ gb of memory", re.IGNORECASE)


def is_out_of_memory(text: str) -> bool:
    """Whether a child's log reports running out of memory (GPU or host), or a run refused for its memory need."""
    return bool(_OUT_OF_MEMORY.search(text or ""))


def format_duration(seconds: float) -> str:
    """A rough human duration: "about 40 s", "about 3 min", "about 1.5 h"."""
    return f"about {short_duration(seconds)}"
