"""``ctfm export-seg``: an existing result (a label map with its .labels.json, or a .seg.nrrd) written as a DICOM SEG
on the grid of the series it was computed on, read back with highdicom voxel for voxel; refusals in one line,
nothing written. No model runs: the label maps are phantoms' organs and thresholds of the real CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.data import require_shared_data  # noqa: E402
from ctfm_testing.dicom_checks import GEOMETRIES, REAL_SERIES, seg_on_grid  # noqa: E402
from ctfm_testing.hostile import assert_refused, ctfm, tree_digest  # noqa: E402
from ctfm_testing.phantoms import BODY_LABELS, body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import Image, write_image  # noqa: E402
from CTFMLib.labels import load_labels, write_seg_nrrd  # noqa: E402

LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def phantom_series(folder, direction=None):
    """A body phantom written as a DICOM series, the series read back, and its organs' label map on that grid."""
    image, labels = body_phantom(shape=(30, 26, 9), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=4, return_labels=True,
                                 **({} if direction is None else {"direction": direction}))
    write_ct_series(folder, image)
    ct = read_dicom_series(folder)
    return ct, Image(np.asarray(labels.array).astype(np.uint8), ct.spacing, ct.origin, ct.direction)


def write_label_map(labels: Image, path, names: dict):
    """A label map with its {value: name} sidecar, as `ctfm segment --out` writes them."""
    write_image(labels, path)
    path.with_name(path.name[: -len(".nii.gz")] + ".labels.json").write_text(json.dumps({str(k): v for k, v in
                                                                                          names.items()}))
    return path


def present(labels: Image) -> dict:
    """{name: value} of the phantom's organs present in ``labels``."""
    values = set(np.unique(labels.array).tolist()) - {0}
    return {name: v for name, v in BODY_LABELS.items() if v in values}


@pytest.mark.parametrize("geometry", [None, *GEOMETRIES])
@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_a_label_map_on_a_synthetic_series_reads_back_equal(tmp_path, geometry, seg_type):
    ct, labels = phantom_series(tmp_path / "series", None if geometry is None else GEOMETRIES[geometry])
    names = present(labels)
    assert len(names) >= 3, "the phantom's organs should be on the grid"
    source = write_label_map(labels, tmp_path / "labels.nii.gz", {v: n for n, v in names.items()})
    out = tmp_path / "seg.dcm"
    result = ctfm("export-seg", source, "--reference", tmp_path / "series", "--out", out, "--seg-type", seg_type,
                  "--json")
    assert result.returncode == 0, result
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["files"] == [str(out)] and sorted(summary["segments"]) == sorted(names)
    np.testing.assert_array_equal(seg_on_grid(out, ct, names), labels.array)
    ds = pydicom.dcmread(str(out), stop_before_pixels=True)
    assert (ds.SOPClassUID == LABEL_MAP_SEG_STORAGE) == (seg_type == "labelmap")
    sources = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID
               for f in (tmp_path / "series").iterdir()}
    referenced = {item.ReferencedSOPInstanceUID for series in ds.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == sources
    first = pydicom.dcmread(str(next((tmp_path / "series").iterdir())), stop_before_pixels=True)
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)


def test_a_seg_nrrd_keeps_its_names_colours_and_terminology_and_plain_output_is_sentences(tmp_path):
    ct, labels = phantom_series(tmp_path / "series")
    names = present(labels)
    infos = load_labels({v: n for n, v in names.items()})
    seg_nrrd = write_seg_nrrd(labels, infos, tmp_path / "result.seg.nrrd")
    out = tmp_path / "seg.dcm"
    result = ctfm("export-seg", seg_nrrd, "--reference", tmp_path / "series", "--out", out)
    assert result.returncode == 0, result
    assert str(out) in result.stdout and not result.stdout.lstrip().startswith("{")
    np.testing.assert_array_equal(seg_on_grid(out, ct, names), labels.array)
    seg = hd.seg.segread(str(out))
    types = {seg.get_segment_description(n).SegmentLabel: seg.get_segment_description(n).SegmentedPropertyTypeCodeSequence[0]
             for n in seg.get_segment_numbers()}
    assert "liver" in types and (types["liver"].CodingSchemeDesignator, types["liver"].CodeValue) == ("SCT", "10200004")
    # --overwrite replaces it; without it the existing SEG is refused and kept
    before = out.read_bytes()
    assert_refused(ctfm("export-seg", seg_nrrd, "--reference", tmp_path / "series", "--out", out), "exists")
    assert out.read_bytes() == before
    assert ctfm("export-seg", seg_nrrd, "--reference", tmp_path / "series", "--out", out, "--overwrite").returncode == 0
    assert out.read_bytes() != before  # fresh UIDs: a new SEG
    np.testing.assert_array_equal(seg_on_grid(out, ct, names), labels.array)


def test_the_real_series(tmp_path):
    folder = require_shared_data(*REAL_SERIES)
    ct = read_dicom_series(folder)
    array = np.zeros(ct.shape, dtype=np.uint8)
    hu = np.asarray(ct.array)
    array[hu > 300] = 2  # bone
    array[(hu > 20) & (hu <= 80)] = 1  # soft tissue
    labels = Image(array, ct.spacing, ct.origin, ct.direction)
    names = {"liver": 1, "vertebrae_L1": 2}
    source = write_label_map(labels, tmp_path / "labels.nii.gz", {v: n for n, v in names.items()})
    out = tmp_path / "seg.dcm"
    result = ctfm("export-seg", source, "--reference", folder, "--out", out)
    assert result.returncode == 0, result
    np.testing.assert_array_equal(seg_on_grid(out, ct, names), labels.array)


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    ct, labels = phantom_series(tmp_path / "series")
    names = {v: n for n, v in present(labels).items()}
    good = write_label_map(labels, tmp_path / "labels.nii.gz", names)
    # off the grid: one slice fewer, and shifted by a voxel
    fewer = Image(np.asarray(labels.array)[:, :, :-1], ct.spacing, ct.origin, ct.direction)
    write_label_map(fewer, tmp_path / "fewer.nii.gz", names)
    shifted = Image(labels.array, ct.spacing, np.asarray(ct.origin) + ct.direction[:, 0] * ct.spacing[0], ct.direction)
    write_label_map(shifted, tmp_path / "shifted.nii.gz", names)
    write_image(labels, tmp_path / "nameless.nii.gz")  # no sidecar
    write_label_map(labels, tmp_path / "unnamed.nii.gz", {1: names.get(1, "liver")} if len(names) > 1 else {})
    write_label_map(Image(np.zeros(ct.shape, np.uint8), ct.spacing, ct.origin, ct.direction),
                    tmp_path / "empty.nii.gz", names)
    (tmp_path / "bad.labels.json").write_text("[1, 2]")
    write_image(labels, tmp_path / "bad.nii.gz")
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "exists.dcm").write_bytes(b"keep")
    series = tmp_path / "series"
    before = tree_digest(tmp_path)
    cases = [
        ((good, "--reference", series, "--out", tmp_path / "seg.nii.gz"), (".dcm",)),
        ((good, "--reference", tmp_path / "none", "--out", tmp_path / "seg.dcm"), ("--reference", "folder")),
        ((good, "--reference", tmp_path / "notdicom", "--out", tmp_path / "seg.dcm"), ("no dicom",)),
        ((tmp_path / "missing.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("no such file",)),
        ((tmp_path / "fewer.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("grid",)),
        ((tmp_path / "shifted.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("grid",)),
        ((tmp_path / "nameless.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), (".labels.json",)),
        ((tmp_path / "unnamed.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("without a label",)),
        ((tmp_path / "empty.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("empty",)),
        ((tmp_path / "bad.nii.gz", "--reference", series, "--out", tmp_path / "seg.dcm"), ("bad.labels.json",)),
        ((good, "--reference", series, "--out", tmp_path / "exists.dcm"), ("exists",)),
        ((good, "--reference", series, "--out", tmp_path / "seg.dcm", "--series", "1.2.3"), ("1.2.3",)),
    ]
    for args, words in cases:
        assert_refused(ctfm("export-seg", *args), *words)
    assert tree_digest(tmp_path) == before
    assert not [p.name for p in tmp_path.rglob(".*")]
