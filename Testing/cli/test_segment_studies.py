"""``ctfm segment TREE --dicom-tree --out-dir OUT`` over a folder tree of DICOM studies (issue 19 item 5).

A tiny segmentation model runs on a tree of two studies: the real DICOM series and a synthetic one, beside a
localizer series, an MR series and a corrupt (truncated) series. Every CT series gets its SEG (read back with
highdicom and compared voxel for voxel with what ``ctfm segment SERIES --out labels.nii.gz`` writes), its report and
statistics in ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/``; the others are listed with their reasons in
``OUT/summary.csv``. A rerun touches no output, says done, and fails only for what fails again.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.data import require_shared_data  # noqa: E402
from ctfm_testing.dicom_checks import REAL_SERIES, seg_on_grid, write_bias_free_segmenter  # noqa: E402
from ctfm_testing.hostile import assert_refused, ctfm, tree_digest  # noqa: E402
from ctfm_testing.phantoms import body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import read_image  # noqa: E402

RUN = ("--device", "cpu", "--quality", "fast")
LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "aorta"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_bias_free_segmenter(tmp_path_factory.mktemp("seg-model"), LABELS)


def uids(folder):
    ds = pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture()
def tree(tmp_path):
    """tree/{real,b/ct,b/scout,b/broken,other/deep/mr}: two CT studies, a localizer, a corrupt and an MR series."""
    root = tmp_path / "tree"
    shutil.copytree(require_shared_data(*REAL_SERIES), root / "real")
    ct = body_phantom(shape=(40, 36, 14), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=3)
    study = pydicom.uid.generate_uid()
    write_ct_series(root / "b" / "ct", ct, study_uid=study)
    scout = body_phantom(shape=(40, 36, 3), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=4)
    write_ct_series(root / "b" / "scout", scout, study_uid=study, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_ct_series(root / "b" / "broken", ct, study_uid=study)
    for f in (root / "b" / "broken").iterdir():  # truncated in the pixel data, as an interrupted copy leaves it
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 1500])
    write_ct_series(root / "other" / "deep" / "mr", ct, Modality="MR")
    return root


def nifti_labels(model, series, folder):
    """What ``ctfm segment SERIES --out labels.nii.gz`` writes: the label map and its {name: value}."""
    folder.mkdir()
    out = folder / "labels.nii.gz"
    result = ctfm("segment", series, "--model", model, *RUN, "--out", out)
    assert result.returncode == 0, result
    names = {v: int(k) for k, v in json.loads((folder / "labels.labels.json").read_text()).items()}
    return read_image(out), names


def summary(out):
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        return {r["folder"]: r for r in csv.DictReader(f)}


def mtimes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_tree_of_studies_segments_every_ct_series_and_a_rerun_does_nothing(model, tree, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(tree)
    args = ("segment", tree, "--dicom-tree", "--model", model, *RUN, "--out-dir", out, "--out-format", "dcm",
            "--sr", "report.dcm", "--statistics", "stats.json")
    result = ctfm(*args)
    assert result.returncode == 1, result  # the corrupt series failed; the rest was done
    assert "Traceback" not in result.stderr
    assert tree_digest(tree) == before  # the input tree is untouched

    rows = summary(out)
    assert set(rows) == {"real", "b/ct", "b/scout", "b/broken", "other/deep/mr"}, rows
    assert [rows[f]["status"] for f in ("real", "b/ct")] == ["written", "written"]
    assert rows["b/scout"]["status"] == "skipped" and "localizer" in rows["b/scout"]["reason"]
    assert rows["other/deep/mr"]["status"] == "skipped" and "MR" in rows["other/deep/mr"]["reason"]
    assert rows["b/broken"]["status"] == "failed" and rows["b/broken"]["reason"]

    series_folders = []
    for folder in ("real", "b/ct"):
        study, series = uids(tree / folder)
        assert (rows[folder]["study"], rows[folder]["series"]) == (study, series)
        if series:
            where = out / study / series
        else:  # the real series is anonymised: no UIDs, so its folder is named after where it lies in the tree
            (where,) = (out / "no-study-uid").iterdir()
            assert where.name.startswith("no-uid-")
        series_folders.append(where)
        assert sorted(p.name for p in where.iterdir()) == ["report.dcm", "seg.dcm", "stats.csv", "stats.json"]
        labels, names = nifti_labels(model, tree / folder, tmp_path / f"single-{folder.replace('/', '-')}")
        assert np.count_nonzero(labels.array), "the tiny model found nothing: the comparison would prove little"
        np.testing.assert_array_equal(seg_on_grid(where / "seg.dcm", read_dicom_series(tree / folder), names),
                                      labels.array)
        stats = json.loads((where / "stats.json").read_text())
        assert int(rows[folder]["structures"]) == len(stats) == len(np.unique(labels.array)) - 1
        assert float(rows[folder]["seconds"]) > 0
    # Only the two CT series have folders (the failed one left none), and no temporary file is left anywhere.
    assert sorted(p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir()) or p.name.startswith(".")) == []
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*")) == sorted(
        str(p.relative_to(out)) for p in series_folders)

    # A rerun segments nothing again: the outputs keep their times, the series say done with their numbers.
    times = mtimes(out)
    again = ctfm(*args)
    assert again.returncode == 1, again  # only because the corrupt series fails again
    assert {k: v for k, v in mtimes(out).items() if k != "summary.csv"} == {
        k: v for k, v in times.items() if k != "summary.csv"}
    rows2 = summary(out)
    assert [rows2[f]["status"] for f in ("real", "b/ct")] == ["done", "done"]
    for folder in ("real", "b/ct"):
        assert rows2[folder]["structures"] == rows[folder]["structures"]
    assert [r["status"] for r in rows2.values()].count("failed") == 1 and rows2["b/broken"]["status"] == "failed"

    # Without the corrupt series all is done: exit 0, nothing written but the summary.
    shutil.rmtree(tree / "b" / "broken")
    third = ctfm(*args)
    assert third.returncode == 0, third
    assert {k: v for k, v in mtimes(out).items() if k != "summary.csv"} == {
        k: v for k, v in times.items() if k != "summary.csv"}
    assert sorted(r["status"] for r in summary(out).values()) == ["done", "done", "skipped", "skipped"]


@pytest.mark.slow
def test_tree_writes_label_maps_by_default_and_overwrite_segments_again(model, tmp_path):
    root = tmp_path / "tree"
    ct = body_phantom(shape=(40, 36, 14), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=3)
    write_ct_series(root / "p1" / "s1", ct)
    out = tmp_path / "out"
    result = ctfm("segment", root, "--dicom-tree", "--model", model, *RUN, "--out-dir", out)
    assert result.returncode == 0, result
    study, series = uids(root / "p1" / "s1")
    where = out / study / series
    assert sorted(p.name for p in where.iterdir()) == ["labels.labels.json", "labels.nii.gz"]
    labels, _ = nifti_labels(model, root / "p1" / "s1", tmp_path / "single")
    np.testing.assert_array_equal(read_image(where / "labels.nii.gz").array, labels.array)
    times = mtimes(where)
    os.utime(where / "labels.nii.gz", ns=(1, 1))
    result = ctfm("segment", root, "--dicom-tree", "--model", model, *RUN, "--out-dir", out, "--overwrite")
    assert result.returncode == 0, result
    assert mtimes(where)["labels.nii.gz"] != 1 and set(mtimes(where)) == set(times)
    assert [r["status"] for r in summary(out).values()] == ["written"]


def test_tree_refusals_are_one_line_and_write_nothing(tmp_path):
    root = tmp_path / "tree"
    ct = body_phantom(shape=(20, 18, 4), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=3)
    write_ct_series(root / "s", ct)
    before = tree_digest(tmp_path)
    # The output folder inside the tree it reads: refused before anything is read or written.
    assert_refused(ctfm("segment", root, "--dicom-tree", "--model", "whole-body", "--out-dir", root / "out"), "out")
    # --sr and --statistics name a file in each series' folder: a plain name, not a path.
    assert_refused(ctfm("segment", root, "--dicom-tree", "--out-dir", tmp_path / "out", "--out-format", "dcm",
                        "--sr", tmp_path / "r.dcm"), "--sr", "file name")
    assert_refused(ctfm("segment", root, "--dicom-tree", "--out-dir", tmp_path / "out", "--statistics",
                        "sub/stats.json"), "--statistics", "file name")
    # --dicom-tree goes with --out-dir only.
    assert_refused(ctfm("segment", root, "--dicom-tree", "--out", tmp_path / "x.nii.gz"), "--dicom-tree")
    # A tree without any DICOM series.
    (tmp_path / "empty").mkdir()
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", tmp_path / "empty", "--dicom-tree", "--out-dir", tmp_path / "out"), "no DICOM")
    assert tree_digest(tmp_path) == before
