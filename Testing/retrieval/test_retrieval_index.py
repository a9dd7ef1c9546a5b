"""The retrieval VectorIndex: exact search against brute force, crash safety under SIGKILL, a reader process
during writes, weights refusal, remove/compact/update, and FAISS recall (when faiss is installed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from CTFMLib.retrieval import RetrievalIndexError, ScanRecord, VectorIndex, store

ROOT = Path(__file__).resolve().parents[2]
HASH = "a" * 64


def _scans(n, dim, seed=0, max_patches=12):
    """n scans: (record, scan vector, patch vectors, LPS centres) with 3 patients, 2 sites, 1..max_patches patches."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(1, max_patches + 1))
        rec = ScanRecord(f"/data/scan{i}.nii.gz", f"1.2.{i}", f"P{i % 3}", f"S{i // 2}",
                         {"shape": [10, 10, 10], "spacing": [1.0, 1.0, 3.0]}, {"spacing": [3, 1, 1]},
                         {"site": "AB"[i % 2], "i": i})
        out.append((rec, rng.standard_normal(dim), rng.standard_normal((m, dim)), rng.uniform(-200, 200, (m, 3))))
    return out


def _key(hits):
    return [(h.scan_id, h.similarity, tuple(h.centre_lps)) for h in hits]


def _filled(tmp_path, scans, dim, name="ix"):
    ix = VectorIndex.create(tmp_path / name, "ctfm-test", HASH, dim, {"spacing": [3, 1, 1]})
    ids = [ix.add(*s) for s in scans]
    return ix, ids


def _brute(query, vectors, metric):
    """Similarity of one query to each row, float64, from the float32 values the index stores."""
    x, q = np.asarray(vectors, np.float32).astype(np.float64), np.asarray(query, np.float32).astype(np.float64)
    if metric == "cosine":
        return x @ q / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    return -np.sqrt(((x - q) ** 2).sum(axis=1))


def _expected(scans, ids, query, k, level, metric, keep=lambda rec: True, max_per_scan=None):
    """(scan id, row within the scan, similarity) of the brute-force top k."""
    items = []
    for (rec, sv, pv, _), sid in zip(scans, ids):
        if not keep(rec):
            continue
        sims = _brute(query, sv[None] if level == "scan" else pv, metric)
        items += [(-s, sid, j) for j, s in enumerate(sims)]
    items.sort()
    out, per = [], {}
    for neg, sid, j in items:
        if max_per_scan is not None and per.get(sid, 0) >= max_per_scan:
            continue
        per[sid] = per.get(sid, 0) + 1
        out.append((sid, j, -neg))
    return out[:k]


def _check_hits(hits, expected, scans, ids, level):
    by_id = dict(zip(ids, scans))
    assert [h.scan_id for h in hits] == [e[0] for e in expected]
    np.testing.assert_allclose([h.similarity for h in hits], [e[2] for e in expected], rtol=0, atol=1e-9)
    for h, (sid, j, _) in zip(hits, expected):
        rec = by_id[sid][0]
        assert h.level == level and h.path == rec.path and h.record == rec
        assert (h.patient_id, h.study_uid) == (rec.patient_id, rec.study_uid)
        if level == "patch":
            np.testing.assert_array_equal(h.centre_lps, by_id[sid][3][j])
        else:
            assert h.centre_lps is None


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_equals_brute_force(tmp_path, metric):
    dim = 16
    scans = _scans(30, dim)
    ix, ids = _filled(tmp_path, scans, dim)
    queries = np.random.default_rng(1).standard_normal((4, dim))
    filters = [
        ({}, lambda r: True),
        ({"exclude_patient": "P1"}, lambda r: r.patient_id != "P1"),
        ({"exclude_study": ["S0", "S3", "S4"]}, lambda r: r.study_uid not in ("S0", "S3", "S4")),
        ({"where": lambda r: r.metadata["site"] == "A"}, lambda r: r.metadata["site"] == "A"),
        ({"exclude_patient": "P0", "exclude_study": "S5", "where": lambda r: r.metadata["i"] > 6},
         lambda r: r.patient_id != "P0" and r.study_uid != "S5" and r.metadata["i"] > 6),
    ]
    for level, k in (("scan", 7), ("patch", 25)):
        for kwargs, keep in filters:
            batch = ix.search(queries, k=k, level=level, metric=metric, backend="exact", **kwargs)
            assert len(batch) == len(queries)
            for q, hits in zip(queries, batch):
                exp = _expected(scans, ids, q, k, level, metric, keep)
                _check_hits(hits, exp, scans, ids, level)
                single = ix.search(q, k=k, level=level, metric=metric, backend="auto", **kwargs)
                _check_hits(single, exp, scans, ids, level)  # auto = exact at this size
    # the best location in each scan: at most one patch hit per scan
    for q in queries:
        hits = ix.search(q, k=8, level="patch", metric=metric, max_per_scan=1, exclude_patient="P2")
        exp = _expected(scans, ids, q, 8, "patch", metric, lambda r: r.patient_id != "P2", max_per_scan=1)
        _check_hits(hits, exp, scans, ids, "patch")
    # k larger than the candidates: every allowed row, best first
    hits = ix.search(queries[0], k=100, level="scan", metric=metric, where=lambda r: r.metadata["i"] < 5)
    assert sorted(h.scan_id for h in hits) == ids[:5]
    assert ix.search(queries[0], k=3, where=lambda r: False) == []
    assert ix.check(deep=True) == []


def test_rejects_bad_input(tmp_path):
    dim = 8
    scans = _scans(2, dim)
    ix, ids = _filled(tmp_path, scans, dim)
    rec, sv, pv, c = scans[0]
    with pytest.raises(RetrievalIndexError, match="update"):
        ix.add(rec, sv, pv, c)
    other = ScanRecord("/data/new.nii.gz")
    with pytest.raises(RetrievalIndexError, match="8-d"):
        ix.add(other, np.zeros(9), np.zeros((1, 9)), np.zeros((1, 3)))
    with pytest.raises(RetrievalIndexError, match="centres"):
        ix.add(other, sv, pv, c[:-1] if len(c) > 1 else np.zeros((2, 3)))
    with pytest.raises(RetrievalIndexError, match="NaN"):
        ix.add(other, np.full(dim, np.nan), pv, c)
    with pytest.raises(RetrievalIndexError, match="JSON"):
        ix.add(ScanRecord("/data/x", metadata={"bad": object()}), sv, pv, c)
    with pytest.raises(RetrievalIndexError, match=r"\(8,\)"):
        ix.search(np.zeros(5))
    with pytest.raises(RetrievalIndexError, match="already holds"):
        VectorIndex.create(tmp_path / "ix", "m", HASH, dim)
    with pytest.raises(RetrievalIndexError, match="not a retrieval index"):
        VectorIndex.open(tmp_path / "nothing-here")
    assert len(ix) == 2 and ix.check() == []  # refused adds left nothing behind


def test_refuses_other_weights(tmp_path):
    dim = 8
    scans = _scans(3, dim)
    ix, ids = _filled(tmp_path, scans, dim)
    ix.close()
    other = "b" * 64
    with pytest.raises(RetrievalIndexError, match="not comparable") as err:
        VectorIndex.open(tmp_path / "ix", weights_hash=other)
    assert HASH[:16] in str(err.value) and other[:16] in str(err.value)
    with pytest.raises(RetrievalIndexError, match="not comparable"):
        VectorIndex.open(tmp_path / "ix", model_id="another-model")
    ix = VectorIndex.open(tmp_path / "ix", model_id="ctfm-test", weights_hash=HASH.upper())
    rec, sv, pv, c = _scans(4, dim, seed=5)[3]
    with pytest.raises(RetrievalIndexError, match="not comparable"):
        ix.add(rec, sv, pv, c, weights_hash=other)
    with pytest.raises(RetrievalIndexError, match="not comparable"):
        ix.search(sv, weights_hash=other)
    assert len(ix) == 3
    ix.add(rec, sv, pv, c, weights_hash=HASH)
    assert ix.search(sv, k=1, weights_hash=HASH)[0].path == rec.path


def test_remove_and_compact_keep_results(tmp_path):
    dim = 12
    scans = _scans(20, dim, seed=3)
    ix, ids = _filled(tmp_path, scans, dim)
    queries = np.random.default_rng(4).standard_normal((3, dim))
    gone_ids = {ids[1], ids[7], ids[8]}
    gone_path = scans[12][0].path

    def survives(r):
        return r.path != gone_path and r.metadata["i"] not in (1, 7, 8)

    def results(**kw):
        out = []
        for level in ("scan", "patch"):
            for metric in ("cosine", "l2"):
                for hits in ix.search(queries, k=10, level=level, metric=metric, **kw):
                    out.append([(h.scan_id, h.similarity, None if h.centre_lps is None else tuple(h.centre_lps))
                                for h in hits])
        return out

    before = results(where=survives)
    stored = {sid: ix.vectors(sid) for sid in ids}
    assert sum(ix.remove(sid) for sid in gone_ids) == 3
    assert ix.remove(gone_path) == 1 and ix.remove(gone_path) == 0
    assert not ix.contains(gone_path, scans[12][0].series_uid)
    assert results() == before
    size_before = os.path.getsize(tmp_path / "ix" / "patch-g0.f32")
    info = ix.compact()
    assert info["scan_rows_dropped"] == 4
    assert results() == before
    assert ix.check(deep=True) == []
    assert ix.info()["removed_rows"] == 0 and len(ix) == 16
    removed_patches = sum(len(scans[i][2]) for i in (1, 7, 8, 12))
    new_file = tmp_path / "ix" / "patch-g1.f32"
    assert os.path.getsize(new_file) == size_before - removed_patches * dim * 4
    assert not (tmp_path / "ix" / "patch-g0.f32").exists()
    for sid in ids:
        if sid in gone_ids or sid == ids[12]:
            with pytest.raises(RetrievalIndexError, match="no scan"):
                ix.vectors(sid)
            continue
        for a, b in zip(ix.vectors(sid), stored[sid]):
            np.testing.assert_array_equal(a, b)
    ix.close()
    reopened = VectorIndex.open(tmp_path / "ix")  # another process's view of the compacted index
    ix = reopened
    assert results() == before


def test_update_replaces(tmp_path):
    dim = 8
    scans = _scans(5, dim)
    ix, ids = _filled(tmp_path, scans, dim)
    rec, sv, pv, c = scans[2]
    rng = np.random.default_rng(9)
    new_sv, new_pv, new_c = rng.standard_normal(dim), rng.standard_normal((3, dim)), rng.uniform(0, 1, (3, 3))
    new_rec = ScanRecord(rec.path, rec.series_uid, "P-new", rec.study_uid, rec.geometry, rec.preprocessing, {"v": 2})
    assert ix.update(new_rec, new_sv, new_pv, new_c) == ids[2]
    assert len(ix) == 5 and ix.get(ids[2]) == new_rec
    got = ix.vectors(ids[2])
    np.testing.assert_array_equal(got[0], new_sv.astype(np.float32))
    np.testing.assert_array_equal(got[1], new_pv.astype(np.float32))
    np.testing.assert_array_equal(got[2], new_c)
    # the old vectors are gone from search: the scan has exactly its 3 new patches
    hits = ix.search(pv[0], k=1000, level="patch", backend="exact")
    mine = [h for h in hits if h.scan_id == ids[2]]
    assert sorted(map(tuple, (h.centre_lps for h in mine))) == sorted(map(tuple, new_c))
    top = ix.search(sv, k=1, backend="exact")[0]
    assert not (top.scan_id == ids[2] and top.similarity > 0.999)
    assert ix.search(new_sv, k=1)[0].scan_id == ids[2]
    # update of an unknown scan adds it
    extra = ScanRecord("/data/extra.nii.gz")
    sid = ix.update(extra, new_sv, new_pv, new_c)
    assert sid not in ids and ix.contains("/data/extra.nii.gz") and len(ix) == 6
    assert ix.check() == []


def test_uncommitted_tail_is_ignored_and_cut(tmp_path):
    """What a writer killed mid-add leaves (bytes past the committed rows) is never read and is cut by the next one."""
    dim = 8
    scans = _scans(6, dim)
    ix, ids = _filled(tmp_path, scans[:4], dim)
    q = scans[0][1]
    expected = _key(ix.search(q, k=10, level="patch"))
    ix.close()
    patch_file = tmp_path / "ix" / "patch-g0.f32"
    committed = os.path.getsize(patch_file)
    with open(patch_file, "ab") as f:  # a dead writer's half row and garbage
        f.write(np.full(dim * 3 + 2, 1e30, np.float32).tobytes())
    reader = VectorIndex.open(tmp_path / "ix", readonly=True)
    assert _key(reader.search(q, k=10, level="patch")) == expected and reader.check() == []
    with pytest.raises(RetrievalIndexError, match="read-only"):
        reader.add(*scans[5])
    writer = VectorIndex.open(tmp_path / "ix")  # no writer active: open cuts the tail
    assert os.path.getsize(patch_file) == committed
    sid = writer.add(*scans[4])
    np.testing.assert_array_equal(writer.vectors(sid)[1], scans[4][2].astype(np.float32))
    assert _key(reader.search(q, k=10, level="patch")) == _key(writer.search(q, k=10, level="patch"))
    # check() does report real damage: committed rows missing from the file
    with open(patch_file, "r+b") as f:
        f.truncate(committed - 4 * dim)
    assert any("shorter" in p for p in writer.check())


CHILD_WRITER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from CTFMLib.retrieval import ScanRecord, VectorIndex
from test_retrieval_index import crash_scan
ix = VectorIndex.open(sys.argv[2])
for i in range(int(sys.argv[3]), int(sys.argv[4])):
    rec, sv, pv, c = crash_scan(i)
    print(f"writing {i}", flush=True)
    t = time.perf_counter()
    sid = ix.add(rec, sv, pv, c)
    print(f"committed {i} {sid} {time.perf_counter() - t:.4f}", flush=True)
"""

CRASH_DIM = 256


def crash_scan(i):
    """Scan i of the crash test: ~4-24 MB of patch vectors, so a kill lands in the middle of writing them."""
    rng = np.random.default_rng(1000 + i)
    n = 4000 + 2000 * (i % 11)
    return (ScanRecord(f"/crash/{i}.nii.gz", None, f"P{i}", None, {}, {}, {"i": i}),
            rng.random(CRASH_DIM, dtype=np.float32), rng.random((n, CRASH_DIM), dtype=np.float32),
            np.stack([np.full(n, i), np.arange(n), np.zeros(n)], axis=1).astype(np.float64))


def _verify_crash_state(path, committed, in_flight):
    """The index opens, check() passes, and holds the committed scans (plus the in-flight one only when whole)."""
    ix = VectorIndex.open(path)
    assert ix.check(deep=True) == []
    held = {rec.metadata["i"]: sid for sid, rec in ix.scans()}
    assert set(committed) <= set(held) <= set(committed) | {in_flight}
    for i, sid in held.items():
        _, sv, pv, c = crash_scan(i)
        got = ix.vectors(sid)
        np.testing.assert_array_equal(got[0], sv)
        np.testing.assert_array_equal(got[1], pv)
        np.testing.assert_array_equal(got[2], c)
    assert ix.info()["patches"] == sum(len(crash_scan(i)[2]) for i in held)
    ix.close()
    return held


@pytest.mark.slow
def test_sigkill_during_add_keeps_exactly_the_committed_scans(tmp_path):
    path = tmp_path / "ix"
    VectorIndex.create(path, "ctfm-test", HASH, CRASH_DIM).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Testing"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    committed, tails, start = {}, [], 0
    for round_no in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(ROOT / "CTFM"), str(path), str(start),
                                  str(start + 50)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        durations, target, lines = [], 2 + round_no, []
        for line in child.stdout:
            lines.append(line.split())
            if lines[-1][0] == "committed":
                durations.append(float(lines[-1][3]))
            elif int(lines[-1][1]) - start == target:
                # kill in the middle of the writing phase: a fraction of how long earlier adds took
                time.sleep(np.median(durations) * (0.2 + 0.2 * round_no))
                child.send_signal(signal.SIGKILL)
                break
        child.wait(timeout=60)
        lines += [w for w in (line.split() for line in child.stdout) if len(w) >= 2]  # printed before the kill
        for word, i, *rest in lines:
            if word == "committed":
                committed[int(i)] = int(rest[0])
        in_flight = int(lines[-1][1]) if lines[-1][0] == "writing" else None
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        # the kill leaves an uncommitted tail when it lands while vectors are written
        ro = VectorIndex.open(path, readonly=True)
        rows = ro.info()["stored_patch_rows"]
        tails.append(os.path.getsize(path / "patch-g0.f32") - (store.HEADER + rows * CRASH_DIM * 4))
        ro.close()
        held = _verify_crash_state(path, committed, in_flight)
        committed.update(held)
        start = max(held) + 1
    print("uncommitted tails after the kills (bytes):", tails)
    assert any(t > 0 for t in tails), f"no kill landed while vectors were being written (tails {tails})"
    # the index goes on: a new writer appends after the committed rows, not after the dead tail
    ix = VectorIndex.open(path)
    rec, sv, pv, c = crash_scan(999)
    sid = ix.add(rec, sv, pv, c)
    np.testing.assert_array_equal(ix.vectors(sid)[1], pv)
    assert ix.search(sv, k=1)[0].scan_id == sid and ix.check() == []


CHILD_READER = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from CTFMLib.retrieval import VectorIndex
from test_retrieval_index import reader_scan
ix = VectorIndex.open(sys.argv[2], readonly=True)
stop, q = sys.argv[3], np.ones(32)
sizes, errors, searches = set(), [], 0
print("ready", flush=True)
while True:
    done = os.path.exists(stop)  # one more whole search after the writer finished
    try:
        hits = ix.search(q, k=10**6, level="patch", metric="l2", backend="exact")
        per = {}
        for h in hits:
            per.setdefault(h.scan_id, []).append(h)
        for sid, hs in per.items():
            i = hs[0].record.metadata["i"]
            _, sv, pv, c = reader_scan(i)
            if sorted(tuple(h.centre_lps) for h in hs) != sorted(map(tuple, c)):
                errors.append(f"scan {i}: {len(hs)} of {len(c)} patches")
            want = -np.linalg.norm(pv.astype(np.float64) - 1, axis=1)
            if not np.allclose(sorted(h.similarity for h in hs), sorted(want), atol=1e-9):
                errors.append(f"scan {i}: wrong patch vectors")
        scan_hits = ix.search(q, k=10**6, level="scan", metric="l2", backend="exact")
        for h in scan_hits:
            sv = reader_scan(h.record.metadata["i"])[1]
            if abs(h.similarity + np.linalg.norm(sv.astype(np.float64) - 1)) > 1e-9:
                errors.append(f"scan {h.record.metadata['i']}: wrong scan vector")
        sizes.add(len(per))
        searches += 1
    except Exception as e:
        errors.append(repr(e))
    if done and searches >= 3:
        break
print(json.dumps({"searches": searches, "sizes": sorted(sizes), "errors": errors[:20]}), flush=True)
"""


def reader_scan(i):
    rng = np.random.default_rng(50 + i)
    n = 200 + 37 * i
    return (ScanRecord(f"/conc/{i}.nii.gz", metadata={"i": i}), rng.standard_normal(32).astype(np.float32),
            rng.standard_normal((n, 32)).astype(np.float32), np.stack([np.full(n, i), np.arange(n), -np.arange(n)], 1))


@pytest.mark.slow
def test_reader_process_sees_whole_scans_while_a_writer_adds(tmp_path):
    path = tmp_path / "ix"
    ix = VectorIndex.create(path, "ctfm-test", HASH, 32)
    ix.add(*reader_scan(0))
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Testing"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    reader = subprocess.Popen([sys.executable, "-c", CHILD_READER, str(ROOT / "CTFM"), str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        ids = {}
        for i in range(1, 41):
            ids[i] = ix.add(*reader_scan(i))
            if i == 20:  # removal and compaction while the reader runs: it switches to the new files
                ix.remove(ids[3])
                ix.remove(ids[11])
                ix.compact()
            time.sleep(0.02)
        stop.touch()
        out, err = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == [], report["errors"]
    assert len(report["sizes"]) >= 3, f"the reader did not overlap the writer: {report}"
    assert report["sizes"][-1] == 39 and report["searches"] >= 3
    assert ix.check() == []


def _clustered(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)]
    x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, rng


@pytest.mark.slow
def test_faiss_recall_on_clustered_vectors(tmp_path):
    """100,000 512-d vectors from 1,000 Gaussian clusters (1,000 patches per scan): recall@10 against brute force."""
    pytest.importorskip("faiss")
    n, dim, per_scan = 100_000, 512, 1000
    x, rng = _clustered(n, dim, 1000)
    ix = VectorIndex.create(tmp_path / "ix", "ctfm-test", HASH, dim)
    for s in range(n // per_scan):
        rows = np.arange(s * per_scan, (s + 1) * per_scan)
        centres = np.stack([rows, np.zeros(per_scan), np.zeros(per_scan)], 1)  # x = the row, to name each hit
        ix.add(ScanRecord(f"/big/{s}"), x[rows].mean(0), x[rows], centres)
    queries = x[rng.choice(n, 100, replace=False)] + 0.1 * rng.standard_normal((100, dim), dtype=np.float32)
    for metric in ("cosine", "l2"):
        if metric == "cosine":
            scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
                x / np.linalg.norm(x, axis=1, keepdims=True)).T
        else:
            scores = 2 * queries @ x.T - np.sum(x ** 2, axis=1)[None]  # -|x - q|^2 + |q|^2: same order
        truth = np.argsort(-scores, axis=1)[:, :10]
        found = ix.search(queries, k=10, level="patch", metric=metric, backend="faiss")
        recall = np.mean([len({int(h.centre_lps[0]) for h in hits} & set(t.tolist())) / 10
                          for hits, t in zip(found, truth)])
        assert recall >= 0.95, f"{metric}: recall@10 {recall}"
    assert list((tmp_path / "ix" / "faiss").glob("patch-*.faiss")), "the built FAISS index is saved for reuse"


def test_faiss_respects_filters_and_removals(tmp_path):
    """The small-index (HNSW) path: filters and removed scans never appear; results match exact search."""
    pytest.importorskip("faiss")
    dim = 32
    scans = _scans(120, dim, seed=8, max_patches=20)
    ix, ids = _filled(tmp_path, scans, dim)
    for sid in ids[::7]:
        ix.remove(sid)
    queries = np.random.default_rng(2).standard_normal((20, dim))
    kw = {"k": 10, "level": "patch", "exclude_patient": "P1", "where": lambda r: r.metadata["site"] == "A"}
    exact = ix.search(queries, backend="exact", **kw)
    approx = ix.search(queries, backend="faiss", **kw)
    gone = set(ids[::7])
    overlap = []
    for e, a in zip(exact, approx):
        assert len(a) == 10
        assert all(h.patient_id != "P1" and h.record.metadata["site"] == "A" and h.scan_id not in gone for h in a)
        overlap.append(len({(h.scan_id, tuple(h.centre_lps)) for h in a} & {(h.scan_id, tuple(h.centre_lps))
                                                                               for h in e}) / 10)
    assert np.mean(overlap) >= 0.95
    # a filter that leaves fewer rows than k: FAISS returns them all, like exact search
    only = ix.search(queries[0], k=50, level="patch", backend="faiss", where=lambda r: r.metadata["i"] == 3)
    assert len(only) == len(scans[3][2]) and {h.scan_id for h in only} == {ids[3]}
