"""The hub's Saliency section: ``ctfm saliency`` in a child process, and reading back its heatmap.

What a map explains (``target``): ``embedding`` (the whole-volume embedding of an
encoder), ``point`` (the embedding of the patch around a point), ``class`` (one
structure of a segmentation model) or ``triage`` (a triage model's logit). ``method``:
``occlusion`` (masking blocks, model-agnostic, slower) or ``gradient``. The map may be
limited to a region: a cube of N mm around the point or an LPS box (a markups ROI).

The child writes ``heat.nii.gz`` (float32 in [0, 1] on the input's voxel grid, 0
outside the region) and ``heat.json`` (``target``, ``method``, ``region``, ``peak_lps``,
``seconds``, ...) and, with ``--json``, prints that JSON as its last stdout line;
:func:`read_heatmap` reads both before the temporary folder goes. Points and boxes are LPS here (the
caller converts from RAS). No Qt, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .jobs import start_volume_command
from .process import ProcessRunner, coordinates, last_json_object

TARGETS = ("embedding", "point", "class", "triage")
METHODS = ("occlusion", "gradient")
REGIONS = ("whole", "cube", "roi")
POINT_SOURCES = ("markup", "crosshair")
HEAT_NAME = "heat.nii.gz"
DEFAULT_SEGMENTATION_MODEL = "whole-body"  # the class target's default: `ctfm segment --model whole-body`
MIN_CUBE_MM, MAX_CUBE_MM = 8.0, 500.0


def sidecar_of(heat_path) -> Path:
    """``heat.json`` next to ``heat.nii.gz`` (the saliency command's description of its map)."""
    heat_path = Path(heat_path)
    name = heat_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.lower().endswith(suffix):
            return heat_path.with_name(name[: -len(suffix)] + ".json")
    return heat_path.with_suffix(".json")


def target_argument(target: str, point_lps=None, class_name: Optional[str] = None) -> str:
    """The ``--target`` value: ``embedding``, ``point:X,Y,Z`` (LPS mm), ``class:NAME`` or ``triage``."""
    if target not in TARGETS:
        raise ValueError(f"unknown saliency target '{target}'; choose one of {', '.join(TARGETS)}")
    if target == "point":
        if point_lps is None:
            raise ValueError("the point target needs a point: place a markup point (or move the crosshair)")
        return "point:" + coordinates(np.asarray(point_lps, dtype=np.float64).reshape(3))
    if target == "class":
        name = (class_name or "").strip()
        if not name:
            raise ValueError("the class target needs a class name (a structure of the segmentation model, e.g. liver)")
        return f"class:{name}"
    return target


def saliency_arguments(
    image,
    out,
    target: str = "embedding",
    method: str = "occlusion",
    weights: Optional[str] = None,
    point_lps=None,
    class_name: Optional[str] = None,
    triage_model=None,
    region_lps=None,
    cube_mm: Optional[float] = None,
    center_lps=None,
    device: str = "auto",
) -> list:
    """``ctfm`` arguments (after ``--progress json``) for one saliency map.

    ``weights``: the encoder (targets embedding, point) or the segmentation model
    (class); ``triage_model``: the triage model folder (target triage). ``region_lps``
    ``(min_xyz, max_xyz)`` limits the map to a box, ``cube_mm`` to a cube around the
    target's point (target point) or around ``center_lps`` (the other targets).
    Values that may start with "-" are written as ``--option=value`` so that argparse
    does not take them for options.
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
    args = ["saliency", str(image), f"--target={target_argument(target, point_lps, class_name)}", "--method", method]
    if target == "triage":
        if not triage_model:
            raise ValueError("the triage target needs a triage model folder (what CT-FM Train's classify task wrote)")
        args += ["--model", str(triage_model)]
    else:
        if not (weights or "").strip():
            raise ValueError("no model given: the encoder (embedding, point) or the segmentation model (class)")
        args += ["--weights", str(weights).strip()]
    if region_lps is not None and cube_mm is not None:
        raise ValueError("give either a region box or a cube size, not both")
    if region_lps is not None:
        low, high = (np.asarray(c, dtype=np.float64).reshape(3) for c in region_lps)
        if np.any(high <= low):
            raise ValueError(f"the region box {low.tolist()} .. {high.tolist()} is empty")
        args.append("--roi=" + coordinates(np.concatenate([low, high])))
    elif cube_mm is not None:
        if not MIN_CUBE_MM <= float(cube_mm) <= MAX_CUBE_MM:
            raise ValueError(f"the cube edge must be {MIN_CUBE_MM:g} to {MAX_CUBE_MM:g} mm, got {cube_mm}")
        args += ["--cube", repr(float(cube_mm))]
        if target != "point":  # the point target's cube is centred on its point
            if center_lps is None:
                raise ValueError("a cube needs its centre: place a markup point (or use the crosshair)")
            args.append("--center=" + coordinates(np.asarray(center_lps, dtype=np.float64).reshape(3)))
    if center_lps is not None and (cube_mm is None or target == "point"):
        raise ValueError("a centre applies only to the cube of the embedding, class and triage targets")
    args += ["--device", device, "--out", str(out), "--json"]  # the result: one JSON object, the last stdout line
    return args


def read_json_file(path) -> Optional[dict]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class HeatmapOutput:
    """A saliency map read back from the child: the map, its description, where it peaks."""

    heatmap: object  # CTFMLib.image.Image, float32 in [0, 1] on the input's grid
    info: dict = field(default_factory=dict)  # heat.json (or the CLI's result line)
    peak_lps: Optional[np.ndarray] = None  # LPS mm; None: the map's maximum (placed on the input's grid when shown)
    seconds: float = 0.0


def read_heatmap(heat_path, info: Optional[dict] = None) -> HeatmapOutput:
    """Read ``heat.nii.gz`` and its description (``heat.json``, else ``info``).

    The peak is the description's ``peak_lps``; None when it has none (``ctfm triage
    --saliency`` writes no description), and the map's maximum stands in when it is shown.
    Raises ``ValueError`` (``ImageError``) for a map outside [0, 1] or not finite.
    """
    from CTFMLib.image import ImageError, read_image

    heat = read_image(heat_path)
    values = np.asarray(heat.array, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ImageError(f"{Path(heat_path).name} holds NaN or infinite values")
    if values.size and (values.min() < -1e-6 or values.max() > 1.0 + 1e-6):
        raise ImageError(f"{Path(heat_path).name} is not a saliency map in [0, 1] "
                         f"(values {values.min():.3g} to {values.max():.3g})")
    heat = heat.with_array(values)
    described = read_json_file(sidecar_of(heat_path)) or dict(info or {})
    peak = described.get("peak_lps")
    try:
        peak = np.asarray(peak, dtype=np.float64).reshape(3) if peak is not None else None
    except (TypeError, ValueError):
        peak = None
    if peak is not None and not np.all(np.isfinite(peak)):
        peak = None
    return HeatmapOutput(heat, described, peak, float(described.get("seconds") or 0.0))


def target_label(target: str, class_name: Optional[str] = None) -> str:
    """A few words naming a target, for node names ("class liver")."""
    return f"class {class_name.strip()}" if target == "class" and class_name else target


def start_saliency(volumeNode, on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None,
                   **request) -> ProcessRunner:
    """Compute a saliency map of ``volumeNode`` in a child process; returns its runner.

    ``request`` holds :func:`saliency_arguments`' keywords (``target``, ``method``,
    ``weights``, ``point_lps``, ...). ``on_done(output_or_None, message)``: a
    :class:`HeatmapOutput` on success; None and the child's error, or "Cancelled.".
    The temporary folder (input and map) is removed once the map is read.
    """
    def read(work, stdout, result):
        output = read_heatmap(work / HEAT_NAME, last_json_object(stdout))
        return output, f"Saliency map computed in {result.seconds:.1f} s."

    return start_volume_command(volumeNode, "ctfm-saliency-", lambda work, source: saliency_arguments(
        source, work / HEAT_NAME, **request), read, "The saliency map", on_progress, on_done)
