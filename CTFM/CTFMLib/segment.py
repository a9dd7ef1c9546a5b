"""Whole-body and tumour segmentation: the model card's labels in bounded memory.

The published whole-body model is run upstream as::

    preprocess (SPL, HU -1024..2048 -> 0..1, CropForeground)
    SlidingWindowInferer(roi_size=(96, 160, 160), overlap=0.625, mode="gaussian")
    softmax, argmax, Invert back to the input

:func:`segment_image` does the same: :func:`CTFMLib.preprocess.preprocess`,
:func:`CTFMLib.sliding_window.stitch` (MONAI's windows and weights, streamed
along the first axis so memory does not grow with classes x volume), argmax,
and :meth:`Preprocessed.to_input` onto the input voxel grid. Softmax is
monotonic per voxel, so the argmax of the blended logits is the card's
softmax + argmax and softmax is never computed.

For a SegResNetDS, whose logits are a 1x1x1 convolution (a linear map plus
bias) of its last decoder features, the windows' *features* are blended
instead of their logits and the head is applied once per voxel when a row is
finished: ``sum w (A f + b) / sum w == A (sum w f / sum w) + b``. The same
labels up to float rounding, with 32 blended channels instead of 118.

Beyond the card (:mod:`CTFMLib.segment_plan` plans it, without torch): by default the input is
resampled to the spacing the model was trained at (``spacing="model"``; ``"native"`` is the
card, literally), the blended evidence is brought back to the input's own voxels by linear
interpolation before the argmax (:class:`CTFMLib.native_labels.NativeLabels`, as nnU-Net and
MONAI's ``Invertd`` on probabilities do; ``interpolation="nearest"`` maps labels instead), the
window overlap follows ``quality`` (full: the card's 0.625), and all-air windows are computed once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .image import Image
from .native_labels import NativeLabels
from .networks import SegResNetDS
from .preprocess import PreprocessConfig, preprocess
from .progress import null_progress, subrange
from .runtime import Runner, RunOptions, run_options
from .segment_plan import (
    DEFAULT_QUALITY,
    QUALITIES,
    ROI,
    SIGMA_SCALE,
    SegmentationPlan,
    Timings,
    model_facts,
    plan_segmentation,
)
from .sliding_window import plan_windows, stitch
from .streaming import StreamedFeatures
from .text import count

OVERLAP = QUALITIES["full"][0]  # the model card's
WHOLE_BODY_ID = "whole_body_segmentation"
MODEL_ALIASES = {"whole-body": WHOLE_BODY_ID, "whole_body": WHOLE_BODY_ID, "wholebody": WHOLE_BODY_ID}
MEMORY_FRACTION = 0.85  # of the memory available when no budget is given


class SegmentationError(RuntimeError):
    """Segmentation cannot run as asked (out of memory, over budget); the message says what to change."""


class MemoryBudgetError(SegmentationError):
    """The estimated peak memory is above the allowed budget."""


@dataclass
class SegmentationResult:
    labels: Image  # on the input voxel grid; uint8 (uint16 with 256 classes or more)
    label_info: list  # CTFMLib.labels.LabelInfo of the structures kept
    seconds: float
    notes: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # windows_total/run/skipped, working grid, quality, ...


# --- what the windows compute ----------------------------------------------------------------


def output_channels(model: nn.Module) -> int:
    channels = getattr(model, "out_channels", None)
    if not channels:
        raise ValueError("the model must say how many classes it outputs (an out_channels attribute)")
    return int(channels)


def _window_model(model: nn.Module, precision: str = "fp32"):
    """``(module to run on windows, channels it returns, head applied to finished rows or None)``.

    A SegResNetDS runs as :class:`CTFMLib.streaming.StreamedFeatures` (slab by slab, in the
    compute dtype) up to its last head, which is linear: blending its 32 input channels and
    applying it once per voxel gives the blended logits of its 118 outputs.
    """
    if isinstance(model, SegResNetDS):
        head = model.up_layers[-1]["head"]
        if isinstance(head, nn.Conv3d) and head.in_channels < model.out_channels:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            # channels-last in place first (as Runner would), so float32 weights are shared, not copied
            model.eval().to(memory_format=torch.channels_last_3d)
            return StreamedFeatures(model, dtype), head.in_channels, head
    return model, output_channels(model), None


def _mm(spacing) -> str:
    """``3 mm`` for an isotropic spacing, else ``3x1x1 mm``."""
    values = [f"{float(v):g}" for v in spacing]
    return f"{values[0]} mm" if len(set(values)) == 1 else f"{'x'.join(values)} mm"


def _first(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def _argmax_of(head, device, dtype):
    """Reducer: blended rows ``(n, H, W, C)`` -> labels, through ``head`` (1x1x1 conv, in fp32) for blended features."""
    if head is not None:
        weight = head.weight.detach().reshape(head.out_channels, head.in_channels).t()
        bias = head.bias.detach() if head.bias is not None else None

    def reduce(rows: torch.Tensor) -> np.ndarray:
        if head is not None:
            flat = rows.to(device).reshape(-1, rows.shape[-1])
            logits = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return logits.argmax(dim=-1).reshape(rows.shape[:-1]).cpu().numpy().astype(dtype, copy=False)
        return rows.argmax(dim=-1).cpu().numpy().astype(dtype, copy=False)

    return reduce


# --- estimates ------------------------------------------------------------------------------------


def plan_for(image: Image, model: nn.Module, options: RunOptions, quality: str = DEFAULT_QUALITY, spacing="model",
             roi=None, interpolation: str = "linear", foreground: bool = True,
             timings: Optional[Timings] = None, progress=None) -> SegmentationPlan:
    """:func:`CTFMLib.segment_plan.plan_segmentation` for a loaded ``model`` and resolved run options.

    With ``progress``, a computer that has run no segmentation yet first measures its speed
    (:func:`CTFMLib.costs.rate`, announced to ``progress``), so that the plan's time is its own."""
    filters = getattr(getattr(model, "encoder", None), "init_filters", None)
    threads = int(options.threads or torch.get_num_threads())
    if progress is not None:
        device = torch.device(options.device)
        if (timings or Timings()).seconds_per_window(device.type, options.precision, threads) is None:
            from .costs import rate

            rate("forward", device, options.precision, threads, announce=lambda m: progress(None, m))
    return plan_segmentation(
        image, quality=quality, spacing=spacing, model_spacing=getattr(model, "ctfm_spacing", None),
        roi=tuple(roi or getattr(model, "ctfm_window", None) or ROI), classes=output_channels(model), filters=filters,
        parameters=sum(p.numel() for p in model.parameters()), device=str(torch.device(options.device)),
        precision=options.precision, threads=threads, batch_size=options.batch_size, interpolation=interpolation,
        foreground=foreground, timings=timings)


def estimate_seconds(image: Image, fast: bool = False, device="auto", precision="auto", roi=ROI,
                     model: Optional[nn.Module] = None, threads: Optional[int] = None, quality: Optional[str] = None,
                     spacing="native", timings: Optional[Timings] = None) -> float:
    """Expected seconds without reading the voxels (every window of the grid counted: an upper bound).

    ``fast`` is ``quality="fast"``; the default is the model card (full quality, native spacing).
    CPU costs scale with 2 / threads; a SegResNetDS ``model`` of another width with (init_filters / 32)^2.
    """
    options = run_options(device, precision, threads)
    quality = "fast" if fast else (quality or "full")
    filters = getattr(getattr(model, "encoder", None), "init_filters", None) if model is not None else None
    plan = plan_segmentation(image, quality=quality, spacing="model" if quality == "fast" else spacing,
                             model_spacing=getattr(model, "ctfm_spacing", None), roi=roi,
                             filters=filters or 32, device=str(torch.device(options.device)),
                             precision=options.precision, threads=int(threads or torch.get_num_threads()),
                             interpolation="nearest", foreground=False, timings=timings)
    return plan.expected_seconds


def default_memory_budget_gb() -> float:
    """A fraction of the memory this process could use: what is available now plus what it holds
    (the estimate counts the image and the model it already holds). psutil when installed, else the
    OS's free pages."""
    try:
        import psutil

        available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    except ImportError:
        try:
            import os

            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return float("inf")
    return MEMORY_FRACTION * available / 2**30


# --- labels -----------------------------------------------------------------------------------------


def model_source(name: str) -> str:
    """``whole-body`` -> the catalogue id; anything else (folder, catalogue or Hugging Face id) unchanged."""
    return MODEL_ALIASES.get(str(name).strip().lower(), str(name))


def load_segmentation_model(source, progress=None):
    """``(network, labels)`` of a model folder, catalogue id, Hugging Face id or ``whole-body``."""
    from .labels import labels_for_model
    from .model_store import sha256_file, weights_file_of
    from .weights import load_model

    model, info = load_model(model_source(source), expect="SegResNetDS", progress=progress)
    window = training_window(info.config)
    if window is not None:
        model.ctfm_window = window  # segment_image's default window for this network
    # The spacing it was trained at (its config, else the catalogue): what spacing="model" resamples to.
    model.ctfm_spacing = model_facts(info.config, info.entry)["spacing"]
    # The weights' sha256, which a DICOM SEG or SR names as the algorithm's identity: the published one where
    # known, else that of the file loaded (a model trained here has no published digest).
    model.ctfm_sha256 = info.sha256 or sha256_file(weights_file_of(info.path))
    return model, labels_for_model(info)


def training_window(config: dict) -> Optional[tuple]:
    """The crop size a fine-tuned model was trained on (``_training.crop_size`` in its config.json), which
    is also its sliding window, as upstream infers with the training patch size; ``None`` if not recorded."""
    size = (config.get("_training") or {}).get("crop_size") if isinstance(config, dict) else None
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size):
        return tuple(size)
    return None


def _label_list(labels, classes: int) -> list:
    from .labels import LabelInfo, load_labels

    if labels is None:
        labels = {}
    if isinstance(labels, dict):
        labels = load_labels({str(k): v for k, v in labels.items()})
    labels = list(labels)
    if not all(isinstance(x, LabelInfo) for x in labels):
        raise ValueError("labels must be a {value: name} dict or a list of LabelInfo")
    too_big = [x.name for x in labels if x.value >= classes]
    if too_big:
        raise ValueError(f"the model outputs {classes} classes (0..{classes - 1}); labels {too_big} are beyond that")
    named = {x.value for x in labels}
    missing = {str(v): f"label_{v}" for v in range(1, classes) if v not in named}
    if missing:  # a channel without a name still gets a segment, never silently dropped
        labels += load_labels(missing)
    return sorted(labels, key=lambda x: x.value)


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def select_structures(labels: list, structures: Optional[Sequence[str]]) -> list:
    """The labels named in ``structures`` (case, spaces and dashes ignored); all when None."""
    if structures is None:
        return list(labels)
    if isinstance(structures, str):
        structures = [s for s in structures.split(",") if s.strip()]
    by_name = {}
    for x in labels:
        by_name.setdefault(_normalise(x.name), x)
        by_name.setdefault(_normalise(x.display_name), x)
    unknown = [s for s in structures if _normalise(s) not in by_name]
    if unknown:
        import difflib

        names = {_normalise(x.name): x.name for x in labels}

        def named(s):
            close = difflib.get_close_matches(_normalise(s), list(names), n=1, cutoff=0.6)
            return f"{s!r} (did you mean {names[close[0]]}?)" if close else repr(s)

        valid = ", ".join(x.name for x in labels)
        raise ValueError(f"unknown structure{'s' if len(unknown) > 1 else ''} {', '.join(map(named, unknown))}; "
                         f"this model's {len(labels)} structures are: {valid}")
    if not structures:
        raise ValueError("structures is empty: name at least one structure, or pass None for all")
    chosen = {by_name[_normalise(s)].value for s in structures}
    return [x for x in labels if x.value in chosen]


def keep_largest_components(labels: np.ndarray, values: Optional[Sequence[int]] = None) -> np.ndarray:
    """Keep, for each label value, only its largest 26-connected component (in place; returns ``labels``).

    26-connectivity is MONAI's ``KeepLargestConnectedComponent`` default (full connectivity).
    """
    import SimpleITK as sitk

    present = set(np.flatnonzero(np.bincount(labels.ravel())).tolist())  # bincount: no sort of the volume
    values = sorted(int(v) for v in (present if values is None else values) if v != 0 and v in present)
    if not values:
        return labels
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.Execute(sitk.GetImageFromArray(np.ascontiguousarray(labels)))
    for v in values:
        # SimpleITK sees the numpy axes reversed: its bounding box (x, y, z) indexes axes (2, 1, 0).
        x, y, z, sx, sy, sz = stats.GetBoundingBox(v)
        box = (slice(z, z + sz), slice(y, y + sy), slice(x, x + sx))
        mask = labels[box] == v
        components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True),
                                           sortByObjectSize=True)
        largest = sitk.GetArrayViewFromImage(components) == 1
        labels[box][mask & ~largest] = 0
    return labels


# --- the pipeline -------------------------------------------------------------------------------------


def segment_image(
    image: Image,
    weights=None,
    model: Optional[nn.Module] = None,
    labels=None,
    structures: Optional[Sequence[str]] = None,
    fast: bool = False,
    largest_component: bool = False,
    options: Optional[RunOptions] = None,
    progress=None,
    roi: Optional[Sequence[int]] = None,
    max_memory_gb: Optional[float] = None,
    quality: Optional[str] = None,
    spacing="model",
    interpolation: str = "linear",
    plan: Optional[SegmentationPlan] = None,
    **run_kwargs,
) -> SegmentationResult:
    """Segment a CT: labels on its own voxel grid (0 = background).

    ``weights``: a model folder, catalogue or Hugging Face id, or ``whole-body``;
    or pass a loaded ``model`` (and its ``labels``: ``{value: name}`` or LabelInfo
    list; unnamed channels are called ``label_N``). ``structures``: names to keep
    (others become 0). ``quality``: full (the default: the card's overlap 0.625), standard (a
    lower overlap, see :data:`CTFMLib.segment_plan.QUALITIES`) or fast (3 mm; ``fast=True``
    is the same). ``spacing``: ``"model"`` (the spacing the model was trained at, when it records
    one), ``"native"`` (the input's voxels: with ``quality="full"`` the model card, literally) or
    a voxel size in mm (one number, or S, P, L). ``interpolation``: how labels computed on a
    resampled grid come back: ``"linear"`` (the blended evidence is interpolated, then the argmax
    taken on the input's voxels) or ``"nearest"`` (labels). ``run_kwargs`` (device, precision:
    auto|fp32|bf16, threads, channels_last, batch_size) build the run options when ``options``
    is not given. ``max_memory_gb``: refuse (:class:`MemoryBudgetError`) before allocating when
    the estimated peak is higher (default: 85% of available memory). ``roi``: the sliding window;
    by default the crop size a fine-tuned model was trained on (:func:`training_window`), else
    the model card's 96x160x160. ``plan``: :func:`plan_for` already made for these arguments (to show it
    first); made here otherwise. The result's ``stats`` say what ran (windows run and skipped, grid).
    """
    start = time.perf_counter()
    progress = progress or null_progress
    if model is None:
        progress(0.0, "loading the model")
        if weights is None:
            raise ValueError("give weights (whole-body, a model folder or id) or a model")
        model, model_labels = load_segmentation_model(weights, progress)
        labels = model_labels if labels is None else labels
    quality = "fast" if fast else (quality or DEFAULT_QUALITY)
    classes = output_channels(model)
    roi = tuple(roi or getattr(model, "ctfm_window", None) or ROI)
    label_info = _label_list(labels, classes)
    kept = select_structures(label_info, structures)
    options = options or run_options(report=progress, **run_kwargs)
    if plan is None:
        plan = plan_for(image, model, options, quality, spacing, roi, interpolation)
    resampled = plan.working_spacing is not None
    linear = resampled and interpolation == "linear"
    notes = []

    what = f"resampled to {_mm(plan.working_spacing)}" if resampled else "at the input's spacing"
    progress(0.02, f"preprocessing ({quality} quality, {what.replace('resampled', 'resampling')})")
    pre = preprocess(image, PreprocessConfig(spacing=plan.working_spacing, grid="monai"))
    module, blend_channels, head = _window_model(model, options.precision)
    windows = plan_windows(pre.array.shape, roi, plan.overlap)
    device = torch.device(options.device)
    budget = default_memory_budget_gb() if max_memory_gb is None else float(max_memory_gb)
    if plan.expected_peak_bytes / 2**30 > budget:
        raise MemoryBudgetError(
            f"segmenting this {image.shape[0]}x{image.shape[1]}x{image.shape[2]} image needs about "
            f"{plan.expected_peak_bytes / 2**30:.1f} GB of memory, more than the {budget:.1f} GB allowed"
            + ("" if quality == "fast" else "; fast quality (--quality fast or --fast, 3 mm) needs much less")
            + "; or allow more with --max-memory-gb"
        )
    notes.append(f"{count(windows.n_windows, 'window')} of {'x'.join(map(str, roi))} (overlap {plan.overlap:g}) "
                 f"on a {'x'.join(map(str, pre.array.shape))} grid ({what}); "
                 f"estimated peak memory {plan.expected_peak_bytes / 2**30:.1f} GB")

    dtype = np.uint8 if classes <= 256 else np.uint16
    stats = {}
    try:
        runner = Runner(module, options, progress)
        notes.append(f"device {runner.device}, {options.precision}"
                     + (", channels_last_3d" if options.channels_last else "") + f", {torch.get_num_threads()} threads")

        def predict(x):
            return _first(runner.run(x))

        progress(0.05, f"segmenting: {count(windows.n_windows, 'window')} on {runner.device.type} "
                       f"({options.precision})")
        sliding = time.perf_counter()
        if linear:
            native = NativeLabels(pre, windows, head, dtype, runner.device)
            stitch(pre.array, predict, blend_channels, roi, plan.overlap, SIGMA_SCALE, options.batch_size,
                   progress=subrange(progress, 0.05, 0.95), consume=native, stats=stats)
        else:
            model_labels = stitch(pre.array, predict, blend_channels, roi, plan.overlap, SIGMA_SCALE,
                                  options.batch_size, reduce=_argmax_of(head, runner.device, dtype), out_dtype=dtype,
                                  progress=subrange(progress, 0.05, 0.95), stats=stats)
        sliding = time.perf_counter() - sliding
    except torch.cuda.OutOfMemoryError:
        raise SegmentationError(
            f"the GPU ({device}) ran out of memory; run on the CPU (--device cpu) or with --quality fast"
        ) from None
    except MemoryError:
        raise SegmentationError(
            "the computer ran out of memory; try --quality fast or close other programs") from None
    except RuntimeError as e:
        text = str(e).lower()
        if "out of memory" in text or "can't allocate memory" in text:
            where = "the GPU" if device.type != "cpu" else "the computer"
            raise SegmentationError(f"{where} ran out of memory ({str(e).splitlines()[0][:200]}); "
                                    "try --device cpu or --quality fast") from None
        raise
    if stats.get("windows_skipped"):
        notes.append(f"{count(stats['windows_skipped'], 'all-air window')} took the output of one computed "
                     "all-air window")

    progress(0.95, "mapping the labels back onto the input grid")
    if linear:
        out = native.labels()
    else:
        out = pre.to_input(model_labels, mode="nearest", fill=0)
        del model_labels
    if structures is not None:
        lut = np.zeros(classes, dtype=dtype)
        for x in kept:
            lut[x.value] = x.value
        out = lut[out]
    if largest_component:
        progress(0.97, "keeping the largest connected component of each structure")
        keep_largest_components(out, [x.value for x in kept])
    seconds = time.perf_counter() - start
    if linear:
        stats["voxels_interpolated"] = native.interpolated
    _record_timing(model, runner, options, stats, seconds, roi, plan.per_voxel_seconds)
    progress(1.0, f"done in {seconds:.0f} s")
    result = Image.from_geometry(out.astype(dtype, copy=False), image.geometry,
                                 {"labels": {x.value: x.name for x in kept}})
    stats.update(quality=quality, overlap=plan.overlap, interpolation=interpolation if resampled else "none",
                 working_spacing=[float(v) for v in (plan.working_spacing if resampled else pre.geometry.spacing)],
                 working_shape=list(pre.array.shape), resampled=resampled, seconds_sliding=round(sliding, 3),
                 expected_seconds=round(plan.expected_seconds, 1), expected_peak_bytes=plan.expected_peak_bytes)
    return SegmentationResult(result, kept, seconds, notes, stats)


def _record_timing(model, runner, options, stats: dict, seconds: float, roi, per_voxel_seconds: float) -> None:
    """Keep this computer's seconds per window (published width only: tiny test networks say nothing).

    ``seconds`` is the whole run; the plan's allowance for the per-voxel work (``per_voxel_seconds``) is taken
    off first, so a plan from this figure (windows x it + the allowance) gives this run's seconds back."""
    filters = getattr(getattr(model, "encoder", None), "init_filters", None)
    run = stats.get("windows_run", 0)
    if filters is None or filters < 32 or run < 2:
        return
    from .segment_plan import window_cost_scale

    per_window = max(seconds - per_voxel_seconds, 0.5 * seconds) / run / window_cost_scale(filters, roi)
    Timings().record(runner.device.type, options.precision, torch.get_num_threads(), per_window)


__all__ = [
    "segment_image", "estimate_seconds", "plan_for", "SegmentationResult", "SegmentationError", "MemoryBudgetError",
    "keep_largest_components", "select_structures", "load_segmentation_model", "ROI", "OVERLAP",
]
