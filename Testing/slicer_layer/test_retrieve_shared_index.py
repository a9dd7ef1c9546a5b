"""The CT-FM Retrieve logic on a shared index (a PostgreSQL URL) on a real MRML scene, with real child processes.

- Refusals, no server needed: a URL with a password (one line, nothing written, the password never shown),
  ``env:NAME`` unset, a missing password file, volumes that exist only in the scene (a shared index needs files
  every workstation reaches: "add a folder on shared storage"), packages missing from Slicer's Python.
- A real server (the ``postgres_url`` fixture of ``ctfm_testing.postgres``; skipped when it is not there): a
  folder of phantoms added through the logic, the statistics line, a crosshair search from a volume node whose
  hits and results table equal ``ctfm index query URL`` run directly; the children get the password file as
  PGPASSFILE; the saved scene holds neither the password nor the password file's path; a role that may only
  read searches, and its add fails with the server's refusal in one line.
"""

import json
import os
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import body_phantom, head_phantom  # noqa: E402
from ctfm_testing.plugin import run_ctfm  # noqa: E402
from CTFMLib.image import read_image, write_image  # noqa: E402
from CTFMRetrieveLib import results  # noqa: E402
from CTFMRetrieveLib.logic import CTFMRetrieveLogic  # noqa: E402
from CTFMSlicer.nodes import rows_from_table_node, volume_node_from_image  # noqa: E402

GRID = {"shape": (40, 36, 12), "spacing": (5.0, 5.0, 8.0)}
SECRET = "n0t-In-The-sc3ne"
URL = "postgresql://alice@db.hospital.org:5432/pacs?schema=ctfm"


def _with_password(url: str, password: str = SECRET) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


def _wait(runner, done, timeout=300):
    result = runner.wait(timeout=timeout)
    assert len(done) == 1, result.describe()
    return done[0]


def _add(logic, index, weights, volumes=(), folders=(), started=None):
    done = []
    runner = logic.startAdd(index, volumes, folders, weights=str(weights), device="cpu",
                            on_done=lambda outcome, message: done.append((outcome, message)))
    if started:
        started(runner)
    return _wait(runner, done)


def _query(logic, index, volume, mode="crosshair", k=10):
    done = []
    runner = logic.startQuery(index, volume, mode, None, k, False, False, "cpu",
                              on_done=lambda hits, message: done.append((hits, message)))
    return _wait(runner, done)


def _set_crosshair(scene, ras):
    node = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") or scene.AddNode(slicer.vtkMRMLCrosshairNode())
    node.SetCrosshairRAS(*ras)


def _scene_xml(scene) -> str:
    scene.SetSaveToXMLString(1)
    scene.Commit()
    return scene.GetSceneXMLString()


# --- refusals (no server) -----------------------------------------------------------------


def test_a_url_with_a_password_is_refused_in_one_line(mrml_scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a relative folder would show up here
    logic = CTFMRetrieveLogic()
    secret_url = _with_password(URL)
    for forAdding in (False, True):
        problem = logic.indexProblem(secret_url, forAdding=forAdding)
        assert "leave the password out" in problem and "password file or PGPASSWORD" in problem
        assert SECRET not in problem and "\n" not in problem
    volume = volume_node_from_image(body_phantom(**GRID), name="query")
    _set_crosshair(mrml_scene, results.volume_centre_ras(volume))
    with pytest.raises(ValueError, match="leave the password out") as refused:
        logic.startAdd(secret_url, folders=[tmp_path])
    assert SECRET not in str(refused.value)
    with pytest.raises(ValueError, match="leave the password out") as refused:
        logic.startQuery(secret_url, volume, "crosshair")
    assert SECRET not in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere on refusal
    # What the panel keeps in the scene of a URL typed with its password: the URL without it.
    from CTFMRetrieveLib import shared

    assert shared.scene_text(secret_url) == URL and shared.scene_text(URL) == URL
    assert logic.indexProblem(URL) is None and logic.indexProblem(URL, forAdding=True) is None


def test_env_names_and_password_files_are_checked(tmp_path, monkeypatch):
    logic = CTFMRetrieveLogic()
    monkeypatch.delenv("CTFM_TEST_SHARED_INDEX", raising=False)
    problem = logic.indexProblem("env:CTFM_TEST_SHARED_INDEX")
    assert "CTFM_TEST_SHARED_INDEX is not set" in problem and "\n" not in problem
    assert logic.indexStatisticsText("env:CTFM_TEST_SHARED_INDEX") == problem  # no child started for it
    monkeypatch.setenv("CTFM_TEST_SHARED_INDEX", URL)
    assert logic.indexProblem("env:CTFM_TEST_SHARED_INDEX") is None
    monkeypatch.setenv("CTFM_TEST_SHARED_INDEX", str(tmp_path))
    assert "'folder'" in logic.indexProblem("env:CTFM_TEST_SHARED_INDEX")
    assert "names no database" in logic.indexProblem("postgresql://alice@db.hospital.org")
    logic.passwordFile = str(tmp_path / "missing.pgpass")
    assert "password file" in logic.indexProblem(URL) and "does not exist" in logic.indexProblem(URL)
    assert logic.indexProblem(tmp_path / "new", forAdding=True) is None  # a folder index needs no password file
    assert "shared index's URL" in logic.indexProblem("", forAdding=True)


def test_volumes_only_in_the_scene_cannot_go_into_a_shared_index(mrml_scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logic = CTFMRetrieveLogic()
    only_here = volume_node_from_image(body_phantom(**GRID), name="only here")
    problem = logic.addVolumesProblem(URL, [only_here])
    assert "only here" in problem and "add a folder on shared storage" in problem and "\n" not in problem
    with pytest.raises(ValueError, match="add a folder on shared storage"):
        logic.startAdd(URL, [only_here], weights="unused")
    assert list(tmp_path.iterdir()) == []  # not written anywhere for it
    # A volume loaded from a file is indexed where it is, as for a folder index; a folder index takes both.
    path = write_image(body_phantom(**GRID, seed=1), tmp_path / "files" / "scan.nrrd")
    loaded = results.load_case(path)
    assert logic.addVolumesProblem(URL, [loaded]) is None
    assert logic.addVolumesProblem(tmp_path / "index", [only_here, loaded]) is None


def test_missing_packages_are_named_with_how_to_install_them():
    from CTFMRetrieveLib import shared

    problem = shared.packages_problem(["psycopg[binary]>=3.1", "ctfm-no-such-package>=1"])
    assert "ctfm-no-such-package" in problem and "psycopg" not in problem
    assert "Slicer's Python" in problem and "pip_install" in problem and "\n" not in problem
    assert shared.packages_problem() is None  # this test environment has psycopg and pgvector


# --- a real server ------------------------------------------------------------------------


@pytest.fixture
def shared_url(request):
    """A URL with a fresh schema on a real PostgreSQL server (``ctfm_testing.postgres``), or a clear skip."""
    try:
        return request.getfixturevalue("postgres_url")
    except pytest.FixtureLookupError:
        pytest.skip("no PostgreSQL test server: the postgres_url fixture (ctfm_testing.postgres) is not there")


@pytest.fixture
def phantom_folder(tmp_path):
    """Three small CT phantoms (two bodies, a head) as NIfTI files in one folder."""
    folder = tmp_path / "shared-storage"
    write_image(body_phantom(**GRID, seed=0, body_radius_mm=80), folder / "body0.nii.gz")
    write_image(body_phantom(**GRID, seed=2, body_radius_mm=92), folder / "body2.nii.gz")
    write_image(head_phantom(shape=(40, 40, 12), spacing=(5.0, 5.0, 8.0), seed=1), folder / "head1.nii.gz")
    return folder


def _environ_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.slow
def test_add_a_folder_and_search_a_shared_index(mrml_scene, shared_url, phantom_folder, tiny_encoder_folder,
                                                 tmp_path, monkeypatch):
    logic = CTFMRetrieveLogic()
    password_file = tmp_path / "workstation" / "ctfm.pgpass"
    password_file.parent.mkdir()
    password_file.write_text(f"*:*:*:*:{SECRET}\n")
    password_file.chmod(0o600)
    logic.passwordFile = str(password_file)
    before = os.environ.get("PGPASSFILE")
    environments = []

    def started(runner):
        if os.path.isdir(f"/proc/{runner.pid}"):
            environments.append(_environ_of(runner.pid))

    outcome, message = _add(logic, shared_url, tiny_encoder_folder, folders=[phantom_folder], started=started)
    assert outcome is not None and (outcome.added, outcome.failed) == (3, []), message
    assert os.environ.get("PGPASSFILE") == before  # only the child got it
    if os.path.isdir("/proc/self"):  # Linux: the child's environment as it started
        assert environments and environments[0].get("PGPASSFILE") == str(password_file)
    text = logic.indexStatisticsText(shared_url)
    assert text.startswith("3 cases, ") and " in the database; " in text, text
    assert logic.indexStatistics(shared_url)["scans"] == 3

    # Search from a volume node (the first body, as the scene shows it) around the crosshair.
    case = phantom_folder / "body0.nii.gz"
    volume = volume_node_from_image(read_image(case), name="query")
    point_ras = results.volume_centre_ras(volume) + np.array([10.0, -5.0, 0.0])
    _set_crosshair(mrml_scene, point_ras)
    monkeypatch.setenv("CTFM_TEST_SHARED_INDEX", shared_url)  # the same index through env:NAME
    hits, message = _query(logic, "env:CTFM_TEST_SHARED_INDEX", volume)
    assert hits is not None and len(hits) == 3, message
    cli = run_ctfm("--progress", "none", "index", "query", shared_url, case,
                   f"--point={-point_ras[0]},{-point_ras[1]},{point_ras[2]}", "--json", "--device", "cpu")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout.strip().splitlines()[-1])["hits"]
    assert [(h.scan_id, h.path) for h in hits] == [(h["scan_id"], h["path"]) for h in expected]
    for mine, theirs in zip(hits, expected):
        np.testing.assert_allclose(mine.centre_lps, theirs["centre_lps"], atol=1e-3)
        assert mine.similarity == pytest.approx(theirs["similarity"], abs=1e-4)
    table = logic.resultsTableNode(hits)
    rows = rows_from_table_node(table)
    assert [(r["scan_id"], r["path"]) for r in rows] == [(h["scan_id"], h["path"]) for h in expected]
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose([(r["R"], r["A"], r["S"]) for r in rows],
                               [np.asarray(h["centre_lps"]) * flip for h in expected], atol=1e-3)

    # The scene as saved: the panel's parameters (the URL as the scene may keep it), the query volume, the
    # results. Neither the password nor the password file's path is in it.
    from CTFMRetrieveLib import shared

    parameters = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CTFMRetrieve")
    parameters.SetParameter("indexLocation", "database")
    parameters.SetParameter("indexUrl", shared.scene_text(_with_password(shared_url)))
    xml = _scene_xml(mrml_scene)
    assert escape(parameters.GetParameter("indexUrl")) in xml and table.GetName() in xml
    assert SECRET not in xml and str(password_file) not in xml and password_file.name not in xml


@pytest.mark.slow
def test_a_role_that_may_only_read_searches_and_cannot_add(mrml_scene, shared_url, phantom_folder,
                                                           tiny_encoder_folder, tmp_path):
    psycopg = pytest.importorskip("psycopg")
    logic = CTFMRetrieveLogic()
    outcome, message = _add(logic, shared_url, tiny_encoder_folder, folders=[phantom_folder / "body0.nii.gz"])
    assert outcome is not None and outcome.added == 1, message

    parts = urlsplit(shared_url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "ctfm")
    admin = urlunsplit(parts._replace(query=urlencode(query)))
    reader = f"ctfm_reader_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{reader}" LOGIN')
        connection.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{reader}"')
        connection.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{reader}"')
    try:
        reader_url = _with_user(shared_url, reader)
        assert logic.indexStatisticsText(reader_url).startswith("1 case, ")
        outcome, message = _add(logic, reader_url, tiny_encoder_folder, folders=[phantom_folder])
        assert outcome is None, message
        assert "\n" not in message and "Traceback" not in message, message
        assert any(word in message.lower() for word in ("not allowed", "permission denied", "read-only")), message
        assert logic.indexStatistics(shared_url)["scans"] == 1  # nothing was added

        volume = volume_node_from_image(read_image(phantom_folder / "body2.nii.gz"), name="query")
        hits, message = _query(logic, reader_url, volume, mode="scan")
        assert hits is not None and [h.path for h in hits] == [str((phantom_folder / "body0.nii.gz").resolve())], message
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP OWNED BY "{reader}"')
            connection.execute(f'DROP ROLE "{reader}"')
