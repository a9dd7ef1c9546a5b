"""``ctfm segment --out seg.dcm`` (DICOM SEG) and ``--sr report.dcm`` (TID 1500) as a user runs them (issue 19 items 1, 3).

A tiny segmentation model runs on the real DICOM series and on synthetic series (a negated column direction,
an oblique one); the SEG is read back with highdicom's own reader and put on the CT's grid through the affines
(``ctfm_testing.dicom_checks.seg_on_grid``), then compared voxel for voxel with what ``--out labels.nii.gz`` writes for
the same input. The SR is parsed back with ``hd.sr.srread`` and compared with stats.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.data import require_shared_data  # noqa: E402
from ctfm_testing.dicom_checks import GEOMETRIES, REAL_SERIES, dciodvfy_errors, seg_on_grid, write_bias_free_segmenter  # noqa: E402
from ctfm_testing.hostile import assert_refused, ctfm, small_ct, tree_digest  # noqa: E402
from ctfm_testing.phantoms import body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import Image, read_image, write_image  # noqa: E402

RUN = ("--device", "cpu", "--quality", "fast")
LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "aorta"}
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# dicom3tools before 2024 does not know the Label Map Segmentation class, so it takes a reference to one for a
# reference to something that is not a segmentation; this one message is what that says.
OLD_DCIODVFY_LABELMAP = "Shall not be present for Referenced SOP Class that is not segmentation"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_bias_free_segmenter(tmp_path_factory.mktemp("seg-model"), LABELS)


def leftovers(folder):
    return [p.name for p in folder.rglob(".*")]


def nifti_labels(model, image, folder):
    """What ``ctfm segment IMAGE --out labels.nii.gz`` writes: the label map and its {name: value}."""
    out = folder / "labels.nii.gz"
    result = ctfm("segment", image, "--model", model, *RUN, "--out", out)
    assert result.returncode == 0, result
    names = {v: int(k) for k, v in json.loads((folder / "labels.labels.json").read_text()).items()}
    return read_image(out), names


def assert_seg_equals(seg_file, ct, labels, names):
    assert labels.geometry.same_grid(ct.geometry, atol=1e-5)
    assert np.count_nonzero(labels.array), "the tiny model found nothing: the comparison would prove little"
    np.testing.assert_array_equal(seg_on_grid(seg_file, ct, names), labels.array)


@pytest.fixture(scope="module")
def real(model, tmp_path_factory):
    folder = require_shared_data(*REAL_SERIES)
    work = tmp_path_factory.mktemp("real")
    labels, names = nifti_labels(model, folder, work)
    return folder, read_dicom_series(folder), labels, names


@pytest.fixture(scope="module")
def synthetic(model, tmp_path_factory):
    """geometry -> (series folder, CT read from it, labels --out labels.nii.gz wrote, {name: value})."""
    cases = {}
    for name, direction in GEOMETRIES.items():
        work = tmp_path_factory.mktemp(name)
        ct = body_phantom(shape=(40, 36, 14), spacing=(5.0, 5.0, 6.0), direction=direction, noise_hu=0,
                          seed=3)
        write_ct_series(work / "series", ct)
        labels, names = nifti_labels(model, work / "series", work)
        cases[name] = (work / "series", read_dicom_series(work / "series"), labels, names)
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_real_series_seg_reads_back_to_the_nifti_labels(model, real, tmp_path, seg_type):
    folder, ct, labels, names = real
    out = tmp_path / "seg.dcm"
    result = ctfm("segment", folder, "--model", model, *RUN, "--out", out, "--seg-type", seg_type)
    assert result.returncode == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]  # no sidecar: the SEG names its segments
    # The anonymised series has no Study/Series UIDs: said once, though its headers are read twice.
    assert [line.startswith("ctfm: warning:") for line in result.stderr.splitlines() if "anonymised" in line] == [True]
    ds = pydicom.dcmread(str(out), stop_before_pixels=True)
    assert ds.SegmentationType == ("LABELMAP" if seg_type == "labelmap" else "BINARY")
    # Each segment names the algorithm by the sha256 of the weights that made it (a model trained here has no
    # published digest, so it is the file's own).
    digest = hashlib.sha256((Path(model) / "model.safetensors").read_bytes()).hexdigest()
    for segment in [s for s in ds.SegmentSequence if s.SegmentNumber > 0]:  # LABELMAP's background 0 has none
        assert digest in segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert_seg_equals(out, ct, labels, names)
    assert dciodvfy_errors(out, tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_synthetic_series_seg_reads_back_to_the_nifti_labels(model, synthetic, tmp_path, geometry, seg_type):
    folder, ct, labels, names = synthetic[geometry]
    out = tmp_path / "seg.dcm"
    result = ctfm("segment", folder, "--model", model, *RUN, "--out", out, "--seg-type", seg_type)
    assert result.returncode == 0, result
    assert_seg_equals(out, ct, labels, names)
    assert dciodvfy_errors(out, tmp_path) == []


@pytest.mark.slow
def test_batch_out_format_dcm_writes_a_seg_per_series(model, synthetic, tmp_path):
    folder, ct, labels, names = synthetic["oblique"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "study").symlink_to(folder, target_is_directory=True)
    small_ct(inputs / "plain.nii.gz")  # no DICOM series: reported, the rest goes on
    result = ctfm("segment", inputs, "--model", model, *RUN, "--out-dir", tmp_path / "out", "--out-format", "dcm")
    assert result.returncode == 1, result
    assert "plain.nii.gz" in result.stderr and "--dicom-reference" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["study.dcm"]
    assert_seg_equals(tmp_path / "out" / "study.dcm", ct, labels, names)


@pytest.mark.slow
def test_dicom_reference_for_a_nifti_of_the_series_and_refused_for_another_grid(model, synthetic, tmp_path):
    folder, ct, labels, names = synthetic["negated_columns"]
    nifti = write_image(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.dcm"
    result = ctfm("segment", nifti, "--model", model, *RUN, "--out", out, "--dicom-reference", folder)
    assert result.returncode == 0, result
    assert_seg_equals(out, ct, labels, names)
    series = pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True).SeriesInstanceUID
    assert pydicom.dcmread(str(out), stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID == series
    # The same CT one slice further on is not on the series' grid: refused before the model runs, nothing written.
    moved = write_image(Image(ct.array, ct.spacing, ct.origin + ct.spacing[2] * ct.direction[:, 2], ct.direction),
                        tmp_path / "moved.nii.gz")
    before = tree_digest(tmp_path)
    line = assert_refused(ctfm("segment", moved, "--model", model, *RUN, "--out", tmp_path / "other.dcm",
                               "--dicom-reference", folder), "grid")
    assert "window" not in line
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_sr_references_existing_segments_and_holds_the_statistics(model, synthetic, tmp_path, seg_type):
    folder = synthetic["oblique"][0]
    seg_file, sr_file, stats_file = tmp_path / "seg.dcm", tmp_path / "report.dcm", tmp_path / "stats.json"
    result = ctfm("segment", folder, "--model", model, *RUN, "--out", seg_file, "--seg-type", seg_type,
                  "--sr", sr_file, "--statistics", stats_file)
    assert result.returncode == 0, result
    stats = json.loads(stats_file.read_text())
    seg = pydicom.dcmread(str(seg_file), stop_before_pixels=True)
    segments = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence if int(s.SegmentNumber)}
    assert len(segments) == len(stats) >= 2, "several structures, so a wrong segment number would show"
    sr = hd.sr.srread(str(sr_file))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(stats)
    reported = set()
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        (number,) = ref.referenced_segment_numbers
        assert number in segments
        name = segments[number]
        assert group.tracking_identifier == name
        measurements = {(m.name.value, m.unit.value): m.value for m in group.get_measurements()}
        assert measurements[("118565006", "ml")] == pytest.approx(stats[name]["volume_ml"], rel=1e-9)
        assert measurements[("112031", "[hnsf'U]")] == pytest.approx(stats[name]["hu_mean"], rel=1e-9, abs=1e-9)
        reported.add(name)
    assert reported == set(stats)
    observer = sr.content[0].ContentSequence  # the observation context: a device named CT-FM
    assert any(getattr(item, "TextValue", None) == "CT-FM" for item in observer)
    errors = [e for e in _dciodvfy_sr(sr_file)
              if not (seg.SOPClassUID == LABEL_MAP_SEG_STORAGE and OLD_DCIODVFY_LABELMAP in e)]
    assert errors == []


def _dciodvfy_sr(path) -> list:
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_dicom_refusals_are_one_line_and_write_nothing(model, tmp_path):
    ct = small_ct(tmp_path / "ct.nii.gz")
    series = tmp_path / "series"
    write_ct_series(series, small_ct(shape=(20, 18, 6)), intercept=-2048.0)
    base = ("--model", model, *RUN)
    before = tree_digest(tmp_path)
    cases = [
        (("segment", ct, *base, "--out", tmp_path / "seg.dcm"), ("--dicom-reference",)),
        (("segment", ct, *base, "--out", tmp_path / "seg.dcm", "--dicom-reference", tmp_path / "none"),
         ("--dicom-reference", "folder")),
        (("segment", series, *base, "--out", tmp_path / "l.nii.gz", "--sr", tmp_path / "r.dcm"), ("--sr", ".dcm")),
        (("segment", series, *base, "--out", tmp_path / "l.nii.gz", "--seg-type", "binary"), ("--seg-type",)),
        (("segment", ct, *base, "--out", tmp_path / "l.nii.gz", "--dicom-reference", series), ("--dicom-reference",)),
        (("segment", series, *base, "--out", tmp_path / "seg.dcm", "--sr", tmp_path / "r.json"), ("--sr", ".dcm")),
        (("segment", series, *base, "--out", tmp_path / "seg.dcm", "--sr", tmp_path / "seg.dcm"), ("same",)),
        (("segment", series, *base, "--out", tmp_path / "seg.dcm", "--sr", tmp_path / "ct.nii.gz"), ("--sr",)),
        (("segment", tmp_path, *base, "--out-dir", tmp_path / "o", "--out-format", "dcm", "--sr", tmp_path / "r.dcm"),
         ("--sr", "--out")),
        (("segment", series, *base, "--plan", "--seg-type", "binary"), ("--seg-type",)),
        (("segment", series, *base, "--out", tmp_path / "seg.txt"), (".dcm",)),
    ]
    for args, words in cases:
        assert_refused(ctfm(*args), *words)
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []
