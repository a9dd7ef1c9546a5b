"""Issue 17, defect 4: an input that is not a CT in Hounsfield units is told apart, warned about, and left out of
pretraining and of ``ctfm index add`` unless allowed.

The rule (:mod:`CTFMLib.ct_check`) is judged on real statistics: every real CT of ``shared/data`` (a NIfTI in
HU, its 30-slice crop, a DICOM series stored as unsigned values with RescaleIntercept -1024) and boxes cropped
inside the body around each of its structures (little or no air) must pass; the same DICOM series' stored
values without their rescale, an MR-like phantom (intensities 0..1000, no air) and a CT whose rescale was
applied twice must not.

Before this change there was no such check: ``CTFMLib.ct_check`` did not exist, pretraining prepared an MR-like
volume like a CT and ``index add`` added it without a word (each test below failed on the old code: the import,
the skip, or the listing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctfm_testing.data import require_shared_data
from ctfm_testing.hostile import ctfm
from ctfm_testing.phantoms import BODY_LABELS, body_phantom, head_phantom
from CTFMLib.image import Image, read_image, write_image

EXAMPLE = "totalsegmentator_example"

# MR-like (T1) intensities of the body phantom's tissues: dark background and bone, bright fat; 0..1000, no air.
MR_LIKE = {"air": 5.0, "soft_tissue": 350.0, "fat": 950.0, "liver": 500.0, "spleen": 450.0, "kidney_right": 550.0,
           "kidney_left": 550.0, "aorta": 300.0, "vertebra": 150.0, "left_marker": 800.0}


def mr_like_phantom(seed: int = 0, **geometry) -> Image:
    """The body phantom's anatomy with MR-like intensities (0..1000, noise 10, no air at -1000): not a CT."""
    ct, labels = body_phantom(return_labels=True, seed=seed, **geometry)
    values = np.zeros(ct.shape, np.float32)
    values[labels.array == 0] = MR_LIKE["air"]
    for name, label in BODY_LABELS.items():
        values[labels.array == label] = MR_LIKE[name]
    values += np.random.default_rng(seed).normal(0.0, 10.0, values.shape).astype(np.float32)
    return Image.from_geometry(np.clip(values, 0, 1000).astype(np.int16), ct.geometry, {})


# --- the rule on real and synthetic images -----------------------------------------------------------------------------


def test_every_real_ct_passes_and_its_raw_stored_values_do_not():
    """The three real CTs pass (the share of voxels from -1150 to -30 HU is far above 1 %, computed here
    directly); the DICOM series' stored values, read with pydicom WITHOUT the rescale the series carries
    (air near 0 instead of -1000), do not, and the reason names the missing rescale as a possibility."""
    import pydicom

    from CTFMLib.ct_check import check_ct, not_ct_reason, warning_for

    base = require_shared_data(EXAMPLE)
    for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_ct_dicom"):
        image = read_image(base / name)
        values = image.array.astype(np.float64)
        share = np.mean((values >= -1150) & (values <= -30))
        assert share > 0.3, (name, share)  # air around the body, lungs, fat
        result = check_ct(image)
        assert result.ct_like and result.problem is None, (name, result)
        assert not_ct_reason(image) is None and warning_for(image, name) is None

    files = sorted((base / "example_ct_dicom").iterdir())
    datasets = [pydicom.dcmread(str(f)) for f in files]
    assert {float(d.RescaleIntercept) for d in datasets} == {-1024.0}  # stored values are HU + 1024
    stored = np.stack([d.pixel_array for d in datasets], axis=-1)
    assert stored.min() >= 0
    raw = check_ct(stored)
    assert not raw.ct_like and "not rescaled to HU" in raw.problem, raw
    assert not check_ct(stored.astype(np.float32) + float(datasets[0].RescaleIntercept) - 1024.0).ct_like  # twice


def test_crops_inside_the_body_still_pass():
    """A field of view inside the body has little or no air around it. The bounding box of each structure of the
    example CT's reference segmentation that is at least 2000 voxels (kidneys, aorta, vertebrae, the box around
    the spinal canal ...) and the central quarter of the body pass: each holds fat (or gas)."""
    from CTFMLib.ct_check import check_ct

    base = require_shared_data(EXAMPLE)
    ct = read_image(base / "example_ct_sm.nii.gz").array
    seg = read_image(base / "example_seg.nii.gz").array
    judged = 0
    for value in np.unique(seg)[1:]:
        where = np.argwhere(seg == value)
        low, high = where.min(axis=0), where.max(axis=0) + 1
        if np.prod(high - low) < 2000:
            continue
        box = ct[tuple(slice(a, b) for a, b in zip(low, high))]
        result = check_ct(box)
        assert result.ct_like, (int(value), box.shape, result)
        judged += 1
    assert judged >= 25
    body = np.argwhere(ct > -500)
    low, high = body.min(axis=0), body.max(axis=0)
    centre, half = (low + high) // 2, (high - low) // 8
    inner = ct[centre[0] - half[0]:centre[0] + half[0], centre[1] - half[1]:centre[1] + half[1], :]
    assert np.mean(inner <= -850) < 0.01  # hardly any air in that box
    assert check_ct(inner).ct_like


def test_phantoms_and_values_that_are_not_hu():
    """The CT phantoms pass (with and without -3024 padding outside the field of view); the MR-like phantom, a CT
    whose rescale was applied twice (air at -2048) and one in tenths of HU do not, each with a reason that says
    what is wrong."""
    from CTFMLib.ct_check import check_ct, not_ct_reason, warning_for

    ct = body_phantom()
    assert check_ct(ct).ct_like and check_ct(head_phantom()).ct_like
    padded = ct.array.astype(np.float32)
    padded[:10] = -3024.0  # the value some scanners write outside their circular field of view
    result = check_ct(padded)
    assert result.ct_like and result.padding == -3024.0, result

    mr = mr_like_phantom()
    assert 0 <= mr.array.min() and mr.array.max() <= 1000
    result = check_ct(mr)
    assert not result.ct_like and result.evidence == 0.0 and "no air, lung or fat" in result.problem, result
    assert not_ct_reason(mr).startswith("not CT-like: no air, lung or fat")
    line = warning_for(mr, "mr.nii.gz")
    assert line.startswith("mr.nii.gz does not look like a CT in Hounsfield units: ") and "\n" not in line

    twice = check_ct(ct.array.astype(np.float32) - 1024.0)
    assert not twice.ct_like and "below air" in twice.problem, twice
    tenths = check_ct(ct.array.astype(np.float32) * 10.0)
    assert not tenths.ct_like, tenths

    assert not_ct_reason(ct.with_array(ct.array, modality="MR")) == "not CT: modality MR"
    # Images every command refuses with its own line (values spanning under 50 HU) get no warning on top.
    flat = ct.with_array(np.zeros(ct.shape, np.int16))
    assert not check_ct(flat).ct_like and warning_for(flat) is None and not_ct_reason(flat) is None


def test_a_nifti_stored_with_its_rescale_is_judged_on_hu(tmp_path):
    """A CT stored as unsigned values with scl_inter -1024 in its NIfTI header is HU once read, and passes; the
    same values stored without the rescale do not (the check judges values as read, after any rescale)."""
    import nibabel as nib

    hu = np.maximum(body_phantom().array, -1024)  # a scanner's unsigned values start at -1024 HU
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])  # LPS spacing (1.5, 1.5, 3) as RAS
    scaled = nib.Nifti1Image(stored, affine)
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / "raw.nii.gz")

    from CTFMLib.ct_check import check_ct

    read = read_image(tmp_path / "scaled.nii.gz")
    assert np.array_equal(read.array, hu)
    assert check_ct(read).ct_like
    assert not check_ct(read_image(tmp_path / "raw.nii.gz")).ct_like


def test_the_check_imports_without_torch():
    """``CTFMLib.ct_check`` and ``CTFMLib.train.config`` (the Slicer hub's) import with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import CTFMLib.ct_check, CTFMLib.train.config\n"
            "import numpy as np\n"
            "from CTFMLib.image import Image\n"
            "values = np.random.default_rng(0).uniform(0, 1000, (8, 8, 8))\n"
            "print(CTFMLib.ct_check.warning_for(Image(values, spacing=(1.0, 1.0, 1.0))) is not None)\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                            env={"PYTHONPATH": str(root / "CTFM"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


# --- pretraining data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_and_mr(tmp_path_factory) -> tuple:
    """A CT phantom and the MR-like phantom, 48 x 48 x 60 at 2 mm (both pass the slice filters)."""
    folder = tmp_path_factory.mktemp("scans")
    grid = {"shape": (48, 48, 60), "spacing": (2.0, 2.0, 2.0)}
    ct = write_image(body_phantom(seed=1, **grid), folder / "ct.nii.gz")
    mr = write_image(mr_like_phantom(seed=2, **grid), folder / "mr.nii.gz")
    return folder, Path(ct), Path(mr)


def test_pretraining_data_skips_and_lists_a_non_ct_scan_unless_allowed(tmp_path, ct_and_mr):
    """The scan cache leaves the MR-like scan out with its reason (skipped.csv too); allowed, it is prepared and
    flagged while the CT entry is not made again; disallowed again, it is left out without being read."""
    import csv

    from CTFMLib.train.data import ScanCache, ScanRef

    _, ct_path, mr_path = ct_and_mr
    scans = [ScanRef(str(ct_path)), ScanRef(str(mr_path))]
    cache = ScanCache(tmp_path / "cache")
    usable, skipped = cache.prepare(scans, workers=0)
    assert [s.path for s in usable] == [str(ct_path)]
    assert [s.path for s, _ in skipped] == [str(mr_path)] and skipped[0][1].startswith("not CT-like: no air"), skipped
    with open(cache.folder / "skipped.csv", newline="") as f:
        assert [(r["path"], r["reason"]) for r in csv.DictReader(f)] == [(str(mr_path), skipped[0][1])]
    ct_entry = cache.array_path(scans[0])
    made = ct_entry.stat().st_mtime_ns

    allowed = ScanCache(tmp_path / "cache", allow_non_ct=True)
    usable, skipped = allowed.prepare(scans, workers=0)
    assert [s.path for s in usable] == [str(ct_path), str(mr_path)] and skipped == []
    assert allowed.non_ct_reason(scans[1]).startswith("not CT-like") and allowed.non_ct_reason(scans[0]) is None
    assert ct_entry.stat().st_mtime_ns == made  # the CT was not prepared again

    mr_entry = allowed.array_path(scans[1])
    mr_made = mr_entry.stat().st_mtime_ns
    usable, skipped = ScanCache(tmp_path / "cache").prepare(scans, workers=0)
    assert [s.path for s in usable] == [str(ct_path)] and [s.path for s, _ in skipped] == [str(mr_path)]
    assert mr_entry.stat().st_mtime_ns == mr_made  # judged from its record, not read again


def test_pretraining_run_lists_the_non_ct_scan_and_trains_on_it_only_when_allowed(tmp_path, ct_and_mr):
    """``run("pretrain")`` over the CT and the MR-like scan: the summary lists the MR-like one as skipped (not CT);
    with ``allow_non_ct`` (``ctfm train --allow-non-ct``) it trains on both and names the MR-like one."""
    import torch

    from CTFMLib.train.run import run

    folder, ct_path, mr_path = ct_and_mr
    config = {"data": {"source": [str(folder)], "workers": 0, "cache_dir": str(tmp_path / "cache")},
              "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
              "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 1},
              "run": {"device": "cpu", "checkpoint_every": 100, "log_every": 1, "scans_per_step": 1},
              "pretrain": {"crops_per_scan": 2, "crop_size": [8, 16, 16], "projection": [16, 8, 4]}}
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        messages = []
        summary = run("pretrain", path, tmp_path / "run", progress=lambda f, m: messages.append(m))
        assert summary["scans"] == 1 and summary["non_ct"] == []
        assert [(p, r.split(":")[0]) for p, r in summary["skipped"]] == [(str(mr_path), "not CT-like")]
        assert any(m.startswith(f"skipped {mr_path}: not CT-like") for m in messages), messages

        summary = run("pretrain", path, tmp_path / "run2", allow_non_ct=True)
        assert summary["scans"] == 2 and summary["skipped"] == []
        assert [p for p, _ in summary["non_ct"]] == [str(mr_path)]
    finally:
        torch.set_num_threads(threads)


# --- index add and query ------------------------------------------------------------------------------------------------


def test_index_add_leaves_out_and_lists_a_non_ct_scan_unless_allowed(tmp_path, tiny_encoder_folder):
    """``ctfm index add`` over a CT and the MR-like phantom adds the CT, lists the other as not CT-like (exit 1,
    nothing of it in the index); ``--allow-non-ct`` adds it with a warning; ``index query`` with it warns."""
    grid = {"shape": (40, 36, 12), "spacing": (5.0, 5.0, 8.0), "body_radius_mm": 90}
    ct = write_image(body_phantom(seed=1, **grid), tmp_path / "ct.nii.gz")
    mr = write_image(mr_like_phantom(seed=2, **grid), tmp_path / "mr.nii.gz")
    index = tmp_path / "index"
    common = ["--weights", tiny_encoder_folder, "--device", "cpu"]
    result = ctfm("--progress", "none", "index", "add", index, ct, mr, *common)
    assert result.returncode == 1, result
    assert "added 1, already indexed 0, left out 1 not CT-like (--allow-non-ct adds them), failed 0 of 2" \
        in result.stdout, result
    assert f"left out {mr}: not CT-like: no air, lung or fat" in result.stderr, result
    info = json.loads(ctfm("index", "info", index, "--json").stdout)
    assert info["scans"] == 1

    result = ctfm("--progress", "none", "index", "add", index, ct, mr, "--allow-non-ct", *common)
    assert result.returncode == 0, result
    assert "added 1, already indexed 1, failed 0 of 2" in result.stdout, result
    assert f"warning: adding {mr} although it is not CT-like" in result.stderr, result
    assert json.loads(ctfm("index", "info", index, "--json").stdout)["scans"] == 2

    result = ctfm("--progress", "none", "index", "query", index, mr, "--json", "--device", "cpu")
    assert result.returncode == 0, result
    assert f"ctfm: warning: {mr} does not look like a CT in Hounsfield units" in result.stderr, result
    result = ctfm("--progress", "none", "index", "query", index, ct, "--json", "--device", "cpu")
    assert result.returncode == 0 and "warning" not in result.stderr, result


# --- a warning in every command that reads an image ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    from ctfm_testing.hostile import tiny_encoder, tiny_segmenter, tiny_triage

    root = tmp_path_factory.mktemp("models")
    return {"enc": tiny_encoder(root / "enc"), "seg": tiny_segmenter(root / "seg"), "tri": tiny_triage(root / "tri")}


@pytest.mark.slow
def test_every_command_warns_about_a_non_ct_input_and_not_about_a_ct(tmp_path, tiny_models):
    """``ctfm embed``, ``segment``, ``saliency`` and ``triage`` on the MR-like phantom run as before but print one
    ``ctfm: warning:`` line naming the file and why it does not look like a CT; on the CT phantom they print
    none. Before: every command ran an MR-like volume without a word (``segment`` even reported structures)."""
    grid = {"shape": (40, 36, 12), "spacing": (6.0, 6.0, 6.0)}
    ct = write_image(body_phantom(seed=1, **grid), tmp_path / "ct.nii.gz")
    mr = write_image(mr_like_phantom(seed=2, **grid), tmp_path / "mr.nii.gz")
    for image in (mr, ct):
        out = tmp_path / f"out-{Path(image).name.split('.')[0]}"
        commands = {
            "embed": ("embed", image, "--weights", tiny_models["enc"], "--out", out / "e.npy"),
            "segment": ("segment", image, "--model", tiny_models["seg"], "--out", out / "s.nii.gz"),
            "saliency": ("saliency", image, "--weights", tiny_models["enc"], "--target", "embedding", "--method",
                         "gradient", "--out", out / "h.nii.gz"),
            "triage": ("triage", image, "--model", tiny_models["tri"]),
        }
        for name, args in commands.items():
            result = ctfm("--progress", "none", *args[:1], *args[1:], "--device", "cpu")
            assert result.returncode == 0, (name, result)
            warnings = [line for line in result.lines if "does not look like a CT" in line]
            if image == mr:
                assert len(warnings) == 1, (name, result)
                assert warnings[0].startswith(f"ctfm: warning: {mr} does not look like a CT in Hounsfield units: "
                                              "no air, lung or fat"), (name, warnings)
            else:
                assert warnings == [], (name, result)
