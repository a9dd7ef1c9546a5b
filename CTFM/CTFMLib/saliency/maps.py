"""The saliency pipeline behind :func:`saliency_image`: checking the request, building the target's
problem (:mod:`CTFMLib.saliency.targets`), running the method on it (:mod:`CTFMLib.saliency.methods`)
in the asked precision, mapping the heat onto the input's voxel grid, and writing it with its JSON sidecar;
plus the command line's parsers. What each target and method explains: :mod:`CTFMLib.saliency`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..costs import duration
from ..image import Geometry, Image, ImageError
from ..progress import null_progress, subrange
from ..text import GRID_AXES, count, size
from . import targets
from .budget import check_memory
from .methods import input_gradients_only, integrated_gradients, occlusion
from .targets import EMBEDDING_SPACING, index_box

TARGETS = ("embedding", "point", "class", "triage")
METHODS = ("occlusion", "gradient")
MASK_SIZE = 10  # voxels; upstream's OcclusionSensitivity settings follow
TRIAGE_MASK = (4, 10, 10)  # voxels of the 5 x 2 x 2 mm triage grid: a 20 mm cube (10 would be 50 mm along S)
OVERLAP = 0.25
OCCLUSION_BATCH = 12
GRADIENT_STEPS = 4  # forward+backward passes; occlusion needs one forward per cube (hundreds)


@dataclass
class SaliencyResult:
    """A heatmap and what it explains.

    ``heatmap``: float32 in [0, 1] on the input voxel grid, 0 outside the region. ``region``:
    ``(min_lps, max_lps)`` or None. ``peak_lps``: the hottest voxel's centre (None when the map
    is all 0). ``scale``: the raw heat (similarity or probability drop; attribution) that 1.0
    stands for. ``model_heat``: the raw heat on the network's input grid before clipping and
    normalising. ``details``: what ran (grid, windows or steps, settings).
    """

    heatmap: Image
    target: str
    method: str
    region: Optional[tuple]
    peak_lps: Optional[np.ndarray]
    seconds: float
    notes: list = field(default_factory=list)
    scale: float = 0.0
    model_heat: Optional[np.ndarray] = None
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready: target, method, region, peak_lps, seconds, scale, notes, details."""
        region = None if self.region is None else {"min_lps": [float(v) for v in self.region[0]],
                                                   "max_lps": [float(v) for v in self.region[1]]}
        return {"target": self.target, "method": self.method, "region": region,
                "peak_lps": None if self.peak_lps is None else [round(float(v), 3) for v in self.peak_lps],
                "seconds": round(self.seconds, 3), "scale": self.scale, "notes": list(self.notes),
                "details": self.details}


# --- regions ------------------------------------------------------------------------------------


def _region(region_lps, cube_mm, point_lps) -> Optional[tuple]:
    """``(min_lps, max_lps)`` float arrays, or None."""
    if region_lps is not None and cube_mm is not None:
        raise ValueError("give either a region box or a cube size, not both")
    if cube_mm is not None:
        if point_lps is None:
            raise ValueError("a cube region needs its centre: give a point (point_lps)")
        if not float(cube_mm) > 0:
            raise ValueError(f"the cube edge must be positive (mm), not {cube_mm}")
        centre = np.asarray(point_lps, dtype=np.float64).reshape(3)
        return centre - float(cube_mm) / 2.0, centre + float(cube_mm) / 2.0
    if region_lps is None:
        return None
    a, b = (np.asarray(c, dtype=np.float64).reshape(3) for c in region_lps)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if np.any(hi <= lo):
        raise ValueError(f"the region box {lo.tolist()}..{hi.tolist()} mm is empty along some axis")
    return lo, hi


def _inside_region(geometry: Geometry, region) -> np.ndarray:
    """Boolean mask of the voxels whose centre lies in the LPS box (computed a few slices at a time)."""
    lo, hi = region
    mask = np.zeros(geometry.shape, dtype=bool)
    start, end = index_box(geometry, region, 1)
    if np.any(end <= start):
        return mask
    axes = [np.arange(s, e, dtype=np.float64) for s, e in zip(start, end)]
    m = geometry.direction * geometry.spacing[None, :]  # column a: LPS step of index axis a
    for k0 in range(0, len(axes[2]), 16):
        k = axes[2][k0:k0 + 16]
        inside = np.ones((len(axes[0]), len(axes[1]), len(k)), dtype=bool)
        for c in range(3):
            v = (geometry.origin[c] + m[c, 0] * axes[0][:, None, None] + m[c, 1] * axes[1][None, :, None]
                 + m[c, 2] * k[None, None, :])
            inside &= (v >= lo[c] - 1e-6) & (v <= hi[c] + 1e-6)
        mask[start[0]:end[0], start[1]:end[1], start[2] + k0:start[2] + k0 + len(k)] = inside
    return mask


# --- the pipeline -------------------------------------------------------------------------------


def saliency_image(image: Image, weights=None, target: str = "embedding", method: str = "occlusion",
                   point_lps=None, class_name: Optional[str] = None, triage_model=None, region_lps=None,
                   cube_mm: Optional[float] = None, mask_size=None, overlap: float = OVERLAP,
                   batch_size: Optional[int] = None, device: str = "auto", progress=None, spacing="auto",
                   steps: int = GRADIENT_STEPS, occlusion_mode="gaussian", blend: str = "outputs",
                   labels: Optional[dict] = None, max_memory_gb: Optional[float] = None,
                   precision: str = "fp32") -> SaliencyResult:
    """A saliency heatmap of ``image`` (a CT in HU) for ``target`` by ``method`` (module docstring).

    ``weights``: the encoder (embedding, point: model id, folder or file, default
    ``ct_fm_feature_extractor``) or segmentation model (class: default ``whole-body``), or a loaded
    network (with ``labels`` ``{value: name}`` for a segmentation network). ``triage_model``: a
    folder or ``(TriageModel, config)``. ``point_lps``: the point target's centre, and the centre
    of a ``cube_mm`` region. ``region_lps``: ``(min_xyz, max_xyz)`` LPS mm. ``spacing``: "auto"
    (embedding 3 mm, class native), None (native) or three mm (SPL) for embedding and class.
    ``mask_size``: occlusion cube edge in voxels (one or three; default 10, triage (4, 10, 10)).
    ``batch_size``: occluded copies per forward pass (default 12) or gradient steps per pass
    (default 1). ``progress(fraction, message)`` may raise :class:`CTFMLib.progress.Cancelled`.
    ``max_memory_gb``: refuse (:class:`~CTFMLib.saliency.budget.SaliencyMemoryError`, naming cheaper settings)
    before the run when its estimated peak is higher (default: 85% of the memory available).
    ``precision``: fp32 (default), bf16 (the forward passes under bf16 autocast) or auto
    (:func:`CTFMLib.runtime.resolve_precision` on the chosen device); ``details["precision"]`` says which ran.
    """
    from ..runtime import Runner, RunOptions, resolve_precision, select_device

    t0 = time.perf_counter()
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if not (isinstance(spacing, str) and spacing == "auto") and target in ("point", "triage"):
        raise ValueError(f"the {target} target has a fixed grid; spacing applies to embedding and class only")
    progress = progress or null_progress
    if mask_size is None:
        mask_size = TRIAGE_MASK if target == "triage" else MASK_SIZE
    region = _region(region_lps, cube_mm, point_lps)
    if region is not None and not _inside_region(image.geometry, region).any():
        raise ImageError(f"the region {np.round(region[0], 1).tolist()}..{np.round(region[1], 1).tolist()} mm "
                         "(LPS) holds no voxel of the image")
    dev = select_device(device, progress)
    precision = resolve_precision(precision, dev)
    progress(0.0, f"preparing the {target} target")
    with contextlib.ExitStack() as stack:
        # eval mode and no parameter gradients from the moment a network is loaded; restored at the end. The
        # Runner places it and holds the precision: the targets run the network under its autocast.
        def hold(model):
            stack.enter_context(input_gradients_only(model))
            return Runner(model, RunOptions(device=str(dev), precision=precision))

        problem, raw, details, box, notes = _run(target, method, image, weights, point_lps, class_name, labels,
                                                 spacing, region, triage_model, dev, hold, mask_size, overlap,
                                                 occlusion_mode, blend, batch_size, steps, progress, max_memory_gb,
                                                 precision)
    progress(0.95, "mapping the heatmap onto the input grid")
    heat = problem.to_input(np.clip(raw, 0.0, None).astype(np.float32))
    if region is not None:
        heat[~_inside_region(image.geometry, region)] = 0.0
    scale = float(heat.max()) if heat.size else 0.0
    if scale > 0:
        heat /= scale
        peak = image.index_to_physical(np.unravel_index(int(np.argmax(heat)), heat.shape))
    else:
        peak = None
        notes.append("the output did not drop anywhere: the heatmap is all 0")
    details = {**details, "grid": list(problem.x.shape[1:]),
               "grid_spacing_mm": [float(s) for s in problem.geometry.spacing],
               "box_start": [int(v) for v in box[0]], "box_end": [int(v) for v in box[1]], "device": str(dev),
               "precision": precision}
    seconds = time.perf_counter() - t0
    progress(1.0, f"done in {seconds:.1f} s")
    heatmap = Image.from_geometry(heat.astype(np.float32, copy=False), image.geometry,
                                  {"saliency_target": target, "saliency_method": method})
    return SaliencyResult(heatmap, target, method, region, peak, seconds, notes, scale, raw, details)


def _run(target, method, image, weights, point_lps, class_name, labels, spacing, region, triage_model, dev, hold,
         mask_size, overlap, occlusion_mode, blend, batch_size, steps, progress, max_memory_gb=None,
         precision="fp32") -> tuple:
    """Build the target's problem and run the method on it: ``(problem, raw heat, details, box, notes)``."""
    if target == "embedding":
        problem = targets.embedding_problem(image, weights, spacing, dev, hold)
    elif target == "point":
        problem = targets.point_problem(image, weights, point_lps, dev, hold)
    elif target == "class":
        problem = targets.class_problem(image, weights, class_name, labels, spacing, region, dev, hold)
    else:
        problem = targets.triage_problem(image, triage_model, dev, hold)
    shape = tuple(problem.x.shape[1:])
    box = (np.zeros(3, int), np.asarray(shape)) if problem.limit is None else tuple(map(np.asarray, problem.limit))
    if region is not None:
        lo, hi = index_box(problem.geometry, region, 1)
        box = (np.maximum(box[0], lo), np.minimum(box[1], hi))
        if np.any(box[1] <= box[0]):
            raise ImageError("the region does not overlap the part of the image the target looks at")
    notes = list(problem.notes)
    from ..segment import default_memory_budget_gb

    batch = batch_size or (OCCLUSION_BATCH if method == "occlusion" else 1)
    budget = default_memory_budget_gb() if max_memory_gb is None else float(max_memory_gb)
    needed = check_memory(problem.model, tuple(problem.x.shape), method, min(batch, steps) if method == "gradient"
                          else batch, target, budget, region is not None)
    notes.append("peak memory not estimated (the network could not be probed)" if needed is None
                 else f"estimated peak memory {needed / 2**30:.1f} GB")
    expected = _expect(method, problem, box, mask_size, overlap, steps, progress, precision)
    work = subrange(progress, 0.1, 0.95)
    if method == "occlusion":
        work(0.0, "occluding")
        raw, details = occlusion(problem.forward, problem.x, problem.score, (box[0], box[1]), mask_size, overlap,
                                 occlusion_mode, blend, batch_size or OCCLUSION_BATCH, work)
        notes.append(f"occlusion: {details['windows']} of {details['windows_whole_grid']} cubes of "
                     f"{'x'.join(map(str, details['mask_voxels']))} voxels, overlap {overlap:g}, "
                     f"{occlusion_mode} occlusion, {blend} blended")
    else:
        work(0.0, "integrating gradients")
        attributions, details = integrated_gradients(problem.objective, problem.x, steps, batch_size or 1,
                                                     0.0, work)
        raw = np.zeros(shape)
        inside = tuple(slice(int(s), int(e)) for s, e in zip(*box))
        raw[inside] = attributions.sum(axis=0)[inside]  # a voxel's channels (HU windows) together
        notes.append(f"integrated gradients: {steps} steps from 0 (-1024 HU; each HU window's 0 for triage)")
    details["expected_seconds"] = round(expected, 1)
    return problem, raw, details, box, notes


# Occlusion expected to take longer than this (and 4x longer than gradients) is announced with the cheaper way.
OCCLUSION_WARN_SECONDS = 120


def _expect(method, problem, box, mask_size, overlap, steps, progress, precision="fp32") -> float:
    """Announce (:class:`~CTFMLib.progress.Estimate`) how long the method will take on this computer
    (:mod:`CTFMLib.costs`), naming gradients when occlusion is slow; returns the seconds."""
    from ..costs import network_seconds, rate
    from ..progress import Estimate
    from .methods import occlusion_grid

    shape = tuple(problem.x.shape[1:])
    voxels = float(np.prod(shape))
    device = problem.x.device
    try:
        from ..costs import flops_per_voxel

        flops = flops_per_voxel(problem.model, int(problem.x.shape[0]), shape)
    except Exception:  # noqa: BLE001 - a network the meta device cannot run: count it as the encoder
        flops = None
    say = lambda m: progress(None, m)  # noqa: E731
    forward = rate("forward", device, precision, announce=say)
    # gradient passes against forward passes, as measured on the encoder here (or the generic ratio)
    gradient = rate("input_gradient", device, precision, measure_now=method == "gradient", announce=say)
    if not gradient.measured:
        from ..costs import GENERIC

        gradient = type(gradient)("input_gradient", forward.seconds_per_mvoxel * GENERIC["input_gradient"]
                                  / GENERIC["forward"], False)
    gradient_seconds = steps * network_seconds(gradient, voxels, flops=flops)
    if method == "gradient":
        progress(None, Estimate(gradient_seconds, f"{count(steps, 'gradient step')} on "
                                f"{size(shape, GRID_AXES)}, {device.type}, {precision}"))
        return gradient_seconds
    cubes = len(occlusion_grid(shape, mask_size, overlap).windows(box))
    seconds = (cubes + 1) * network_seconds(forward, voxels, flops=flops)
    detail = f"{count(cubes, 'occluded cube')} on {size(shape, GRID_AXES)}, {device.type}, {precision}"
    if seconds > OCCLUSION_WARN_SECONDS and seconds > 4 * gradient_seconds:
        detail += (f"; --method gradient takes about {duration(gradient_seconds)}, or give a smaller --roi or "
                   "--cube")
    progress(None, Estimate(seconds, detail))
    return seconds


# --- the command line's pieces ------------------------------------------------------------------


def parse_target(text: str) -> tuple:
    """``embedding``, ``point:X,Y,Z``, ``class:NAME`` or ``triage`` -> ``(target, point or None, class or None)``."""
    name, _, arg = str(text).strip().partition(":")
    name = name.strip().lower()
    usage = "use embedding, point:X,Y,Z (mm), class:NAME or triage"
    if name not in TARGETS:
        raise ValueError(f"unknown saliency target {text!r}: {usage}")
    if name in ("embedding", "triage"):
        if arg.strip():
            raise ValueError(f"the {name} target takes no argument, got {text!r}: {usage}")
        return name, None, None
    if name == "class":
        if not arg.strip():
            raise ValueError(f"class needs a class name, e.g. class:liver, got {text!r}")
        return name, None, arg.strip()
    try:
        values = [float(v) for v in arg.replace(";", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise ValueError(f"point needs three numbers in mm, e.g. point:10,-20,35.5, got {text!r}")
    return name, np.asarray(values), None


def parse_box(text: str) -> tuple:
    """``X0,Y0,Z0,X1,Y1,Z1`` (mm) -> ``(corner, opposite corner)`` arrays."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or not np.all(np.isfinite(values)):
        raise ValueError(f"a region is six numbers X0,Y0,Z0,X1,Y1,Z1 in mm (two opposite corners), not {text!r}")
    return np.asarray(values[:3]), np.asarray(values[3:])


def sidecar_json(out) -> Path:
    """``heat.json`` next to ``heat.nii.gz`` (``.nii``, ``.nrrd``, ``.mha``, ``.dcm`` likewise)."""
    out = Path(out)
    name = out.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if name.lower().endswith(suffix):
            return out.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"cannot write a heatmap to {out.name}: use .nii.gz, .nii, .nrrd, .mha or .dcm (DICOM input)")


def write_saliency(result: SaliencyResult, out, extra: Optional[dict] = None, overwrite: bool = True,
                   dicom_series=None, series_uid: Optional[str] = None, target_text: Optional[str] = None) -> dict:
    """Write the heatmap and its JSON sidecar (:func:`sidecar_json`) together; returns the JSON written.

    Both go through :func:`CTFMLib.files.atomic_outputs`: a failure leaves neither (and no JSON
    describing a missing heatmap). A heatmap with NaN or infinite values, or a non-finite scale,
    is refused: it means broken weights, and a map of NaN must not look like a result.
    ``out`` ending in ``.dcm`` writes a DICOM Parametric Map (:mod:`CTFMLib.dicom_pmap`) referencing
    ``dicom_series``, the series folder the map was computed on (``series_uid`` picks one of several);
    ``target_text`` (default: the target's kind) is what its description says was explained.
    """
    from ..files import atomic_outputs
    from ..image import write_image

    out = Path(out)
    summary = {**result.summary(), **(extra or {}), "heatmap": str(out)}
    heat = np.asarray(result.heatmap.array)
    scale = summary.get("scale")
    if not np.isfinite(heat).all() or (scale is not None and not np.isfinite(float(scale))):
        raise ValueError("the saliency map holds NaN or infinite values: the weights or the image are broken; "
                         "nothing was written")
    pmap = None
    if out.name.lower().endswith(".dcm"):
        if dicom_series is None or not Path(dicom_series).is_dir():
            raise ValueError(f"{out.name}: a DICOM Parametric Map references the DICOM series the map was computed "
                             "on; give the CT as a DICOM series folder, or write .nii.gz")
        from ..dicom_pmap import parametric_map

        # Built (and every refusal made) before any file exists.
        pmap = parametric_map(result.heatmap, dicom_series, description="CT-FM saliency",
                              target=target_text or result.target, method=result.method, series_uid=series_uid)
    with atomic_outputs([out, sidecar_json(out)], overwrite=overwrite) as (heatmap, sidecar):
        if pmap is not None:
            pmap.save_as(str(heatmap), enforce_file_format=True)
        else:
            write_image(result.heatmap, heatmap)
        sidecar.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


__all__ = ["saliency_image", "SaliencyResult", "TARGETS", "METHODS", "MASK_SIZE", "TRIAGE_MASK", "OVERLAP",
           "OCCLUSION_BATCH", "GRADIENT_STEPS", "EMBEDDING_SPACING", "parse_target", "parse_box", "sidecar_json",
           "write_saliency"]
