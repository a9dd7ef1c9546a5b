"""Time and peak memory of CT-FM volume and scan embeddings of the real example CT; prints JSON.

    python Testing/Benchmarks/embed.py [--weights SRC] [--device auto] [--precision fp32] [--modes volume,scan]

Without ``--weights`` the full-size CT-FM encoder with random weights is used
(same architecture, so the same cost). Each mode runs in a fresh child process
so its peak RSS is its own.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))
sys.path.insert(0, str(ROOT / "Testing"))


def one(args) -> dict:
    import torch

    from CTFMLib.embed import embed_image
    from CTFMLib.image import read_image
    from CTFMLib.networks import build_encoder

    image = read_image(args.image)
    if args.weights:
        from CTFMLib.weights import load_model

        model = load_model(args.weights, expect="SegResEncoder")[0]
    else:
        torch.manual_seed(0)
        model = build_encoder().eval()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    vec = embed_image(image, model=model, mode=args.one, device=args.device, precision=args.precision,
                      batch_size=args.batch_size, threads=args.threads)
    seconds = time.perf_counter() - t0
    import torch as _t

    return {
        "mode": args.one, "seconds": round(seconds, 3), "dim": int(vec.shape[0]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_run_mb": round(rss_before / 1024, 1),
        "peak_cuda_mb": round(_t.cuda.max_memory_allocated() / 2**20, 1) if _t.cuda.is_available() else None,
        "image_shape": list(image.shape), "spacing_mm": [round(float(s), 3) for s in image.spacing],
        "device": args.device, "precision": args.precision, "threads": _t.get_num_threads(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image", default=None)
    p.add_argument("--weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--modes", default="volume,scan")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.image is None:
        from ctfm_testing.data import shared_data_dir

        data = shared_data_dir()
        if data is None:
            print(json.dumps({"skipped": "real CT data not found (set CTFM_TEST_DATA)"}))
            return
        args.image = str(data / "totalsegmentator_example" / "example_ct.nii.gz")
    if args.one:
        print(json.dumps(one(args)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--image", args.image, "--device", args.device,
               "--precision", args.precision, "--batch-size", str(args.batch_size)]
        if args.weights:
            cmd += ["--weights", args.weights]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode != 0:
            results.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "embed", "image": args.image, "results": results}, indent=2))


if __name__ == "__main__":
    main()
