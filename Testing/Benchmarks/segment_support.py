"""Pieces of Testing/Benchmarks/segment.py: this CPU's convolution peak on the whole-body network's own
shapes, the clinical-like CT, a model that has learned anatomy, label agreement.

Nothing here is imported by CTFMLib; it reads CTFMLib (networks, streaming, preprocess, sliding_window)
and runs it as ``ctfm segment`` does.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "CTFM", ROOT / "Testing"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The published whole-body network (CT-FM's SegResNetDS) and its sliding window.
CONFIG = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
          "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
ROI = (96, 160, 160)

FLOP_FORMULA = {
    "conv3d": "2 * C_in/groups * k_d*k_h*k_w * C_out * D_out*H_out*W_out (a multiply-add = 2 FLOPs; bias not counted)",
    "conv_transpose3d": "2 * C_in * k_d*k_h*k_w * C_out/groups * D_in*H_in*W_in (every input voxel scatters "
                        "a k^3 x C_out block)",
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's own peak resident memory, MB: VmHWM of /proc/self/status (Linux).

    Not ru_maxrss: Linux carries the parent's high-water mark into a child's ru_maxrss across fork/exec
    (a child of a 1.5 GB parent reports >= 1.5 GB); VmHWM belongs to the process's own address space.
    Falls back to ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- the machine ------------------------------------------------------------------------------------


def cpu_info(threads: int) -> dict:
    """What the CPU is (never assumed): lscpu's model name, the bf16/AMX/AVX-512 flags, the load."""
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if line.split(":")[0].strip() == "Model name":
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    flags = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
                if model is None and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = [f for f in flags if f.startswith("amx") or "bf16" in f or f in ("avx512f", "avx512_vnni", "avx_vnni",
                                                                               "avx512_fp16", "avx2", "fma")]
    info = {"model_name": model or platform.processor() or "unknown", "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "flags_bf16_amx": sorted(wanted),
            "native_bf16": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
            "amx": "amx_bf16" in flags}
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["onednn"] = bool(torch.backends.mkldnn.is_available())
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


# --- FLOPs --------------------------------------------------------------------------------------------


def conv_output_shape(kind, x_shape, w_shape, stride, padding, output_padding=(0, 0, 0)):
    spatial = x_shape[2:]
    k = w_shape[2:]
    if kind == "conv3d":
        return tuple((n + 2 * p - kk) // s + 1 for n, p, kk, s in zip(spatial, padding, k, stride))
    return tuple((n - 1) * s - 2 * p + kk + op for n, p, kk, s, op in zip(spatial, padding, k, stride, output_padding))


def conv_flops(kind, x_shape, w_shape, stride, padding, groups=1, output_padding=(0, 0, 0)) -> int:
    """FLOPs of one call (see FLOP_FORMULA); ``x_shape`` (B, C, D, H, W), ``w_shape`` as PyTorch stores it."""
    k = int(np.prod(w_shape[2:]))
    if kind == "conv3d":
        out = conv_output_shape(kind, x_shape, w_shape, stride, padding)
        c_out, c_in_per_group = w_shape[0], w_shape[1]
        return 2 * x_shape[0] * c_in_per_group * k * c_out * int(np.prod(out))
    c_in, c_out_per_group = w_shape[0], w_shape[1]
    return 2 * x_shape[0] * c_in * k * c_out_per_group * int(np.prod(x_shape[2:]))


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def network_layers(config=None, roi=ROI) -> dict:
    """Every Conv3d / ConvTranspose3d of the network, the spatial size it sees on one ``roi`` window and its
    FLOPs, from forward hooks on an eval-mode forward pass on the meta device (nothing is computed)."""
    import torch
    from torch import nn

    from CTFMLib.networks import SegResNetDS

    config = dict(config or CONFIG)
    args = {k: v for k, v in config.items() if k != "spatial_dims"}
    with torch.device("meta"):
        net = SegResNetDS(**args).eval()
    rows = []

    def hook(module, inputs, output, name):
        x = inputs[0]
        kind = "conv_transpose3d" if isinstance(module, nn.ConvTranspose3d) else "conv3d"
        rows.append({
            "layer": name, "kind": kind, "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
            "in_size": list(x.shape[2:]), "out_size": list(output.shape[2:]),
            "gflop": round(conv_flops(kind, tuple(x.shape), tuple(module.weight.shape), module.stride,
                                      module.padding, module.groups) / 1e9, 3),
            "head": name.endswith(".head"),
        })

    handles = [m.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n))
               for name, m in net.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        net(torch.empty((1, config.get("in_channels", 1)) + tuple(roi), device="meta"))
    for h in handles:
        h.remove()
    total = sum(r["gflop"] for r in rows)
    heads = sum(r["gflop"] for r in rows if r["head"])
    last_head = [r for r in rows if r["head"]][-1]["gflop"] if heads else 0.0
    return {"window": list(roi), "layers": rows, "n_layers": len(rows),
            "gflop_module_forward": round(total, 1),  # eval-mode forward: computes all dsdepth heads
            "gflop_without_heads": round(total - heads, 1),
            "gflop_heads": round(heads, 1), "gflop_last_head": round(last_head, 1)}


# --- the convolutions as CTFMLib.streaming runs them --------------------------------------------------


def _dtype(precision):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def streamed_network(config=None, precision="fp32"):
    import torch

    from CTFMLib.networks import SegResNetDS
    from CTFMLib.streaming import StreamedFeatures

    args = {k: v for k, v in (config or CONFIG).items() if k != "spatial_dims"}
    torch.manual_seed(0)
    net = SegResNetDS(**args).eval().to(memory_format=torch.channels_last_3d)
    return StreamedFeatures(net, _dtype(precision))


class CallRecorder:
    """Wraps torch.nn.functional.conv3d / conv_transpose3d (which CTFMLib.streaming calls) to record every
    call's shapes, dtype, layout and wall time, within one process and one ``with`` block."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        import torch.nn.functional as F

        self._orig = (F.conv3d, F.conv_transpose3d)
        conv3d, deconv = self._orig

        def rec(kind, fn):
            def wrapped(x, weight, bias=None, stride=1, padding=0, *rest, **kw):
                t0 = time.perf_counter()
                y = fn(x, weight, bias, stride, padding, *rest, **kw)
                dt = time.perf_counter() - t0
                groups = 1
                output_padding = (0, 0, 0)
                if kind == "conv3d":
                    if len(rest) >= 2:
                        groups = rest[1]
                    groups = kw.get("groups", groups)
                else:
                    if rest:
                        output_padding = _triple(rest[0])
                    output_padding = _triple(kw.get("output_padding", output_padding))
                    if len(rest) >= 2:
                        groups = rest[1]
                    groups = kw.get("groups", groups)
                self.calls.append({
                    "kind": kind, "x": tuple(x.shape), "w": tuple(weight.shape), "bias": bias is not None,
                    "stride": _triple(stride), "padding": _triple(padding), "output_padding": output_padding,
                    "groups": int(groups), "dtype": str(x.dtype).replace("torch.", ""),
                    "channels_last": bool(x.ndim == 5 and x.is_contiguous(memory_format=_cl())),
                    "seconds": dt})
                return y
            return wrapped

        F.conv3d = rec("conv3d", conv3d)
        F.conv_transpose3d = rec("conv_transpose3d", deconv)
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.conv3d, F.conv_transpose3d = self._orig
        return False


def _cl():
    import torch

    return torch.channels_last_3d


def _key(c):
    return (c["kind"], c["x"], c["w"], c["bias"], c["stride"], c["padding"], c["output_padding"], c["groups"])


def record_window(precision: str, config=None, roi=ROI, windows: int = 2):
    """Run ``windows`` windows through CTFMLib.streaming.StreamedFeatures (the first builds oneDNN's kernels)
    and return (the last window's calls, its wall seconds, the first window's seconds)."""
    import torch

    net = streamed_network(config, precision)
    x = torch.rand((1, 1) + tuple(roi), generator=torch.Generator().manual_seed(0))
    seconds = []
    calls = []
    with torch.inference_mode():
        for _ in range(windows):
            with CallRecorder() as rec:
                t0 = time.perf_counter()
                net(x)
                seconds.append(time.perf_counter() - t0)
            calls = rec.calls
    return calls, seconds[-1], seconds[0]


def _bench_call(key, precision, min_time: float, rounds: int):
    """GFLOPS of one call shape run back to back: warm-up, then ``rounds`` rounds of at least ``min_time`` s."""
    import torch
    import torch.nn.functional as F

    kind, xs, ws, has_bias, stride, padding, output_padding, groups = key
    dtype = _dtype(precision)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(xs, generator=g).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(ws, generator=g) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    b = torch.zeros(ws[0] if kind == "conv3d" else ws[1] * groups, dtype=dtype) if has_bias else None
    if kind == "conv3d":
        def fn():
            return F.conv3d(x, w, b, stride, padding, 1, groups)
    else:
        def fn():
            return F.conv_transpose3d(x, w, b, stride, padding, output_padding, groups)
    flops = conv_flops(kind, xs, ws, stride, padding, groups, output_padding)
    with torch.inference_mode():
        t0 = time.perf_counter()
        n = 0
        while n < 2 or time.perf_counter() - t0 < min(0.3, min_time):
            fn()
            n += 1
        per_call = (time.perf_counter() - t0) / n
        reps = max(1, int(min_time / max(per_call, 1e-6)))
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            rates.append(flops * reps / (time.perf_counter() - t0) / 1e9)
    return flops, sorted(rates), reps


def measure_peak(precisions=("fp32", "bf16"), threads=None, min_time=0.4, rounds=5, config=None, roi=ROI) -> dict:
    """This machine's convolution throughput on the network's own calls, as CTFMLib.streaming makes them.

    Per precision: one window through StreamedFeatures with every F.conv3d / F.conv_transpose3d call
    recorded (shapes: slabs of rows, channels_last_3d, the compute dtype); each distinct call shape is
    then run back to back (warm-up, then ``rounds`` rounds of at least ``min_time`` s). ``gflops`` per
    shape is the median round; the precision's ``peak_gflops`` is the best shape's median (sustained),
    ``peak_gflops_best_round`` its best round. ``window_conv_seconds_at_measured_rates`` is sum over the
    window's calls of FLOPs / that shape's rate: the convolution time of one window if every call ran as
    fast as it does alone; ``window_seconds`` the measured window (second of two; all costs included).
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    out = {"cpu": cpu_info(torch.get_num_threads()), "flop_formula": FLOP_FORMULA,
           "method": measure_peak.__doc__.split("\n\n")[1].split("``gflops``")[0].strip(),
           "min_seconds_per_round": min_time, "rounds": rounds, "network": network_layers(config, roi),
           "precisions": {}}
    for precision in precisions:
        log(f"peak: {precision}: one window through CTFMLib.streaming, recording its convolutions")
        calls, window_s, first_s = record_window(precision, config, roi)
        groups = {}
        for c in calls:
            groups.setdefault(_key(c), []).append(c)
        shapes = []
        for i, (key, cs) in enumerate(sorted(groups.items(), key=lambda kv: -sum(
                conv_flops(kv[0][0], kv[0][1], kv[0][2], kv[0][4], kv[0][5], kv[0][7], kv[0][6]) for _ in kv[1]))):
            flops, rates, reps = _bench_call(key, precision, min_time, rounds)
            kind, xs, ws, has_bias, stride, padding, output_padding, g = key
            med = rates[len(rates) // 2]
            in_window = sum(c["seconds"] for c in cs)
            shapes.append({
                "kind": kind, "input": list(xs), "weight": list(ws), "stride": list(stride),
                "padding": list(padding), "output": list(conv_output_shape(kind, xs, ws, stride, padding,
                                                                            output_padding)),
                "in_channels": xs[1], "out_channels": ws[0] if kind == "conv3d" else ws[1] * g,
                "kernel": list(ws[2:]), "dtype": cs[0]["dtype"], "channels_last": cs[0]["channels_last"],
                "calls_per_window": len(cs), "gflop_per_call": round(flops / 1e9, 3),
                "gflops": round(med, 1), "gflops_best_round": round(rates[-1], 1),
                "gflops_worst_round": round(rates[0], 1), "reps_per_round": reps,
                "gflops_in_window": round(flops * len(cs) / max(in_window, 1e-9) / 1e9, 1),
            })
            log(f"peak: {precision}: shape {i + 1}/{len(groups)} {kind} x{list(xs)} w{list(ws)} "
                f"s{list(stride)}: {med:.0f} GFLOPS ({len(cs)} calls per window)")
        window_flops = sum(conv_flops(c["kind"], c["x"], c["w"], c["stride"], c["padding"], c["groups"],
                                      c["output_padding"]) for c in calls)
        conv_in_window = sum(c["seconds"] for c in calls)
        rate = {(s["kind"], tuple(s["input"]), tuple(s["weight"]), tuple(s["stride"])): s["gflops"] for s in shapes}
        at_rates = sum(conv_flops(c["kind"], c["x"], c["w"], c["stride"], c["padding"], c["groups"],
                                  c["output_padding"]) / 1e9 / rate[(c["kind"], c["x"], c["w"], c["stride"])]
                       for c in calls)
        best = max(shapes, key=lambda s: s["gflops"])
        peak = best["gflops"]
        out["precisions"][precision] = {
            "peak_gflops": peak, "peak_gflops_best_round": max(s["gflops_best_round"] for s in shapes),
            "peak_shape": {k: best[k] for k in ("kind", "input", "weight", "stride")},
            "window_gflop_streamed": round(window_flops / 1e9, 1),
            "window_seconds": round(window_s, 3), "first_window_seconds": round(first_s, 3),
            "window_conv_seconds_in_window": round(conv_in_window, 3),
            "window_conv_seconds_at_measured_rates": round(at_rates, 3),
            "window_gflops": round(window_flops / 1e9 / window_s, 1),
            "window_fraction_of_peak": round(window_flops / 1e9 / window_s / peak, 3),
            "distinct_call_shapes": len(shapes), "calls_per_window": len(calls),
            "shapes": shapes,
        }
    return out


def fraction_of_peak(seconds_per_window, peak: dict, precision: str, gflop_per_window=None):
    """(FLOPs per window / t) / peak for ``precision``; None when either is unknown."""
    p = (peak or {}).get("precisions", {}).get(precision)
    if not p or not seconds_per_window:
        return None
    gflop = gflop_per_window or p["window_gflop_streamed"]
    return round(gflop / seconds_per_window / p["peak_gflops"], 3)


# --- inputs ---------------------------------------------------------------------------------------------------


def example_folder() -> Path:
    from ctfm_testing.data import shared_data_dir

    data = shared_data_dir()
    folder = data / "totalsegmentator_example" if data is not None else None
    if folder is None or not (folder / "example_ct.nii.gz").exists():
        raise FileNotFoundError("real CT data not found: ../shared/data/totalsegmentator_example "
                                "(set CTFM_TEST_DATA to the shared data folder)")
    return folder


def clinical_ct(source: Path, out: Path, spacing=(0.8, 0.8, 1.5)) -> Path:
    """``source`` resampled (linear, outside -1024 HU) to ``spacing`` mm on the same extent, int16; reused
    when ``out`` already holds it. Voxel 0 stays where it was; n = ceil(extent / spacing - 0.5) voxels per
    axis (the 3 mm example CT, 122 x 101 x 112, becomes 457 x 379 x 224)."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(source))
    size = [int(np.ceil(n * s / t - 0.5)) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    if out.exists():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(out))
        reader.ReadImageInformation()
        if list(reader.GetSize()) == size and np.allclose(reader.GetSpacing(), spacing):
            return out
    log(f"writing the clinical-like CT {'x'.join(map(str, size))} at {'x'.join(map(str, spacing))} mm to {out}")
    fine = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), tuple(float(s) for s in spacing),
                         ct.GetDirection(), -1024, sitk.sitkFloat32)
    fine = sitk.Cast(sitk.Round(fine), sitk.sitkInt16)
    tmp = out.with_name(out.name + ".partial.nii.gz")
    sitk.WriteImage(fine, str(tmp))
    os.replace(tmp, out)
    return out


def whole_body_spacing() -> list:
    """The whole-body model's working spacing as the catalogue records it (S, P, L mm)."""
    from CTFMLib.catalog import load_catalog

    entry = load_catalog().find("whole_body_segmentation")
    spacing = getattr(entry, "spacing", None)
    if not spacing:
        raise RuntimeError("the catalogue (Resources/Models.json) records no spacing for whole_body_segmentation")
    return [float(v) for v in spacing]


def random_whole_body_model(folder: Path) -> Path:
    """The full 118-class network with random weights (seed 0, head biases zeroed), in the published layout,
    its config recording the catalogue's whole-body spacing (``_training.spacing``, what ``spacing="model"``
    reads for a model folder) so the defaults resample as they do for the published model. Reused when present."""
    spacing = whole_body_spacing()
    config_path = folder / "config.json"
    if config_path.exists() and (folder / "model.safetensors").exists():
        config = json.loads(config_path.read_text())
        if (config.get("_training") or {}).get("spacing") != spacing:
            config["_training"] = {**(config.get("_training") or {}), "spacing": spacing}
            config_path.write_text(json.dumps(config, indent=2))
        return folder
    import torch

    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    log(f"writing the random-weight whole-body network to {folder}")
    model = monai_segresnet(out_channels=118, init_filters=32, blocks_down=(1, 2, 2, 4, 4), dsdepth=4, seed=0)
    with torch.no_grad():
        for level in model.up_layers:
            if isinstance(level["head"], torch.nn.Conv3d):
                level["head"].bias.zero_()
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    write_published_layout(model, tmp, {**CONFIG, "_training": {"spacing": spacing}})
    os.replace(tmp, folder)
    return folder


# --- a model that has learned anatomy -----------------------------------------------------------------------

NO_AUGMENT = {"affine_p": 0.0, "smooth_p": 0.0, "intensity_scale_p": 0.0, "intensity_shift_p": 0.0, "noise_p": 0.0}


def trained_model_recipe(structures: int = 10, steps: int = 300, spacing: float = 1.5, crop=(48, 160, 192),
                         init_filters: int = 8, blocks_down=(1, 1, 1, 1), lr: float = 5e-3) -> dict:
    return {"structures": structures, "steps": steps, "spacing": spacing, "crop": list(crop),
            "init_filters": init_filters, "blocks_down": list(blocks_down), "lr": lr,
            "scan": "example_ct_sm.nii.gz", "labels": "example_seg.nii.gz"}


def trained_model(work: Path, recipe: dict, threads: int) -> tuple:
    """``(model folder, training summary)``: a SegResNetDS fine-tuned by ``ctfm train segment`` on the example CT
    (example_ct_sm, 30 slices of 3 mm) and its reference labels (example_seg), resampled to ``spacing`` mm by
    the trainer (``segment.spacing``), on the ``structures`` largest structures; random init, no augmentation,
    crops of ``crop`` voxels (also its sliding window). Kept in ``work`` and reused while the recipe is the same."""
    import hashlib

    folder = work / ("preset_model-" + hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10])
    model = folder / "run" / "model"
    stamp = folder / "recipe.json"
    if (model / "model.safetensors").exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
        return model, {**summary, "reused": True}
    import shutil

    from CTFMLib.image import read_image

    data = example_folder()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    reference = read_image(data / recipe["labels"]).array
    counts = np.bincount(reference.ravel())
    counts[0] = 0
    largest = [int(v) for v in np.argsort(counts)[::-1][:recipe["structures"]] if counts[v] > 0]
    (folder / "data.csv").write_text(f"path,segmentation\n{data / recipe['scan']},{data / recipe['labels']}\n")
    config = {
        "data": {"source": [str(folder / "data.csv")], "workers": 0, "cache_dir": str(folder / "cache")},
        "model": {"init_filters": recipe["init_filters"], "blocks_down": recipe["blocks_down"], "weights": None},
        "optim": {"lr": recipe["lr"], "warmup_steps": 5, "max_steps": recipe["steps"], "grad_clip": 1.0},
        "run": {"scans_per_step": 1, "device": "cpu", "precision": recipe.get("precision", "fp32"), "log_every": 10,
                "checkpoint_every": 100000, "seed": 0},
        "segment": {"labels": "totalsegmentator", "structures": largest, "spacing": [recipe["spacing"]] * 3,
                    "crop_size": recipe["crop"], "dsdepth": 2, "augment": NO_AUGMENT},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    log(f"training the preset model ({recipe['steps']} steps, {len(largest)} structures, {recipe['spacing']} mm) "
        f"in {folder}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "CTFM")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "CTFMLib.cli", "train", "segment", "--config",
                          str(folder / "config.json"), "--out", str(folder / "run"), "--device", "cpu"],
                         env=env, stdout=sys.stderr, stderr=sys.stderr)
    seconds = time.perf_counter() - t0
    if out.returncode != 0 or not (model / "model.safetensors").exists():
        raise RuntimeError(f"ctfm train segment failed (exit {out.returncode}); see the messages above")
    losses = [float(r.split(",")[1]) for r in (folder / "run" / "metrics.csv").read_text().splitlines()[1:]
              if r.count(",") >= 1 and r.split(",")[1]]
    summary = {"train_seconds": round(seconds, 1), "structures": largest, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "config": config}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    stamp.write_text(json.dumps(recipe))
    return model, {**summary, "reused": False}


# --- label agreement --------------------------------------------------------------------------------------------


def agreement(labels: np.ndarray, full: np.ndarray, names: dict) -> dict:
    """``labels`` against ``full`` (same grid): the fraction of voxels with equal labels (all, and where either is
    foreground), and per structure of ``names`` ({value: name}) the Dice of the two masks (None when both empty)."""
    a = np.asarray(labels).ravel().astype(np.int64)
    b = np.asarray(full).ravel().astype(np.int64)
    k = int(max(a.max(initial=0), b.max(initial=0), max(names, default=0))) + 1
    confusion = np.bincount(a * k + b, minlength=k * k).reshape(k, k)
    equal = int(np.trace(confusion))
    background_both = int(confusion[0, 0])
    foreground = a.size - background_both
    per = {}
    for value, name in sorted(names.items()):
        both = int(confusion[value, value])
        size = int(confusion[value].sum() + confusion[:, value].sum())
        per[name] = {"dice": round(2 * both / size, 5) if size else None, "voxels_full": int(confusion[:, value].sum()),
                     "voxels": int(confusion[value].sum())}
    dices = [p["dice"] for p in per.values() if p["dice"] is not None]
    return {"voxel_agreement": round(equal / a.size, 6),
            "foreground_agreement": round((equal - background_both) / foreground, 6) if foreground else None,
            "mean_dice": round(float(np.mean(dices)), 5) if dices else None,
            "min_dice": round(float(np.min(dices)), 5) if dices else None,
            "per_structure": per}


def dice_against(labels: np.ndarray, reference: np.ndarray, channels: dict) -> dict:
    """Dice of ``labels == channel`` against ``reference == value`` for ``channels`` {channel: (value, name)}."""
    out = {}
    for channel, (value, name) in channels.items():
        a, b = labels == channel, reference == value
        size = int(a.sum() + b.sum())
        out[name] = round(2 * int((a & b).sum()) / size, 4) if size else None
    return out


# --- segment_image at any overlap -------------------------------------------------------------------------------


class Segmenter:
    """``segment_image`` (the production path: preprocess at the working spacing, the sliding window, blended
    evidence brought back to the input's voxels) for one loaded model, at a quality or at any overlap.

    ``overlap=x`` runs quality "standard" with its overlap set to ``x`` for the call
    (``CTFMLib.segment_plan.QUALITIES["standard"]``, restored afterwards), so every overlap is measured
    through exactly the code a preset runs."""

    def __init__(self, model_folder: Path, precision="fp32", threads=None):
        from CTFMLib.runtime import run_options
        from CTFMLib.segment import load_segmentation_model

        self.model, self.labels = load_segmentation_model(str(model_folder))
        self.config = json.loads((Path(model_folder) / "config.json").read_text())
        self.options = run_options("cpu", precision, threads=threads)

    @property
    def names(self) -> dict:
        return {x.value: x.name for x in self.labels if x.value > 0}

    def segment(self, image, quality="full", overlap=None, spacing="model"):
        """``(labels on the input grid, stats, seconds)``."""
        from CTFMLib import segment_plan
        from CTFMLib.segment import segment_image

        qualities = getattr(segment_plan, "QUALITIES", None)
        if overlap is not None and not isinstance(qualities, dict):
            raise RuntimeError("CTFMLib.segment_plan.QUALITIES is gone: the overlap sweep needs another way to "
                               "set the sliding window's overlap")
        saved = dict(qualities) if qualities is not None else None
        try:
            if overlap is not None:
                quality = "standard"
                qualities["standard"] = (float(overlap), qualities["standard"][1])
            result = segment_image(image, model=self.model, labels=self.labels, quality=quality, spacing=spacing,
                                   options=self.options)
        finally:
            if saved is not None:
                qualities.clear()
                qualities.update(saved)
        return result.labels.array, dict(getattr(result, "stats", {}) or {}), result.seconds
