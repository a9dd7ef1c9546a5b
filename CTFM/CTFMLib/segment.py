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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .embed import RunOptions, Runner, select_device
from .image import Image
from .networks import SegResNetDS
from .preprocess import PreprocessConfig, orientation_transform, preprocess
from .progress import null_progress, subrange
from .sliding_window import ADD_BYTES, FINALISE_BYTES, plan_windows, stitch
from .streaming import StreamedFeatures

ROI = (96, 160, 160)
OVERLAP = 0.625
SIGMA_SCALE = 0.125
FAST_SPACING = (3.0, 3.0, 3.0)
WHOLE_BODY_ID = "whole_body_segmentation"
MODEL_ALIASES = {"whole-body": WHOLE_BODY_ID, "whole_body": WHOLE_BODY_ID, "wholebody": WHOLE_BODY_ID}

# Seconds per 96x160x160 window of the published network (SegResNetDS, init_filters 32,
# 118 outputs) on 2 threads of an AMD EPYC CPU with avx512_bf16 (no AMX), run as
# CTFMLib.streaming.StreamedFeatures, batch 1, all costs included: Testing/Benchmarks/segment.py
# on the 1.5 mm example CT (30 windows) took 232-238 s in fp32 and 115-117 s in bf16; the first
# window is 1.4 s slower (oneDNN builds its kernels). Its 1.5 TFLOP of convolutions run at
# about 215 GFLOPS in fp32 and 450 in bf16 here. CPU times are scaled by 2 / threads.
# The CUDA and MPS figures are rough allowances, not measured.
SECONDS_PER_WINDOW = {("cpu", "fp32"): 7.7, ("cpu", "bf16"): 3.8, ("cuda", "fp32"): 0.5, ("cuda", "bf16"): 0.25,
                      ("mps", "fp32"): 2.0, ("mps", "bf16"): 2.0}
MEASURED_THREADS = 2
# Reading, preprocessing and mapping back, per voxel of the input: an allowance (the figures
# above already hold the blending; the rest was a few seconds for the 11M-voxel CT).
SECONDS_PER_VOXEL = 1.5e-7
# Peak bytes of one window's forward pass per voxel and per init_filter (the published network
# has 32): the level buffers StreamedFeatures keeps (4/3 of the level-0 map) and its slabs,
# from ru_maxrss on the same machine (fp32 about 5.5, bf16 about 3); rounded up.
FORWARD_BYTES = {"fp32": 7.0, "bf16": 4.0}
PROCESS_BYTES = 300 << 20  # Python with PyTorch, NumPy and SimpleITK loaded
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


# --- device and precision -----------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device: torch.device) -> str:
    """bf16 autocast where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32.

    On the project's test CPU (AVX512-BF16, no AMX) a window takes 3.8 s in bf16 against
    7.7 s in fp32 (both channels_last_3d); with random weights of the published network the
    labels agree with the fp32 model card on 99.2% of voxels (fp32: 99.9999%).
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def run_options(device="auto", precision="auto", threads=None, channels_last=None, batch_size=1,
                report=None) -> RunOptions:
    """RunOptions for segmentation: precision "auto" per device, channels_last_3d on the CPU (1.3x faster here)."""
    resolved = select_device(device, report)
    if precision in (None, "auto"):
        precision = default_precision(resolved)
    if channels_last is None:
        channels_last = resolved.type == "cpu"
    return RunOptions(device=str(resolved), precision=precision, threads=threads, channels_last=channels_last,
                      batch_size=batch_size)


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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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


def _model_grid_shape(image: Image, fast: bool) -> tuple:
    """The model-space shape before the foreground crop (an upper bound for estimates)."""
    perm, _ = orientation_transform(image.direction, "SPL")
    shape = np.array([image.shape[p] for p in perm], dtype=np.float64)
    if fast:
        spacing = image.spacing[list(perm)]
        shape = np.maximum(1, np.round(shape * spacing / np.asarray(FAST_SPACING)))
    return tuple(int(s) for s in shape)


def estimate_seconds(image: Image, fast: bool = False, device="auto", precision="auto", roi=ROI,
                     model: Optional[nn.Module] = None, threads: Optional[int] = None) -> float:
    """Expected seconds: windows x the cost per window measured for the published network.

    The foreground crop is not known before preprocessing, so this is an upper bound
    (air around the body costs windows too). CPU costs scale with 2 / threads; a
    SegResNetDS ``model`` of another width with (init_filters / 32)^2, as its convolutions do.
    """
    options = run_options(device, precision)
    kind = torch.device(options.device).type
    per_window = SECONDS_PER_WINDOW.get((kind, options.precision), SECONDS_PER_WINDOW[("cpu", "fp32")])
    if kind == "cpu":
        per_window *= MEASURED_THREADS / max(1, threads or torch.get_num_threads())
    filters = getattr(getattr(model, "encoder", None), "init_filters", None)
    if filters:
        per_window *= (filters / 32) ** 2
    windows = plan_windows(_model_grid_shape(image, fast), roi, OVERLAP).n_windows
    return windows * per_window + SECONDS_PER_VOXEL * float(np.prod(image.shape))


def estimate_peak_bytes(model_shape, roi, blend_channels: int, classes: int, input_image: Image,
                        precision: str = "fp32", batch_size: int = 1, filters: Optional[int] = None,
                        forward_on_host: bool = True, parameters: int = 0) -> int:
    """Peak host memory of one segmentation: volumes, blending buffers, one forward pass, the output."""
    plan = plan_windows(model_shape, roi, OVERLAP)
    padded = int(np.prod(plan.padded_shape))
    _, height, width = plan.padded_shape
    label_bytes = 1 if classes <= 256 else 2
    volume = 4 * int(np.prod(model_shape))
    total = input_image.array.nbytes + volume + (4 * padded if 4 * padded > volume else 0)  # a padded copy
    total += 4 * (blend_channels + 1) * min(roi[0], plan.padded_shape[0]) * height * width  # ring buffers
    total += label_bytes * (padded + 2 * int(np.prod(input_image.shape)))  # model-grid and input-grid labels
    window = int(np.prod(roi)) * batch_size
    total += (2 if precision == "bf16" else 4) * blend_channels * window + ADD_BYTES  # a batch's output
    total += FINALISE_BYTES * (1 + max(classes, blend_channels) // max(1, blend_channels))
    if forward_on_host and filters:
        total += int(FORWARD_BYTES.get(precision, FORWARD_BYTES["fp32"]) * filters * window)
    # the weights, and StreamedFeatures' own: conv1 folded with bn2 (fp32), or all of them in bf16
    return int(total + 6 * parameters + PROCESS_BYTES)


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
    from .weights import load_model

    model, info = load_model(model_source(source), expect="SegResNetDS", progress=progress)
    window = training_window(info.config)
    if window is not None:
        model.ctfm_window = window  # segment_image's default window for this network
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
        valid = ", ".join(x.name for x in labels)
        raise ValueError(f"unknown structure(s) {', '.join(map(repr, unknown))}; this model's structures are: {valid}")
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
    **run_kwargs,
) -> SegmentationResult:
    """Segment a CT: labels on its own voxel grid (0 = background).

    ``weights``: a model folder, catalogue or Hugging Face id, or ``whole-body``;
    or pass a loaded ``model`` (and its ``labels``: ``{value: name}`` or LabelInfo
    list; unnamed channels are called ``label_N``). ``structures``: names to keep
    (others become 0). ``fast``: resample to 3 mm first (labels come back with
    nearest neighbour). ``run_kwargs`` (device, precision: auto|fp32|bf16,
    threads, channels_last, batch_size) build the run options when ``options``
    is not given. ``max_memory_gb``: refuse (:class:`MemoryBudgetError`) before
    allocating when the estimated peak is higher (default: 85% of available memory).
    ``roi``: the sliding window; by default the crop size a fine-tuned model was trained
    on (:func:`training_window`), else the model card's 96x160x160.
    """
    start = time.perf_counter()
    progress = progress or null_progress
    if model is None:
        progress(0.0, "loading the model")
        if weights is None:
            raise ValueError("give weights (whole-body, a model folder or id) or a model")
        model, model_labels = load_segmentation_model(weights, progress)
        labels = model_labels if labels is None else labels
    classes = output_channels(model)
    roi = tuple(roi or getattr(model, "ctfm_window", None) or ROI)
    label_info = _label_list(labels, classes)
    kept = select_structures(label_info, structures)
    options = options or run_options(report=progress, **run_kwargs)
    notes = []

    progress(0.02, "preprocessing" + (" (fast: 3 mm)" if fast else ""))
    pre = preprocess(image, PreprocessConfig(spacing=FAST_SPACING) if fast else None)
    module, blend_channels, head = _window_model(model, options.precision)
    plan = plan_windows(pre.array.shape, roi, OVERLAP)
    device = torch.device(options.device)
    filters = getattr(getattr(model, "encoder", None), "init_filters", None)
    peak = estimate_peak_bytes(pre.array.shape, tuple(roi), blend_channels, classes, image, options.precision,
                               options.batch_size, filters, device.type == "cpu",
                               sum(p.numel() for p in model.parameters()))
    budget = default_memory_budget_gb() if max_memory_gb is None else float(max_memory_gb)
    if peak / 2**30 > budget:
        raise MemoryBudgetError(
            f"segmenting this {image.shape[0]}x{image.shape[1]}x{image.shape[2]} image needs about "
            f"{peak / 2**30:.1f} GB of memory, more than the {budget:.1f} GB allowed"
            + ("" if fast else "; fast mode (--fast, 3 mm) needs much less")
            + "; or allow more with --max-memory-gb"
        )
    notes.append(f"{_count(plan.n_windows, 'window')} of {'x'.join(map(str, roi))} on a "
                 f"{'x'.join(map(str, pre.array.shape))} grid{' resampled to 3 mm' if fast else ''}; "
                 f"estimated peak memory {peak / 2**30:.1f} GB")

    dtype = np.uint8 if classes <= 256 else np.uint16
    try:
        runner = Runner(module, options, progress)
        notes.append(f"device {runner.device}, {options.precision}"
                     + (", channels_last_3d" if options.channels_last else "") + f", {torch.get_num_threads()} threads")

        def predict(x):
            return _first(runner.run(x))

        progress(0.05, f"segmenting: {_count(plan.n_windows, 'window')} on {runner.device.type} ({options.precision})")
        model_labels = stitch(pre.array, predict, blend_channels, roi, OVERLAP, SIGMA_SCALE, options.batch_size,
                              reduce=_argmax_of(head, runner.device, dtype), out_dtype=dtype,
                              progress=subrange(progress, 0.05, 0.95))
    except torch.cuda.OutOfMemoryError:
        raise SegmentationError(
            f"the GPU ({device}) ran out of memory; run on the CPU (--device cpu) or in fast mode (--fast)"
        ) from None
    except MemoryError:
        raise SegmentationError(
            "the computer ran out of memory; try fast mode (--fast) or close other programs") from None
    except RuntimeError as e:
        text = str(e).lower()
        if "out of memory" in text or "can't allocate memory" in text:
            where = "the GPU" if device.type != "cpu" else "the computer"
            raise SegmentationError(f"{where} ran out of memory ({str(e).splitlines()[0][:200]}); "
                                    "try --device cpu or fast mode (--fast)") from None
        raise

    progress(0.95, "mapping the labels back onto the input grid")
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
    progress(1.0, f"done in {seconds:.0f} s")
    result = Image.from_geometry(out.astype(dtype, copy=False), image.geometry,
                                 {"labels": {x.value: x.name for x in kept}})
    return SegmentationResult(result, kept, seconds, notes)


__all__ = [
    "segment_image", "estimate_seconds", "SegmentationResult", "SegmentationError", "MemoryBudgetError",
    "keep_largest_components", "select_structures", "load_segmentation_model", "run_options", "ROI", "OVERLAP",
]
