"""Organ statistics on a life-size scan: time and extra memory of :func:`CTFMLib.statistics.structure_statistics`;
prints JSON.

    python Testing/Benchmarks/statistics.py [--shape 512,512,400] [--structures 40] [--slab PLANES]

The scan is synthetic: an int16 CT of random HU and a uint8 label map with 40 ellipsoidal structures (about a
fifth of the voxels), both in the memory order of an image read from a file (``k`` slowest). Memory is the
peak of what numpy allocated during the call (tracemalloc, which numpy reports to) and the growth of the
process's peak RSS over the call (VmHWM, reset before it); the issue's bound is 1 GB extra for 512 x 512 x 400.
"""

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))


def phantom(shape: tuple, structures: int, seed: int = 0):
    """``(ct, labels)`` as Images: random HU and ``structures`` ellipsoids, on a 0.8 x 0.8 x 1.25 mm grid."""
    from CTFMLib.image import Image

    rng = np.random.default_rng(seed)
    ct = np.asfortranarray(rng.integers(-1024, 2000, shape, dtype=np.int16))
    labels = np.zeros(shape, np.uint8, order="F")
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for value in range(1, structures + 1):
        centre = rng.uniform(0.15, 0.85, 3) * shape
        radii = rng.uniform(0.06, 0.16, 3) * shape
        z0, z1 = int(max(centre[2] - radii[2], 0)), int(min(centre[2] + radii[2] + 1, shape[2]))
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip((grid[0], grid[1], grid[2][:, :, z0:z1]), centre, radii))
        labels[:, :, z0:z1][inside <= 1.0] = value
    spacing = (0.8, 0.8, 1.25)
    return Image(ct, spacing=spacing), Image(labels, spacing=spacing)


def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in MiB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Start VmHWM afresh (Linux >= 4.0: ``5`` into clear_refs), so building the phantom does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="512,512,400", help="i,j,k voxels (default: 512,512,400)")
    p.add_argument("--structures", type=int, default=40)
    p.add_argument("--slab", type=int, help="planes per slab (default: the module's)")
    args = p.parse_args()
    from CTFMLib.statistics import structure_statistics

    shape = tuple(int(v) for v in args.shape.split(","))
    image, labels = phantom(shape, args.structures)
    foreground = int(np.count_nonzero(labels.array))
    reset = _reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    stats = structure_statistics(image, labels, slab=args.slab)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = _status_mb("VmHWM")
    print(json.dumps({
        "shape": list(shape), "structures": len(stats), "foreground_voxels": foreground,
        "input_mb": round((image.array.nbytes + labels.array.nbytes) / 2**20, 1),
        "seconds": round(seconds, 2), "peak_extra_mb_tracemalloc": round(peak / 2**20, 1),
        "peak_rss_growth_mb": round(rss_peak - rss_before, 1) if reset else None, "limit_mb": 1024,
    }))


if __name__ == "__main__":
    main()
