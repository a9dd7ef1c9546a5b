"""Expected against measured time of each command on the real example CT; prints JSON.

    python Testing/Benchmarks/estimates.py [--work DIR] [--threads N] [--only segment-fast,embed-scan,...]

Each command runs as a user runs it, ``ctfm --progress json ... --json`` in its own process (published-shape
networks with random weights: the same work as the published weights), with a CT-FM cache of its own in
``--work`` (kept between runs, so a second run shows the calibrated state; ``--fresh`` empties it first).
The benchmark reads the process's progress lines as they come: the first line carrying
``expected_seconds`` is the command's estimate (:class:`CTFMLib.progress.Estimate`), said at
``announced_at`` seconds after the start. Reported per command:

- ``expected``: ``announced_at + expected_seconds`` (when the command said it would end);
- ``measured``: the process's wall time;
- ``ratio``: measured / expected (the target: 0.7-1.3 on a quiet machine);
- ``work_ratio``: (measured - announced_at) / expected_seconds, the estimate of the remaining work alone.

Commands (all on ``example_ct.nii.gz``, 122 x 101 x 112 voxels (x, y, z) at 3 mm):
``segment-fast`` and ``segment`` (the whole-body network, 118 classes, 32 filters; ``--quality fast`` and
the defaults), ``saliency-gradient`` (the point target's 24 x 128 x 128 cube at the CT's centre,
``--method gradient``), ``embed-scan``, ``index-add`` (one scan into a new index), ``pretrain-5``
(5 steps of ``ctfm train pretrain``, the default recipe with 4 crops of 32 x 96 x 96 per scan and one scan
per step, so that it fits this machine's memory; the scan cache is filled by the first step's command).
The segmentations learn this computer's seconds per window as they run (``timings.json``): run the
benchmark twice to see the first-run estimate (from the encoder's measured speed) and the learnt one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "Testing" / "Benchmarks"))

COMMANDS = ("segment-fast", "segment", "saliency-gradient", "embed-scan", "index-add", "pretrain-5")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def encoder_folder(folder: Path) -> Path:
    """The published encoder's shape (32 filters, blocks 1,2,2,4,4) with random weights, in the published layout."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch

    from CTFMLib.networks import build_encoder
    from CTFMLib.weights import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_encoder(), folder, {"architecture": "SegResEncoder", "spatial_dims": 3, "in_channels": 1,
                                              "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]})
    return folder


def centre_lps(path: Path) -> list:
    from CTFMLib.image import read_image

    image = read_image(path)
    import numpy as np

    return [round(float(v), 1) for v in image.index_to_physical((np.asarray(image.shape) - 1) / 2.0)]


def pretrain_config(path: Path, scan: Path, cache: Path) -> Path:
    config = {"data": {"source": [str(scan)], "cache_dir": str(cache), "workers": 0},
              "pretrain": {"crops_per_scan": 4, "crop_size": [32, 96, 96]},
              "optim": {"max_steps": 5, "warmup_steps": 1},
              "run": {"scans_per_step": 1, "val_every": 0, "checkpoint_every": 5, "precision": "fp32"}}
    path.write_text(json.dumps(config, indent=2))
    return path


def run_command(args: list, env: dict, timeout: float) -> dict:
    """Run ``ctfm`` and follow its JSON progress lines; the estimate and the wall time."""
    command = [sys.executable, "-m", "CTFMLib.cli", "--progress", "json", *map(str, args)]
    log("$ " + " ".join(command[2:]))
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found: dict = {}
    errors: list = []

    def follow():
        for line in proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                errors.append(line.rstrip())
                continue
            if isinstance(event, dict) and "expected_seconds" in event and "expected_seconds" not in found:
                found.update(announced_at=round(time.perf_counter() - start, 2),
                              expected_seconds=float(event["expected_seconds"]), message=event.get("message"))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)  # stderr is the reader's: communicate() would take it
    timer.start()
    out = proc.stdout.read()
    proc.wait()
    measured = time.perf_counter() - start
    timer.cancel()
    reader.join(5)
    result = {"command": " ".join(map(str, args)), "exit_code": proc.returncode, "measured": round(measured, 1),
              **found}
    if "expected_seconds" in found:
        expected = found["announced_at"] + found["expected_seconds"]
        result["expected"] = round(expected, 1)
        result["ratio"] = round(measured / expected, 3)
        result["work_ratio"] = round((measured - found["announced_at"]) / max(found["expected_seconds"], 1e-3), 3)
    if proc.returncode != 0:
        result["stderr_tail"] = errors[-5:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if lines:
        try:
            result["result"] = {k: v for k, v in json.loads(lines[-1]).items() if k in ("seconds", "steps")}
        except ValueError:
            pass
    log(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ctfm-bench-estimates", help="work folder (models, cache, outputs)")
    parser.add_argument("--threads", type=int, default=None, help="threads per command (default: all cores)")
    parser.add_argument("--only", default=",".join(COMMANDS), help="comma-separated subset of " + ", ".join(COMMANDS))
    parser.add_argument("--fresh", action="store_true", help="empty the work folder's CT-FM cache first")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per command")
    args = parser.parse_args()

    import shutil

    from segment_support import cpu_info, example_folder, random_whole_body_model

    work = Path(args.work)
    marker = work / ".ctfm-bench-estimates"  # the folder is this benchmark's: only then does it empty parts of it
    if work.exists() and any(work.iterdir()) and not marker.exists():
        parser.error(f"--work {work} holds files this benchmark did not make: give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    cache = work / "ctfm_cache"
    if args.fresh and cache.exists():
        shutil.rmtree(cache)
    ct = example_folder() / "example_ct.nii.gz"
    threads = args.threads or os.cpu_count() or 1
    env = {**os.environ, "CTFM_CACHE": str(cache), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])}
    env.pop("CTFM_COSTS_FILE", None)
    encoder = encoder_folder(work / "encoder")
    whole_body = random_whole_body_model(work / "whole_body_random")
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    point = ",".join(map(str, centre_lps(ct)))
    commands = {
        "segment-fast": ["segment", ct, "--model", whole_body, "--quality", "fast", "--out", out / "fast.nii.gz"],
        "segment": ["segment", ct, "--model", whole_body, "--out", out / "default.nii.gz"],
        "saliency-gradient": ["saliency", ct, "--weights", encoder, "--target", f"point:{point}", "--method",
                              "gradient", "--out", out / "heat.nii.gz"],
        "embed-scan": ["embed", ct, "--weights", encoder, "--mode", "scan", "--out", out / "scan.npy"],
        "index-add": ["index", "add", out / "index", ct, "--weights", encoder],
        "pretrain-5": ["train", "pretrain", "--config", pretrain_config(out / "pretrain.json", ct, out / "scans"),
                       "--out", out / "pretrain", "--max-steps", 5],
    }
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(COMMANDS))
    if unknown:
        parser.error(f"unknown commands {unknown}: choose from {', '.join(COMMANDS)}")
    results = {}
    for name in chosen:
        results[name] = run_command([*commands[name], "--json"], env, args.timeout)
    ratios = [r["ratio"] for r in results.values() if "ratio" in r]
    report = {
        "benchmark": "estimates", "image": str(ct), "threads": threads, "cpu": cpu_info(threads),
        "loadavg_1_5_15": list(os.getloadavg()), "commands": results,
        "all_within_0.7_1.3": bool(ratios) and len(ratios) == len(results) and all(0.7 <= r <= 1.3 for r in ratios),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
