"""Whole-body segmentation: ours against the model card's MONAI pipeline, side by side; prints JSON.

    python Testing/Benchmarks/segment.py [--quick] [--precisions fp32,bf16] [--threads N]
    python Testing/Benchmarks/segment.py --synthetic-large [--quick]
    python Testing/Benchmarks/segment.py --resample-to 1.5 [--precisions fp32]
    python Testing/Benchmarks/segment.py --peak [--quick] [--precisions fp32,bf16] [--threads N]
    python Testing/Benchmarks/segment.py --clinical [--quick | --estimate-native N] [--work DIR]
    python Testing/Benchmarks/segment.py --presets [--quick] [--overlaps 0.625,0.5,0.4,0.25] [--markdown]

JSON goes to stdout, progress to stderr. ``--threads`` (default: all cores) is set in every process.

Default: the real example CT resampled to 1.5 mm (244 x 202 x 224 voxels), the
full 118-class SegResNetDS (init_filters 32, blocks_down 1,2,2,4,4; random
weights, seed 0, head biases zeroed so the image rather than a bias picks the
class) written in the published layout. The reference is the model card:
MONAI LoadImage / Orientation SPL / ScaleIntensityRange / CropForeground,
``SlidingWindowInferer(roi_size=(96, 160, 160), overlap=0.625,
mode="gaussian")``, argmax, back onto the input grid. Each pipeline runs in its
own child process, so ``peak_rss_mb`` is its own (VmHWM: ru_maxrss would carry
the parent's high-water mark into the child on Linux); ``seconds`` runs
from reading the image to labels on the input grid (model loading excluded).
Agreement: the fraction of input voxels where our labels equal the reference's.

``--quick``: the native 3 mm CT instead (2 windows), to check the benchmark runs.
``--synthetic-large``: ours only, on a synthetic 512 x 512 x 400 CT at
0.8 x 0.8 x 1.5 mm (with ``--quick``: stopped after 55 of its 490 windows,
when the blending buffers have reached their full size; ``--stop-after N``
chooses where).

``--resample-to 1.5``: the example CT at its own 3 mm, both pipelines working at
1.5 mm: MONAI ``Spacingd`` (bilinear) + the card's pipeline + softmax + ``Invertd``
(linear) + argmax, against ``segment_image(spacing=1.5, quality="full")``; agreement
on the input's voxels.

``--peak``: this CPU's convolution throughput on the whole-body network's own
convolutions (every Conv3d / ConvTranspose3d of one 96x160x160 window, listed
with channels, kernel, stride and spatial size, and their FLOPs), per precision:
one window runs through ``CTFMLib.streaming.StreamedFeatures`` with every
``F.conv3d`` / ``F.conv_transpose3d`` call recorded (slabs of rows,
channels_last_3d, float32 or bfloat16 tensors and weights, no autocast: as
segmentation runs them), then each distinct call shape runs alone, back to back
(warm-up, then rounds of >= 0.4 s; ``--quick``: 0.1 s). Peak = the best shape's
median-round GFLOPS. Also: the window's FLOPs and time and its fraction of
the peak. FLOPs: 2 x C_in x k^3 x C_out x output voxels (transposed: x input voxels).

``--clinical``: the example CT resampled to 0.8 x 0.8 x 1.5 mm (457 x 379 x 224,
linear, outside -1024 HU; written once to ``--work``), the full 118-class
network with random weights (its config records the catalogue's whole-body
spacing, as the published model's entry does); per precision (``--precisions``;
``--quick``: the default precision only) two runs, each in its own child
process: the defaults (``segment_image`` without spacing/quality) and the model
card (``spacing="native", quality="full"``), each with ``ctfm segment --plan``
before it and again after all runs (expected seconds against measured; the runs
use their own CT-FM cache, ``--ctfm-cache``, where segment_image keeps this
computer's seconds per window). The model-card run is estimated from its first
N windows with ``--estimate-native N`` (``--quick``: 3): setup + first window +
(windows run - 1) x the mean of the following run windows ("estimated": true,
"measured_windows": N). Also the convolution peak (as ``--peak``), each run's
seconds per window as a fraction of it, the default/model-card ratio and issue
15's targets.

``--presets``: a SegResNetDS (init_filters 8, blocks_down 1,1,1,1) fine-tuned with
``ctfm train segment`` on the example CT (example_ct_sm, 30 slices) and its
reference labels (example_seg), the 10 largest structures, resampled by the
trainer to 1.5 mm (``segment.spacing``), crops 48x160x192 (its window), 300
steps, no augmentation; kept in ``--work`` and trained once per recipe
(``--quick``: 5 structures, 40 steps: a check that it runs, not a model). Its
Dice on the training scan says what it learned. Then the example CT (and,
without ``--quick``, the clinical-like CT) segmented through ``segment_image``
at the model's spacing with quality full, at every overlap of ``--overlaps``,
and with quality standard and fast; agreement with full on the input's voxels:
the fraction of equal labels (all voxels, and where either is foreground) and
per-structure Dice, with windows run and seconds. ``--markdown``: the tables
on stdout instead of the JSON (the JSON is then written to ``--work``).
"""

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (ROOT / "CTFM", ROOT / "Testing", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import segment_support as support  # noqa: E402
from segment_support import CONFIG, ROI, log, peak_rss_mb, ru_maxrss_mb  # noqa: E402

DEFAULT_WORK = Path(tempfile.gettempdir()) / "ctfm-segment-benchmark"
INTERFACE_MISSING = (
    "segment_image has no {missing} option (issue 15: spacing=model|native|MM, quality=full|standard|fast, "
    "SegmentationResult.stats); this benchmark measures them")


# --- inputs ---------------------------------------------------------------------------------------


def write_model(folder: Path) -> Path:
    return support.random_whole_body_model(folder)


def resampled_ct(source: Path, spacing: float, out: Path) -> Path:
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(source))
    size = [int(round(n * s / spacing)) for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    fine = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), (spacing,) * 3,
                         ct.GetDirection(), -1024, ct.GetPixelID())
    sitk.WriteImage(fine, str(out))
    return out


def synthetic_large_ct(out: Path, slices: int) -> Path:
    """A life-size body phantom, 512 x 512 x ``slices`` at 0.8 x 0.8 x 1.5 mm, built slab by slab."""
    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import Image, write_image

    spacing = np.array([0.8, 0.8, 1.5])
    shape = (512, 512, slices)
    origin = -spacing * (np.asarray(shape) - 1) / 2
    slabs = []
    for k0 in range(0, slices, 50):
        n = min(50, slices - k0)
        slab = body_phantom(shape=(512, 512, n), spacing=spacing, origin=origin + [0, 0, k0 * spacing[2]],
                            body_radius_mm=170.0, seed=k0)
        slabs.append(slab.array)
    write_image(Image(np.concatenate(slabs, axis=2), spacing, origin, metadata={"modality": "CT"}), out)
    return out


# --- one pipeline, in a child process ---------------------------------------------------------------------


def run_reference(args) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets.segresnet_ds import SegResNetDS
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange
    from safetensors.torch import load_file

    from CTFMLib.image import read_image
    from CTFMLib.preprocess import preprocess

    model = SegResNetDS(**{**CONFIG, "blocks_down": tuple(CONFIG["blocks_down"])})
    model.load_state_dict(load_file(str(Path(args.model) / "model.safetensors")), strict=True)
    model.eval()
    if args.resample_to:
        return run_reference_resampled(args, model)
    t0 = time.perf_counter()
    card = Compose([LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
                    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground()])
    x = card(args.image)
    inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=args.reference_batch, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        logits = inferer(x[None], model)
        labels = torch.softmax(logits, 1).argmax(1)[0].numpy().astype(np.uint8)
    del logits
    # The card's Invert: undo crop and orientation (CTFMLib's inverse, checked against MONAI's in the tests).
    labels = preprocess(read_image(args.image)).to_input(labels)
    seconds = time.perf_counter() - t0
    np.save(args.labels_out, labels)
    return {"pipeline": "model card (MONAI)", "precision": "fp32", "seconds": round(seconds, 1),
            "peak_rss_mb": peak_rss_mb(), "windows_batch": args.reference_batch}


def run_reference_resampled(args, model) -> dict:
    """MONAI with a working spacing: Spacingd -> the card's pipeline -> softmax -> Invertd (linear) -> argmax."""
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    t0 = time.perf_counter()
    pixdim = (float(args.resample_to),) * 3
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), EnsureTyped("image"),
                   Orientationd("image", axcodes="SPL"), Spacingd("image", pixdim=pixdim, mode="bilinear"),
                   ScaleIntensityRanged("image", a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
                   CropForegroundd("image", source_key="image")])
    data = pre({"image": str(args.image)})
    inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=args.reference_batch, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        data["pred"] = torch.softmax(inferer(data["image"][None], model)[0], 0)
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"]
    labels = inverted.argmax(0).numpy().astype(np.uint8)
    seconds = time.perf_counter() - t0
    np.save(args.labels_out, labels)
    return {"pipeline": f"MONAI Spacingd {args.resample_to} mm + model card + softmax + Invertd (linear) + argmax",
            "precision": "fp32", "seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "windows_batch": args.reference_batch}


def run_ours(args) -> dict:
    from CTFMLib.image import read_image
    from CTFMLib.progress import Cancelled
    from CTFMLib.runtime import run_options
    from CTFMLib.segment import load_segmentation_model, segment_image

    model, labels = load_segmentation_model(args.model)
    options = run_options(args.device, args.precision, batch_size=args.batch_size)
    # the model card, literally (the input's voxels, overlap 0.625), where segment_image has those options
    card = {} if interface_problem() else {"spacing": float(args.resample_to) if args.resample_to else "native",
                                            "quality": "full"}
    seen = []

    def stop_early(fraction, message):
        seen.append(message)
        if args.stop_after and message == f"window {args.stop_after} of {message.rsplit(' ', 1)[-1]}":
            raise Cancelled()

    t0 = time.perf_counter()
    image = read_image(args.image)
    try:
        result = segment_image(image, model=model, labels=labels, options=options, max_memory_gb=float("inf"),
                               progress=stop_early, **card)
    except Cancelled:
        return {"pipeline": "ctfm segment", "precision": options.precision, "device": options.device,
                "stopped_after": [m for m in seen if m.startswith("window")][-1],
                "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}
    seconds = time.perf_counter() - t0
    np.save(args.labels_out, result.labels.array)
    return {"pipeline": "ctfm segment", "precision": options.precision, "channels_last": options.channels_last,
            "device": options.device, "seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "windows_batch": args.batch_size, "notes": result.notes, "options": card}


def child(kind: str, image: Path, model: Path, labels_out: Path, args, precision="fp32") -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--image", str(image), "--model", str(model),
           "--labels-out", str(labels_out), "--precision", precision, "--device", args.device,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--stop-after", str(args.stop_after),
           "--reference-batch", str(args.reference_batch)] + (["--resample-to", str(args.resample_to)]
                                                              if args.resample_to else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
    if out.returncode != 0:
        return {"pipeline": kind, "precision": precision, "error": out.stderr.strip().splitlines()[-3:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(argv: list, what: str, args) -> dict:
    """Run this script with ``argv`` in a child process; its last stdout line is its JSON. stderr passes through."""
    out = subprocess.run([sys.executable, __file__] + argv, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                         env=child_env(args))
    lines = out.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if out.returncode != 0 and "error" not in result:
        result["error"] = f"{what}: the child process failed (exit {out.returncode}); see its messages above"
    return result


# --- --peak ---------------------------------------------------------------------------------------------------


def peak_settings(args) -> tuple:
    return (0.1, 2) if args.quick else (args.peak_seconds, args.peak_rounds)


def run_peak_child(args) -> dict:
    min_time, rounds = peak_settings(args)
    return support.measure_peak(tuple(args.precisions.split(",")), args.threads, min_time, rounds)


def peak_summary(peak: dict) -> dict:
    """The peak without its per-shape and per-layer lists (for --clinical's summary lines)."""
    return {p: {k: v for k, v in d.items() if k != "shapes"} for p, d in peak.get("precisions", {}).items()}


# --- --clinical: one segment_image run ------------------------------------------------------------------------

WINDOW_MESSAGE = re.compile(r"window (\d+) of (\d+)")


def _spacing_value(text):
    if text in (None, ""):
        return None
    if text in ("model", "native"):
        return text
    values = [float(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    return values[0] if len(values) == 1 else tuple(values)


def interface_problem() -> str:
    """Empty when segment_image has the issue-15 options, else what is missing."""
    from CTFMLib.segment import segment_image

    params = inspect.signature(segment_image).parameters
    missing = [name for name in ("spacing", "quality") if name not in params]
    return " and ".join(missing)


def run_segment(args) -> dict:
    """One ``segment_image`` run (the ``--clinical`` child): timings from its progress messages."""
    import torch

    from CTFMLib.image import read_image
    from CTFMLib.progress import Cancelled
    from CTFMLib.runtime import run_options
    from CTFMLib.segment import load_segmentation_model, segment_image

    missing = interface_problem()
    if missing:
        return {"error": INTERFACE_MISSING.format(missing=missing), "interface_missing": missing}
    kwargs = {}
    if args.spacing:
        kwargs["spacing"] = _spacing_value(args.spacing)
    if args.quality:
        kwargs["quality"] = args.quality
    model, labels = load_segmentation_model(args.model)
    options = run_options(args.device, args.precision, threads=args.threads, batch_size=args.batch_size)
    stamps = []  # (seconds since start, k, n)
    marks = {}
    t0 = time.perf_counter()

    def progress(fraction, message):
        now = time.perf_counter() - t0
        m = WINDOW_MESSAGE.search(message or "")
        if m and message.startswith("window"):
            stamps.append((now, int(m.group(1)), int(m.group(2))))
            if args.estimate_windows and len(stamps) >= args.estimate_windows:
                raise Cancelled()
        elif message and message.startswith("segmenting"):
            marks["stitch_start"] = now
        elif message and message.startswith("mapping"):
            marks["map_back_start"] = now

    image = read_image(args.image)
    out = {"precision": options.precision, "device": options.device, "threads": torch.get_num_threads(),
           "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
           "input_shape": list(image.shape), "input_spacing": [round(float(s), 4) for s in image.spacing]}
    stopped = False
    result = None
    try:
        result = segment_image(image, model=model, labels=labels, options=options, progress=progress, **kwargs)
    except Cancelled:
        stopped = True
    wall = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["ru_maxrss_mb"] = ru_maxrss_mb()
    out["seconds_measured"] = round(wall, 2)
    out.update(window_timing(stamps, marks, wall, stopped))
    if result is not None:
        stats = getattr(result, "stats", None)
        out["stats"] = _jsonable(stats) if stats is not None else None
        out["notes"] = result.notes
        out["seconds_in_segment_image"] = round(result.seconds, 2)
        present = np.bincount(result.labels.array.ravel())
        out["classes_present"] = int(np.count_nonzero(present))
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def window_timing(stamps, marks, wall, stopped) -> dict:
    """Per-window seconds from the ``window k of N`` progress messages (one per window, run or skipped).

    The first interval also builds oneDNN's kernels: reported alone. The others fall in two groups: windows
    that ran the network and all-air windows that reused one computed output (only the blending): an
    interval under 0.4 x the 90th percentile counts as the latter.
    """
    if not stamps:
        return {"windows_seen": 0, "stopped_early": stopped}
    start = marks.get("stitch_start", stamps[0][0])
    times = [start] + [s[0] for s in stamps]
    intervals = np.diff(times)
    first = float(intervals[0])
    rest = intervals[1:]
    quick = np.zeros(len(rest), dtype=bool)
    if len(rest) >= 3:
        quick = rest < 0.4 * np.percentile(rest, 90)
    run, reused = rest[~quick], rest[quick]
    out = {"windows_seen": len(stamps), "windows_reported_total": stamps[-1][2], "stopped_early": stopped,
           "seconds_before_windows": round(start, 2), "first_window_seconds": round(first, 3),
           "seconds_per_window": round(float(run.mean()), 3) if len(run) else round(first, 3),
           "seconds_per_window_median": round(float(np.median(run)), 3) if len(run) else round(first, 3),
           "reused_window_intervals": int(quick.sum()),
           "seconds_per_reused_window": round(float(reused.mean()), 3) if len(reused) else None,
           "window_phase_seconds": round(stamps[-1][0] - start, 2)}
    if not stopped:
        end = marks.get("map_back_start", stamps[-1][0])
        out["seconds_after_windows"] = round(wall - end, 2)
    return out


def child_env(args) -> dict:
    """The children's environment: threads, and a CT-FM cache of their own in the work folder (segment_image
    keeps this computer's seconds per window there, and --plan reads them: the user's cache is left alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CTFM_CACHE": str(args.ctfm_cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM")] + ([os.environ["PYTHONPATH"]]
                                                                   if os.environ.get("PYTHONPATH") else []))}
    return env


def plan_cli(image: Path, model: Path, spacing, quality, precision, args) -> dict:
    """``ctfm segment IMAGE --plan ...`` (in a child): its JSON, or an error saying why not."""
    cmd = [sys.executable, "-m", "CTFMLib.cli", "segment", str(image), "--model", str(model), "--device", args.device,
           "--precision", precision, "--threads", str(args.threads), "--plan", "--json"]
    if spacing:
        cmd += ["--spacing", str(spacing)]
    if quality:
        cmd += ["--quality", quality]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
    seconds = round(time.perf_counter() - t0, 2)
    text = out.stdout.strip()
    try:
        plan = json.loads(text[text.index("{"):text.rindex("}") + 1])
    except ValueError:
        last = (out.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"ctfm segment --plan gave no JSON (exit {out.returncode}): {last[:300]}",
                "command": " ".join(cmd[1:])}
    plan["plan_command_seconds"] = seconds
    return plan


def plan_get(plan: dict, *names):
    """The first of ``names`` in ``plan``, at its top level or nested one level (``windows.run``)."""
    for name in names:
        if not isinstance(plan, dict):
            return None
        if name in plan:
            return plan[name]
        if "." in name:
            outer, inner = name.split(".", 1)
            if isinstance(plan.get(outer), dict) and inner in plan[outer]:
                return plan[outer][inner]
    return None


def plan_check(plan: dict, seconds) -> dict:
    """A plan's expected seconds against measured ones (issue 15: within 30%)."""
    expected = plan_get(plan, "expected_seconds")
    if not expected or not seconds:
        return {"error": plan.get("error")} if plan.get("error") else {}
    return {"expected_seconds": expected, "estimate": plan_get(plan, "estimate"),
            "expected_over_measured": round(expected / seconds, 3),
            "within_30_percent": bool(abs(expected / seconds - 1) <= 0.3)}


def finish_run(run: dict, plan: dict, peak: dict) -> dict:
    """Windows, seconds (measured or estimated), fraction of peak and plan-vs-measured for one run."""
    stats = run.get("stats") or {}
    run["plan"] = plan

    def pick(key, *names):
        value = stats.get(key)
        return value if value is not None else plan_get(plan, *names)

    run["windows_total"] = pick("windows_total", "windows.total", "windows_total") or run.get("windows_reported_total")
    run["windows_run"] = pick("windows_run", "windows.run", "windows_run") or run["windows_total"]
    run["windows_skipped"] = pick("windows_skipped", "windows.skipped", "windows_skipped")
    run["working_spacing"] = pick("working_spacing", "working.spacing_mm")
    run["working_shape"] = pick("working_shape", "working.grid")
    run["overlap"] = pick("overlap", "overlap")
    run["quality"] = pick("quality", "quality")
    per = run.get("seconds_per_window") or 0.0
    if run.get("stopped_early"):
        n = run.get("windows_seen", 0)
        skipped = run["windows_skipped"] or 0
        per_reused = run.get("seconds_per_reused_window") or 0.0
        run["estimated"] = True
        run["measured_windows"] = n
        run["seconds"] = round(run["seconds_before_windows"] + run["first_window_seconds"]
                               + max(0, (run["windows_run"] or n) - 1) * per + skipped * per_reused, 1)
        run["estimate"] = (f"seconds before the first window + the first window + (windows_run - 1) x the mean of "
                           f"the run windows among windows 2..{n} + windows_skipped x the mean of the reused ones "
                           "(0 when none was seen); the mapping back onto the input grid after the last window is not "
                           "included; peak RSS is the peak up to the stop")
    else:
        run["estimated"] = False
        run["seconds"] = run.get("seconds_measured")
        # all costs included: the whole run's seconds per window run
        if run.get("windows_run"):
            run["seconds_per_window_all_costs"] = round(run["seconds"] / run["windows_run"], 3)
    run["fraction_of_peak"] = support.fraction_of_peak(per, peak, run.get("precision"))
    run["plan_before_run"] = plan_check(plan, run.get("seconds"))
    peak_bytes = plan_get(plan, "expected_peak_bytes")
    if peak_bytes:
        run["plan_expected_peak_mb"] = round(peak_bytes / 2**20, 1)
    return run


def clinical(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = support.example_folder()
    image = support.clinical_ct(folder / "example_ct.nii.gz", work / "clinical_ct_0.8x0.8x1.5mm.nii.gz")
    model = write_model(work / "whole_body_random")
    if args.quick and not args.estimate_native:
        args.estimate_native = 3
    log("clinical: measuring the convolution peak (child process)")
    peak_args = ["--one", "peak", "--threads", str(args.threads), "--precisions", args.precisions,
                 "--peak-seconds", str(args.peak_seconds), "--peak-rounds", str(args.peak_rounds)]
    peak = run_child(peak_args + (["--quick"] if args.quick else []), "the convolution peak", args)
    precisions = args.precisions.split(",")
    runs = []
    # The defaults first: a complete run keeps this computer's seconds per window (in --ctfm-cache), which the
    # model card's plan then uses; every plan is asked again after all runs (plan_after_runs).
    cases = (("defaults", None, None, args.estimate_default), ("model card", "native", "full", args.estimate_native))
    for precision in precisions:
        for name, spacing, quality, estimate in cases:
            log(f"clinical: {name}, {precision}" + (f", estimated from {estimate} windows" if estimate else ""))
            plan = plan_cli(image, model, spacing, quality, precision, args)
            argv = ["--one", "segment", "--image", str(image), "--model", str(model), "--precision", precision,
                    "--device", args.device, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                    "--estimate-windows", str(estimate or 0)]
            argv += (["--spacing", spacing] if spacing else []) + (["--quality", quality] if quality else [])
            run = run_child(argv, f"{name} ({precision})", args)
            if run.get("interface_missing"):
                return {"benchmark": "segment --clinical", "error": run["error"]}
            run = {"run": name, "cli": "ctfm segment IMAGE" + (f" --spacing {spacing}" if spacing else "")
                   + (f" --quality {quality}" if quality else "") + f" --precision {precision}", **run}
            runs.append(finish_run(run, plan, peak) if "error" not in run else run)
    for run in runs:
        if "error" in run:
            continue
        spacing = "native" if run["run"] == "model card" else None
        quality = "full" if run["run"] == "model card" else None
        after = plan_cli(image, model, spacing, quality, run["precision"], args)
        run["plan_after_runs"] = plan_check(after, run.get("seconds"))
    comparison = {}
    native_bf16 = (peak.get("cpu") or {}).get("native_bf16", False)
    for precision in precisions:
        card = next((r for r in runs if r["run"] == "model card" and r.get("precision") == precision
                     and "error" not in r), None)
        default = next((r for r in runs if r["run"] == "defaults" and r.get("precision") == precision
                        and "error" not in r), None)
        if not card or not default or not card.get("seconds") or not default.get("seconds"):
            continue
        limit = 300 if precision == "bf16" and native_bf16 else 480 if precision == "fp32" else None
        ratio_windows = (round(card["windows_run"] / default["windows_run"], 2)
                         if card.get("windows_run") and default.get("windows_run") else None)
        comparison[precision] = {
            "default_over_model_card_seconds": round(default["seconds"] / card["seconds"], 3),
            "model_card_over_default_windows_run": ratio_windows,
            "model_card_estimated": card["estimated"],
            "targets": {
                "default_at_most_quarter_of_model_card": default["seconds"] <= card["seconds"] / 4,
                "default_seconds_limit": limit,
                "default_within_limit": None if limit is None else default["seconds"] <= limit,
                "default_peak_rss_at_most_4_gb": default.get("peak_rss_mb", 1e9) <= 4096,
                "model_card_plan_windows_at_least_4x_defaults": (
                    None if ratio_windows is None else ratio_windows >= 4),
                "plan_within_30_percent_before_runs": {r["run"]: r["plan_before_run"].get("within_30_percent")
                                                       for r in (default, card)},
                "plan_within_30_percent_after_runs": {r["run"]: (r.get("plan_after_runs") or {}).get(
                    "within_30_percent") for r in (default, card)},
            },
        }
    return {"benchmark": "segment --clinical", "image": str(image),
            "image_description": "example CT (122x101x112 at 3 mm) resampled to 0.8x0.8x1.5 mm, linear, -1024 outside",
            "model": {**CONFIG, "weights": "random (seed 0, head biases zeroed)",
                      "spacing": support.whole_body_spacing(),
                      "spacing_note": "the catalogue's whole-body spacing, written as _training.spacing in the "
                                      "model folder's config.json so spacing='model' applies it"},
            "threads": args.threads, "ctfm_cache": str(args.ctfm_cache),
            "cpu": peak.get("cpu"), "convolution_peak": peak_summary(peak), "runs": runs, "comparison": comparison,
            "peak_error": peak.get("error")}


# --- --presets ----------------------------------------------------------------------------------------------------


def presets(args) -> dict:
    import torch

    from CTFMLib.image import read_image

    missing = interface_problem()
    if missing:
        return {"benchmark": "segment --presets", "error": INTERFACE_MISSING.format(missing=missing)}
    torch.set_num_threads(args.threads)
    os.environ["CTFM_CACHE"] = str(args.ctfm_cache)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = support.example_folder()
    recipe = support.trained_model_recipe(**({"structures": 5, "steps": 40} if args.quick else
                                             {"structures": args.structures, "steps": args.train_steps}))
    model_folder, training = support.trained_model(work, recipe, args.threads)
    seg = support.Segmenter(model_folder, args.preset_precision, args.threads)
    names = seg.names
    overlaps = [float(o) for o in args.overlaps.split(",") if o.strip()]

    # Did it learn anatomy? Its training scan at full quality against the reference labels (Dice per structure).
    values = (seg.config.get("_training") or {}).get("label_values") or []
    channels = {i + 1: (int(v), names.get(i + 1, f"label_{v}")) for i, v in enumerate(values)}
    labels, _, _ = seg.segment(read_image(folder / recipe["scan"]), "full")
    learned = support.dice_against(labels, read_image(folder / recipe["labels"]).array, channels)
    training_check = {"image": recipe["scan"], "reference": recipe["labels"], "quality": "full", "dice": learned,
                      "mean_dice": round(float(np.mean([d for d in learned.values() if d is not None])), 4)}
    log(f"presets: the model's Dice on its training scan (full quality): {training_check['mean_dice']}")

    images = [("example CT (3 mm)", folder / "example_ct.nii.gz")]
    if not args.quick:
        images.append(("clinical-like CT (0.8x0.8x1.5 mm)",
                       support.clinical_ct(folder / "example_ct.nii.gz", work / "clinical_ct_0.8x0.8x1.5mm.nii.gz")))
    results = []
    for what, path in images:
        image = read_image(path)
        log(f"presets: {what}: full")
        full, stats, seconds = seg.segment(image, "full")
        entry = {"image": what, "path": str(path), "input_shape": list(image.shape),
                 "input_spacing": [round(float(v), 4) for v in image.spacing],
                 "working_spacing": stats.get("working_spacing"), "working_shape": stats.get("working_shape"),
                 "full": _preset_row(stats, seconds, None)}
        entry["overlaps"] = {}
        for overlap in overlaps:
            if overlap == stats.get("overlap"):
                entry["overlaps"][str(overlap)] = {**_preset_row(stats, seconds, None), "same_as": "full"}
                entry["overlaps"][str(overlap)]["agreement"] = support.agreement(full, full, names)
                continue
            log(f"presets: {what}: overlap {overlap}")
            labels, st, sec = seg.segment(image, overlap=overlap)
            entry["overlaps"][str(overlap)] = _preset_row(st, sec, support.agreement(labels, full, names))
        from CTFMLib.segment_plan import QUALITIES

        for quality in ("standard", "fast"):
            same = str(QUALITIES[quality][0]) if QUALITIES[quality][1] is None else None
            if same in entry["overlaps"]:
                # the preset is one of the overlaps just measured: the same code path, not run twice
                entry[quality] = {**entry["overlaps"][same], "quality": quality, "same_as": f"overlap {same}"}
                continue
            log(f"presets: {what}: quality {quality}")
            labels, st, sec = seg.segment(image, quality)
            entry[quality] = _preset_row(st, sec, support.agreement(labels, full, names))
        results.append(entry)
    from CTFMLib.segment_plan import QUALITIES

    return {"benchmark": "segment --presets", "threads": args.threads, "precision": args.preset_precision,
            "qualities": {k: {"overlap": v[0], "spacing": v[1]} for k, v in QUALITIES.items()},
            "model": {"folder": str(model_folder), "recipe": recipe, "window": list(seg.model.ctfm_window)
                      if getattr(seg.model, "ctfm_window", None) else None,
                      "spacing": list(getattr(seg.model, "ctfm_spacing", None) or []),
                      "structures": list(names.values()), "training_seconds": training.get("train_seconds"),
                      "reused": training.get("reused"),
                      "loss_first_last": [training.get("first_loss"), training.get("last_loss")]},
            "training_check": training_check,
            "pipeline": ("segment_image(spacing='model', quality=...) on a model folder: the production path "
                         "(resampled to the model's spacing, sliding window, blended evidence interpolated back "
                         "to the input's voxels, argmax there); an overlap under test runs quality 'standard' with "
                         "CTFMLib.segment_plan.QUALITIES['standard'] set to it for that call. Agreement: on the "
                         "input grid, against quality full."),
            "overlaps_under_test": overlaps, "images": results}


def _preset_row(stats: dict, seconds: float, agreement) -> dict:
    row = {"quality": stats.get("quality"), "overlap": stats.get("overlap"), "working_spacing": stats.get(
        "working_spacing"), "windows_total": stats.get("windows_total"), "windows_run": stats.get("windows_run"),
        "windows_skipped": stats.get("windows_skipped"), "seconds": round(seconds, 1)}
    if agreement is not None:
        row["agreement"] = agreement
    return row


def markdown(report: dict) -> str:
    if report.get("error"):
        return f"error: {report['error']}\n"
    m = report["model"]
    r = m["recipe"]
    lines = [f"Model: SegResNetDS init_filters {r['init_filters']}, blocks_down {r['blocks_down']}, fine-tuned by "
             f"`ctfm train segment` ({r['steps']} steps, {m.get('training_seconds')} s, no augmentation) on "
             f"example_ct_sm + example_seg ({len(m['structures'])} largest structures) at {m['spacing']} mm, window "
             f"{'x'.join(map(str, m['window'] or []))}; mean Dice on its training scan "
             f"{report['training_check']['mean_dice']}. {report['precision']}, {report['threads']} threads. "
             f"Dice of each structure against quality full (overlap "
             f"{report['qualities']['full']['overlap']}), on the input's voxels."]
    trained = report["training_check"]["dice"]
    for entry in report["images"]:
        keys = list(entry["overlaps"])
        cols = [("overlap " + k, entry["overlaps"][k]) for k in keys]
        cols += [(f"standard ({entry['standard']['overlap']})", entry["standard"]),
                 (f"fast ({'x'.join(f'{v:g}' for v in entry['fast']['working_spacing'] or [])} mm)", entry["fast"])]
        lines += ["", f"**{entry['image']}**: input {'x'.join(map(str, entry['input_shape']))}, working grid "
                      f"{'x'.join(map(str, entry['working_shape'] or []))} at "
                      f"{'x'.join(f'{v:g}' for v in entry['working_spacing'] or [])} mm", ""]
        header = ["structure", "Dice vs reference (training scan)"] + [c for c, _ in cols]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        first = cols[0][1]["agreement"]["per_structure"]
        order = sorted(first, key=lambda n: -first[n]["voxels_full"])
        for name in order:
            cells = [c["agreement"]["per_structure"][name]["dice"] for _, c in cols]
            ref = trained.get(name)
            lines.append(f"| {name} | {'-' if ref is None else f'{ref:.3f}'} | "
                         + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
        for label, key, pct in (("voxels equal", "voxel_agreement", True),
                                ("foreground voxels equal", "foreground_agreement", True),
                                ("mean Dice", "mean_dice", False)):
            cells = [c["agreement"][key] for _, c in cols]
            lines.append(f"| **{label}** | | " + " | ".join(
                "-" if c is None else (f"{100 * c:.3f}%" if pct else f"{c:.4f}") for c in cells) + " |")
        lines.append("| **windows run (of total)** | | " + " | ".join(
            f"{c['windows_run']} ({c['windows_total']})" for _, c in cols) + " |")
        lines.append("| **seconds** | | " + " | ".join(str(c["seconds"]) for _, c in cols) + " |")
    return "\n".join(lines) + "\n"


# --- the comparison ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", help="a CT (default: the example CT resampled to 1.5 mm)")
    p.add_argument("--quick", action="store_true", help="a small volume, to check the benchmark works")
    p.add_argument("--synthetic-large", action="store_true", help="ours only, 512 x 512 x 400 synthetic CT")
    p.add_argument("--peak", action="store_true", help="this CPU's convolution peak on the network's own shapes")
    p.add_argument("--resample-to", type=float, default=None,
                   help="the default comparison on the example CT at its own 3 mm, both pipelines working at this "
                        "spacing: MONAI Spacingd + Invertd (linear) against ctfm segment --spacing MM")
    p.add_argument("--clinical", action="store_true",
                   help="the example CT at 0.8x0.8x1.5 mm: model card (--spacing native --quality full) vs defaults")
    p.add_argument("--presets", action="store_true",
                   help="quality presets and overlaps against full, with a model fine-tuned on the example CT")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1, help="ours: windows per forward pass (default 1)")
    p.add_argument("--reference-batch", type=int, default=1,
                   help="the reference's sw_batch_size (default 1: batching is not faster on a CPU and costs memory)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--stop-after", type=int, default=0,
                   help="ours: stop after this many windows and report the peak memory so far (0: run to the end)")
    p.add_argument("--work", default=str(DEFAULT_WORK),
                   help="--clinical/--presets: folder for the CTs and models they build (reused; default %(default)s)")
    p.add_argument("--estimate-native", type=int, default=0,
                   help="--clinical: estimate the model-card run from its first N windows (--quick: 3)")
    p.add_argument("--estimate-default", type=int, default=0,
                   help="--clinical: estimate the defaults run from its first N windows too (0: run it to the end)")
    p.add_argument("--ctfm-cache", help="--clinical/--presets: the CT-FM cache the runs use (segment_image keeps its "
                                       "seconds per window there, --plan reads them); default WORK/ctfm_cache")
    p.add_argument("--peak-seconds", type=float, default=0.4, help="--peak: seconds per timed round and shape")
    p.add_argument("--peak-rounds", type=int, default=5, help="--peak: timed rounds per shape")
    p.add_argument("--overlaps", default="0.625,0.5,0.4,0.25", help="--presets: overlaps to compare with 0.625")
    p.add_argument("--structures", type=int, default=12,
                   help="--presets: the model learns this many largest structures")
    p.add_argument("--train-steps", type=int, default=150, help="--presets: training steps")
    p.add_argument("--preset-precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--markdown", action="store_true", help="--presets: print the tables (markdown) instead of JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--labels-out", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--spacing", help=argparse.SUPPRESS)
    p.add_argument("--quality", help=argparse.SUPPRESS)
    p.add_argument("--estimate-windows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.ctfm_cache = args.ctfm_cache or str(Path(args.work) / "ctfm_cache")
    if args.clinical and args.quick and not args.one:
        # the default precision only: bf16 where the CPU computes it natively (as CTFMLib.segment decides), else fp32
        args.precisions = "bf16" if support.cpu_info(args.threads)["native_bf16"] else "fp32"

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        runner = {"reference": run_reference, "ours": run_ours, "peak": run_peak_child, "segment": run_segment}
        result = runner[args.one](args)
        print(json.dumps(result))
        if isinstance(result, dict) and result.get("interface_missing"):
            sys.exit(3)
        return

    if args.peak:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps({"benchmark": "segment --peak", **run_peak_child(args)}, indent=2))
        return
    if args.clinical:
        report = clinical(args)
        print(json.dumps(report, indent=2))
        if report.get("error"):
            log(f"segment --clinical: {report['error']}")
            sys.exit(2)
        return
    if args.presets:
        report = presets(args)
        report["markdown"] = markdown(report)
        if report.get("error"):
            print(json.dumps(report, indent=2))
            log(f"segment --presets: {report['error']}")
            sys.exit(2)
        if args.markdown:
            saved = Path(args.work) / "presets.json"
            saved.write_text(json.dumps(report, indent=2))
            log(f"presets: the JSON is in {saved}")
            print(report["markdown"])
        else:
            print(json.dumps(report, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="ctfm-bench-") as tmp:
        tmp = Path(tmp)
        model = write_model(tmp / "model")
        if args.synthetic_large:
            image = synthetic_large_ct(tmp / "large.nii.gz", 400)
            what = "synthetic CT 512x512x400 at 0.8x0.8x1.5 mm"
            args.no_reference = True
            if args.quick and not args.stop_after:
                # The blending buffers are full-size once a row of windows (7 x 7) is done: the memory
                # peak is reached; the remaining windows repeat it (490 in all, about 40 min on 2 CPU threads).
                args.stop_after = 55
        elif args.image:
            image, what = Path(args.image), args.image
        else:
            from ctfm_testing.data import shared_data_dir

            data = shared_data_dir()
            if data is None:
                print(json.dumps({"skipped": "real CT data not found (set CTFM_TEST_DATA)"}))
                return
            source = data / "totalsegmentator_example" / "example_ct.nii.gz"
            if args.resample_to:
                image, what = source, f"example CT, native 3 mm, both pipelines at {args.resample_to:g} mm"
            elif args.quick:
                image, what = source, "example CT, native 3 mm"
            else:
                image, what = resampled_ct(source, 1.5, tmp / "ct_1p5mm.nii.gz"), "example CT resampled to 1.5 mm"
        from CTFMLib.image import read_image

        shape = list(read_image(image).shape)
        runs = []
        if not args.no_reference:
            runs.append(child("reference", image, model, tmp / "ref.npy", args))
        for precision in args.precisions.split(","):
            runs.append(child("ours", image, model, tmp / f"ours_{precision}.npy", args, precision))
            if not args.no_reference and "error" not in runs[0] and "error" not in runs[-1]:
                ref, ours = np.load(tmp / "ref.npy"), np.load(tmp / f"ours_{precision}.npy")
                runs[-1]["agreement"] = round(float((ref == ours).mean()), 6)
                runs[-1]["time_vs_reference"] = round(runs[-1]["seconds"] / runs[0]["seconds"], 3)
                runs[-1]["memory_vs_reference"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        if not args.no_reference and "error" not in runs[0]:
            ref = np.load(tmp / "ref.npy")
            runs[0]["classes_present"] = int(len(np.unique(ref)))
        print(json.dumps({"benchmark": "segment", "image": what, "shape": shape, "model": CONFIG,
                          "threads": args.threads, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
