"""``ctfm segment`` as a user runs it: one image or a batch, label maps or .seg.nrrd, errors and cancel."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ctfm_testing.checkpoints import monai_segresnet, write_published_layout
from ctfm_testing.phantoms import body_phantom
from ctfm_testing.plugin import ROOT, run_ctfm
from CTFMLib.image import read_image, write_image
from CTFMLib.segment import segment_image

LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "aorta"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A small SegResNetDS written by MONAI in the published layout, with its labels.json."""
    model = monai_segresnet(out_channels=5, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=2, seed=2)
    with torch.no_grad():
        for level in model.up_layers:
            if isinstance(level["head"], nn.Conv3d):
                level["head"].bias.zero_()  # let image content, not a bias, choose the class
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 5, "init_filters": 4,
              "blocks_down": [1, 1, 1, 1], "dsdepth": 2}
    folder = write_published_layout(model, tmp_path_factory.mktemp("seg-model"), config)
    (folder / "labels.json").write_text(json.dumps({"0": "background", **LABELS}))
    return folder


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    write_image(body_phantom(shape=(60, 56, 40), spacing=(2.0, 2.0, 3.0)), folder / "a.nii.gz")
    write_image(body_phantom(shape=(50, 50, 30), spacing=(2.0, 2.0, 3.0), seed=1), folder / "b.nrrd")
    (folder / "c.nii.gz").write_bytes(b"\x1f\x8b this is not an image")
    return folder


def leftovers(folder):
    """Temporary files an interrupted write would leave (all start with a dot)."""
    return [p.name for p in folder.rglob(".*")]


@pytest.mark.slow
def test_one_image_to_label_map_and_sidecar(model_folder, phantoms, tmp_path):
    out = tmp_path / "out" / "a_labels.nii.gz"
    run = run_ctfm("segment", phantoms / "a.nii.gz", "--model", model_folder, "--out", out,
                   "--device", "cpu", "--precision", "fp32")
    assert run.returncode == 0, run.stderr
    assert 0 <= run.stderr.find("expected time: about") < run.stderr.find("window 1 of")  # before the work starts
    assert "window 1 of" in run.stderr and "100%" in run.stderr
    written = read_image(out)
    image = read_image(phantoms / "a.nii.gz")
    direct = segment_image(image, weights=model_folder, device="cpu", precision="fp32")
    assert written.geometry.same_grid(image.geometry, atol=1e-5)
    np.testing.assert_array_equal(written.array, direct.labels.array)
    assert len(np.unique(written.array)) >= 3
    assert json.loads((tmp_path / "out" / "a_labels.labels.json").read_text()) == LABELS
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_seg_nrrd_with_structures_and_largest_component(model_folder, phantoms, tmp_path):
    from CTFMLib.labels import read_seg_nrrd

    out = tmp_path / "a.seg.nrrd"
    run = run_ctfm("segment", phantoms / "a.nii.gz", "--model", model_folder, "--out", out, "--device", "cpu",
                   "--precision", "fp32", "--structures", "liver,aorta", "--largest-component")
    assert run.returncode == 0, run.stderr
    labels, infos = read_seg_nrrd(out)
    direct = segment_image(read_image(phantoms / "a.nii.gz"), weights=model_folder, device="cpu", precision="fp32",
                           structures=["liver", "aorta"], largest_component=True)
    np.testing.assert_array_equal(labels.array, direct.labels.array)
    present = set(np.unique(labels.array).tolist()) - {0}
    assert present and present <= {1, 4}
    assert {(x.value, x.name) for x in infos} == {(v, LABELS[str(v)]) for v in present}
    assert all(x.terminology for x in infos)


@pytest.mark.slow
def test_batch_folder_reports_the_corrupt_input_and_writes_the_others(model_folder, phantoms, tmp_path):
    out_dir = tmp_path / "results"
    run = run_ctfm("segment", phantoms, "--model", model_folder, "--out-dir", out_dir, "--device", "cpu")
    assert run.returncode == 1
    assert "FAILED" in run.stderr and "c.nii.gz" in run.stderr and "corrupt" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.count("expected time") == 2  # a and b; c fails when read, before its estimate
    assert "segmented 2 of 3 images" in run.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.labels.json", "a.nii.gz", "b.labels.json", "b.nii.gz"]
    assert read_image(out_dir / "b.nii.gz").shape == (50, 50, 30)


@pytest.mark.slow
def test_batch_csv_with_relative_paths_and_a_missing_file(model_folder, phantoms, tmp_path):
    csv = tmp_path / "list.csv"
    rel = os.path.relpath(phantoms / "b.nrrd", tmp_path)
    csv.write_text(f"image,out\n{rel},b_out.seg.nrrd\n{tmp_path / 'missing.nii.gz'},\n")
    out_dir = tmp_path / "results"
    run = run_ctfm("segment", csv, "--model", model_folder, "--out-dir", out_dir, "--device", "cpu")
    assert run.returncode == 1, run.stderr
    assert "missing.nii.gz" in run.stderr and "no such file" in run.stderr
    assert "segmented 1 of 2 images" in run.stdout
    assert [p.name for p in out_dir.iterdir()] == ["b_out.seg.nrrd"]


@pytest.mark.slow
def test_refusals_are_one_line_errors_without_output(model_folder, phantoms, tmp_path):
    out = tmp_path / "a.nii.gz"
    run = run_ctfm("segment", phantoms / "a.nii.gz", "--model", model_folder, "--out", out, "--max-memory-gb", "0.001")
    assert run.returncode == 2
    assert "GB of memory" in run.stderr and "--fast" in run.stderr and "Traceback" not in run.stderr
    run = run_ctfm("segment", phantoms / "a.nii.gz", "--model", model_folder, "--out", out, "--structures", "lung")
    assert run.returncode == 2 and "unknown structure" in run.stderr and "liver, spleen" in run.stderr
    run = run_ctfm("segment", phantoms / "a.nii.gz", "--model", model_folder, "--out", tmp_path / "a.png")
    assert run.returncode == 2 and ".seg.nrrd" in run.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_interrupt_leaves_no_output(model_folder, tmp_path):
    path = write_image(body_phantom(shape=(200, 200, 100), spacing=(1.0, 1.0, 1.5)), tmp_path / "big.nii.gz")
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "CTFM")}
    proc = subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "json", "segment", str(path),
                             "--model", str(model_folder), "--out", str(out_dir / "big.nii.gz"), "--device", "cpu",
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a shell's background job starts with SIGINT ignored; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:
            if '"window 1 of' in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    assert not out_dir.exists() or not list(out_dir.iterdir())
