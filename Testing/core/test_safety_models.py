"""The model store and weights under hostile input (``../shared/reviews/adversarial.md``, A1 A10-A14, A20, A21).

Every test builds its own tiny models (``ctfm_testing.hostile``) and works in its own sandbox: an isolated
``CTFM_CACHE`` with a planted download and user file beside the model store, so a test can assert that
nothing outside the store ever changes. Refusals are checked as the user sees them: exit 2, one line,
no traceback. Held-up behaviour (section B) keeps its tests here too (``test_b_...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctfm_testing.hostile import (
    assert_refused,
    ctfm,
    leftovers,
    small_ct,
    tiny_encoder,
    tiny_segmenter,
    tiny_triage,
    tree_digest,
)

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = "project-lighter/ct_fm_feature_extractor"


@pytest.fixture
def store(ctfm_cache):
    """The isolated cache with what a user keeps there: a download, an earlier import and a note of their own."""
    (ctfm_cache / "hub").mkdir(parents=True)
    (ctfm_cache / "hub" / "sentinel").write_text("precious download")
    (ctfm_cache / "user_notes.txt").write_text("mine")
    return ctfm_cache


@pytest.fixture
def enc(tmp_path):
    return tiny_encoder(tmp_path / "src" / "enc")


def _models(cache) -> Path:
    return cache / "models"


def _outside(cache) -> dict:
    """Everything in the cache but the model store (which the test changes on purpose)."""
    return {k: v for k, v in tree_digest(cache).items() if not (k == "models" or k.startswith("models" + os.sep))}


def _rewrite(folder, change) -> Path:
    """Change a model folder's tensors in place (``change(state)`` edits the dict)."""
    path = Path(folder) / "model.safetensors"
    state = dict(load_file(str(path)))
    change(state)
    save_file(state, str(path))
    return Path(folder)


# --- A1: ids that become folders --------------------------------------------------------------------------------


def test_a1_dot_ids_never_delete_the_cache(store, enc, tmp_path):
    """A1: `models remove ..` / `remove .` / `import --id ..` / `--id .` deleted the cache or every import."""
    assert ctfm("models", "import", enc, "--id", "keep/me").returncode == 0
    before = tree_digest(store)
    for args in (("remove", ".."), ("remove", "."), ("import", enc, "--id", ".."), ("import", enc, "--id", "."),
                 ("download", ".."), ("download", "owner/..")):
        line = assert_refused(ctfm("models", *args), "model id")
        assert "Traceback" not in line
        assert tree_digest(store) == before, args
    from CTFMLib.weights import load_model

    assert load_model("keep/me")[1].path == _models(store) / "keep--me"


def test_a1_zip_whose_config_names_dotdot_is_filed_under_a_safe_id(store, enc, tmp_path):
    """A1: a zip whose config.json says "_name_or_path": ".." (or ".") wiped the cache when imported without --id."""
    assert ctfm("models", "import", enc, "--id", "keep/me").returncode == 0
    before = _outside(store)
    for evil in ("..", ".", "../..", "/etc", "C:\\x"):
        config = json.loads((enc / "config.json").read_text())
        config["_name_or_path"] = evil
        archive = tmp_path / "evil_name.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("m/config.json", json.dumps(config))
            z.write(enc / "model.safetensors", "m/model.safetensors")
        result = ctfm("models", "import", archive)
        assert result.returncode == 0, result
        assert "evil_name" in result.stdout  # the zip's name, printed as the id to use
        assert _outside(store) == before
        assert (_models(store) / "keep--me" / "model.safetensors").is_file()
        assert sorted(p.name for p in _models(store).iterdir()) == ["evil_name", "keep--me"]


BAD_IDS = ["..", ".", "", " ", "../x", "..\\..\\x", "a\\b", "C:x", "c:\\windows", "/abs", "a/b/c", "owner/..",
           "owner/.", "a\x00b", "a\nb", "esc\x1b[2J", "con", "x" * 300, "trailing.", "a:b", "a|b", "a*b"]


@pytest.mark.slow
@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:20] for b in BAD_IDS])
def test_a1_ids_that_are_not_one_plain_name_are_refused(store, enc, bad):
    """A1: ids are checked by one rule (files.safe_name on each part of OWNER/NAME) for import, remove and lookup."""
    assert ctfm("models", "import", enc, "--id", "keep/me").returncode == 0
    before = tree_digest(store)
    if bad == "../x":  # "..--x" is a plain folder name: allowed, and it stays inside the store
        pass
    else:
        assert_refused(ctfm("models", "import", enc, "--id", bad))
        assert_refused(ctfm("models", "remove", bad))
        assert tree_digest(store) == before
    from CTFMLib import cache

    assert cache.imported_model(bad) is None
    assert all(p.parent == _models(store) for p in _models(store).iterdir())


@pytest.mark.slow
def test_a1_fuzz_random_ids_never_touch_anything_outside_the_store(store, enc, tmp_path):
    """A1 (fuzz): 200 random ids with '..', separators of every platform, drive letters and unicode, through
    `models remove` and `models import --id`: no traceback, a one-line refusal or success, and nothing outside
    the model store changes (the other import survives every remove but its own)."""
    rng = random.Random(14)
    atoms = ["..", ".", "/", "\\", "C:", "d:", "ü", "空", " ", "-", "_", "a", "b", "\x00", "\x1b", "|", ":", "~",
             "con", "\u202e", "%2e%2e", "*", "?"]
    neighbour = tmp_path / "neighbour"
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("outside the cache")
    assert ctfm("models", "import", enc, "--id", "keep/me").returncode == 0
    outside, beside = _outside(store), tree_digest(neighbour)
    for i in range(200):
        bad = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 6)))
        action = ("remove", bad) if i % 2 else ("import", enc, "--id", bad)
        result = ctfm("models", *action)
        assert "Traceback" not in result.stderr, (bad, result)
        assert result.returncode in (0, 2), (bad, result)
        if result.returncode == 2:
            assert len(result.lines) == 1, (bad, result)
        assert _outside(store) == outside, bad
        assert tree_digest(neighbour) == beside, bad
        for p in _models(store).iterdir():
            assert p.parent == _models(store) and p.is_dir() and not p.is_symlink(), (bad, p)
        if not (_models(store) / "keep--me").exists():  # only `remove keep/me` could do that
            pytest.fail(f"{bad!r} removed another model")


# --- A10: configs are checked before anything is built ---------------------------------------------------------

ABSURD = {
    "init_filters 1000000": {"init_filters": 1000000, "blocks_down": [1]},
    "init_filters 512": {"init_filters": 512, "blocks_down": [1, 2, 2, 4, 4]},
    "40 levels": {"init_filters": 4, "blocks_down": [1] * 40},
    "a million blocks": {"init_filters": 4, "blocks_down": [1000000]},
    "init_filters -5": {"init_filters": -5, "blocks_down": [1]},
    "init_filters text": {"init_filters": "x", "blocks_down": [1]},
    "blocks text": {"init_filters": 4, "blocks_down": "11"},
    "config a list": [1, 2],
    "in_channels 0": {"init_filters": 4, "blocks_down": [1], "in_channels": 0},
    "unknown key": {"init_filters": 4, "blocks_down": [1], "dropout_prob": 0.5},
    "spatial 2": {"spatial_dims": 2, "init_filters": 4, "blocks_down": [1]},
    "10000 classes": {"init_filters": 4, "blocks_down": [1, 1], "out_channels": 10000},
    "dsdepth too deep": {"init_filters": 4, "blocks_down": [1, 1], "out_channels": 3, "dsdepth": 5},
    "bool filters": {"init_filters": True, "blocks_down": [1]},
    "in range, too big": {"init_filters": 128, "blocks_down": [16] * 8},
}

_A10_CHILD = textwrap.dedent('''
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway allocation fails here, not the machine
    from ctfm_testing.hostile import ctfm
    out = {}
    for name, args in json.loads(sys.argv[1]).items():
        t = time.time()
        r = ctfm(*args)
        out[name] = [r.returncode, r.stderr, time.time() - t]
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_a10_absurd_configs_are_refused_in_one_line_before_building(store, enc, tmp_path):
    """A10: absurd config.json values built the network first (tracebacks, gigabytes, a hang); now each is one line,
    at once, for `ctfm embed --weights FOLDER` and for `ctfm models import` alike (in a child with a 4 GB cap)."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    cases = {}
    for name, config in ABSURD.items():
        folder = tmp_path / "cfg" / name.replace(" ", "_")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes((enc / "model.safetensors").read_bytes())
        cases[f"embed {name}"] = ["embed", str(ct), "--weights", str(folder), "--out", str(tmp_path / "e.npy")]
        cases[f"import {name}"] = ["models", "import", str(folder), "--id", "absurd"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), str(ROOT / "Testing")]),
           "CTFM_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _A10_CHILD, json.dumps(cases)], capture_output=True, text=True,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for name, (code, err, seconds) in results.items():
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, err[-800:])
        assert seconds < 20, (name, seconds)
    assert not (tmp_path / "e.npy").exists()
    assert not _models(store).exists() or not any(_models(store).iterdir())
    assert "outside" in results["import 10000 classes"][1] or "1024" in results["import 10000 classes"][1]
    assert "128" in results["embed init_filters 512"][1]
    assert "parameters" in results["embed in range, too big"][1] and "parameters" in results["import in range, too big"][1]


def test_a10_shapes_are_compared_with_the_header_before_reading_tensors(tmp_path, enc):
    """A10: a config that fits the ranges but not the file is named from the safetensors header alone."""
    from CTFMLib import weights as W

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"init_filters": 8, "blocks_down": [1, 1, 1]}))
    (folder / "model.safetensors").write_bytes((enc / "model.safetensors").read_bytes())
    with pytest.raises(W.WeightsMismatchError, match="conv_init.weight"):
        W.load_model(folder)
    assert W.safetensors_header(folder / "model.safetensors")["conv_init.weight"].shape == (4, 1, 3, 3, 3)


# --- A11: what an import copies ------------------------------------------------------------------------------


def test_a11_import_copies_only_the_model_files_never_through_links(store, enc, tmp_path):
    """A11: a folder's symlinked extras (a secret, a 60 MB tree) were copied into the store; only the model is."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    bigdir = tmp_path / "bigdir"
    bigdir.mkdir()
    (bigdir / "data.bin").write_bytes(b"\0" * 1000)
    (enc / "notes.txt").symlink_to(secret)
    (enc / "data").symlink_to(bigdir, target_is_directory=True)
    (enc / "loop").symlink_to(".", target_is_directory=True)
    (enc / "training.log").write_text("not part of the model")
    result = ctfm("models", "import", enc, "--id", "t/f1")
    assert result.returncode == 0, result
    dest = _models(store) / "t--f1"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "ctfm-import.json", "model.safetensors"]
    assert all(p.is_file() and not p.is_symlink() for p in dest.iterdir())
    assert leftovers(store) == [] and leftovers(enc.parent) == []


def test_a11_a_symlinked_model_file_is_refused(store, enc, tmp_path):
    """A11: a model file that is a link is refused with one line (never followed, never copied)."""
    real = tmp_path / "elsewhere.safetensors"
    (enc / "model.safetensors").rename(real)
    (enc / "model.safetensors").symlink_to(real)
    assert_refused(ctfm("models", "import", enc, "--id", "t/link"), "symbolic link")
    assert not _models(store).exists() or not any(_models(store).iterdir())


def _big_zip(path, model_folder, junk_bytes: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in ("config.json", "model.safetensors"):
            z.write(model_folder / name, f"m/{name}")
        with z.open("m/junk.bin", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(junk_bytes >> 20):
                f.write(block)
    return path


def test_a11_a_zip_bomb_beside_the_model_is_never_extracted(store, enc, tmp_path):
    """A11: 400 MB of zeros zipped beside a model were extracted to TMPDIR and copied into the store."""
    archive = _big_zip(tmp_path / "bomb.zip", enc, 200 << 20)
    assert archive.stat().st_size < 2 << 20
    result = ctfm("models", "import", archive, "--id", "t/bomb")
    assert result.returncode == 0, result
    dest = _models(store) / "t--bomb"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "ctfm-import.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) < 1 << 20


def test_a11_zip_members_larger_than_the_model_needs_are_refused(store, enc, tmp_path):
    """A11: weights that claim more bytes than their header's tensors, a 20 MB config.json: refused, nothing left."""
    data = (enc / "model.safetensors").read_bytes()
    archive = tmp_path / "padded.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(enc / "config.json", "config.json")
        z.writestr("model.safetensors", data + b"\0" * (50 << 20))
    assert_refused(ctfm("models", "import", archive, "--id", "t/pad"), "safetensors")
    archive = tmp_path / "bigconfig.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", json.dumps({"init_filters": 4, "blocks_down": [1, 1, 1]}) + " " * (20 << 20))
        z.write(enc / "model.safetensors", "model.safetensors")
    assert_refused(ctfm("models", "import", archive, "--id", "t/cfg"), "config.json")
    assert not _models(store).exists() or not any(_models(store).iterdir())


def _zip_symlink(z: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    z.writestr(info, target)


def test_b_zip_symlink_entries_are_inert_and_model_files_must_be_regular(store, enc, tmp_path):
    """B (held up): zip symlink entries never become links; as a model file such an entry is refused."""
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(enc / "config.json", "m/config.json")
        z.write(enc / "model.safetensors", "m/model.safetensors")
        _zip_symlink(z, "m/notes.txt", "/etc/passwd")
    assert ctfm("models", "import", archive, "--id", "t/links").returncode == 0
    dest = _models(store) / "t--links"
    assert not (dest / "notes.txt").exists() and not any(p.is_symlink() for p in dest.iterdir())
    archive = tmp_path / "linked_model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(enc / "config.json", "m/config.json")
        _zip_symlink(z, "m/model.safetensors", "/etc/passwd")
    assert_refused(ctfm("models", "import", archive, "--id", "t/linked"), "symbolic link")


@pytest.mark.parametrize("member", ["../../evil_trav.txt", "/tmp/evil_abs.txt", "..\\..\\evil_win.txt", "C:/evil.txt"])
def test_b_zip_traversal_members_are_refused(store, enc, tmp_path, member):
    """B (held up): a zip with a member outside the extraction folder is refused ("has an unsafe path")."""
    archive = tmp_path / "trav.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(enc / "config.json", "m/config.json")
        z.write(enc / "model.safetensors", "m/model.safetensors")
        z.writestr(member, "x")
    assert_refused(ctfm("models", "import", archive, "--id", "t/trav"), "unsafe path")
    assert not (tmp_path / "evil_trav.txt").exists() and not Path("/tmp/evil_abs.txt").exists()
    assert not _models(store).exists() or not any(_models(store).iterdir())


def test_b_a_zip_with_two_models_is_refused(store, enc, tmp_path):
    """B (held up): two model.safetensors in one zip."""
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for folder in ("a", "b"):
            z.write(enc / "config.json", f"{folder}/config.json")
            z.write(enc / "model.safetensors", f"{folder}/model.safetensors")
    assert_refused(ctfm("models", "import", archive, "--id", "t/two"), "exactly one")


_IMPORTER = textwrap.dedent('''
    import sys
    from CTFMLib.weights import import_model
    import_model(sys.argv[1], sys.argv[2])
''')


@pytest.mark.slow
def test_b_concurrent_imports_under_one_id_always_leave_a_loadable_model(store, tmp_path):
    """B (held up): two imports of different models under one id, at the same time, in rounds: the result always
    loads and is one of the two, and no temporary folder is left."""
    from CTFMLib.model_store import sha256_file
    from CTFMLib.weights import load_model

    a = tiny_encoder(tmp_path / "a", seed=1)
    b = tiny_encoder(tmp_path / "b", seed=2)
    digests = {sha256_file(a / "model.safetensors"), sha256_file(b / "model.safetensors")}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "CTFM"), "CTFM_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", _IMPORTER, str(f), "race/one"], env=env,
                                  stderr=subprocess.PIPE, text=True) for f in (a, b)]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()
        model, info = load_model("race/one")
        assert sha256_file(info.path / "model.safetensors") in digests
        assert leftovers(store) == []


# --- A12: published ids and checksums ----------------------------------------------------------------------------


def test_a12_a_published_id_takes_other_weights_only_with_force_and_says_so(store, enc, tmp_path):
    """A12: any weights could be imported as the published model and were then used as the default weights."""
    from CTFMLib.catalog import load_catalog
    from CTFMLib.model_store import model_status
    from CTFMLib.weights import load_model

    line = assert_refused(ctfm("models", "import", enc, "--id", PUBLISHED), "--force")
    assert "ct_fm_feature_extractor" in line
    assert not _models(store).exists() or not any(_models(store).iterdir())
    result = ctfm("models", "import", enc, "--id", PUBLISHED, "--force")
    assert result.returncode == 0 and "imported, not the published weights" in result.stdout, result
    marker = json.loads((_models(store) / "project-lighter--ct_fm_feature_extractor" / "ctfm-import.json").read_text())
    assert marker["published"] is False and marker["forced"] is True and len(marker["sha256"]) == 64
    listing = ctfm("models", "list").stdout
    assert [ln for ln in listing.splitlines() if ln.startswith("ct_fm_feature_extractor")][0].endswith(
        "imported, not the published weights")
    assert model_status(load_catalog().find("ct_fm_feature_extractor")) == "imported, not the published weights"
    info = ctfm("info")
    assert info.returncode == 0 and "imported, not the published weights" in info.stdout, info
    from CTFMSlicer import models as hub

    row = [r for r in hub.model_rows() if r["id"] == "ct_fm_feature_extractor"][0]
    assert row["status"] == "imported, not the published weights"
    model, info = load_model("ct_fm_feature_extractor")  # loads, and says what it is
    assert any("not the published weights" in n for n in info.notes)


def _catalogue(tmp_path, files) -> Path:
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"version": 1, "models": [{
        "id": "tiny", "title": "Tiny", "task": "embedding", "repo_id": "someone/tiny", "revision": "main",
        "architecture": "SegResEncoder", "files": files}]}))
    return path


def test_a12_known_checksums_and_sizes_are_enforced(store, enc, tmp_path, monkeypatch):
    """A12: with the published checksum known, the published weights import without --force (marked published);
    other weights are refused, and a download that differs from a known size or checksum is refused."""
    good = hashlib.sha256((enc / "model.safetensors").read_bytes()).hexdigest()
    size = (enc / "config.json").stat().st_size
    monkeypatch.setenv("CTFM_CATALOG", str(_catalogue(tmp_path, [
        {"name": "config.json", "sha256": None, "size": size},
        {"name": "model.safetensors", "sha256": good, "size": (enc / "model.safetensors").stat().st_size}])))
    result = ctfm("models", "import", enc, "--id", "tiny")
    assert result.returncode == 0, result
    marker = json.loads((_models(store) / "someone--tiny" / "ctfm-import.json").read_text())
    assert marker["published"] is True and marker["sha256"] == good
    assert ctfm("models", "list").stdout.splitlines()[0].endswith(" imported")
    other = tiny_encoder(tmp_path / "other", seed=5)
    assert_refused(ctfm("models", "import", other, "--id", "someone/tiny"), "checksum")
    assert json.loads((_models(store) / "someone--tiny" / "ctfm-import.json").read_text())["sha256"] == good

    from ctfm_testing.checkpoints import write_hf_cache

    ctfm("models", "remove", "tiny")
    write_hf_cache(store / "hub", "someone/tiny", {"config.json": other / "config.json",
                                                  "model.safetensors": other / "model.safetensors"})
    ct = small_ct(tmp_path / "ct.nii.gz")
    assert_refused(ctfm("embed", ct, "--weights", "tiny", "--out", tmp_path / "e.npy"), "checksum")
    assert not (tmp_path / "e.npy").exists()


def test_a12_the_catalogue_records_only_values_found_on_the_published_pages():
    """A12: Models.json carries what the Hugging Face file pages publish (config.json: 123 bytes on
    huggingface.co/project-lighter/ct_fm_feature_extractor/blob/23e05e9.../config.json and on the
    ct_fm_segresnet file list), each with its source page; unknown values stay null; sha256 values are hex."""
    from CTFMLib.catalog import Catalog

    raw = json.loads((ROOT / "Resources" / "Models.json").read_text())
    cat = Catalog.load(ROOT / "Resources" / "Models.json")
    assert cat.find("ct_fm_feature_extractor").size("config.json") == 123
    assert cat.find("ct_fm_segresnet").size("config.json") == 123
    for m in raw["models"]:
        for f in m.get("files", []):
            assert f.get("sha256") is None or len(f["sha256"]) == 64
            if f.get("sha256") or f.get("size") is not None:
                assert f.get("source", "").startswith("https://huggingface.co/" + m["repo_id"] + "/")


def test_a12_a_download_of_the_wrong_size_is_refused(store, enc, tmp_path):
    """A12: a hub-cache entry of a published model whose config.json differs from the published size."""
    from ctfm_testing.checkpoints import write_hf_cache

    write_hf_cache(store / "hub", PUBLISHED, {"config.json": enc / "config.json",
                                              "model.safetensors": enc / "model.safetensors"},
                   commit="23e05e9c3398ed305339d144e3642bbcf9ccc46f")
    ct = small_ct(tmp_path / "ct.nii.gz")
    assert_refused(ctfm("embed", ct, "--weights", "ct_fm_feature_extractor", "--out", tmp_path / "e.npy"),
                   "123", "ctfm models remove")


# --- A13: pickled checkpoints ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a13_a_deflated_pt_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A13: a 1 MB .pt holding a 1 GiB zero tensor (re-zipped with deflate) was inflated before being refused."""
    from CTFMLib import weights as W

    plain = tmp_path / "plain.pt"
    torch.save({"conv_init.weight": torch.zeros(32 << 20)}, str(plain))  # 128 MB, stored as torch writes it
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(W.WeightsError, match="decompression bomb"):
        W.read_state_dict(bomb)
    ct = small_ct(tmp_path / "ct.nii.gz")
    assert_refused(ctfm("embed", ct, "--weights", bomb, "--out", tmp_path / "e.npy"), "bomb")


def test_b_a_plain_torch_checkpoint_still_loads(tmp_path, enc):
    """B (held up): a checkpoint torch.save wrote (stored records) loads, and one with pickled code is refused."""
    from CTFMLib import weights as W

    state = load_file(str(enc / "model.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, str(tmp_path / "last.ckpt"))
    model, info = W.load_model(tmp_path / "last.ckpt")
    assert info.config["init_filters"] == 4


# --- A14: values and dtypes --------------------------------------------------------------------------------------


def test_a14_negative_batchnorm_variance_is_refused_by_name(tmp_path, enc):
    """A14: one running_var = -1 gave an all-NaN embedding (embed, saliency) or an all-background segmentation."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    _rewrite(enc, lambda s: s["layers.0.blocks.0.norm1.running_var"].__setitem__(0, -1.0))
    line = assert_refused(ctfm("embed", ct, "--weights", enc, "--out", tmp_path / "e.npy"), "variance")
    assert "layers.0.blocks.0.norm1.running_var" in line
    assert not (tmp_path / "e.npy").exists()
    seg = tiny_segmenter(tmp_path / "seg")
    _rewrite(seg, lambda s: s["encoder.layers.1.blocks.0.norm2.running_var"].__setitem__(1, -1.0))
    line = assert_refused(ctfm("segment", ct, "--model", seg, "--out", tmp_path / "s.nii.gz"), "variance")
    assert "encoder.layers.1.blocks.0.norm2.running_var" in line
    assert not (tmp_path / "s.nii.gz").exists()
    assert_refused(ctfm("models", "import", seg, "--id", "t/negvar"), "variance")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_a14_integer_or_bool_weights_are_refused_by_name(tmp_path, enc, dtype):
    """A14: weights cast to int8 (NaN embeddings), bool or int64 running_var (embeddings of 1e31) ran with exit 0."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    if dtype == torch.int8:
        _rewrite(enc, lambda s: s.update({k: v.to(dtype) for k, v in s.items()}))
    else:
        _rewrite(enc, lambda s: s.__setitem__("layers.1.blocks.0.norm1.running_var",
                                              s["layers.1.blocks.0.norm1.running_var"].to(dtype)))
    line = assert_refused(ctfm("embed", ct, "--weights", enc, "--out", tmp_path / "e.npy"), "floating-point")
    assert "running_var" in line or "conv_init.weight" in line
    assert not (tmp_path / "e.npy").exists()


def test_a14_weights_that_overflow_are_refused_naming_the_layer(tmp_path, enc):
    """A14: finite but absurd weights (1e38) give infinite outputs: refused, naming the first layer that overflowed."""
    from CTFMLib import weights as W

    _rewrite(enc, lambda s: s["conv_init.weight"].fill_(1e38))
    with pytest.raises(W.WeightsError, match="NaN or infinite") as e:
        W.load_model(enc)
    assert "conv_init.weight" in str(e.value)


def test_a14_a_triage_model_with_negative_variance_is_refused(tmp_path):
    """A14: the triage model's loader makes the same checks."""
    from CTFMLib.train.classify import load_triage_model
    from CTFMLib.weights import WeightsError

    folder = tiny_triage(tmp_path / "triage")
    load_triage_model(folder)
    _rewrite(folder, lambda s: s["encoder.layers.0.blocks.0.norm1.running_var"].__setitem__(0, -2.0))
    with pytest.raises(WeightsError, match="encoder.layers.0.blocks.0.norm1.running_var"):
        load_triage_model(folder)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_b_half_and_double_weights_are_cast_and_load(tmp_path, enc, dtype):
    """B (held up): float16/bfloat16/float64 weights load (cast to float32) and give the float32 model's output."""
    from CTFMLib import weights as W

    reference, _ = W.load_model(enc)
    other = tmp_path / "cast"
    other.mkdir()
    (other / "config.json").write_text((enc / "config.json").read_text())
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(enc / "model.safetensors")).items()}
    save_file(state, str(other / "model.safetensors"))
    model, _ = W.load_model(other)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference.embed(x), model.embed(x)
    tolerance = {torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    assert torch.allclose(a, b, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("damage", ["empty", "100 bytes", "truncated", "header 2^62", "junk header", "gap"])
def test_b_damaged_safetensors_are_refused_clearly(tmp_path, enc, damage):
    """B (held up): truncated, tiny, empty, absurd-header and junk-header files: 'not a valid safetensors file'."""
    data = (enc / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    broken = {"empty": b"", "100 bytes": data[:100], "truncated": data[: len(data) // 2],
              "header 2^62": (1 << 62).to_bytes(8, "little") + data[8:],
              "junk header": len(b"{not json").to_bytes(8, "little") + b"{not json" + data[8 + n:],
              "gap": data + b"\0" * 64}[damage]
    (enc / "model.safetensors").write_bytes(broken)
    ct = small_ct(tmp_path / "ct.nii.gz")
    assert_refused(ctfm("embed", ct, "--weights", enc, "--out", tmp_path / "e.npy"), "not a valid safetensors file")
    assert_refused(ctfm("models", "import", enc, "--id", "t/broken"), "not a valid safetensors file")


# --- A20: a cancelled import leaves nothing ------------------------------------------------------------------------


def _import_temporaries(store, tmp) -> list:
    """Temporary folders of an import: in the model store (now), in TMPDIR (before), ``.partial`` folders (before)."""
    found = [p for p in tmp.iterdir() if p.name.startswith("ctfm-import-")]
    if _models(store).is_dir():
        found += [p for p in _models(store).iterdir() if p.name.startswith(".ctfm-tmp-") or p.name.endswith(".partial")]
    return found


@pytest.mark.slow
def test_a20_sigterm_during_import_leaves_no_temporary_folder(store, tmp_path):
    """A20: SIGTERM (Slicer's Cancel) during `ctfm models import` left a ctfm-import-* folder (119 MB) and .partial."""
    big = tiny_encoder(tmp_path / "big", init_filters=16, blocks_down=(1, 2, 2, 4, 4))  # about 75 MB
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("config.json", "model.safetensors"):
            z.write(big / name, f"big/{name}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "CTFM"), "CTFM_CACHE": str(store), "TMPDIR": str(tmp),
           "OMP_NUM_THREADS": "1"}
    for source in (archive, big):
        proc = subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "models", "import",
                                 str(source), "--id", "t/big"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if _import_temporaries(store, tmp):  # the import is under way
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.002)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
        assert "Traceback" not in err
        assert _import_temporaries(store, tmp) == [] and leftovers(store) == []
        dest = _models(store) / "t--big"
        assert not dest.exists() or (dest / "model.safetensors").stat().st_size == \
            (big / "model.safetensors").stat().st_size


# --- A21: ids, labels, permissions ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a21a_any_safe_id_can_be_used_after_import_and_is_listed(store, enc, tmp_path):
    """A21 (a): an import without --id, or under "mymodel" / "ü/空 x", reported success but could not be used,
    and `models list` never showed it."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    mine = tmp_path / "my-encoder"
    enc.rename(mine)
    result = ctfm("models", "import", mine)
    assert result.returncode == 0 and "--weights my-encoder" in result.stdout, result
    for model_id in ("mymodel", "ü/空 x"):
        assert ctfm("models", "import", mine, "--id", model_id).returncode == 0
    listing = ctfm("models", "list").stdout
    for model_id in ("my-encoder", "mymodel", "ü/空 x"):
        assert any(ln.startswith(model_id + " ") for ln in listing.splitlines()), (model_id, listing)
        out = tmp_path / f"e-{len(model_id)}.npy"
        result = ctfm("embed", ct, "--weights", model_id, "--out", out)
        assert result.returncode == 0 and out.is_file(), result
    assert ctfm("models", "remove", "ü/空 x").returncode == 0
    assert not any(ln.startswith("ü/空 x ") for ln in ctfm("models", "list").stdout.splitlines())


def test_a21b_an_invalid_labels_json_is_refused_at_import_and_named_at_load(store, tmp_path):
    """A21 (b): a broken labels.json was imported unchecked, and segment then failed naming no file."""
    seg = tiny_segmenter(tmp_path / "seg")
    (seg / "labels.json").write_text('{"1": "liver", 2: spleen}')
    line = assert_refused(ctfm("models", "import", seg, "--id", "t/badlabels"), "labels.json")
    assert str(seg) in line
    assert not _models(store).exists() or not any(_models(store).iterdir())
    ct = small_ct(tmp_path / "ct.nii.gz")
    line = assert_refused(ctfm("segment", ct, "--model", seg, "--out", tmp_path / "s.nii.gz"), "labels.json")
    assert str(seg / "labels.json") in line


HOSTILE_NAMES = {
    "NUL": "liver\x00spleen", "ESC": "liver\x1b[31m", "tab": "liver\tx", "newline": "liver\nx",
    "path": "../../etc/x", "backslash": "a\\b", "dotdot": "..", "1 MB": "x" * (1 << 20), "bar": "a|b",
    "C1": "liver\x85", "number": 5, "empty": "  ",
}


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(HOSTILE_NAMES))
def test_a21c_hostile_label_names_are_refused(tmp_path, ctfm_cache, what):
    """A21 (c): label names with NUL, control characters, ESC, path-like text or 1 MB were accepted into
    the .seg.nrrd header (and NUL made .labels.json and .seg.nrrd disagree)."""
    from CTFMLib.labels import load_labels

    name = HOSTILE_NAMES[what]
    with pytest.raises(ValueError) as e:
        load_labels({"1": name})
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)
    seg = tiny_segmenter(tmp_path / "seg")
    (seg / "labels.json").write_text(json.dumps({"0": "background", "1": name, "2": "spleen"}))
    assert_refused(ctfm("models", "import", seg, "--id", "t/names"), "labels.json")
    with pytest.raises(ValueError, match="labels.json"):
        load_labels(seg)


@pytest.mark.parametrize("display", [5, ["x"], {"a": 1}, "x\x1b[2J", "y" * 1000])
def test_a21c_display_names_are_checked(display):
    """A21 (c): display_name was never validated."""
    from CTFMLib.labels import load_labels

    with pytest.raises(ValueError, match="display name"):
        load_labels({"1": {"name": "liver", "display_name": display}})
    assert load_labels({"1": {"name": "liver", "display_name": "Liver / hepar"}})[0].display_name == "Liver / hepar"


@pytest.mark.slow
def test_labels_json_and_seg_nrrd_agree_on_every_name(tmp_path):
    """With hostile names refused (A21 c), what .labels.json says and .seg.nrrd stores are the same names
    (unicode included)."""
    names = {"1": "liver", "2": "Leber (ü, 空)", "3": "kidney_left", "4": "ωmega-4"}
    seg = tiny_segmenter(tmp_path / "seg", labels=names)
    ct = small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out.seg.nrrd"
    result = ctfm("segment", ct, "--model", seg, "--out", out)
    assert result.returncode == 0, result
    from CTFMLib.labels import read_seg_nrrd

    image, labels = read_seg_nrrd(out)
    present = set(np.unique(np.asarray(image.array)).tolist()) - {0}
    assert {info.value: info.name for info in labels} == {v: names[str(v)] for v in present}


def test_a21d_saved_and_imported_files_have_normal_permissions(store, tmp_path):
    """A21 (d): model.safetensors written by save_pretrained was mode 0600, and imports copied modes."""
    old = os.umask(0o022)
    try:
        enc = tiny_encoder(tmp_path / "enc")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in enc.iterdir()}
        assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
        for p in enc.iterdir():
            p.chmod(0o600)  # a private copy: the store still gets normal permissions
        assert ctfm("models", "import", enc, "--id", "t/modes").returncode == 0
        dest = _models(store) / "t--modes"
        assert stat.S_IMODE(dest.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {0o644}
    finally:
        os.umask(old)
