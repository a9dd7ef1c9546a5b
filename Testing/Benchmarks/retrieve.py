"""Retrieval index speed and approximate-search recall on clustered vectors, per backend; prints one JSON object.

    python Testing/Benchmarks/retrieve.py [--backend embedded|postgresql|both] [--quick] [--sizes 100000,1000000]
                                          [--dim 512] [--per-scan N] [--url postgresql://...] [--dir TMP]

For each size, patch-level vectors from 1,000 Gaussian clusters (unit-variance centres, noise 0.5 per
coordinate) are added to a fresh index, one "scan" per ``--per-scan`` patches (1,000 for the embedded
backend alone, as before; 100 when PostgreSQL runs), four scans per patient; then, for each backend:

- add throughput (vectors/s, one transaction per scan, fsyncs included) and bytes per vector (embedded: the
  index files, FAISS apart; PostgreSQL: ``info()["bytes"]``, the tables and their indexes);
- query latency p50/p99 (one query per call, k=10, cosine) with a patient filter (``exclude_patient``: a
  patient of the index) for exact search and for the approximate one: FAISS for the embedded backend (HNSW
  below 50,000 vectors, IVF-Flat above; ``build_s`` includes the first batch), HNSW for PostgreSQL
  (``build_s`` is ``build_hnsw()``);
- recall@10 of the approximate search against exact search, same filter, over queries drawn from the clusters.

``--backend`` embedded (the default) reports as before: ``{"sizes": [...]}``; postgresql starts a throw-away
PostgreSQL server (pgserver) in a temporary folder unless ``--url`` names one (a fresh schema is used and
dropped), and reports ``{"sizes": [{"vectors": N, "postgresql": {...}}]}``; ``both`` puts the embedded numbers of
the same run and data beside them (``"embedded": {...}``). Default sizes: 1e4, 1e5, 1e6 for the embedded
backend alone, 1e5 and 1e6 when PostgreSQL runs; ``--quick`` is 2e4 only (under two minutes on 2 cores).
FAISS numbers are null when faiss is not installed.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))

from CTFMLib.retrieval import ScanRecord, VectorIndex  # noqa: E402
from CTFMLib.retrieval import search as _search  # noqa: E402

CLUSTERS, K, PER_PATIENT = 1000, 10, 4


def _folder_bytes(path: Path, skip=()) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not any(s in p.parts for s in skip))


def _tune(url: str, maintenance_work_mem: str) -> dict:
    """Settings a DBA would give a server that builds HNSW indexes (pgvector's advice): the graph in memory, and
    one parallel worker per spare core; returns what the server then reports."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET maintenance_work_mem = '{maintenance_work_mem}'")
        conn.execute(f"ALTER SYSTEM SET max_parallel_maintenance_workers = {max(0, (os.cpu_count() or 1) - 1)}")
        conn.execute("SELECT pg_reload_conf()")
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0]
                for name in ("maintenance_work_mem", "max_parallel_maintenance_workers", "shared_buffers")}


def _latency(ix, queries, backend, exclude) -> dict:
    times = []
    for q, patient in zip(queries, exclude):
        t = time.perf_counter()
        ix.search(q, k=K, level="patch", backend=backend, exclude_patient=patient)
        times.append(time.perf_counter() - t)
    return {"queries": len(times), "p50_ms": round(1e3 * float(np.percentile(times, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(times, 99)), 3)}


def _recall(ix, queries, exclude, backend) -> float:
    """Mean share of the exact top-10 (with the patient filter) that ``backend`` finds; patches named by row."""
    shares = []
    for q, patient in zip(queries, exclude):
        truth = ix.search(q, k=K, level="patch", backend="exact", exclude_patient=patient)
        found = ix.search(q, k=K, level="patch", backend=backend, exclude_patient=patient)
        shares.append(len({h.centre_lps[0] for h in found} & {h.centre_lps[0] for h in truth}) / K)
    return round(float(np.mean(shares)), 4)


def _data(n: int, dim: int, per_scan: int):
    """``(cluster centres, scan generator, queries' rng)``: the same vectors for every backend of a size."""
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)

    def scans():
        g = np.random.default_rng(n + 1)
        for s in range(n // per_scan):
            x = centres[g.integers(0, CLUSTERS, per_scan)] + 0.5 * g.standard_normal((per_scan, dim),
                                                                                       dtype=np.float32)
            row = s * per_scan
            where = np.stack([np.arange(row, row + per_scan), np.zeros(per_scan), np.zeros(per_scan)], 1)  # rows
            yield ScanRecord(f"/synthetic/{s}.nii.gz", patient_id=f"P{s // PER_PATIENT}"), x.mean(0), x, where

    return centres, scans


def _queries(centres, n: int, count: int, per_scan: int):
    """``count`` queries from the clusters, each with a patient of the index to leave out."""
    rng = np.random.default_rng(n + 2)
    dim = centres.shape[1]
    q = centres[rng.integers(0, CLUSTERS, count)] + 0.5 * rng.standard_normal((count, dim), dtype=np.float32)
    patients = [f"P{int(s) // PER_PATIENT}" for s in rng.integers(0, n // per_scan, count)]
    return q, patients


def _add_all(ix, scans) -> dict:
    add_s, rows = 0.0, 0
    for record, scan_vector, patches, centres in scans():
        t = time.perf_counter()
        ix.add(record, scan_vector, patches, centres)
        add_s += time.perf_counter() - t
        rows += len(patches)
    return {"add_seconds": round(add_s, 2), "add_vectors_per_s": round(rows / add_s)}


def embedded(n: int, dim: int, per_scan: int, folder: Path, n_latency: int, n_recall: int) -> dict:
    centres, scans = _data(n, dim, per_scan)
    path = folder / f"ix-{n}"
    ix = VectorIndex.create(path, "benchmark", "0" * 64, dim, {"note": "synthetic clustered vectors"})
    out = {"vectors": n, "scans": n // per_scan, "patches_per_scan": per_scan, **_add_all(ix, scans),
           "bytes_per_vector": round(_folder_bytes(path) / n, 1)}
    queries, exclude = _queries(centres, n, n_recall, per_scan)
    t = time.perf_counter()
    ix.search(queries, k=K, level="patch", backend="exact")
    out["exact_batch_s_per_query"] = round((time.perf_counter() - t) / n_recall, 4)
    out["exact"] = _latency(ix, queries[:n_latency], "exact", exclude)
    if _search.faiss_module() is None:
        out["faiss"] = None
        ix.close()
        return out
    t = time.perf_counter()
    ix.search(queries, k=K, level="patch", backend="faiss")  # the first call builds the FAISS index
    fa = {"kind": _search.FaissCache.kind_for(n), "build_s": round(time.perf_counter() - t, 2),
          "recall_at_10": _recall(ix, queries, exclude, "faiss")}
    fa.update(_latency(ix, queries[:n_latency], "faiss", exclude))
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


def postgresql(n: int, dim: int, per_scan: int, server_url: str, n_latency: int, n_recall: int) -> dict:
    from CTFMLib.retrieval.postgres import PostgresIndex

    centres, scans = _data(n, dim, per_scan)
    schema = f"bench_{n}_{uuid.uuid4().hex[:8]}"
    url = f"{server_url}{'&' if '?' in server_url else '?'}schema={schema}"
    ix = PostgresIndex.create(url, "benchmark", "0" * 64, dim, {"note": "synthetic clustered vectors"})
    try:
        out = {"vectors": n, "scans": n // per_scan, "patches_per_scan": per_scan, **_add_all(ix, scans)}
        ix.compact()  # VACUUM (ANALYZE): the planner's statistics, as `ctfm index compact` leaves them
        out["bytes_per_vector"] = round(int(ix.info()["bytes"]) / n, 1)
        queries, exclude = _queries(centres, n, n_recall, per_scan)
        out["exact"] = _latency(ix, queries[:n_latency], "exact", exclude)
        t = time.perf_counter()
        ix.build_hnsw()
        hn = {"build_s": round(time.perf_counter() - t, 2)}
        hn["bytes_per_vector_with_hnsw"] = round(int(ix.info()["bytes"]) / n, 1)
        hn["recall_at_10"] = _recall(ix, queries, exclude, "hnsw")
        hn.update(_latency(ix, queries[:n_latency], "hnsw", exclude))
        out["hnsw"] = hn
        info = ix.info()
        out["server"] = {k: info[k] for k in info if "version" in k}
    finally:
        ix.close()
        _drop_schema(server_url, schema)
    return out


def _drop_schema(server_url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    conninfo = server_url.split("?schema=")[0]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=("embedded", "postgresql", "both"), default="embedded")
    p.add_argument("--quick", action="store_true", help="2e4 vectors only (under two minutes)")
    p.add_argument("--sizes", help="comma-separated vector counts (multiples of --per-scan)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-scan", type=int, help="patches per scan (default 1000 embedded alone, else 100)")
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--url", help="postgresql: a server to use (a throw-away schema), instead of a pgserver")
    p.add_argument("--dir", help="where to build the indexes (default: a temporary folder, removed after)")
    p.add_argument("--maintenance-work-mem", default="4GB",
                   help="the throw-away server's maintenance_work_mem: an HNSW graph that does not fit "
                        "it builds far slower (default: %(default)s; a server of --url is left as it is)")
    args = p.parse_args()
    with_pg = args.backend in ("postgresql", "both")
    per_scan = args.per_scan or (100 if with_pg else 1000)
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        [20_000] if args.quick else [100_000, 1_000_000] if with_pg else [10_000, 100_000, 1_000_000])
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ctfm-retrieve-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    faiss = _search.faiss_module()
    report = {"backend": args.backend, "dim": args.dim, "k": K, "metric": "cosine", "level": "patch",
              "clusters": CLUSTERS, "patches_per_scan": per_scan, "scans_per_patient": PER_PATIENT,
              "filter": "exclude_patient", "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "numpy": np.__version__, "faiss": getattr(faiss, "__version__", None), "sizes": []}
    t0 = time.perf_counter()
    server = None
    try:
        server_url = args.url
        if with_pg and not server_url:
            import pgserver

            server = pgserver.get_server(folder / "pgdata", cleanup_mode="stop")
            server_url = server.get_uri()
            report["server_settings"] = _tune(server_url, args.maintenance_work_mem)
        for n in sizes:
            lat = args.latency_queries if n < 1_000_000 else min(args.latency_queries, 30)
            rec = args.recall_queries if n < 1_000_000 else min(args.recall_queries, 50)
            if args.backend == "embedded":
                row = embedded(n, args.dim, per_scan, folder, lat, rec)
            else:
                row = {"vectors": n, "scans": n // per_scan,
                       "postgresql": postgresql(n, args.dim, per_scan, server_url, lat, rec)}
                if args.backend == "both":
                    row["embedded"] = embedded(n, args.dim, per_scan, folder, lat, rec)
            report["sizes"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if not args.dir:
                shutil.rmtree(folder / f"ix-{n}", ignore_errors=True)
    finally:
        if server is not None:
            server.cleanup()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
