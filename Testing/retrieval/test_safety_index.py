"""The retrieval index under the adversarial report (``../shared/reviews/adversarial.md``): A6, A7, A8, A17
(index options), A19, A20 (index add), A21 (thumbnails), and the section B items of the index.

Real files, real SQLite, real child processes; every index is built here with a tiny 16-d encoder
(``ctfm_testing.hostile.tiny_encoder``) or, where only the storage matters, with the Python API.
Tests that mount a small tmpfs (read-only media, full disk) need root and skip with the reason otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctfm_testing.hostile import assert_refused, ctfm, fill, leftovers, small_ct, small_tmpfs, tiny_encoder, tree_digest
from ctfm_testing.plugin import run_ctfm
from CTFMLib.retrieval import RetrievalIndexError, ScanRecord, VectorIndex, store

ROOT = Path(__file__).resolve().parents[2]
HASH = "a" * 64
DIM = 16


# --- material ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A CLI-built index of three small CTs (tiny encoder), and the scans and weights it was built from.

    Tests that change it work on a copy (:func:`copy_index`); the scans and weights stay where they are,
    as the index refers to them by absolute path.
    """
    base = tmp_path_factory.mktemp("built")
    weights = tiny_encoder(base / "enc")
    scans = base / "scans"
    scans.mkdir()
    paths = [small_ct(scans / f"s{i}.nii.gz", seed=i) for i in range(3)]
    extra = small_ct(base / "extra.nii.gz", seed=7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTFM_CACHE", str(base / "cache"))
        result = ctfm("index", "add", base / "idx", scans, "--weights", weights, "--device", "cpu")
    assert result.returncode == 0, result
    return {"index": base / "idx", "weights": weights, "scans": paths, "extra": extra, "folder": scans}


def copy_index(built, where: Path) -> Path:
    target = where / "idx"
    shutil.copytree(built["index"], target)
    return target


def centre_point(path) -> str:
    """``--point=X,Y,Z``: the LPS centre of a scan's voxel grid."""
    from CTFMLib.image import read_image

    image = read_image(path)
    centre = image.index_to_physical((np.asarray(image.shape, dtype=np.float64) - 1) / 2)
    return "--point=" + ",".join(f"{v:.3f}" for v in centre)


def committed_sizes(path) -> dict:
    """{vector file name: the size its committed rows take} from a read-only open."""
    with VectorIndex.open(path, readonly=True) as ix:
        info = ix.info()
        dim, gen = ix.dim, info["generation"]
    return {f"{lv}-g{gen}.f32": store.HEADER + info[f"stored_{lv}_rows"] * 4 * dim for lv in store.LEVELS}


def api_index(path, n=4, patches=5, seed=0, dim=DIM):
    """An index of ``n`` synthetic scans written with the Python API; returns the vectors written, by path."""
    rng = np.random.default_rng(seed)
    written = {}
    with VectorIndex.create(path, "ctfm-test", HASH, dim, {"spacing": [3, 1, 1]}) as ix:
        for i in range(n):
            rec = ScanRecord(f"/data/scan{i}.nii.gz", patient_id=f"P{i}")
            sv, pv = rng.standard_normal(dim).astype(np.float32), rng.standard_normal((patches, dim)).astype(np.float32)
            ix.add(rec, sv, pv, rng.uniform(-100, 100, (patches, 3)))
            written[rec.path] = (sv, pv)
    return written


def scan_rows(path) -> dict:
    """{scan id: (path, first patch row, patch count)} read from index.sqlite itself."""
    import sqlite3

    db = sqlite3.connect(Path(path) / "index.sqlite")  # read-write: it removes -wal/-shm when it closes
    try:
        return {sid: (p, start, count) for sid, p, start, count in
                db.execute("SELECT id, path, patch_start, patch_count FROM scans")}
    finally:
        db.close()


def dropped_lines(result) -> int:
    return sum(line.startswith("dropped scan ") for line in result.stdout.splitlines())


def child_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), str(ROOT / "Testing"),
                                                         os.environ.get("PYTHONPATH", "")])}


# --- A6: a truncated vector file is refused, found and repaired ---------------------------------------


@pytest.mark.slow
def test_a6_add_refuses_a_truncated_vector_file_and_check_repair_drops_the_damaged_scans(built, tmp_path,
                                                                                         ctfm_cache):
    """A6: `truncate -s 1000 patch-g0.f32` then `ctfm index add`: the add zero-filled the lost vectors, and
    `info --check` then said "consistent" while queries returned similarity-0 hits."""
    idx = copy_index(built, tmp_path)
    patch_file = idx / "patch-g0.f32"
    spans = scan_rows(idx)
    whole = (os.path.getsize(patch_file) - store.HEADER) // (4 * DIM) // 2  # keep half the rows, and a bit
    os.truncate(patch_file, store.HEADER + whole * 4 * DIM + 10)
    lost = {sid for sid, (path, start, count) in spans.items() if start + count > whole}
    assert 0 < len(lost) < 3
    size = os.path.getsize(patch_file)
    before = tree_digest(idx)

    result = ctfm("index", "add", idx, built["extra"], "--weights", built["weights"], "--device", "cpu")
    line = assert_refused(result, "shorter", "ctfm index check", "--repair")
    assert "patch-g0.f32" in line
    assert os.path.getsize(patch_file) == size  # not zero-filled
    assert tree_digest(idx) == before

    with VectorIndex.open(idx) as ix:  # the Python API refuses just the same
        with pytest.raises(RetrievalIndexError, match="shorter"):
            ix.add(ScanRecord("/x"), np.ones(DIM), np.ones((2, DIM)), np.zeros((2, 3)))
    assert os.path.getsize(patch_file) == size

    result = ctfm("index", "check", idx)
    assert result.returncode == 1 and "PROBLEMS" in result.stdout and "--repair" in result.stdout, result
    assert ctfm("index", "info", idx, "--check").returncode == 1

    with VectorIndex.open(idx, readonly=True) as ix:
        assert set(ix.check_report(deep=True).damaged) == lost

    result = ctfm("index", "check", idx, "--repair")
    assert result.returncode == 0, result
    for sid in lost:
        assert f"dropped scan {sid} ({spans[sid][0]})" in result.stdout
    assert dropped_lines(result) == len(lost)
    result = ctfm("index", "check", idx, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["consistent"], result
    assert len(VectorIndex.open(idx, readonly=True)) == 3 - len(lost)

    # writable again: the dropped scans go back in, and every hit is a real similarity
    result = ctfm("index", "add", idx, built["folder"], "--device", "cpu")
    assert result.returncode == 0 and f"added {len(lost)}, already indexed {3 - len(lost)}" in result.stdout, result
    result = ctfm("index", "query", idx, built["scans"][1], centre_point(built["scans"][1]), "-k", "4", "--json",
                  "--device", "cpu")
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 3 and all(abs(h["similarity"]) > 1e-3 for h in hits), hits
    assert ctfm("index", "check", idx).returncode == 0


def test_a6_deep_check_verifies_checksums_and_compaction_keeps_them(tmp_path):
    """A6: a committed vector changed on disk (here: a patch row rewritten) went unnoticed by check(deep=True)."""
    written = api_index(tmp_path / "ix", n=5)
    with VectorIndex.open(tmp_path / "ix") as ix:
        assert ix.check(deep=True) == []
        ids = {rec.path: sid for sid, rec in ix.scans()}
        victim = ids["/data/scan2.nii.gz"]
        ix.remove(ids["/data/scan0.nii.gz"])
        ix.compact()  # rows move to a new generation; their checksums stay valid
        assert ix.check(deep=True) == []
    patch_start = scan_rows(tmp_path / "ix")[victim][1]
    patch_file = tmp_path / "ix" / "patch-g1.f32"
    with open(patch_file, "r+b") as f:  # one float of the victim's second patch vector
        f.seek(store.HEADER + (patch_start + 1) * DIM * 4 + 8)
        f.write(np.float32(123.5).tobytes())
    with VectorIndex.open(tmp_path / "ix", readonly=True) as ix:
        report = ix.check_report(deep=True)
        assert list(report.damaged) == [victim] and "checksum" in report.damaged[victim][2]
        assert ix.check() == []  # the quick check reads no vectors
    result = ctfm("index", "check", tmp_path / "ix", "--repair", "--json")
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert [d["scan_id"] for d in out["dropped"]] == [victim] and out["kept"] == 3
    with VectorIndex.open(tmp_path / "ix", readonly=True) as ix:
        assert ix.check(deep=True) == []
        for sid, rec in ix.scans():
            sv, pv, _ = ix.vectors(sid)
            np.testing.assert_array_equal(sv, written[rec.path][0])
            np.testing.assert_array_equal(pv, written[rec.path][1])


# The scans table as CT-FM made it before checksums (commit e27dc64), filled from the current one.
OLD_SCANS_TABLE = """
BEGIN;
ALTER TABLE scans RENAME TO scans_new;
CREATE TABLE scans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    series_uid TEXT,
    patient_id TEXT,
    study_uid TEXT,
    geometry TEXT NOT NULL,
    preprocessing TEXT NOT NULL,
    metadata TEXT NOT NULL,
    model_id TEXT NOT NULL,
    weights_hash TEXT NOT NULL,
    added_at REAL NOT NULL,
    scan_row INTEGER NOT NULL,
    patch_start INTEGER NOT NULL,
    patch_count INTEGER NOT NULL,
    centres BLOB NOT NULL
);
INSERT INTO scans SELECT id, path, series_uid, patient_id, study_uid, geometry, preprocessing, metadata, model_id,
    weights_hash, added_at, scan_row, patch_start, patch_count, centres FROM scans_new;
DROP TABLE scans_new;
CREATE UNIQUE INDEX scans_key ON scans (path, ifnull(series_uid, ''));
COMMIT;
"""


def test_a6_an_index_without_checksums_is_upgraded_and_its_zero_filled_rows_are_found(tmp_path):
    """A6 on an index made before checksums: the rows an old `add` zero-filled are flagged (all-zero vectors);
    intact old rows are only noted ("no checksum"), and the first write-open adds the column."""
    import sqlite3

    written = api_index(tmp_path / "ix", n=4)
    db = sqlite3.connect(tmp_path / "ix" / "index.sqlite", isolation_level=None)
    if any(r[1] == "checksum" for r in db.execute("PRAGMA table_info(scans)")):
        db.executescript(OLD_SCANS_TABLE)
    ids = dict(db.execute("SELECT path, id FROM scans"))
    start, count = db.execute("SELECT patch_start, patch_count FROM scans WHERE path = ?",
                              ("/data/scan1.nii.gz",)).fetchone()
    db.close()
    with open(tmp_path / "ix" / "patch-g0.f32", "r+b") as f:  # what the old add's truncate(end) left: zeros
        f.seek(store.HEADER + start * DIM * 4)
        f.write(b"\0" * count * DIM * 4)

    with VectorIndex.open(tmp_path / "ix", readonly=True) as ix:
        report = ix.check_report(deep=True)
    zeroed = ids["/data/scan1.nii.gz"]
    assert list(report.damaged) == [zeroed] and "all zeros" in report.damaged[zeroed][2]
    assert any("no checksum (added before checksums)" in n for n in report.notes), report.notes
    assert len(report.problems) == 1

    with VectorIndex.open(tmp_path / "ix") as ix:  # the first write-open upgrades the table
        rec = ScanRecord("/data/new.nii.gz")
        ix.add(rec, np.ones(DIM), np.full((2, DIM), 2.0), np.zeros((2, 3)))
        report = ix.check_report(deep=True)
        assert list(report.damaged) == [ids["/data/scan1.nii.gz"]]
        dropped = ix.repair()["dropped"]
        assert [d["path"] for d in dropped] == ["/data/scan1.nii.gz"]
        assert ix.check(deep=True) == [] and len(ix) == 4
        for sid, r in ix.scans():
            if r.path in written:
                np.testing.assert_array_equal(ix.vectors(sid)[1], written[r.path][1])
    db = sqlite3.connect(tmp_path / "ix" / "index.sqlite")
    sums = dict(db.execute("SELECT path, checksum FROM scans"))
    db.close()
    assert sums["/data/new.nii.gz"] is not None and sums["/data/scan0.nii.gz"] is None


# --- A7: atomic creation -------------------------------------------------------------------------------

RACE_CHILD = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from CTFMLib.retrieval import ScanRecord, VectorIndex, store

role, path = sys.argv[2], sys.argv[3]
if role == "A":  # the report's harness: a delay where the old create had its window (check, then files)
    original, calls = store.create_vector_file, []

    def slow(p, dim):
        if not calls:
            print("window", flush=True)
            time.sleep(2.0)
        calls.append(p)
        original(p, dim)

    store.create_vector_file = slow
ix = VectorIndex.open_or_create(path, "ctfm-test", "a" * 64, 8)
value = 1.0 if role == "A" else 2.0
sid = ix.add(ScanRecord("/" + role), np.full(8, value), np.full((5, 8), value), np.zeros((5, 3)))
print("added", sid, flush=True)
"""


@pytest.mark.slow
def test_a7_a_second_creator_waits_instead_of_truncating_the_first_ones_files(tmp_path):
    """A7: creator A delayed between its check and the vector files; creator B created, added and committed;
    A then truncated B's vector files ("shorter than its committed rows", "mmap length ...")."""
    path = tmp_path / "ix"
    a = subprocess.Popen([sys.executable, "-c", RACE_CHILD, str(ROOT / "CTFM"), "A", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert a.stdout.readline().strip() == "window", a.stderr.read()
        b = subprocess.run([sys.executable, "-c", RACE_CHILD, str(ROOT / "CTFM"), "B", str(path)],
                           capture_output=True, text=True, env=child_env(), timeout=120)
        out_a, err_a = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0 and "added" in out_a, err_a
    assert b.returncode == 0 and "added" in b.stdout, b.stderr
    with VectorIndex.open(path, readonly=True) as ix:
        assert ix.check(deep=True) == []
        got = {rec.path: ix.vectors(sid) for sid, rec in ix.scans()}
    assert sorted(got) == ["/A", "/B"]
    for role, value in (("A", 1.0), ("B", 2.0)):
        np.testing.assert_array_equal(got["/" + role][0], np.full(8, value, np.float32))
        np.testing.assert_array_equal(got["/" + role][1], np.full((5, 8), value, np.float32))


@pytest.mark.slow
def test_a7_two_adds_creating_one_new_index_both_succeed(built, tmp_path):
    """A7 without the delay: two `ctfm index add NEW_INDEX scans` started together; one failed with
    "table meta already exists" and "already holds a retrieval index"."""
    idx = tmp_path / "new"
    cmd = [sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "index", "add", str(idx), str(built["folder"]),
           "--weights", str(built["weights"]), "--device", "cpu", "--threads", "1"]
    env = {**child_env(), "CTFM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err and "FAILED" not in err, (out, err)
    added = [int(out.split("added ")[-1].split(",")[0]) for out, _ in outs]
    assert sum(added) == 3, outs
    with VectorIndex.open(idx, readonly=True) as ix:
        assert len(ix) == 3 and ix.check(deep=True) == []


# --- A8: concurrent adds into one index -------------------------------------------------------------------

LATE_ADDER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from CTFMLib.cli import main
from CTFMLib.retrieval.index import VectorIndex

original, go = VectorIndex.add, sys.argv[2]


def add_after_the_other(self, record, *args, **kwargs):
    # The scan was embedded; another process adds it now (what the report's two concurrent adds did)
    if not os.path.exists(go + ".seen"):
        open(go + ".seen", "w").close()
        print("embedded, about to add", flush=True)
        while not os.path.exists(go):
            time.sleep(0.05)
    return original(self, record, *args, **kwargs)


VectorIndex.add = add_after_the_other
sys.exit(main(["--progress", "none", "index", "add", *sys.argv[3:]]))
"""


@pytest.mark.slow
def test_a8_a_scan_another_add_indexed_meanwhile_is_skipped_not_an_abort(built, tmp_path, ctfm_cache):
    """A8: two `ctfm index add ce scans` at once: the loser stopped with "is already in the index as scan 2:
    use update() to replace it" (rc 2) and left its remaining scans unprocessed."""
    idx = tmp_path / "idx"
    first, others = built["scans"][0], built["scans"][1:]
    assert ctfm("index", "add", idx, first, "--weights", built["weights"], "--device", "cpu").returncode == 0
    go = tmp_path / "go"
    late = subprocess.Popen([sys.executable, "-c", LATE_ADDER, str(ROOT / "CTFM"), str(go), str(idx),
                             *map(str, others), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**child_env(), "CTFM_CACHE": str(ctfm_cache)})
    try:
        lines = []  # the late adder's first lines (an expected time) until its scan is embedded
        while not lines or lines[-1] not in ("embedded, about to add", ""):
            lines.append(late.stdout.readline().strip())
        assert lines[-1] == "embedded, about to add", (lines, late.poll())
        # meanwhile another add indexes the scan the late one is about to add
        assert ctfm("index", "add", idx, others[0], "--device", "cpu").returncode == 0
        go.touch()
        out, err = late.communicate(timeout=300)
    finally:
        if late.poll() is None:
            late.kill()
    assert late.returncode == 0, (out, err)
    assert "update()" not in out + err and "Traceback" not in err
    assert "already indexed (added by another process meanwhile)" in out
    assert "added 1, already indexed 1, failed 0 of 2" in out  # and it went on with the next scan
    with VectorIndex.open(idx, readonly=True) as ix:
        assert sorted(rec.path for _, rec in ix.scans()) == sorted(str(p.resolve()) for p in built["scans"])
        assert ix.check(deep=True) == []


# --- A17: index option values ------------------------------------------------------------------------------


def test_a17_per_scan_negative_is_refused_and_zero_still_means_no_limit(built, ctfm_cache):
    """A17: `ctfm index query ... --per-scan -1` ran as "no limit" without a word."""
    point = centre_point(built["scans"][0])
    result = ctfm("index", "query", built["index"], built["scans"][0], point, "--per-scan", "-1", "--device", "cpu")
    assert_refused(result, "per-scan", "-1")
    result = ctfm("index", "query", built["index"], built["scans"][0], point, "--per-scan", "0", "-k", "100",
                  "--json", "--device", "cpu")
    assert result.returncode == 0, result
    hits = json.loads(result.stdout)["hits"]
    per_scan = {}
    for h in hits:
        per_scan[h["scan_id"]] = per_scan.get(h["scan_id"], 0) + 1
    assert len(per_scan) == 3 and max(per_scan.values()) > 1  # several places of one scan: no limit


@pytest.mark.slow
def test_a17_stride_1_is_refused_before_any_work_and_a_fine_stride_warns(built, tmp_path, ctfm_cache):
    """A17: `ctfm index add idx scan --stride 1` embedded 294,448 patches for a 30-slice scan, without a warning."""
    idx = tmp_path / "idx"
    try:
        result = run_ctfm("--progress", "none", "index", "add", idx, built["scans"][0], "--stride", "1",
                          "--weights", built["weights"], "--device", "cpu", timeout=120,
                          env={"CTFM_CACHE": str(ctfm_cache)})
    except subprocess.TimeoutExpired:
        pytest.fail("--stride 1 was not refused: the add ran for minutes")
    assert_refused(result, "--stride 1", "times as many patches", "at most 64")
    assert not idx.exists()
    # 12,32,32: 2 x 4 x 4 = 32 times the default patches: accepted with one warning line
    result = ctfm("index", "add", idx, built["scans"][0], "--stride", "12,32,32", "--weights", built["weights"],
                  "--device", "cpu")
    assert result.returncode == 0, result
    warnings = [ln for ln in result.lines if "warning" in ln]
    assert len(warnings) == 1 and "32 times" in warnings[0], result
    with VectorIndex.open(idx, readonly=True) as ix:
        assert ix.preprocessing["stride"] == [12, 32, 32] and ix.info()["patches"] > 4


def test_a17_add_into_a_file_is_refused_once_up_front(built, tmp_path, ctfm_cache):
    """A17: `ctfm index add afile.txt scans` reported every scan FAILED "[Errno 17] File exists"."""
    afile = tmp_path / "afile.txt"
    afile.write_text("my notes\n")
    result = ctfm("index", "add", afile, built["folder"], "--weights", built["weights"], "--device", "cpu")
    assert_refused(result, "afile.txt is a file, not an index folder")
    assert afile.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]
    for args in (("info",), ("check",), ("compact",)):
        assert_refused(ctfm("index", *args, afile), "is a file, not an index folder")


# --- A19: read-only media, full disks, damaged files ------------------------------------------------------


@pytest.mark.slow
def test_a19_an_index_on_read_only_media_can_be_searched(built, tmp_path, ctfm_cache):
    """A19: on a read-only mount every command failed with sqlite3.OperationalError "unable to open database
    file" (a traceback): a read-only index could not even be searched."""
    with small_tmpfs(tmp_path / "media", "16m") as media:
        idx = media / "idx"
        shutil.copytree(built["index"], idx)
        labels = tmp_path / "labels.csv"
        labels.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate(built["scans"])))
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        before = tree_digest(media)

        result = ctfm("index", "info", idx, "--check")
        assert result.returncode == 0 and "consistent" in result.stdout, result
        result = ctfm("index", "query", idx, built["scans"][1], "-k", "2", "--json", "--device", "cpu")
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["hits"][0]["path"] == str(built["scans"][1].resolve())
        result = ctfm("index", "eval", idx, "--labels", labels, "-k", "1", "--json")
        assert result.returncode == 0 and json.loads(result.stdout)["queries"] == 3, result
        assert ctfm("index", "check", idx).returncode == 0
        for args in (("remove", idx, "1"), ("compact", idx), ("check", idx, "--repair"),
                     ("add", idx, built["extra"], "--device", "cpu")):
            assert_refused(ctfm("index", *args), "read-only")
        assert tree_digest(media) == before  # nothing written, no -wal/-shm


def test_a19_read_only_media_with_unmerged_changes_are_refused_not_read_stale(tmp_path):
    """A19 (immutable reads): a copy holding changes still in index.sqlite-wal would read stale rows as immutable."""
    with small_tmpfs(tmp_path / "media", "8m") as media:
        writer = VectorIndex.create(tmp_path / "ix", "ctfm-test", HASH, DIM)
        writer.add(ScanRecord("/a"), np.ones(DIM), np.ones((1, DIM)), np.zeros((1, 3)))
        assert (tmp_path / "ix" / "index.sqlite-wal").stat().st_size > 0  # the writer is still open
        shutil.copytree(tmp_path / "ix", media / "ix")
        writer.close()
        (media / "ix" / "index.sqlite-shm").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        with pytest.raises(RetrievalIndexError, match="not yet merged") as err:
            VectorIndex.open(media / "ix", readonly=True)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a19_full_disk_reads_work_and_writes_fail_with_the_real_cause(built, tmp_path, ctfm_cache):
    """A19: with ~8 KB free even `ctfm index info` failed with "disk I/O error" (traceback, -wal/-shm left);
    with ~50 KB free `add` said "cannot rollback - no transaction is active" (the real cause, disk full, hidden)
    and embedded and failed every remaining scan. B: failed adds leave the index consistent; after space is
    freed adding works."""
    import sqlite3

    with small_tmpfs(tmp_path / "small", "4m") as small:
        idx = small / "idx"
        shutil.copytree(built["index"], idx)
        names = sorted(p.name for p in idx.iterdir())
        filler = fill(small, leave=0)

        result = ctfm("index", "info", idx, "--check")
        assert result.returncode == 0 and "consistent" in result.stdout, result
        result = ctfm("index", "query", idx, built["scans"][2], "-k", "1", "--json", "--device", "cpu")
        assert result.returncode == 0 and json.loads(result.stdout)["hits"][0]["similarity"] == pytest.approx(1.0)
        assert sorted(p.name for p in idx.iterdir()) == names  # no -wal/-shm left
        result = ctfm("index", "add", idx, built["extra"], "--device", "cpu")
        assert_refused(result, "no space left", "free some space")
        assert sorted(p.name for p in idx.iterdir()) == names
        filler.unlink()

        # A long add that finds the disk full: the vector write or SQLite's commit fails
        rng = np.random.default_rng(3)
        causes = []
        with VectorIndex.open(idx) as writer:
            for n, (leave_kb, patches) in enumerate([(40, 1), (40, 300), (24, 300), (8, 300), (0, 1), (0, 300)]):
                filler = fill(small, leave=leave_kb * 1024)
                try:
                    writer.add(ScanRecord(f"/full/{n}"), rng.standard_normal(DIM), rng.standard_normal((patches, DIM)),
                               np.zeros((patches, 3)))
                except RetrievalIndexError as e:
                    assert "no space left" in str(e) and "rollback" not in str(e) and "\n" not in str(e), e
                    causes.append(type(e.__cause__))
                for name, size in committed_sizes(idx).items():
                    assert (idx / name).stat().st_size == size, (n, name)  # the failed add's vectors were cut
                with VectorIndex.open(idx, readonly=True) as reader:
                    assert reader.check(deep=True) == []
                filler.unlink()
            assert sqlite3.OperationalError in causes, causes  # the report's case: the commit itself failed
            sid = writer.add(ScanRecord("/full/after"), np.ones(DIM), np.ones((300, DIM)), np.zeros((300, 3)))
            np.testing.assert_array_equal(writer.vectors(sid)[1], np.ones((300, DIM), np.float32))
            assert writer.check(deep=True) == []


@pytest.mark.slow
def test_a19_damaged_files_give_one_line_with_the_cause(built, tmp_path, ctfm_cache):
    """A19: index.sqlite overwritten -> "sqlite3.DatabaseError: file is not a database" (traceback, every command);
    scan-g0.f32 deleted -> query "keeps changing generation; retry", add -> every scan FAILED [Errno 2];
    patch file truncated -> "mmap length is greater than file size"."""
    scan = built["scans"][0]
    point = centre_point(scan)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{scan},a\n{built['scans'][1]},a\n")

    def every_command(idx):
        yield ("info", idx)
        yield ("info", idx, "--check")
        yield ("query", idx, scan, "--device", "cpu")
        yield ("query", idx, scan, point, "--device", "cpu")
        yield ("add", idx, built["extra"], "--device", "cpu")
        yield ("remove", idx, "1")
        yield ("compact", idx)
        yield ("eval", idx, "--labels", labels)

    notdb = copy_index(built, tmp_path / "notdb")
    with open(notdb / "index.sqlite", "r+b") as f:
        f.write(b"this is not SQLite" * 10)
    for args in [*every_command(notdb), ("check", notdb), ("check", notdb, "--repair")]:
        assert_refused(ctfm("index", *args), "not a CT-FM index", "not a database", "rebuild")
    assert sorted(p.name for p in notdb.iterdir()) == ["index.sqlite", "patch-g0.f32", "scan-g0.f32"]

    missing = copy_index(built, tmp_path / "missing")
    (missing / "scan-g0.f32").unlink()
    for args in (("query", missing, scan, "--device", "cpu"), ("add", missing, built["extra"], "--device", "cpu"),
                 ("compact", missing), ("eval", missing, "--labels", labels)):
        line = assert_refused(ctfm("index", *args), "scan-g0.f32 is missing", "--repair")
        assert "generation" not in line and "Errno" not in line
    result = ctfm("index", "check", missing)
    assert result.returncode == 1 and "scan-g0.f32 is missing" in result.stdout, result
    result = ctfm("index", "check", missing, "--repair")
    assert result.returncode == 0 and dropped_lines(result) == 3, result
    assert ctfm("index", "add", missing, built["folder"], "--device", "cpu").returncode == 0
    with VectorIndex.open(missing, readonly=True) as ix:
        assert len(ix) == 3 and ix.check(deep=True) == []

    short = copy_index(built, tmp_path / "short")
    os.truncate(short / "patch-g0.f32", os.path.getsize(short / "patch-g0.f32") // 2)
    for args in (("query", short, scan, point, "--device", "cpu"), ("compact", short)):
        line = assert_refused(ctfm("index", *args), "patch-g0.f32 is shorter than its rows", "--repair")
        assert "mmap" not in line


def test_readers_need_no_write_access_and_leave_no_files(built, tmp_path, ctfm_cache):
    """The A19 mechanism (readers open SQLite read-only, mode=ro) keeps what readers did before: an index folder
    the user may not write is searchable, and a reader leaves no -wal/-shm behind."""
    idx = copy_index(built, tmp_path)
    before = tree_digest(idx)
    assert ctfm("index", "info", idx, "--check").returncode == 0
    assert tree_digest(idx) == before
    if os.geteuid() == 0:
        return  # root may write anywhere; the read-only mount test covers it
    os.chmod(idx, 0o555)
    try:
        result = ctfm("index", "query", idx, built["scans"][0], "--json", "--device", "cpu")
        assert result.returncode == 0, result
        assert tree_digest(idx) == before
    finally:
        os.chmod(idx, 0o755)


# --- A20: SIGTERM during index add -----------------------------------------------------------------------


@pytest.mark.slow
def test_a20_sigterm_during_ctfm_index_add_leaves_no_temporary_files_and_a_consistent_index(tmp_path, built):
    """A20: no command but training handled SIGTERM (Slicer's Cancel): `ctfm index add` died at once."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(5):
        small_ct(scans / f"t{i}.nii.gz", seed=20 + i)
    idx = tmp_path / "idx"
    env = {**child_env(), "CTFM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "index", "add", str(idx),
                              str(scans), "--weights", str(built["weights"]), "--device", "cpu", "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in child.stdout:
            if "added as scan" in line:
                time.sleep(0.05)
                child.send_signal(signal.SIGTERM)
                break
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ctfm: terminated", err
    assert leftovers(idx) == [] and leftovers(scans) == []
    assert sorted(p.name for p in idx.iterdir()) == ["index.sqlite", "patch-g0.f32", "scan-g0.f32"]
    for name, size in committed_sizes(idx).items():
        assert (idx / name).stat().st_size == size, name
    with VectorIndex.open(idx, readonly=True) as ix:
        assert ix.check(deep=True) == [] and 1 <= len(ix) < 5
    result = ctfm("index", "add", idx, scans, "--device", "cpu")  # started again, it finishes the job
    assert result.returncode == 0, result
    with VectorIndex.open(idx, readonly=True) as ix:
        assert len(ix) == 5 and ix.check(deep=True) == []


SIGTERM_WRITER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from CTFMLib.progress import Terminated, terminate_on_sigterm
from CTFMLib.retrieval import ScanRecord, VectorIndex

ix = VectorIndex.open(sys.argv[2])
rng = np.random.default_rng(int(sys.argv[3]))
try:
    with terminate_on_sigterm():
        for i in range(1000):
            pv = rng.random((6000 + 2000 * (i % 5), 256), dtype=np.float32)
            print("writing", i, flush=True)
            t = time.perf_counter()
            ix.add(ScanRecord(f"/t{sys.argv[3]}-{i}"), rng.random(256, dtype=np.float32), pv, np.zeros((len(pv), 3)))
            print("committed", i, time.perf_counter() - t, flush=True)
except Terminated:
    ix.close()
    sys.exit(143)
"""


@pytest.mark.slow
def test_a20_sigterm_while_vectors_are_written_cuts_them_again(tmp_path):
    """A20: a writer stopped by SIGTERM while appending vectors leaves no uncommitted tail behind."""
    path = tmp_path / "ix"
    VectorIndex.create(path, "ctfm-test", HASH, 256).close()
    for round_no in range(3):
        child = subprocess.Popen([sys.executable, "-c", SIGTERM_WRITER, str(ROOT / "CTFM"), str(path), str(round_no)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        durations = []
        for line in child.stdout:
            words = line.split()
            if words[0] == "committed":
                durations.append(float(words[2]))
            elif int(words[1]) == 2:
                time.sleep(np.median(durations) * (0.3 + 0.25 * round_no))  # inside the writing phase
                child.send_signal(signal.SIGTERM)
                break
        out, err = child.communicate(timeout=60)
        assert child.returncode == 143, err
        for name, size in committed_sizes(path).items():
            assert (path / name).stat().st_size == size, (round_no, name)
        with VectorIndex.open(path, readonly=True) as ix:
            assert ix.check(deep=True) == []
    assert leftovers(path) == []


def test_a20_the_faiss_cache_is_written_atomically_and_follows_no_planted_link(tmp_path):
    """A20/A9 for the FAISS cache: it was written to `.NAME.PID.tmp` (predictable, following a symlink) and
    os.replace'd; now through CTFMLib.files (a private temporary folder, never a planted link)."""
    pytest.importorskip("faiss")
    written = api_index(tmp_path / "ix", n=6)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    faiss_dir = tmp_path / "ix" / "faiss"
    faiss_dir.mkdir()
    with VectorIndex.open(tmp_path / "ix") as ix:
        name = f"patch-cosine-g0-n{ix.info()['stored_patch_rows']}.faiss"
        (faiss_dir / f".{name}.{os.getpid()}.tmp").symlink_to(victim)  # the old predictable temporary name
        sv = next(iter(written.values()))[1][0]
        assert ix.search(sv, k=3, level="patch", backend="faiss")[0].similarity == pytest.approx(1.0)
    assert victim.read_text() == "precious\n"
    assert (faiss_dir / name).is_file() and not (faiss_dir / name).is_symlink()
    assert [p.name for p in faiss_dir.iterdir() if p.name.startswith(".ctfm-tmp")] == []


# --- A21: thumbnails never replace existing files ---------------------------------------------------------


def test_a21_thumbnails_refuse_to_replace_existing_pictures_unless_overwrite(built, tmp_path, ctfm_cache):
    """A21: `ctfm index query --thumbnails DIR` overwrote the 1.png, 2.png, ... already in DIR (non-atomically)."""
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    (thumbs / "1.png").write_bytes(b"my own picture")
    (thumbs / "notes.txt").write_text("keep")
    query = ("index", "query", built["index"], built["scans"][0], "-k", "2", "--json", "--device", "cpu",
             "--thumbnails", thumbs)
    assert_refused(ctfm(*query), "1.png", "--overwrite")
    assert (thumbs / "1.png").read_bytes() == b"my own picture" and sorted(p.name for p in thumbs.iterdir()) == [
        "1.png", "notes.txt"]
    result = ctfm(*query, "--overwrite")
    assert result.returncode == 0, result
    hits = json.loads(result.stdout)["hits"]
    assert [Path(h["thumbnail"]).name for h in hits] == ["1.png", "2.png"]
    assert all(Path(h["thumbnail"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for h in hits)
    assert (thumbs / "notes.txt").read_text() == "keep" and leftovers(thumbs) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_refused(ctfm(*query[:-1], afile), "is a file")


# --- B: what held up keeps holding ------------------------------------------------------------------------


def test_b_query_arguments_are_checked(built, ctfm_cache):
    """B: -k 0/-1, NaN/inf or 2/4 coordinates, --ras without a point: clear errors, one line each."""
    base = ("index", "query", built["index"], built["scans"][0], "--device", "cpu")
    for extra, word in ((("-k", "0"), "-k"), (("-k", "-1"), "-k"), (("--point=nan,0,0",), "point"),
                        (("--point=inf,0,0",), "point"), (("--point=1,2",), "three numbers"),
                        (("--point=1,2,3,4",), "three numbers"), (("--box=0,0,0,1,1",), "six numbers"),
                        (("--ras",), "--ras")):
        assert_refused(ctfm(*base, *extra), word)
    far = "--point=10000,10000,10000"
    result = ctfm(*base, far)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result


@pytest.mark.slow
def test_b_corrupt_sqlite_pages_and_an_empty_index_file_say_what_to_do(built, tmp_path, ctfm_cache):
    """B: a corrupted SQLite page -> "cannot be read (...); rebuild the index"; an empty index.sqlite ->
    "incompletely created index" (and `add` now completes the creation)."""
    corrupt = copy_index(built, tmp_path / "corrupt")
    db = corrupt / "index.sqlite"
    data = bytearray(db.read_bytes())
    rng = np.random.default_rng(5)
    data[4096:] = rng.bytes(len(data) - 4096)  # every page after the first: the tables' pages
    db.write_bytes(bytes(data))
    for args in (("info", corrupt), ("query", corrupt, built["scans"][0], "--device", "cpu"), ("remove", corrupt, "1"),
                 ("compact", corrupt), ("check", corrupt, "--repair")):
        assert_refused(ctfm("index", *args), "rebuild")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.sqlite").touch()
    for args in (("info", empty), ("query", empty, built["scans"][0], "--device", "cpu"), ("check", empty)):
        assert_refused(ctfm("index", *args), "incompletely created index")
    result = ctfm("index", "add", empty, built["scans"][0], "--weights", built["weights"], "--device", "cpu")
    assert result.returncode == 0, result
    assert ctfm("index", "check", empty).returncode == 0


@pytest.mark.slow
def test_b_sql_is_parameterised(built, tmp_path, ctfm_cache):
    """B: CSV columns and values that are SQL, and removal targets like "1 OR 1=1" or "%", are plain text."""
    listing = tmp_path / "list.csv"
    column = "label'); DROP TABLE scans;--"
    value = "'); DELETE FROM meta;--"
    listing.write_text(f'path,"{column}"\n{built["scans"][0]},"{value}"\n{built["scans"][1]},1 OR 1=1\n')
    idx = tmp_path / "idx"
    result = ctfm("index", "add", idx, listing, "--weights", built["weights"], "--device", "cpu")
    assert result.returncode == 0, result
    for target in ("1 OR 1=1", "%", "1; DROP TABLE scans"):
        assert ctfm("index", "remove", idx, target).returncode == 1
    with VectorIndex.open(idx, readonly=True) as ix:
        assert len(ix) == 2 and ix.check(deep=True) == []
        columns = sorted(rec.metadata["columns"][column] for _, rec in ix.scans())
    assert columns == sorted([value, "1 OR 1=1"])


def test_b_other_weights_are_refused_by_hash(built, tmp_path, ctfm_cache):
    """B: an add or query with other weights is refused: vectors of different weights are not comparable."""
    other = tiny_encoder(tmp_path / "other", seed=3)
    idx = copy_index(built, tmp_path)
    before = tree_digest(idx)
    assert_refused(ctfm("index", "add", idx, built["extra"], "--weights", other, "--device", "cpu"), "weights")
    assert_refused(ctfm("index", "query", idx, built["scans"][0], "--weights", other, "--device", "cpu"), "weights")
    assert tree_digest(idx) == before
