"""What a segmentation will do before it runs: working grid, windows, time and memory (no torch).

``ctfm segment --plan`` prints it, the CT-FM Segment panel shows it before the user clicks, and
:func:`CTFMLib.segment.segment_image` runs it. Everything here is NumPy on the input's voxels and
header, so the Slicer GUI can plan without loading PyTorch.

- **Working spacing** (``--spacing``): ``model`` (default) resamples the input to the spacing the
  model was trained at when it differs by more than :data:`SPACING_TOLERANCE`; ``native`` keeps
  the input's voxels (the model card, literally); a number or three is explicit. Spacings are
  given along the working grid's axes S, P, L (superior, posterior, left), as CT-FM's training
  configurations give them.
  The grid follows MONAI's ``Spacing``: voxel 0 stays where it is and an axis of ``n`` voxels of
  ``s`` mm becomes ``round((n - 1) * s / t + 1)`` voxels of ``t`` mm.
- **Quality** (``--quality``): :data:`QUALITIES` sets the sliding window's overlap; ``fast``
  also works at 3 mm (the former ``--fast``).
- **Windows**: MONAI's layout (:mod:`CTFMLib.windows`) on the foreground box. A window whose
  input is all air (every voxel at or below -1024 HU, i.e. 0 after the card's scaling) gives the
  same output wherever it lies, so it is computed once and reused (``skipped``).
- **Time**: windows run x seconds per window, measured on this computer by earlier runs
  (:class:`Timings`, a small JSON file in the CT-FM cache folder) or, before the first run, the
  figure measured for the published network on the project's test CPUs; plus a per-voxel allowance.
- **Memory**: the volumes, the blending buffers, one forward pass and the output, as measured.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .costs import cpu_name
from .image import Image
from .preprocess import HU_MIN, mask_box, orientation_transform
from .windows import plan_windows

__all__ = [
    "ROI", "QUALITIES", "DEFAULT_QUALITY", "FAST_SPACING", "SPACING_TOLERANCE", "SegmentationPlan", "Timings",
    "Foreground",
    "parse_spacing", "working_spacing", "working_grid_shape", "plan_segmentation", "model_facts", "planned_run",
    "cpu_has_bf16", "window_cost_scale",
]  # fmt: skip

ROI = (96, 160, 160)
SIGMA_SCALE = 0.125
# quality -> (overlap of the sliding window, fixed working spacing in mm or None for --spacing)
QUALITIES = {"full": (0.625, None), "standard": (0.5, None), "fast": (0.625, (3.0, 3.0, 3.0))}
# full: standard's labels agreed with full's on 97.4-97.7% of voxels with a model fine-tuned on the example CT
# (README, "quality presets"), under the 99% that would make it the default.
DEFAULT_QUALITY = "full"
FAST_SPACING = (3.0, 3.0, 3.0)
# An input whose spacing is this close (relative) to the working spacing on every axis is not resampled.
SPACING_TOLERANCE = 0.02
ORIENTATION = "SPL"

# Seconds per 96x160x160 window of the published network (SegResNetDS, init_filters 32, 118
# outputs), batch 1, all costs included, before this computer has measured its own (Timings):
# 2 threads of an AMD EPYC with AVX512-BF16 (no AMX) ran 232-238 s (fp32) and 115-117 s (bf16) for
# the 30 windows of the 1.5 mm example CT; 2 threads of an Intel Xeon with AMX ran 5.9-7.4 s (fp32) and
# 1.5-2.0 s (bf16: AMX tiles) per window on the clinical-like CT (Testing/Benchmarks/segment.py --clinical).
# fp32: between the two CPUs. CPU figures scale with 2 / threads; the CUDA and MPS figures are rough
# allowances, not measured.
SECONDS_PER_WINDOW = {("cpu", "fp32"): 6.8, ("cpu", "bf16"): 3.8, ("cpu", "bf16", "amx"): 1.6,
                      ("cuda", "fp32"): 0.5, ("cuda", "bf16"): 0.25, ("mps", "fp32"): 2.0, ("mps", "bf16"): 2.0}
MEASURED_THREADS = 2
# A window of the published network from this computer's encoder figure (CTFMLib.costs: seconds per million
# voxels of the encoder's forward pass, autocast for bf16) before a segmentation has run here: the window's
# 2.46 million voxels x the streamed SegResNetDS window against the encoder on as many voxels. Measured on
# 2 threads of an Intel Xeon with AMX: fp32 7.75 s per window (Timings) against 1.75-2.03 s per million
# voxels (1.55-1.8); bf16 2.21 s against 1.12 (0.8: the streamed network runs natively in bf16).
ENCODER_TO_WINDOW = {"fp32": 1.7 * float(np.prod(ROI)) / 1e6, "bf16": 0.8 * float(np.prod(ROI)) / 1e6}
# Reading, preprocessing and mapping back, per voxel of the input (an allowance; the labels' linear
# mapping onto the input grid adds a head product per input voxel).
SECONDS_PER_VOXEL = {"nearest": 1.5e-7, "linear": 4e-7}
# Peak bytes of one window's forward pass per voxel and per init_filter (streaming, measured: fp32 about
# 5.5, bf16 about 3; rounded up), the process itself, and the blending's working sets.
FORWARD_BYTES = {"fp32": 7.0, "bf16": 4.0}
PROCESS_BYTES = 300 << 20
FINALISE_BYTES = 32 << 20
ADD_BYTES = 16 << 20
REFERENCE_FILTERS = 32


# --- spacing ------------------------------------------------------------------------------------------


def parse_spacing(text) -> object:
    """``model``, ``native``, or a voxel size in mm: one number (isotropic) or three (S, P, L).

    Returns ``"model"``, ``"native"`` or an ``(S, P, L)`` tuple; ``ValueError`` names the problem.
    """
    from .arguments import SPACING_RANGE_MM

    if isinstance(text, (tuple, list)):
        values = [float(v) for v in text]
    else:
        word = str(text).strip().lower()
        if word in ("model", "native"):
            return word
        try:
            values = [float(v) for v in word.replace(";", ",").split(",")]
        except ValueError:
            values = []
    low, high = SPACING_RANGE_MM
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and low <= v <= high for v in values):
        raise ValueError(f"--spacing is model, native, or a voxel size in mm ({low:g}-{high:g}): one number or "
                         f"three (S,P,L), not {text!r}")
    return tuple(values)


def working_spacing(image_spacing_spl, choice, model_spacing=None) -> Optional[np.ndarray]:
    """The working grid's spacing along S, P, L, or ``None`` to keep the input's voxels.

    ``choice``: ``"model"`` (``model_spacing``, S/P/L mm, or native when the model has none),
    ``"native"``, or an (S, P, L) tuple. Within :data:`SPACING_TOLERANCE` of the input on every
    axis, the input's voxels are kept.
    """
    if choice == "native" or (choice == "model" and model_spacing is None):
        return None
    target = np.asarray(model_spacing if choice == "model" else choice, dtype=np.float64)
    native = np.asarray(image_spacing_spl, dtype=np.float64)
    if np.all(np.abs(native - target) <= SPACING_TOLERANCE * target):
        return None
    return target


def working_grid_shape(oriented_shape, oriented_spacing, target) -> tuple:
    """MONAI ``Spacing``'s output shape: ``round((n - 1) * s / t + 1)`` voxels per axis (voxel 0 fixed)."""
    if target is None:
        return tuple(int(n) for n in oriented_shape)
    return tuple(max(1, int(np.round((n - 1) * s / t + 1.0))) for n, s, t in
                 zip(oriented_shape, oriented_spacing, target))


# --- timings measured on this computer ------------------------------------------------------------------


class Timings:
    """Seconds per window measured on this computer, kept in ``<CT-FM cache>/timings.json``.

    Keyed by processor, device kind, precision and thread count, normalised to the published network
    (init_filters 32) and a 96x160x160 window, so a later plan on the same computer predicts from
    what it measured rather than from another CPU's figure. Written atomically; unreadable = empty.
    """

    NAME = "timings.json"

    def __init__(self, path: Optional[Path] = None):
        if path is None:
            from .cache import ctfm_home

            path = ctfm_home() / self.NAME
        self.path = Path(path)

    def _read(self) -> dict:
        from .files import read_json_object

        return read_json_object(self.path)

    @staticmethod
    def key(device: str, precision: str, threads: int) -> str:
        return f"{cpu_name()}|{device}|{precision}|{int(threads)}"

    def seconds_per_window(self, device: str, precision: str, threads: int) -> Optional[float]:
        value = self._read().get(self.key(device, precision, threads))
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def record(self, device: str, precision: str, threads: int, seconds: float) -> None:
        """Keep a new measurement (a running mean with the earlier ones, so one odd run does not rule)."""
        from .files import atomic_write_text

        if not (seconds > 0 and math.isfinite(seconds)):
            return
        data = self._read()
        key = self.key(device, precision, threads)
        old = data.get(key)
        data[key] = round(seconds if not isinstance(old, (int, float)) else 0.5 * (old + seconds), 4)
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError:
            pass  # a cache that cannot be written only means estimates stay generic


def window_cost_scale(filters: Optional[int], roi) -> float:
    """Cost of a window relative to the published network's 96x160x160 window (convolutions ~ filters^2)."""
    f = (filters or REFERENCE_FILTERS) / REFERENCE_FILTERS
    return f * f * float(np.prod(roi)) / float(np.prod(ROI))


def seconds_per_window(device: str, precision: str, threads: int, filters: Optional[int] = None, roi=ROI,
                       timings: Optional[Timings] = None) -> tuple:
    """``(seconds, measured here?)`` for one window of this network on this device."""
    kind = device.split(":")[0]
    timings = timings or Timings()
    measured = timings.seconds_per_window(kind, precision, threads)
    if measured is not None:
        return measured * window_cost_scale(filters, roi), True
    from .costs import Costs

    encoder = Costs().get(Costs.key(kind, precision, threads), "forward")  # measured here, for the encoder
    if encoder is not None:
        return encoder * ENCODER_TO_WINDOW.get(precision, ENCODER_TO_WINDOW["fp32"]) * window_cost_scale(filters, roi), True
    base = SECONDS_PER_WINDOW.get((kind, precision), SECONDS_PER_WINDOW[("cpu", "fp32")])
    if kind == "cpu" and precision == "bf16" and "amx_bf16" in _cpu_flags():
        base = SECONDS_PER_WINDOW[("cpu", "bf16", "amx")]
    if kind == "cpu":
        base *= MEASURED_THREADS / max(1, threads)
    return base * window_cost_scale(filters, roi), False


# --- the plan --------------------------------------------------------------------------------------------


@dataclass
class SegmentationPlan:
    """What :func:`CTFMLib.segment.segment_image` will do; :meth:`to_dict` is ``ctfm segment --plan``."""

    input_shape: tuple
    input_spacing: tuple
    orientation: tuple  # (perm, flip) to SPL
    working_spacing: Optional[tuple]  # along S, P, L; None = the input's voxels
    resampled_shape: tuple  # the working grid before the foreground crop (S, P, L)
    foreground_box: tuple  # ((start), (end)) on that grid, estimated from the input
    quality: str
    overlap: float
    roi: tuple
    interpolation: str
    windows_total: int
    windows_skipped: int
    device: str
    precision: str
    threads: int
    expected_seconds: float
    expected_peak_bytes: int
    calibrated: bool
    model_spacing: Optional[tuple] = None  # S, P, L mm, as the model records it
    notes: list = field(default_factory=list)
    per_voxel_seconds: float = 0.0  # the part of expected_seconds that is per input voxel, not per window

    @property
    def windows_run(self) -> int:
        return self.windows_total - self.windows_skipped

    @property
    def working_shape(self) -> tuple:
        start, end = self.foreground_box
        return tuple(int(e - s) for s, e in zip(start, end))

    def working_spacing_spl(self) -> list:
        spl = self.working_spacing if self.working_spacing is not None else _oriented(self.input_spacing,
                                                                                        self.orientation[0])
        return [round(float(v), 4) for v in spl]

    def to_dict(self) -> dict:
        return {
            "input": {"axes": "xyz", "shape": list(self.input_shape), "spacing": [round(float(s), 4) for s in self.input_spacing]},
            "working": {"axes": ORIENTATION, "spacing_mm": self.working_spacing_spl(),
                        "resampled": self.working_spacing is not None, "grid": list(self.working_shape),
                        "model_spacing_mm": None if self.model_spacing is None else list(self.model_spacing)},
            "quality": self.quality, "overlap": self.overlap, "roi": list(self.roi), "interpolation": self.interpolation,
            "windows": {"total": self.windows_total, "run": self.windows_run, "skipped": self.windows_skipped},
            "device": self.device, "precision": self.precision, "threads": self.threads,
            "expected_seconds": round(self.expected_seconds, 1),
            "expected_peak_bytes": int(self.expected_peak_bytes),
            "expected_peak_gb": round(self.expected_peak_bytes / 2**30, 2),
            "estimate": "measured on this computer" if self.calibrated else "not yet measured on this computer",
            "notes": list(self.notes),
        }


def _oriented(values, perm) -> np.ndarray:
    return np.asarray([values[p] for p in perm], dtype=np.float64)


COARSE = 4  # occupancy blocks of COARSE^3 input voxels, for counting all-air windows


@dataclass
class Foreground:
    """What the voxels say, once per image (a plan for each quality reuses it): the bounding box of voxels
    above -1024 HU and the cumulative occupancy of blocks of :data:`COARSE`^3 voxels, in SPL index space."""

    box: tuple  # ((start), (end)) of the foreground, oriented input index space
    summed: np.ndarray  # (blocks + 1) cumulative sums along the three axes

    @classmethod
    def of(cls, image: Image) -> "Foreground":
        perm, flip = orientation_transform(image.direction, ORIENTATION)
        mask = np.asarray(image.array) > HU_MIN
        if not mask.any():
            raise ValueError("the image has no voxel above -1024 HU (all air or empty): nothing to segment")
        m = np.transpose(mask, perm)
        for a, f in enumerate(flip):
            if f:
                m = np.flip(m, axis=a)
        start, end = mask_box(m)
        m = np.pad(m, [(0, (-n) % COARSE) for n in m.shape])
        s = m.shape
        blocks = m.reshape(s[0] // COARSE, COARSE, s[1] // COARSE, COARSE, s[2] // COARSE, COARSE).any(axis=(1, 3, 5))
        summed = np.zeros(tuple(n + 1 for n in blocks.shape), dtype=np.int64)
        summed[1:, 1:, 1:] = blocks.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
        return cls((tuple(start), tuple(end)), summed)


def _any_in(summed: np.ndarray, lo, hi) -> bool:
    """Whether any occupied block lies in [lo, hi) (block coordinates)."""
    lo = [max(0, min(int(v), summed.shape[a] - 1)) for a, v in enumerate(lo)]
    hi = [max(0, min(int(v), summed.shape[a] - 1)) for a, v in enumerate(hi)]
    if any(h <= low for low, h in zip(lo, hi)):
        return False
    (a0, b0, c0), (a1, b1, c1) = lo, hi
    total = (summed[a1, b1, c1] - summed[a0, b1, c1] - summed[a1, b0, c1] - summed[a1, b1, c0]
             + summed[a0, b0, c1] + summed[a0, b1, c0] + summed[a1, b0, c0] - summed[a0, b0, c0])
    return bool(total > 0)


def plan_segmentation(image: Image, quality: str = DEFAULT_QUALITY, spacing="model", model_spacing=None,
                      roi: Sequence[int] = ROI, classes: int = 118, filters: Optional[int] = REFERENCE_FILTERS,
                      parameters: int = 0, device: str = "cpu", precision: str = "fp32", threads: int = 2,
                      batch_size: int = 1, interpolation: str = "linear", foreground=True,
                      timings: Optional[Timings] = None) -> SegmentationPlan:
    """Plan a segmentation of ``image`` (its voxels are read for the foreground; nothing is resampled).

    ``quality``: full | standard | fast. ``spacing``: model | native | (S, P, L) mm (``fast`` fixes 3 mm).
    ``model_spacing``: the (S, P, L) mm the model was trained at, or None. ``device`` is a resolved
    device ("cpu", "cuda:0"); ``precision`` fp32 | bf16. ``foreground=False`` skips reading the
    voxels (the box is then the whole grid: an upper bound); a :class:`Foreground` of the image is
    reused instead of reading them again (a plan per quality).
    """
    if quality not in QUALITIES:
        raise ValueError(f"--quality is one of {', '.join(QUALITIES)}, not {quality!r}")
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation is linear or nearest, not {interpolation!r}")
    overlap, fixed = QUALITIES[quality]
    choice = parse_spacing(spacing) if not isinstance(spacing, tuple) else spacing
    if fixed is not None:
        if choice not in ("model", "native"):
            raise ValueError(f"--quality {quality} works at {fixed[0]:g} mm; leave out --spacing, or use another quality")
        choice = fixed
    perm, flip = orientation_transform(image.direction, ORIENTATION)
    oriented_shape = tuple(int(image.shape[p]) for p in perm)
    oriented_spacing = _oriented(image.spacing, perm)
    target = working_spacing(oriented_spacing, choice, model_spacing)
    grid = working_grid_shape(oriented_shape, oriented_spacing, target)
    scale = np.ones(3) if target is None else oriented_spacing / target  # working voxels per input voxel
    notes = []
    box = ((0, 0, 0), grid)
    summed = None
    if foreground is not False:
        scan = foreground if isinstance(foreground, Foreground) else Foreground.of(image)
        (i_start, i_end), summed, block = scan.box, scan.summed, COARSE
        start = [max(0, int(math.floor((s - 1) * k)) + 1) if target is not None else s
                 for s, k in zip(i_start, scale)]
        end = [min(n, int(math.ceil((e * k)))) if target is not None else e
               for e, k, n in zip(i_end, scale, grid)]
        box = (tuple(start), tuple(max(s + 1, e) for s, e in zip(start, end)))
    shape = tuple(e - s for s, e in zip(*box))
    windows = plan_windows(shape, roi, overlap)
    skipped = 0
    if summed is not None:
        for z in windows.starts[0]:
            for y in windows.starts[1]:
                for x in windows.starts[2]:
                    lo = [box[0][a] + w - windows.pad_before[a] for a, w in enumerate((z, y, x))]
                    hi = [lo[a] + roi[a] for a in range(3)]
                    # working index -> input index (one voxel of margin), -> occupancy blocks
                    in_lo = [math.floor(v / k) - 1 for v, k in zip(lo, scale)]
                    in_hi = [math.ceil((v - 1) / k) + 2 for v, k in zip(hi, scale)]
                    if not _any_in(summed, [v // block for v in in_lo], [-(-v // block) for v in in_hi]):
                        skipped += 1
        if skipped:
            skipped -= 1  # one all-air window is computed: its output stands for the others
    run = windows.n_windows - skipped
    per_window, calibrated = seconds_per_window(device, precision, threads, filters, roi, timings)
    per_voxel = SECONDS_PER_VOXEL[interpolation if target is not None else "nearest"] * float(np.prod(image.shape))
    seconds = run * per_window + per_voxel
    peak = estimate_peak_bytes(shape, roi, overlap, classes, image, precision, batch_size, filters,
                               device.startswith("cpu"), parameters, resampled=target is not None,
                               linear=interpolation == "linear" and target is not None)
    if target is not None:
        notes.append(f"resampled to {'x'.join(f'{v:g}' for v in target)} mm (S, P, L)")
    return SegmentationPlan(tuple(image.shape), tuple(float(s) for s in image.spacing), (perm, flip),
                            None if target is None else tuple(float(t) for t in target), grid, box, quality,
                            float(overlap), tuple(int(r) for r in roi), interpolation, windows.n_windows, skipped,
                            device, precision, int(threads), float(seconds), int(peak), calibrated,
                            None if model_spacing is None else tuple(float(v) for v in model_spacing), notes,
                            per_voxel)


def estimate_peak_bytes(shape, roi, overlap, classes: int, input_image: Image, precision: str = "fp32",
                        batch_size: int = 1, filters: Optional[int] = None, forward_on_host: bool = True,
                        parameters: int = 0, resampled: bool = False, linear: bool = False,
                        blend_channels: Optional[int] = None) -> int:
    """Peak host memory: volumes, blending buffers, one forward pass, the output (bytes)."""
    # a SegResNetDS blends its last decoder features (init_filters channels) when they are fewer than its classes
    blend = blend_channels or (filters if filters and filters < classes else classes)
    plan = plan_windows(shape, roi, overlap)
    padded = int(np.prod(plan.padded_shape))
    _, height, width = plan.padded_shape
    label_bytes = 1 if classes <= 256 else 2
    volume = 4 * int(np.prod(shape))
    inputs = int(np.prod(input_image.shape))
    total = input_image.array.nbytes + volume + (4 * padded if 4 * padded > volume else 0)  # a padded copy
    if resampled:
        total += 4 * inputs  # the oriented float copy resampling starts from
    total += 4 * (blend + 1) * min(roi[0], plan.padded_shape[0]) * height * width  # ring buffers
    if linear:  # labels straight onto the input grid, a few input rows of features and logits at a time
        total += label_bytes * 2 * inputs + 8 * (blend + classes) * max(input_image.shape) ** 2
    else:
        total += label_bytes * (padded + 2 * inputs)  # model-grid and input-grid labels
    window = int(np.prod(roi)) * batch_size
    total += (2 if precision == "bf16" else 4) * blend * window + ADD_BYTES  # a batch's output
    total += FINALISE_BYTES * (1 + max(classes, blend) // max(1, blend))
    if forward_on_host and filters:
        total += int(FORWARD_BYTES.get(precision, FORWARD_BYTES["fp32"]) * filters * window)
    return int(total + 6 * parameters + PROCESS_BYTES)


# --- what a model folder says, without torch ---------------------------------------------------------------


def model_facts(config: Optional[dict] = None, entry=None) -> dict:
    """``{"spacing", "roi", "classes", "filters", "parameters"}`` from a model's config.json and catalogue entry.

    ``spacing`` (S, P, L mm) comes from the config's ``_training.spacing`` (``ctfm train segment``) or the
    catalogue entry's ``spacing``; ``None`` when neither records one. ``parameters`` is an estimate
    (convolution weights of a SegResNetDS of that width), enough for the memory estimate.
    """
    config = config or {}
    training = config.get("_training") if isinstance(config.get("_training"), dict) else {}
    spacing = _spacing_value(training.get("spacing")) or _spacing_value(getattr(entry, "spacing", None))
    roi = training.get("crop_size")
    roi = tuple(int(v) for v in roi) if isinstance(roi, (list, tuple)) and len(roi) == 3 else ROI
    filters = int(config.get("init_filters", REFERENCE_FILTERS))
    classes = int(config.get("out_channels", 118))
    blocks = config.get("blocks_down", [1, 2, 2, 4, 4])
    # The encoder's residual blocks (two 3x3x3 convolutions each) and as much again for the rest, scaled by 0.6:
    # within 2% of the real SegResNetDS counts (87,167,126 for the published network; 1,246,076 at 8 filters).
    parameters = 0.6 * sum(2 * 27 * (filters * 2 ** i) ** 2 * int(b) for i, b in enumerate(blocks)) * 2
    return {"spacing": spacing, "roi": roi, "classes": classes, "filters": filters, "parameters": int(parameters)}


def _spacing_value(value) -> Optional[tuple]:
    if value is None or value == "native":
        return None
    if isinstance(value, (int, float)):
        value = [value] * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        if all(math.isfinite(float(v)) and v > 0 for v in value):
            return tuple(float(v) for v in value)
    return None


def environment_threads() -> int:
    """The thread count torch will use when none is given (OMP_NUM_THREADS, else the cores)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def _cpu_flags() -> list:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return []


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo (no torch)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def planned_run(device: str = "auto", precision: str = "auto", threads: Optional[int] = None) -> tuple:
    """``(device, precision, threads)`` as a run would resolve them, without torch (for a GUI's plan).

    ``auto`` is taken as the CPU (a GUI that knows a GPU is there passes ``cuda``); precision ``auto``
    is bf16 where the CPU computes it natively (or on CUDA), else fp32, as :mod:`CTFMLib.segment` decides.
    """
    device = "cpu" if device in (None, "", "auto") else str(device)
    if precision in (None, "", "auto"):
        precision = "bf16" if (device.startswith("cuda") or (device == "cpu" and cpu_has_bf16())) else "fp32"
    return device, precision, int(threads or environment_threads())
