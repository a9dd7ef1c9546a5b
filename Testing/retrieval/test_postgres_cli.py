"""`ctfm index ...` on a PostgreSQL index: the same answers as a folder index, its management commands, no
password in any output, and `index add` on two torchrun "nodes" (a killed node included).

A real PostgreSQL server with pgvector (the ``postgres_server`` / ``postgres_url`` fixtures: pgserver on a Unix
socket, a fresh schema per test), the real ``ctfm`` command line (in this process, or torchrun children for the
nodes), a tiny encoder at random weights and small phantoms (DICOM series with patient ids, NIfTI files).
"""

import json
import re
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import pytest

from ctfm_testing.hostile import assert_refused, ctfm
from ctfm_testing.phantoms import body_phantom, head_phantom
from CTFMLib.image import read_image, write_image
from CTFMLib.retrieval import backends

GRID = {"shape": (30, 26, 8), "spacing": (5.0, 5.0, 8.0)}  # 150 x 130 x 64 mm: four patches of the encoder
HEAD = {"shape": (30, 30, 8), "spacing": (5.0, 5.0, 8.0), "head_radius_mm": 60}
RUN = ["--device", "cpu", "--batch-size", "4", "--threads", "1"]
SECRET = "n0t-Shown-pw"


def _schema(url: str, suffix: str) -> str:
    """``url`` naming another schema of the same database (``SCHEMA_suffix``)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["schema"] = f"{query.get('schema', 'ctfm')}_{suffix}"
    return urlunsplit(parts._replace(query=urlencode(query)))


def _with_password(url: str, password: str = SECRET) -> str:
    """``url`` with a password in it (the test server trusts its Unix socket and ignores it)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


def _ok(result) -> dict:
    assert result.returncode == 0, result
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three DICOM series (patients P1, P1, P2) and two NIfTI files, listed in a CSV with a ``site`` column."""
    from ctfm_testing.synthetic_dicom import write_ct_series

    root = tmp_path_factory.mktemp("pg-scans")
    series = {"p1a": ("P1", body_phantom(**GRID, seed=0, body_radius_mm=50)),
              "p1b": ("P1", body_phantom(**GRID, seed=1, body_radius_mm=60)),
              "p2": ("P2", head_phantom(**HEAD, seed=0))}
    for name, (patient, image) in series.items():
        write_ct_series(root / name, image, intercept=-2048.0, PatientID=patient)
    write_image(body_phantom(**GRID, seed=2, body_radius_mm=55), root / "body2.nii.gz")
    write_image(head_phantom(**HEAD, seed=1), root / "head1.nii.gz")
    sites = {"p1a": "A", "p1b": "B", "p2": "A", "body2.nii.gz": "B", "head1.nii.gz": "A"}
    (root / "scans.csv").write_text("path,site\n" + "".join(f"{root / n},{s}\n" for n, s in sites.items()))
    return {"root": root, "csv": root / "scans.csv", "site_a": {str((root / n).resolve()) for n, s in sites.items()
                                                                if s == "A"}}


def _queries(scans) -> dict:
    """Each kind of query (scan, point, box) of P1's first series, without and with filters (every filter on
    whole scans; some on patches, to keep it quick)."""
    query = scans["root"] / "p1a"
    image = read_image(query)
    centre = image.index_to_physical((np.asarray(image.shape) - 1) / 2)
    kinds = {"scan": [], "point": ["--point=" + ",".join(map(str, centre)), "-k", "4"],
             "box": ["--box=" + ",".join(map(str, np.concatenate([centre - 25, centre + 25]))), "--per-scan", "2"]}
    filters = {"none": [], "patient": ["--exclude-patient"], "scan": ["--exclude-scan", str(query)],
               "metadata": ["--metadata", "columns.site=A"]}
    chosen = {"scan": filters, "point": ("none", "patient", "metadata"), "box": ("none", "scan")}
    return {(k, f): [str(query), *a, *filters[f]] for k, a in kinds.items() for f in chosen[k]}


@pytest.mark.slow
def test_a_database_index_answers_every_query_as_a_folder_index_does(scans, tiny_encoder_folder, postgres_url,
                                                                      tmp_path, ctfm_cache):
    folder = tmp_path / "idx"
    for index in (folder, postgres_url):
        out = _ok(ctfm("index", "add", index, scans["csv"], "--weights", tiny_encoder_folder, "--json", *RUN))
        assert (out["added"], out["failed"]) == (5, []), out
    assert _ok(ctfm("index", "info", postgres_url, "--json"))["backend"] == "postgresql"  # not a folder named so
    p1 = {str((scans["root"] / n).resolve()) for n in ("p1a", "p1b")}
    for (kind, only), args in _queries(scans).items():
        embedded, database = (_ok(ctfm("index", "query", index, *args, "--json", *RUN))["hits"]
                              for index in (folder, postgres_url))
        assert embedded, (kind, only)
        names = ("scan_id", "path", "series_uid", "patient_id", "study_uid")
        assert [[h[n] for n in names] for h in database] == [[h[n] for n in names] for h in embedded], (kind, only)
        np.testing.assert_allclose([h["centre_lps"] for h in database], [h["centre_lps"] for h in embedded],
                                   atol=2e-3, err_msg=f"{kind} {only}")  # rounded to 3 decimals in the JSON
        np.testing.assert_allclose([h["similarity"] for h in database], [h["similarity"] for h in embedded],
                                   atol=1e-5, err_msg=f"{kind} {only}")
        paths = {h["path"] for h in embedded}
        if only == "patient":  # the filters do filter: P1's two series are left out, the others are all there
            assert not paths & p1 and len(paths) == 3, (kind, paths)
        elif only == "scan":
            assert str((scans["root"] / "p1a").resolve()) not in paths and len(paths) == 4, (kind, paths)
        elif only == "metadata":
            assert paths == scans["site_a"], (kind, paths)
        else:
            assert len(paths) == (4 if kind == "point" else 5), (kind, paths)
    # A metadata key no scan has: nothing, from either backend.
    for index in (folder, postgres_url):
        out = _ok(ctfm("index", "query", index, scans["root"] / "p2", "--metadata", "columns.site=Z", "--json", *RUN))
        assert out["hits"] == [] and out["query"]["metadata"] == {"columns": {"site": "Z"}}


@pytest.mark.slow
def test_every_action_on_a_database_and_none_shows_its_password(scans, tiny_encoder_folder, postgres_url, tmp_path,
                                                                ctfm_cache, monkeypatch):
    url = _with_password(postgres_url)
    assert SECRET not in backends.display(url)
    monkeypatch.setenv("CTFM_TEST_INDEX_URL", url)
    said = []

    def run(*args):
        result = ctfm("index", *args)
        said.append(result.stdout + result.stderr)
        return result

    added = _ok(run("add", url, scans["root"] / "body2.nii.gz", scans["root"] / "head1.nii.gz", scans["root"] / "p2",
                    "--weights", tiny_encoder_folder, "--json", *RUN))
    assert added["added"] == 3 and added["index"] == backends.display(url)
    info = _ok(run("info", "env:CTFM_TEST_INDEX_URL", "--json", "--check"))
    assert (info["scans"], info["problems"], info["backend"]) == (3, [], "postgresql")
    assert info["patches"] > 3 and info["bytes"] > 0 and info["hnsw"] is False
    assert run("info", url).returncode == 0
    assert _ok(run("check", url, "--json"))["problems"] == []
    check = run("check", url)
    assert check.returncode == 0 and "consistent: 3 scans" in check.stdout, check

    labels = tmp_path / "labels.csv"  # body2 and p2 share a label: each finds the other at rank 1
    labels.write_text(f"path,label\n{scans['root'] / 'body2.nii.gz'},x\n{scans['root'] / 'p2'},x\n")
    scores = _ok(run("eval", "env:CTFM_TEST_INDEX_URL", "--labels", labels, "-k", "1", "--json"))
    assert (scores["queries"], scores["HR@1"]) == (2, 1.0), scores
    copy = _schema(url, "re")  # reembed: from a database into another schema of it
    reembedded = _ok(run("reembed", url, copy, "--weights", tiny_encoder_folder, "--json", *RUN))
    assert (reembedded["added"], reembedded["failed"], reembedded["index"]) == (3, [], backends.display(copy))
    assert _ok(run("info", copy, "--json"))["scans"] == 3

    assert _ok(run("remove", url, scans["root"] / "head1.nii.gz", "--json"))["removed"] == 1
    missing = run("remove", url, "999")
    assert missing.returncode == 1 and "nothing removed" in missing.stderr and backends.display(url) in missing.stderr
    compacted = _ok(run("compact", "env:CTFM_TEST_INDEX_URL", "--hnsw", "--json"))
    assert compacted["vacuumed"] is True and compacted["hnsw"], compacted
    info = _ok(run("info", url, "--json"))
    assert (info["scans"], info["hnsw"]) == (2, True)
    again = run("compact", url, "--hnsw")  # idempotent
    assert again.returncode == 0 and "HNSW indexes built" in again.stdout, again
    hits = _ok(run("query", url, scans["root"] / "body2.nii.gz", "--json", *RUN))
    assert [h["path"] for h in hits["hits"]][:1] == [str((scans["root"] / "body2.nii.gz").resolve())]
    assert hits["index"] == backends.display(url)
    assert all(SECRET not in text for text in said), [text for text in said if SECRET in text]


def test_options_that_do_not_fit_are_refused_before_any_work(tmp_path, ctfm_cache):
    image = write_image(body_phantom(**GRID), tmp_path / "q.nii.gz")
    assert_refused(ctfm("index", "compact", tmp_path / "idx", "--hnsw"), "folder index", "FAISS")
    assert not (tmp_path / "idx").exists()
    assert_refused(ctfm("index", "query", tmp_path / "idx", image, "--metadata", "site"), "KEY=VALUE")
    assert_refused(ctfm("index", "query", tmp_path / "idx", image, "--metadata", "n:=1x"), "JSON value")
    assert_refused(ctfm("index", "info", "env:CTFM_UNSET_INDEX_VARIABLE"), "CTFM_UNSET_INDEX_VARIABLE", "not set")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.nii.gz"]


# --- two torchrun "nodes" ---------------------------------------------------------------------------


def _phantoms(folder, n: int) -> list:
    for i in range(n):
        image = body_phantom(**GRID, seed=i, body_radius_mm=50) if i % 2 == 0 else head_phantom(**HEAD, seed=i)
        write_image(image, folder / f"scan{i}.nii.gz")
    return sorted(str(p.resolve()) for p in folder.glob("*.nii.gz"))


def _contents(target) -> dict:
    """``{path: (scan vector, patches, centres)}`` of an index that passes a deep check, each scan exactly once."""
    with backends.open_index(target, readonly=True) as index:
        assert index.check(deep=True) == []
        rows = index.scans()
        paths = [rec.path for _, rec in rows]
        assert len(paths) == len(set(paths)), paths
        return {rec.path: index.vectors(scan_id) for scan_id, rec in rows}


def _scans_in(url) -> int:
    if not backends.exists(url):
        return 0
    with backends.open_index(url, readonly=True) as index:
        return len(index)


@pytest.mark.slow
def test_two_nodes_add_into_a_database_each_scan_once_as_one_process_does_even_after_a_killed_node(
        tmp_path, tiny_encoder_folder, postgres_url, ctfm_cache):
    from ctfm_testing.processes import kill_node, two_node_launch

    scans = tmp_path / "scans"
    scans.mkdir()
    paths = _phantoms(scans, 8)
    add = ["--progress", "none", "index", "add", postgres_url, scans, "--weights", tiny_encoder_folder, *RUN]

    # Two nodes start; once a scan is in, node 1 loses power (SIGKILL of its launcher and worker). Node 0 must not
    # wait for it forever: its rank fails at the next collective and the launcher ends, with an error.
    nodes = two_node_launch(*add)
    try:
        deadline = time.monotonic() + 120
        while _scans_in(postgres_url) == 0 and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.05)
        kill_node(nodes[1])
        _, survivor_err = nodes[0].communicate(timeout=180)
    finally:
        kill_node(nodes[0])
    assert nodes[0].returncode != 0, survivor_err  # the run is incomplete, and says so
    partial = _contents(postgres_url)  # whole scans only: a killed writer leaves no half scan
    assert 1 <= len(partial) <= len(paths), sorted(partial)

    # Run again on two nodes: the rest is added, each scan once.
    nodes = two_node_launch(*add, "--json")
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    summary = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    assert len(summary) == 1, outs  # rank 0 reports
    assert summary[0]["added"] == len(paths) - len(partial) and summary[0]["failed"] == [], summary
    assert summary[0]["already_indexed"] == len(partial) and backends.display(postgres_url) == summary[0]["index"]
    two = _contents(postgres_url)
    assert sorted(two) == paths

    # A single process into a folder gives the same vectors.
    one_folder = tmp_path / "one"
    assert ctfm("index", "add", one_folder, scans, "--weights", tiny_encoder_folder, *RUN).returncode == 0
    one = _contents(one_folder)
    assert sorted(one) == paths
    for path, (scan, patches, centres) in one.items():
        other = two[path]
        assert patches.shape == other[1].shape and len(patches) > 1
        np.testing.assert_allclose(other[0], scan, atol=1e-5)
        np.testing.assert_allclose(other[1], patches, atol=1e-5)
        np.testing.assert_allclose(other[2], centres, atol=1e-5)


@pytest.mark.slow
def test_a_folder_index_on_two_nodes_is_refused_naming_postgresql(tmp_path, tiny_encoder_folder, ctfm_cache):
    from ctfm_testing.processes import two_node_launch

    scan = write_image(body_phantom(**GRID), tmp_path / "scan.nii.gz")
    nodes = two_node_launch("--progress", "none", "index", "add", tmp_path / "idx", scan, "--weights",
                            tiny_encoder_folder, *RUN)
    outs = [n.communicate(timeout=180) for n in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode != 0, outs
        errors = [line for line in err.splitlines() if line.startswith("ctfm: ")]
        # the worker refused with one line and exit 2 (torchrun's own report of that follows; no frame of ours)
        assert len(errors) == 1 and re.search(r"exitcode\s*:\s*2\b", err) and "CTFMLib/" not in err, err
        assert errors[0].startswith("ctfm: error: ") and "PostgreSQL index" in errors[0], errors
        assert "several nodes" in errors[0] and "postgresql://" in errors[0], errors
    assert not (tmp_path / "idx").exists()
