"""The PostgreSQL + pgvector retrieval index (CTFMLib.retrieval.postgres) against a real embedded server: the same
hits as the folder index, the same refusals, crash safety with a killed writer, concurrent creators, writers and
readers, and pgvector's HNSW index."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ctfm_testing.plugin import ROOT
from ctfm_testing.processes import child_env
from CTFMLib.retrieval import backends
from CTFMLib.retrieval import search as _search
from CTFMLib.retrieval.index import VectorIndex
from CTFMLib.retrieval.store import AlreadyIndexedError, RetrievalIndexError, ScanRecord

psycopg = pytest.importorskip("psycopg")
from CTFMLib.retrieval.postgres import PostgresIndex, split_url  # noqa: E402  (needs psycopg)

DIM = 512
WEIGHTS = "ab" * 32
MODEL = "ct-fm-test"


def clustered(rng, n, clusters=5, spread=0.35):
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, DIM))).astype(np.float32)


def low_rank_clusters(rng, n, clusters=8, rank=16):
    """Clusters spread along a few directions each, as embeddings of similar anatomy are (not isotropic noise)."""
    centres = rng.normal(size=(clusters, DIM))
    basis = rng.normal(size=(clusters, rank, DIM)) / np.sqrt(rank)
    label = rng.integers(0, clusters, n)
    along = np.einsum("nr,nrd->nd", rng.normal(size=(n, rank)), basis[label])
    return (centres[label] + 0.5 * along + 0.05 * rng.normal(size=(n, DIM))).astype(np.float32)


def make_scans(n=14, seed=0):
    """(record, scan vector, patch vectors, centres) with 2..9 patches each, 4 patients, 2 studies each, and
    scans 3 and 9 identical in their vectors (a tie both indexes must break the same way)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        vecs = clustered(rng, 3 + i % 8)
        if i == 9:
            vecs = np.vstack([out[3][1][None], out[3][2]])
        count = len(vecs) - 1
        record = ScanRecord(f"/data/scan{i:02d}.nii.gz", f"1.2.{i}" if i % 3 else None, f"P{i % 4}",
                            f"P{i % 4}-S{i % 2}", {"shape": [4, 4, 4], "spacing": [1.0, 1.0, 2.5]},
                            {"size": 64}, {"site": "ab"[i % 2], "tags": ["lung"] + (["nodule"] if i % 3 == 0 else []),
                                          "n_patches": count, "contrast": i % 4 == 1})
        out.append((record, vecs[0], vecs[1:], rng.uniform(-200, 200, size=(count, 3))))
    return out


def fill(index, scans):
    return [index.add(*s) for s in scans]


def as_tuples(hits):
    return [(h.scan_id, h.path, h.level, h.patient_id, h.study_uid, h.record.metadata,
             None if h.centre_lps is None else tuple(h.centre_lps)) for h in hits]


def assert_same_hits(a, b):
    assert as_tuples(a) == as_tuples(b)
    np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in b], atol=1e-5, rtol=0)


def sql(url, statement, params=()):
    """Run one statement in the URL's schema as the database's owner (what an administrator or damage would do)."""
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}", public')
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def child(code: str, *args) -> subprocess.Popen:
    """A Python child process running ``code`` (the CT-FM library importable; sys.argv[1:] = args)."""
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])}
    prelude = ("import sys, json, time, numpy as np\n"
               "from CTFMLib.retrieval.postgres import PostgresIndex\n"
               "from CTFMLib.retrieval.store import ScanRecord, AlreadyIndexedError, RetrievalIndexError\n")
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


# ---- the same results as the folder index ----------------------------------------------------------------------


def test_the_same_hits_as_the_folder_index(postgres_url, tmp_path):
    scans = make_scans()
    folder = VectorIndex.create(tmp_path / "index", MODEL, WEIGHTS, DIM)
    pg = PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM)
    assert fill(folder, scans) == fill(pg, scans)
    # an update keeps the id in both; then the folder index's rows are no longer in id order (ties follow ids)
    assert folder.update(*scans[3]) == pg.update(*scans[3]) == 4
    queries = np.vstack([scans[3][1], scans[5][2][1], clustered(np.random.default_rng(7), 3)])
    cases = [dict(), dict(k=3), dict(k=50), dict(metric="l2"), dict(level="patch"), dict(level="patch", k=25),
             dict(level="patch", max_per_scan=1), dict(level="patch", max_per_scan=2, k=7),
             dict(level="patch", metric="l2", max_per_scan=1), dict(exclude_patient="P1"),
             dict(exclude_patient=["P0", "P2"], level="patch"), dict(exclude_study="P3-S1"),
             dict(where=lambda r: r.metadata["n_patches"] > 4), dict(where=lambda r: False),
             dict(metadata={"site": "a"}), dict(metadata={"tags": ["nodule"]}, level="patch", max_per_scan=1),
             dict(metadata={"contrast": True}), dict(metadata={"contrast": 1}), dict(metadata={"tags": "lung"}),
             dict(metadata={"site": "b"}, exclude_patient="P1", where=lambda r: r.series_uid is not None,
                  level="patch", k=6)]
    for case in cases:
        a, b = folder.search(queries, **case), pg.search(queries, **case)
        assert len(a) == len(b) == len(queries)
        for x, y in zip(a, b):
            assert len(x) == len(y) <= case.get("k", 10), case
            assert_same_hits(x, y)
    for x in folder.search(queries, metadata={"contrast": True}):  # the filters really filter
        assert x and all(h.record.metadata["contrast"] is True for h in x)
    assert folder.search(queries[0], metadata={"contrast": 1}) == []  # true is not 1, as in jsonb
    tied = [h.scan_id for h in pg.search(scans[3][1], k=2)]
    assert tied == [4, 10] == [h.scan_id for h in folder.search(scans[3][1], k=2)]
    assert pg.search(queries[0], k=1, backend="exact")[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert [(i, r) for i, r in folder.scans()] == [(i, r) for i, r in pg.scans()]
    assert len(pg) == len(folder) == len(scans)
    for sid, _ in pg.scans():
        for x, y in zip(folder.vectors(sid), pg.vectors(sid)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    info = pg.info()
    assert info["backend"] == "postgresql" and info["scans"] == len(scans) and info["bytes"] > 0
    assert info["patches"] == sum(len(s[2]) for s in scans) and info["hnsw"] is False
    assert ":" not in info["path"].split("@")[0].split("//")[1]  # no password, ever
    folder.close()
    pg.close()


# ---- refusals, updates, removal, integrity ---------------------------------------------------------------------


def test_refusals_update_and_remove(postgres_url, tmp_path):
    scans = make_scans(6)
    assert not PostgresIndex.exists(postgres_url) and not backends.exists(postgres_url)
    with pytest.raises(RetrievalIndexError, match="not a retrieval index"):
        PostgresIndex.open(postgres_url)
    pg = PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM, {"size": 64})
    assert PostgresIndex.exists(postgres_url) and pg.root == postgres_url.replace("postgres:@", "postgres@")
    ids = fill(pg, scans)
    with pytest.raises(RetrievalIndexError, match="already holds a retrieval index"):
        PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM)
    for kwargs, words in ((dict(weights_hash="cd" * 32), "not with weights sha256 cdcd"),
                          (dict(model_id="other"), "not with model 'other'")):
        with pytest.raises(RetrievalIndexError, match=words) as e:
            PostgresIndex.open(postgres_url, **kwargs)
        assert "\n" not in str(e.value) and "built with model 'ct-fm-test'" in str(e.value)
    with pytest.raises(RetrievalIndexError, match="holds 512-d vectors, not 256-d"):
        PostgresIndex.open_or_create(postgres_url, MODEL, WEIGHTS, 256)
    with pytest.raises(RetrievalIndexError, match="other settings"):
        PostgresIndex.open_or_create(postgres_url, MODEL, WEIGHTS, DIM, {"size": 96})
    with pytest.raises(RetrievalIndexError, match="not with weights"):
        pg.add(ScanRecord("/new.nii"), *scans[0][1:], weights_hash="cd" * 32)
    with pytest.raises(RetrievalIndexError, match="not with weights"):
        pg.search(scans[0][1], weights_hash="cd" * 32)
    with pytest.raises(AlreadyIndexedError, match="already in the index as scan 2") as e:
        pg.add(*scans[1])
    assert e.value.scan_id == 2 and len(pg) == 6
    with pytest.raises(RetrievalIndexError, match="use backend='hnsw'"):
        pg.search(scans[0][1], backend="faiss")
    with pytest.raises(RetrievalIndexError, match="no HNSW index yet"):
        pg.search(scans[0][1], backend="hnsw")
    with VectorIndex.create(tmp_path / "index", MODEL, WEIGHTS, DIM) as folder:
        with pytest.raises(RetrievalIndexError, match="FAISS"):
            folder.search(scans[0][1], backend="hnsw")
        # a scan without patches: both indexes take it (its checksum covers the scan vector alone)
        sid = folder.add(ScanRecord("/data/empty.nii"), scans[0][1], np.zeros((0, DIM)), np.zeros((0, 3)))
        assert folder.vectors(sid)[1].shape == (0, DIM) and folder.check(deep=True) == []

    # update: same id, new vectors and record; a scan without patches too
    record, s, p, c = scans[2]
    new_s, new_p = -s, p[:1] * 2
    record2 = ScanRecord(record.path, record.series_uid, "P9", "P9-S0", {}, {}, {"n_patches": 1})
    assert pg.update(record2, new_s, new_p, c[:1]) == ids[2]
    got = pg.vectors(ids[2])
    assert np.array_equal(got[0], new_s) and np.array_equal(got[1], new_p) and np.array_equal(got[2], c[:1])
    assert pg.get(ids[2]).patient_id == "P9" and len(pg) == 6
    empty = pg.add(ScanRecord("/data/empty.nii"), s, np.zeros((0, DIM)), np.zeros((0, 3)))
    assert pg.vectors(empty)[1].shape == (0, DIM)
    assert pg.search(new_s, k=1)[0].scan_id == ids[2]

    # remove: by id, by path and series, by path; ids are never reused
    assert pg.remove(ids[2]) == 1 and pg.remove(ids[2]) == 0
    assert ids[2] not in [h.scan_id for h in pg.search(new_s, k=10)]
    assert ids[2] not in [h.scan_id for h in pg.search(new_p[0], k=50, level="patch")]
    assert sql(postgres_url, "SELECT count(*) FROM patches WHERE scan_id = %s", (ids[2],)) == [(0,)]
    assert pg.remove(scans[1][0].path, "no-such-series") == 0
    assert pg.remove(scans[1][0].path, scans[1][0].series_uid) == 1
    assert pg.remove(scans[0][0].path) == 1 and not pg.contains(scans[0][0].path)
    assert pg.add(*scans[0]) > empty
    assert pg.compact()["vacuumed"] is True
    pg.close()
    with backends.open_index(postgres_url, model_id=MODEL, readonly=True) as again:
        assert isinstance(again, PostgresIndex) and len(again) == 5  # 6 + 1 empty - 3 removed + 1 again

    with PostgresIndex.open(postgres_url, readonly=True) as reader:
        assert len(reader.search(scans[3][1], k=3)) == 3
        with pytest.raises(RetrievalIndexError, match="read-only"):
            reader.add(ScanRecord("/x.nii"), *scans[0][1:])
    sql(postgres_url, "CREATE ROLE ctfm_reader_only LOGIN") if not sql(
        postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = 'ctfm_reader_only'") else None
    conninfo, schema = split_url(postgres_url)
    sql(postgres_url, f'GRANT USAGE ON SCHEMA "{schema}" TO ctfm_reader_only')
    sql(postgres_url, f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO ctfm_reader_only')
    role_url = postgres_url.replace("postgres:@", "ctfm_reader_only@")
    with PostgresIndex.open(role_url) as reader:  # a role that may only read: searches work, writes are refused
        assert len(reader.search(scans[3][1], k=2)) == 2
        with pytest.raises(RetrievalIndexError, match="not allowed") as e:
            reader.remove(scans[3][0].path)
        assert "\n" not in str(e.value)


def test_a_password_in_the_query_is_never_shown_either():
    from CTFMLib.retrieval.backends import display

    shown = display("postgresql://bob@db/pacs?password=hunter2&schema=lung&host=/run/pg")
    assert "hunter2" not in shown and shown == "postgresql://bob@db/pacs?schema=lung&host=/run/pg"
    assert display("postgresql://bob:pw@db/pacs?PASSWORD=x") == "postgresql://bob@db/pacs"


def test_a_missing_extension_the_role_may_not_create_is_named(postgres_url):
    name = split_url(postgres_url)[1]
    sql(postgres_url, f"CREATE DATABASE {name}")  # no pgvector there yet
    try:
        if not sql(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = 'ctfm_plain_user'"):
            sql(postgres_url, "CREATE ROLE ctfm_plain_user LOGIN")
        url = postgres_url.replace("postgres:@/postgres?", f"ctfm_plain_user@/{name}?")
        with pytest.raises(RetrievalIndexError, match="extension 'vector'.*not installed.*CREATE EXTENSION") as e:
            PostgresIndex.create(url, MODEL, WEIGHTS, DIM)
        assert "\n" not in str(e.value)
        owner = postgres_url.replace("/postgres?", f"/{name}?")  # a role that may: it installs the extension
        with backends.open_or_create(owner, MODEL, WEIGHTS, DIM) as pg:
            assert len(pg) == 0 and backends.exists(owner)
        assert sql(owner, "SELECT extname FROM pg_extension WHERE extname = 'vector'") == [("vector",)]
    finally:
        sql(postgres_url, f"DROP DATABASE {name} WITH (FORCE)")


def test_bad_urls_are_refused_in_one_line(postgres_url, tmp_path):
    with pytest.raises(RetrievalIndexError, match="not a plain SQL name"):
        PostgresIndex.open(postgres_url.split("&schema=")[0] + "&schema=Robert'); DROP TABLE x;--")
    missing = f"postgresql://someone:secret@/db?host={tmp_path}&schema=ctfm"
    with pytest.raises(RetrievalIndexError, match="cannot use the PostgreSQL index") as e:
        PostgresIndex.open(missing, timeout=2)
    assert "\n" not in str(e.value) and "secret" not in str(e.value) and "someone@" in str(e.value)
    with pytest.raises(RetrievalIndexError, match="does not exist") as e:
        PostgresIndex.exists(postgres_url.replace("/postgres?", "/nosuchdb?"))
    assert "\n" not in str(e.value)


def test_check_finds_a_changed_vector_and_repair_drops_that_scan(postgres_url):
    scans = make_scans(5)
    pg = PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM)
    ids = fill(pg, scans)
    assert pg.check(deep=True) == [] and pg.repair()["repaired"] is False
    changed = np.array(scans[2][2][1], dtype=np.float32)
    changed[7] += 0.5
    sql(postgres_url, "UPDATE patches SET embedding = %s::vector WHERE scan_id = %s AND patch_row = 1",
        (str(changed.tolist()), ids[2]))
    assert pg.check(deep=False) == []  # only the vectors changed: a deep check reads them
    report = pg.check_report(deep=True)
    assert list(report.damaged) == [ids[2]] and "checksum" in report.problems[0]
    sql(postgres_url, "DELETE FROM patches WHERE scan_id = %s AND patch_row = 0", (ids[4],))
    assert set(pg.check_report(deep=False).damaged) == {ids[4]}
    result = pg.repair()
    assert result["repaired"] and sorted(d["scan_id"] for d in result["dropped"]) == [ids[2], ids[4]]
    assert result["kept"] == 3 and pg.check(deep=True) == [] and len(pg) == 3
    assert {h.scan_id for h in pg.search(scans[2][1], k=10)} == {ids[0], ids[1], ids[3]}
    pg.close()


# ---- crash safety and concurrency ------------------------------------------------------------------------------

_ADD_ONE = """
url, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(n)
index = PostgresIndex.open(url)
print("open", flush=True)
sid = index.add(ScanRecord(path, None, "P", "S", {}, {}, {"n_patches": n}), rng.normal(size=512),
                rng.normal(size=(n, 512)), rng.normal(size=(n, 3)))
print("added", sid, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_add_leaves_nothing(postgres_url):
    PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM).close()
    conninfo, schema = split_url(postgres_url)
    with psycopg.connect(conninfo) as blocker:  # holds the patches table: the child's add stops after its scan row
        blocker.execute(f'LOCK TABLE "{schema}".patches IN SHARE MODE')
        proc = child(_ADD_ONE, postgres_url, "/data/killed.nii", 40)
        deadline = time.monotonic() + 30
        while True:  # the child's backend waits for the lock inside its add transaction
            waiting = sql(postgres_url, "SELECT pid FROM pg_stat_activity WHERE application_name = 'ctfm-index' "
                          "AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL")
            if waiting:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        assert sql(postgres_url, "SELECT count(*) FROM scans") == [(0,)]  # its scan row is not committed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        blocker.rollback()
    deadline = time.monotonic() + 20
    while sql(postgres_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (waiting[0][0],)):
        assert time.monotonic() < deadline  # the server notices the dead client and rolls back
        time.sleep(0.05)
    with PostgresIndex.open(postgres_url) as pg:
        assert len(pg) == 0 and not pg.contains("/data/killed.nii") and pg.check(deep=True) == []
        assert sql(postgres_url, "SELECT count(*) FROM patches") == [(0,)]
    out = finish(child(_ADD_ONE, postgres_url, "/data/killed.nii", 40))
    with PostgresIndex.open(postgres_url) as pg:
        assert len(pg) == 1 and pg.vectors(int(out.split()[-1]))[1].shape == (40, DIM)


_CREATE_AND_ADD = """
url, first, last, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
try:
    PostgresIndex.create(url, "ct-fm-test", "ab" * 32, 512).close()
    print("created", flush=True)
except RetrievalIndexError as e:
    print("refused", str(e).split(":")[-1].strip(), flush=True)
index = PostgresIndex.open_or_create(url, "ct-fm-test", "ab" * 32, 512)
for i in range(first, last):
    rng = np.random.default_rng(i)
    try:
        index.add(ScanRecord(f"/data/{i}.nii", None, "P", "S", {}, {}, {"n_patches": 1 + i % 5}),
                  rng.normal(size=512), rng.normal(size=(1 + i % 5, 512)), rng.normal(size=(1 + i % 5, 3)))
        print("added", i, flush=True)
    except AlreadyIndexedError:
        print("skipped", i, flush=True)
"""


@pytest.mark.slow
def test_concurrent_creators_get_one_index_and_writers_add_each_scan_once(postgres_url):
    start = time.time() + 2.0
    procs = [child(_CREATE_AND_ADD, postgres_url, 0, 14, start), child(_CREATE_AND_ADD, postgres_url, 6, 20, start)]
    outs = [finish(p) for p in procs]
    lines = [line.split() for out in outs for line in out.splitlines()]
    assert sorted(w[0] for w in lines if w[0] in ("created", "refused")) == ["created", "refused"]
    added = sorted(int(w[1]) for w in lines if w[0] == "added")
    assert added == list(range(20))  # every scan added by exactly one writer, the overlap skipped by the other
    with PostgresIndex.open(postgres_url) as pg:
        assert len(pg) == 20 and pg.check(deep=True) == []
        assert sorted(r.path for _, r in pg.scans()) == sorted(f"/data/{i}.nii" for i in range(20))


_WRITE_MANY = """
url, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
index = PostgresIndex.open(url)
for i in range(first, last):
    rng = np.random.default_rng(i)
    n = 1 + (7 * i) % 23
    index.add(ScanRecord(f"/data/{i}.nii", None, f"P{i % 3}", "S", {}, {}, {"n_patches": n}),
              rng.normal(size=512), rng.normal(size=(n, 512)), rng.normal(size=(n, 3)))
print("done", flush=True)
"""

_READ_UNTIL = """
url, stop = sys.argv[1], sys.argv[2]
import os
index = PostgresIndex.open(url, readonly=True)
rng = np.random.default_rng(os.getpid())
queries = checked = 0
while not os.path.exists(stop) or queries < 5:
    for level in ("scan", "patch"):
        for hit in index.search(rng.normal(size=512), k=5, level=level, max_per_scan=2 if level == "patch" else None):
            s, p, c = index.vectors(hit.scan_id)
            n = hit.record.metadata["n_patches"]
            assert p.shape == (n, 512) and c.shape == (n, 3), (hit.scan_id, p.shape, n)
            checked += 1
        queries += 1
print("ok", queries, checked, flush=True)
"""


@pytest.mark.slow
def test_readers_see_whole_scans_while_writers_add(postgres_url, tmp_path):
    PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM).close()
    stop = tmp_path / "stop"
    readers = [child(_READ_UNTIL, postgres_url, stop) for _ in range(4)]
    writers = [child(_WRITE_MANY, postgres_url, 0, 40), child(_WRITE_MANY, postgres_url, 40, 80)]
    try:
        for w in writers:
            assert finish(w).strip() == "done"
    finally:
        stop.write_text("")
    outs = [finish(r).split() for r in readers]
    assert all(o[0] == "ok" and int(o[1]) >= 5 for o in outs)
    assert sum(int(o[2]) for o in outs) > 0
    with PostgresIndex.open(postgres_url) as pg:
        assert len(pg) == 80 and pg.check(deep=True) == []


# ---- HNSW ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hnsw_finds_what_exact_search_finds_and_auto_stays_exact_on_small_indexes(postgres_url, monkeypatch):
    rng = np.random.default_rng(3)
    vectors = low_rank_clusters(rng, 3020)
    vectors, queries = vectors[:3000], vectors[3000:]
    pg = PostgresIndex.create(postgres_url, MODEL, WEIGHTS, DIM)
    for i in range(100):  # 100 scans of 30 patches: 3,000 patch vectors
        block = vectors[30 * i:30 * i + 30]
        pg.add(ScanRecord(f"/data/{i}.nii"), block.mean(0), block, rng.normal(size=(30, 3)))
    built = pg.build_hnsw()
    assert built["built"] == ["scans", "patches"] and pg.build_hnsw()["built"] == [] and pg.info()["hnsw"]
    exact = pg.search(queries, k=10, level="patch", backend="exact")
    approx = pg.search(queries, k=10, level="patch", backend="hnsw")
    recall = np.mean([len({(h.scan_id, tuple(h.centre_lps)) for h in a} & {(h.scan_id, tuple(h.centre_lps))
                                                                             for h in e}) / 10
                      for a, e in zip(approx, exact)])
    assert recall >= 0.95
    # auto: exact below the threshold, HNSW from there on (told apart by what each finds in a coarse graph)
    sql(postgres_url, "DROP INDEX patches_embedding_hnsw")
    pg.build_hnsw(m=2, ef_construction=4)
    monkeypatch.setattr(_search, "HNSW_EF_SEARCH", 8)
    exact = [as_tuples(x) for x in pg.search(queries, k=60, level="patch", backend="exact")]
    approx = [as_tuples(x) for x in pg.search(queries, k=60, level="patch", backend="hnsw")]
    assert exact != approx
    assert [as_tuples(x) for x in pg.search(queries, k=60, level="patch")] == exact
    monkeypatch.setattr(_search, "FAISS_AUTO_MIN_ROWS", 1000)
    assert [as_tuples(x) for x in pg.search(queries, k=60, level="patch")] == approx
    assert [as_tuples(x) for x in pg.search(queries, k=60, level="patch", metric="l2")] == \
        [as_tuples(x) for x in pg.search(queries, k=60, level="patch", metric="l2", backend="exact")]
    pg.close()


def test_json_containment_agrees_with_postgresql(postgres_url):
    from CTFMLib.retrieval.store import json_contains

    docs = [{"a": 1, "b": [1, 2, {"c": "x"}], "d": {"e": True, "f": None}}, {"a": 1.0, "b": []}, {"b": [[1, 2]]}]
    patterns = [{}, {"a": 1}, {"a": 1.0}, {"a": True}, {"b": [2]}, {"b": [{"c": "x"}]}, {"b": 1}, {"b": []},
                {"d": {"e": True}}, {"d": {"e": 1}}, {"d": {"f": None}}, {"d": {}}, {"b": [[1]]}, {"b": [1, 1]},
                {"x": None}, {"d": {"e": True, "g": 1}}]
    rows = sql(postgres_url, "SELECT d::text, p::text, d @> p FROM jsonb_array_elements(%s::jsonb) d, "
               "jsonb_array_elements(%s::jsonb) p", (json.dumps(docs), json.dumps(patterns)))
    assert len(rows) == len(docs) * len(patterns)
    for d, p, expected in rows:
        assert json_contains(json.loads(d), json.loads(p)) == expected, (d, p)
