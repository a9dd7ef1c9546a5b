"""The ``ctfm`` command line, run as a child process."""

import json
import shutil

import numpy as np
import pytest

from ctfm_testing.plugin import run_ctfm


def test_console_script_is_installed():
    if shutil.which("ctfm") is None:
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    import subprocess

    out = subprocess.run(["ctfm", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ctfm ")


@pytest.mark.slow
def test_info_reports_versions_device_cache_and_catalogue(ctfm_cache):
    out = run_ctfm("info", "--json", env={"CTFM_CACHE": str(ctfm_cache)})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["versions"]["torch"] and info["device"]["auto"] in ("cpu", "cuda", "mps")
    assert info["cache"]["models"] == str(ctfm_cache / "models")
    ids = {m["id"]: m for m in info["catalog"]["models"]}
    assert {"ct_fm_feature_extractor", "ct_fm_segresnet", "whole_body_segmentation"} <= set(ids)
    assert ids["ct_fm_feature_extractor"]["repo_id"] == "project-lighter/ct_fm_feature_extractor"
    assert ids["ct_fm_feature_extractor"]["status"] == "not on this computer"


@pytest.mark.slow
def test_embed_real_ct_with_local_weights(example_ct_path, ctfm_weights_folder, tmp_path):
    out_file = tmp_path / "emb.npy"
    out = run_ctfm("--progress", "bar", "embed", example_ct_path, "--weights", ctfm_weights_folder, "--out", out_file)
    assert out.returncode == 0, out.stderr
    assert "%" in out.stderr and "embedding the whole volume" in out.stderr  # progress shown
    vec = np.load(out_file)
    assert vec.shape == (512,) and np.isfinite(vec).all() and np.abs(vec).max() > 0


@pytest.mark.slow
def test_embed_json_progress_is_machine_readable(example_ct_path, tiny_encoder_folder, tmp_path):
    from CTFMLib.image import read_image
    from CTFMLib.progress import parse_json_progress

    image = read_image(example_ct_path)
    centre_lps = image.index_to_physical((np.asarray(image.shape) - 1) / 2)
    ras = centre_lps * [-1, -1, 1]
    out = run_ctfm("--progress", "json", "embed", example_ct_path, "--weights", tiny_encoder_folder,
                   "--mode", "point", "--point", ",".join(f"{v:.2f}" for v in ras), "--ras", "--out", tmp_path / "p.npy")
    assert out.returncode == 0, out.stderr
    events = [e for e in map(parse_json_progress, out.stderr.splitlines()) if e]
    assert events and events[-1][0] == 1.0
    assert np.load(tmp_path / "p.npy").shape == (32,)


def test_offline_without_weights_says_how_to_get_them(example_ct_path, ctfm_cache, tmp_path):
    out = run_ctfm("embed", example_ct_path, "--weights", "project-lighter/ct_fm_feature_extractor",
                   "--out", tmp_path / "e.npy", env={"HF_HUB_OFFLINE": "1", "CTFM_CACHE": str(ctfm_cache)})
    assert out.returncode == 2
    assert "ctfm models download ct_fm_feature_extractor" in out.stderr
    assert "ctfm models import" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.slow
def test_models_import_list_remove(ctfm_cache, ctfm_weights_folder):
    env = {"CTFM_CACHE": str(ctfm_cache)}
    # Random weights are not the published model: its id takes them only with --force, and says so.
    out = run_ctfm("models", "import", ctfm_weights_folder, "--id", "project-lighter/ct_fm_feature_extractor", env=env)
    assert out.returncode == 2 and "--force" in out.stderr and "Traceback" not in out.stderr
    out = run_ctfm("models", "import", ctfm_weights_folder, "--id", "project-lighter/ct_fm_feature_extractor",
                   "--force", env=env)
    assert out.returncode == 0, out.stderr
    listing = run_ctfm("models", "list", env=env).stdout
    line = [ln for ln in listing.splitlines() if ln.startswith("ct_fm_feature_extractor")][0]
    assert line.endswith("imported, not the published weights")
    out = run_ctfm("models", "remove", "ct_fm_feature_extractor", env=env)
    assert out.returncode == 0 and "removed" in out.stdout
    listing = run_ctfm("models", "list", env=env).stdout
    assert "imported" not in listing


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_encoder_folder):
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    out = run_ctfm("embed", tmp_path / "junk.nii.gz", "--weights", tiny_encoder_folder, "--out", tmp_path / "x.npy")
    assert out.returncode == 2 and "corrupt" in out.stderr and "Traceback" not in out.stderr
    out = run_ctfm("embed", tmp_path / "missing.nii.gz", "--weights", tiny_encoder_folder, "--out", tmp_path / "x.npy")
    assert out.returncode == 2 and "no such file" in out.stderr
    out = run_ctfm("embed", tmp_path / "junk.nii.gz", "--point", "1,2", "--out", tmp_path / "x.npy")
    assert out.returncode == 2 and "three numbers" in out.stderr
