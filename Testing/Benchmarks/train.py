"""Pretraining throughput: crops per second, split into data time and model time; prints JSON.

    python Testing/Benchmarks/train.py [--quick] [--device cpu|cuda|auto] [--steps N] [--scans-per-step N]
        [--crops N] [--init-filters N] [--blocks-down 1,2,2,4,4] [--precision auto] [--data] [--threads N]
        [--data-only]

Default: the real :class:`~CTFMLib.train.pretrain.PretrainTask` with the default recipe (15 crops of
32 x 128 x 128 voxels per scan, two views each, ``scans_per_step`` 2) and the full CT-FM encoder
(init_filters 32, blocks_down 1,2,2,4,4; random weights), on a synthetic abdomen (a body phantom of
320 x 320 x 120 voxels at 1 x 1 x 3 mm, HU scaled to [0, 1] over [-1024, 2048] as the scan cache does).
``--data``: the real example CT instead, preprocessed by the scan cache (3 x 1 x 1 mm, SPL).

Each step is timed as the trainer runs it (no data workers: ``task.batch`` runs in the training loop):

- ``data``: ``task.batch(step)``: the crops and augmented views, NumPy/torch on the CPU;
- ``model``: ``task.backward`` (host -> device copy, forward, NT-Xent, backward; in micro-batches of
  ``pretrain.micro_batch`` crops, "auto" = what fits this machine's memory) + AdamW step, under the
  trainer's precision (``auto``: bf16 autocast on CUDA when supported, else fp16 with a grad scaler;
  fp32 on the CPU), with ``torch.cuda.synchronize()`` before each clock reading on CUDA.

The first ``--warmup`` steps (default 1: kernel selection, allocator growth) are run but not counted.
A crop is one of the ``crops_per_scan`` crops of a scan; the model sees two views of each
(``views_per_step = 2 * crops_per_step``). ``--quick``: tiny settings that finish in well under a minute.
``--data-only``: time ``task.batch`` alone (the model is not built).

Memory: in fp32 the full encoder keeps ~0.6 GB of activations per 32 x 128 x 128 view for the backward
pass (measured on the CPU: 4 views 4.1 GB peak, 8 views 6.5 GB), so the default step (60 views) would need
~38 GB at once; the task's micro-batches (``pretrain.micro_batch``, "auto") keep each pass within the memory
available, at the cost of a second forward pass per crop.
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))
sys.path.insert(0, str(ROOT / "Testing"))

HU_RANGE = (-1024.0, 2048.0)


def synthetic_volume(shape_spl) -> np.ndarray:
    """A body phantom as the scan cache stores it: float32 (S, P, L) in [0, 1]."""
    from ctfm_testing.phantoms import body_phantom

    s, p, lr = shape_spl
    image = body_phantom(shape=(lr, p, s), spacing=(1.0, 1.0, 3.0), seed=0)  # array axes x (L), y (P), z (S)
    hu = np.asarray(image.array, dtype=np.float32).transpose(2, 1, 0)[::-1]  # -> S (superior first), P, L
    return np.ascontiguousarray(np.clip((hu - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]), 0, 1), dtype=np.float32)


def real_volume(folder: Path) -> np.ndarray:
    from ctfm_testing.data import shared_data_dir
    from CTFMLib.train.data import ScanCache, find_scans

    data = shared_data_dir()
    if data is None:
        raise SystemExit(json.dumps({"skipped": "real CT data not found (set CTFM_TEST_DATA)"}))
    scans = find_scans([data / "totalsegmentator_example" / "example_ct.nii.gz"])
    cache = ScanCache(folder, spacing=(3.0, 1.0, 1.0), hu_range=HU_RANGE)
    usable, skipped = cache.prepare(scans, workers=0)
    if not usable:
        raise SystemExit(json.dumps({"error": f"the example CT was not usable: {skipped}"}))
    return np.array(cache.get(usable[0]))


def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def amp_dtype(precision: str, device):
    """The trainer's choice (trainer._Run._amp_dtype): mixed precision on CUDA only."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--scans-per-step", type=int, default=2)
    p.add_argument("--crops", type=int, default=15, help="crops per scan")
    p.add_argument("--crop-size", default="32,128,128", help="S,P,L voxels")
    p.add_argument("--init-filters", type=int, default=32)
    p.add_argument("--blocks-down", default="1,2,2,4,4")
    p.add_argument("--volume", default="120,320,320", help="S,P,L voxels of the synthetic scan")
    p.add_argument("--data", action="store_true", help="the real example CT instead of a synthetic scan")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the benchmark runs")
    p.add_argument("--data-only", action="store_true", help="time the data (task.batch) alone")
    args = p.parse_args()
    if args.quick:
        args.crops, args.crop_size, args.init_filters, args.blocks_down = 4, "16,64,64", 8, "1,1,1,1"
        args.volume = "48,128,128"

    import torch

    from CTFMLib.train.config import load_config
    from CTFMLib.train.pretrain import PretrainTask
    from CTFMLib.train.trainer import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    blocks = [int(b) for b in args.blocks_down.split(",")]
    deepest = args.init_filters * 2 ** (len(blocks) - 1)
    config = load_config(None, "pretrain", {
        "model": {"init_filters": args.init_filters, "blocks_down": blocks},
        "pretrain": {"crops_per_scan": args.crops, "crop_size": [int(s) for s in args.crop_size.split(",")],
                     "projection": [deepest, 256, 128]},
        "run": {"scans_per_step": args.scans_per_step, "seed": 0},
    })
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        volume = real_volume(Path(tmp)) if args.data else synthetic_volume([int(s) for s in args.volume.split(",")])
    setup_s = time.perf_counter() - t0
    # Two scans to draw from (the second mirrored left-right), as a data set would offer.
    task = PretrainTask(config, [volume, np.ascontiguousarray(volume[..., ::-1])])

    torch.manual_seed(0)
    model = None if args.data_only else task.build_model().to(device).train()
    optimizer = None if args.data_only else torch.optim.AdamW(
        model.parameters(), lr=float(config["optim"]["lr"]), weight_decay=float(config["optim"]["weight_decay"]))
    dtype = amp_dtype(args.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        sync()
        t0 = time.perf_counter()
        batch = task.batch(step, 0, 1)
        t1 = time.perf_counter()
        if args.data_only:
            steps.append({"step": step, "warmup": step <= args.warmup, "data_s": round(t1 - t0, 4)})
            continue
        def autocast():
            return torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)

        # as the trainer runs it: pretrain.micro_batch crops per pass ("auto": what fits this machine's memory)
        loss = task.backward(model, batch, device, scaler.scale, autocast)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        sync()
        t2 = time.perf_counter()
        steps.append({"step": step, "warmup": step <= args.warmup, "data_s": round(t1 - t0, 4),
                      "model_s": round(t2 - t1, 4), "loss": round(value, 5)})

    timed = [s for s in steps if not s["warmup"]] or steps
    data_s = float(np.mean([s["data_s"] for s in timed]))
    model_s = float(np.mean([s["model_s"] for s in timed])) if model is not None else None
    crops = args.scans_per_step * args.crops

    def rate(seconds):
        return round(crops / seconds, 2) if seconds else None
    result = {
        "benchmark": "train", "task": "pretrain", "quick": args.quick,
        "input": "example CT (3 x 1 x 1 mm, SPL)" if args.data else f"synthetic body phantom {list(volume.shape)}",
        "volume_shape": list(volume.shape), "setup_s": round(setup_s, 2),
        "settings": {"scans_per_step": args.scans_per_step, "crops_per_scan": args.crops,
                     "crop_size": config["pretrain"]["crop_size"], "init_filters": args.init_filters,
                     "blocks_down": blocks, "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
                     "parameters": sum(p.numel() for p in model.parameters()) if model is not None else None},
        "crops_per_step": crops, "views_per_step": 2 * crops,
        "data_s_per_step": round(data_s, 4), "model_s_per_step": round(model_s, 4) if model_s else None,
        "crops_per_s": {"data": rate(data_s), "model": rate(model_s),
                        "total": rate(data_s + model_s) if model_s else None},
        "data_fraction": round(data_s / (data_s + model_s), 3) if model_s else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "machine": machine(device), "steps": steps,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
