"""Retrieval index speed and FAISS recall on clustered vectors; prints JSON.

    python Testing/Benchmarks/retrieve.py [--quick] [--dim 512] [--sizes 10000,100000,1000000] [--dir TMP]

For each size, patch-level vectors from 1,000 Gaussian clusters (unit-variance centres, noise 0.5 per
coordinate; 1,000 patches per scan) are added to a fresh index, then:

- add throughput (vectors/s, fsyncs included) and bytes on disk per vector (index files; FAISS separately);
- query latency p50/p99 (one query per call, k=10, cosine) for exact numpy search and for FAISS
  (HNSW below 50,000 vectors, IVF-Flat above; build and reload times reported apart);
- FAISS recall@10 against exact search, over queries drawn from the same clusters.

``--quick`` runs 1e4 and 1e5 only. FAISS numbers are null when faiss is not installed.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))

from CTFMLib.retrieval import ScanRecord, VectorIndex  # noqa: E402
from CTFMLib.retrieval import search as _search  # noqa: E402

CLUSTERS, PER_SCAN, K = 1000, 1000, 10


def _folder_bytes(path: Path, skip=()) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not any(s in p.parts for s in skip))


def _latency(ix, queries, backend) -> dict:
    times = []
    for q in queries:
        t = time.perf_counter()
        ix.search(q, k=K, level="patch", backend=backend)
        times.append(time.perf_counter() - t)
    return {"queries": len(times), "p50_ms": round(1e3 * float(np.percentile(times, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(times, 99)), 3)}


def one_size(n: int, dim: int, folder: Path, n_latency: int, n_recall: int) -> dict:
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    path = folder / f"ix-{n}"
    ix = VectorIndex.create(path, "benchmark", "0" * 64, dim, {"note": "synthetic clustered vectors"})
    add_s, row = 0.0, 0
    for s in range(n // PER_SCAN):
        x = centres[rng.integers(0, CLUSTERS, PER_SCAN)] + 0.5 * rng.standard_normal((PER_SCAN, dim), dtype=np.float32)
        where = np.stack([np.arange(row, row + PER_SCAN), np.zeros(PER_SCAN), np.zeros(PER_SCAN)], 1)  # names rows
        t = time.perf_counter()
        ix.add(ScanRecord(f"/synthetic/{s}.nii.gz", patient_id=f"P{s}"), x.mean(0), x, where)
        add_s += time.perf_counter() - t
        row += PER_SCAN
    out = {"vectors": n, "scans": n // PER_SCAN, "patches_per_scan": PER_SCAN, "add_seconds": round(add_s, 2),
           "add_vectors_per_s": round(n / add_s), "bytes_per_vector": round(_folder_bytes(path) / n, 1)}
    queries = centres[rng.integers(0, CLUSTERS, n_recall)] + 0.5 * rng.standard_normal((n_recall, dim),
                                                                                        dtype=np.float32)
    t = time.perf_counter()
    truth = ix.search(queries, k=K, level="patch", backend="exact")
    out["exact_batch_s_per_query"] = round((time.perf_counter() - t) / n_recall, 4)
    out["exact"] = _latency(ix, queries[:n_latency], "exact")
    if _search.faiss_module() is None:
        out["faiss"] = None
        return out
    t = time.perf_counter()
    found = ix.search(queries, k=K, level="patch", backend="faiss")  # the first call builds the FAISS index
    build_and_batch = time.perf_counter() - t
    recall = np.mean([len({h.centre_lps[0] for h in a} & {h.centre_lps[0] for h in b}) / K
                      for a, b in zip(found, truth)])
    fa = {"kind": _search.FaissCache.kind_for(n), "build_plus_first_batch_s": round(build_and_batch, 2),
          "recall_at_10": round(float(recall), 4)}
    fa.update(_latency(ix, queries[:n_latency], "faiss"))
    ix.close()
    fresh = VectorIndex.open(path)  # a new process's first FAISS search loads the saved index
    t = time.perf_counter()
    fresh.search(queries[0], k=K, level="patch", backend="faiss")
    fa["reload_first_query_s"] = round(time.perf_counter() - t, 2)
    fa["bytes_per_vector"] = round(_folder_bytes(path / "faiss") / n, 1)
    fresh.close()
    out["faiss"] = fa
    out["auto_uses_faiss"] = n >= _search.FAISS_AUTO_MIN_ROWS
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1e4 and 1e5 vectors only")
    p.add_argument("--sizes", help="comma-separated vector counts (multiples of 1000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--dir", help="where to build the indexes (default: a temporary folder, removed after)")
    args = p.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ctfm-retrieve-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    faiss = _search.faiss_module()
    report = {"dim": args.dim, "k": K, "metric": "cosine", "level": "patch", "clusters": CLUSTERS,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "numpy": np.__version__,
              "faiss": getattr(faiss, "__version__", None), "sizes": []}
    t0 = time.perf_counter()
    try:
        for n in sizes:
            lat = args.latency_queries if n < 1_000_000 else min(args.latency_queries, 30)
            report["sizes"].append(one_size(n, args.dim, folder, lat, args.recall_queries))
            print(json.dumps(report["sizes"][-1]), file=sys.stderr, flush=True)
            if not args.dir:
                shutil.rmtree(folder / f"ix-{n}", ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
