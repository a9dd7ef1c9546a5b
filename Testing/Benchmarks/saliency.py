"""Occlusion vs gradient saliency time with the real CT-FM encoder (random weights); prints JSON.

    python Testing/Benchmarks/saliency.py [--quick] [--device cpu] [--threads N] [--full-occlusion]

The image is a life-size head phantom, 512 x 512 x 40 voxels at 0.5 x 0.5 x 5 mm (``--quick``:
256 x 256 x 40 at 1 x 1 x 5 mm, the same head: the networks see the same grids, only reading and
resampling are cheaper). Cases, each with both methods through :func:`CTFMLib.saliency.saliency_image`:

- ``whole_head``: the scan embedding on the whole head (3 mm grid, upstream's saliency setting);
- ``region64``: the patch embedding (24 x 128 x 128 at 3 x 1 x 1 mm) around a point in the brain,
  limited to a 64-voxel cube of that grid (all 24 slices of the patch, 64 x 64 in plane).

The gradient method (integrated gradients, default steps) runs to the end. Occlusion is cancelled
through its progress callback (the real code path) after 4 batches (``--quick``: 2) and its time
extrapolated: setup + first batch (which also builds oneDNN's kernels) + the mean of the others x the
remaining batches; ``--full-occlusion`` runs it to the end instead. The model-card crop keeps the
whole field of view (air is above -1024 HU), so the head's 3 mm grid is 67 x 85 x 85 and its
occlusion needs 1440 cubes. Same architecture as the published encoder, so the same cost.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))
sys.path.insert(0, str(ROOT / "Testing"))


class _Stop(Exception):
    pass


def time_occlusion(image, model, kwargs, measure_batches=None) -> dict:
    """Run occlusion; with ``measure_batches``, stop after that many batches and extrapolate."""
    from CTFMLib.progress import Cancelled
    from CTFMLib.saliency import OCCLUSION_BATCH, saliency_image

    marks = {}
    batch_times = []

    def progress(fraction, message):
        now = time.perf_counter()
        if message == "occluding":
            marks["start"] = now
        elif message.startswith("occluded window"):
            done, total = (int(v) for v in message.split()[2::2])
            batch_times.append(now - marks.get("last", marks["start"]))
            marks["last"] = now
            marks["total"] = total
            if measure_batches and len(batch_times) >= measure_batches and done < total:
                raise Cancelled()

    t0 = time.perf_counter()
    try:
        result = saliency_image(image, weights=model, method="occlusion", progress=progress, device=args.device,
                                **kwargs)
    except Cancelled:
        result = None
    end = time.perf_counter()
    windows = marks["total"]
    batches = -(-windows // OCCLUSION_BATCH)
    steady = batch_times[1:] or batch_times
    out = {"windows": windows, "batches": batches, "setup_s": round(marks["start"] - t0, 2),
           "first_batch_s": round(batch_times[0], 2),
           "per_window_s": round(sum(steady) / len(steady) / OCCLUSION_BATCH, 3)}
    if result is not None:
        out["seconds"] = round(end - t0, 2)
        out["measured"] = "whole run"
        out["peak_lps"] = [round(float(v), 1) for v in result.peak_lps]
    else:
        out["seconds"] = round(marks["start"] - t0 + batch_times[0] + sum(steady) / len(steady) * (batches - 1), 1)
        out["measured"] = f"{len(batch_times)} of {batches} batches, extrapolated"
    return out


def time_gradient(image, model, kwargs) -> dict:
    from CTFMLib.saliency import saliency_image

    t0 = time.perf_counter()
    result = saliency_image(image, weights=model, method="gradient", device=args.device, **kwargs)
    return {"seconds": round(time.perf_counter() - t0, 2), "steps": result.details["steps"],
            "peak_lps": [round(float(v), 1) for v in result.peak_lps]}


def main():
    import numpy as np
    import torch

    from ctfm_testing.phantoms import head_phantom
    from CTFMLib.embed import PATCH_SPACING
    from CTFMLib.networks import build_encoder
    from CTFMLib.preprocess import PreprocessConfig, preprocess
    from CTFMLib.saliency import EMBEDDING_SPACING

    if args.threads:
        torch.set_num_threads(args.threads)
    shape, spacing = ((256, 256, 40), (1.0, 1.0, 5.0)) if args.quick else ((512, 512, 40), (0.5, 0.5, 5.0))
    t0 = time.perf_counter()
    image = head_phantom(shape=shape, spacing=spacing, head_radius_mm=85.0,
                         lesion={"center_lps": (25.0, -20.0, 15.0), "radius_mm": 10.0, "hu": 70.0})
    phantom_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_encoder().eval()  # the published CT-FM architecture, 77.8M parameters, random weights
    point = np.array([25.0, -20.0, 15.0])
    # 64 voxels of the 3 x 1 x 1 mm (S, P, L) patch grid per axis, as an LPS box (x = L, y = P, z = S)
    half = 32.0 * np.array([PATCH_SPACING[2], PATCH_SPACING[1], PATCH_SPACING[0]])
    cases = [
        ("whole_head", {"target": "embedding"}, 0 if args.full_occlusion else None),
        ("region64", {"target": "point", "point_lps": point, "region_lps": (point - half, point + half)},
         0 if args.full_occlusion else None),
    ]
    report = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "quick": args.quick, "image": {"shape": list(shape), "spacing_mm": list(spacing),
                                             "phantom_seconds": round(phantom_s, 1)},
              "network": "SegResEncoder init_filters 32, blocks_down (1, 2, 2, 4, 4) (CT-FM), random weights",
              "cases": []}
    grid = preprocess(image, PreprocessConfig(spacing=EMBEDDING_SPACING)).array.shape
    for name, kwargs, full in cases:
        measure = None if full == 0 else (2 if args.quick else 4)
        occ = time_occlusion(image, model, kwargs, measure)
        grad = time_gradient(image, model, kwargs)
        case = {"name": name, "target": kwargs["target"],
                "grid": list(grid) if name == "whole_head" else [24, 128, 128],
                "region": "whole" if "region_lps" not in kwargs else "64-voxel cube of the 3x1x1 mm grid (24x64x64)",
                "occlusion": occ, "gradient": grad, "speedup": round(occ["seconds"] / grad["seconds"], 1)}
        report["cases"].append(case)
        print(json.dumps(case), file=sys.stderr, flush=True)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a coarser phantom and extrapolated occlusion")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--full-occlusion", action="store_true",
                   help="run occlusion to the end instead of extrapolating (about 35 min on 2 CPU cores)")
    args = p.parse_args()
    main()
