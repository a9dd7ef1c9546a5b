"""DICOM SEG from a label map (CTFMLib.dicom_seg): read back with highdicom, voxel for voxel on the source grid.

The SEG is read with highdicom's own reader (``segread``, ``get_volume``) and put back on the source grid
through the affines alone (highdicom's volume affine against the CT's), so a mirrored axis, a slice
order mix-up or a shifted frame shows as a mismatch. Expected codes and colours are read from the
terminology JSON in Resources/Terminology, not from CTFMLib.labels. ``dciodvfy`` (Debian dicom3tools)
checks the files against the DICOM standard where it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.data import require_shared_data  # noqa: E402
from ctfm_testing.dicom_checks import (  # noqa: E402
    GEOMETRIES,
    LABEL_MAP_SEG_STORAGE,
    REAL_SERIES,
    dciodvfy_errors,
    seg_on_grid,
)
from ctfm_testing.phantoms import body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import read_tag, write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import Image  # noqa: E402
from CTFMLib.labels import LabelInfo, load_labels, whole_body_labels  # noqa: E402

TERMINOLOGY = Path(__file__).resolve().parents[2] / "Resources" / "Terminology" / "totalsegmentator_v2.json"
ALGORITHM = ("CT-FM whole body", "9.8.7", "0123456789abcdef" * 4)
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def write_dicom_seg(*args, **kwargs):
    from CTFMLib.dicom_seg import write_dicom_seg as write

    return write(*args, **kwargs)


def terminology() -> dict:
    """name -> structure entry of the whole-body terminology file."""
    return {s["name"]: s for s in json.loads(TERMINOLOGY.read_text(encoding="utf-8"))["structures"]}


def code_of(item) -> tuple:
    return (item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)


def json_code(entry) -> tuple:
    return None if not entry else (entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"])


# --- reading a SEG back onto the source grid --------------------------------------------------------


# --- series and label maps ------------------------------------------------------------------------

# Phantom label value -> whole-body structure name (fat and soft tissue are left out: background).
PHANTOM_NAMES = {3: "liver", 4: "spleen", 5: "kidney_right", 6: "kidney_left", 7: "aorta", 8: "vertebrae_L3",
                 10: "kidney_cyst_left", 11: "urinary_bladder"}  # 11 is listed but never painted


def phantom_labels() -> list:
    """Whole-body names for the phantom's values, and the left marker without any terminology (a private code)."""
    return load_labels({str(v): n for v, n in PHANTOM_NAMES.items()}) + [
        LabelInfo(9, "left_marker", (1.0, 0.0, 0.0), "", "Left marker")]


def synthetic_case(folder: Path, direction) -> tuple:
    """A phantom CT written as a DICOM series, read back, and its label map on that grid."""
    ct, labels = body_phantom(shape=(28, 24, 12), spacing=(3.5, 3.5, 4.0), direction=direction, noise_hu=0,
                              return_labels=True)
    write_ct_series(folder, ct)
    source = read_dicom_series(folder)
    # The series' own reading order may flip axes of the phantom's grid: carry the labels over by position.
    index = np.rint(ct.physical_to_index(source.index_to_physical(
        np.indices(source.shape).reshape(3, -1).T))).astype(int).T
    array = labels.array[index[0], index[1], index[2]].reshape(source.shape).astype(np.uint8)
    array[np.isin(array, (1, 2))] = 0
    kidney = np.argwhere(array == 6)
    array[tuple(kidney[: max(1, len(kidney) // 5)].T)] = 10  # a "cyst" in the left kidney
    return source, source.with_array(array)


def real_case() -> tuple:
    """The real series and a label map on its grid made of HU ranges cut by position (asymmetric on every axis)."""
    folder = require_shared_data(*REAL_SERIES)
    ct = read_dicom_series(folder)
    hu = ct.array
    i, j, k = np.indices(ct.shape, sparse=True)
    by_name = {info.name: info.value for info in whole_body_labels()}
    array = np.zeros(ct.shape, dtype=np.uint8)
    soft = (hu > 0) & (hu < 120)
    array[soft & (i < 200)] = by_name["liver"]
    array[soft & (i > 330) & (k < 12)] = by_name["spleen"]
    array[(hu > 250) & (j > 256)] = by_name["vertebrae_L3"]
    array[(hu > 250) & (j <= 256) & (i > 256)] = by_name["rib_left_1"]
    array[soft & (i >= 256) & (i <= 330) & (k >= 15)] = by_name["kidney_left"]
    return folder, ct, ct.with_array(array)




@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """name -> (series folder, source image, label map) for each synthetic geometry."""
    cases = {}
    for name, direction in GEOMETRIES.items():
        folder = tmp_path_factory.mktemp(name) / "series"
        source, labels = synthetic_case(folder, direction)
        cases[name] = (folder, source, labels)
    return cases


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_synthetic_series_reads_back_voxel_for_voxel(synthetic, tmp_path, geometry, seg_type):
    folder, source, labels = synthetic[geometry]
    # The series have the geometries they are named for.
    if geometry == "negated_columns":
        orientation = [float(v) for v in read_tag(sorted(folder.iterdir())[0], "ImageOrientationPatient")]
        assert np.allclose(orientation, [1, 0, 0, 0, -1, 0])
    else:
        assert np.all(np.abs(source.direction) < 0.99), "no axis of the oblique series may be an LPS axis"
    info = phantom_labels()
    out = write_dicom_seg(labels, info, folder, tmp_path / "seg.dcm", algorithm=ALGORITHM, seg_type=seg_type)
    assert out == tmp_path / "seg.dcm"
    back = seg_on_grid(out, source, {x.name: x.value for x in info})
    np.testing.assert_array_equal(back, labels.array)


@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_real_series_reads_back_voxel_for_voxel(tmp_path, seg_type):
    folder, ct, labels = real_case()
    info = whole_body_labels()
    out = write_dicom_seg(labels, info, folder, tmp_path / "seg.dcm", algorithm=ALGORITHM, seg_type=seg_type)
    back = seg_on_grid(out, ct, {x.name: x.value for x in info})
    np.testing.assert_array_equal(back, labels.array)
    seg = hd.seg.segread(str(out))
    present = sorted(set(np.unique(labels.array).tolist()) - {0})
    assert len(present) >= 4
    by_value = {x.value: x.name for x in info}
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.get_segment_numbers()] == \
        [by_value[v] for v in present]
    # The anonymised series has empty SOPInstanceUIDs in its data sets: the SEG references the file meta's.
    files = {pydicom.dcmread(str(p), stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
             for p in folder.iterdir()}
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {r.ReferencedSOPInstanceUID for r in referenced} == files
    assert dciodvfy_errors(out, tmp_path) == []


# --- what the SEG says ----------------------------------------------------------------------------


@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_segments_codes_colours_and_references(synthetic, tmp_path, seg_type):
    folder, source, labels = synthetic["negated_columns"]
    out = write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "seg.dcm", algorithm=ALGORITHM,
                          seg_type=seg_type)
    ds = pydicom.dcmread(str(out))
    present = sorted(set(np.unique(labels.array).tolist()) - {0})
    names = {**PHANTOM_NAMES, 9: "left_marker"}
    segments = [s for s in ds.SegmentSequence if s.SegmentNumber != 0]  # LABELMAP adds a background segment 0
    # One segment per structure present (never urinary_bladder), numbered 1..n in label-value order.
    assert [s.SegmentLabel for s in segments] == [names[v] for v in present]
    assert [int(s.SegmentNumber) for s in segments] == list(range(1, len(present) + 1))
    assert "urinary_bladder" not in [s.SegmentLabel for s in segments]
    known = terminology()
    for s in segments:
        if s.SegmentLabel == "left_marker":  # no terminology: the private scheme, declared in the object
            assert s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99CTFM"
            assert "99CTFM" in [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence]
            continue
        entry = known[s.SegmentLabel]
        assert code_of(s.SegmentedPropertyCategoryCodeSequence[0]) == json_code(entry["category"])
        type_item = s.SegmentedPropertyTypeCodeSequence[0]
        assert code_of(type_item) == json_code(entry["type"])
        modifiers = [code_of(m) for m in type_item.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([json_code(entry["type_modifier"])] if entry["type_modifier"] else [])
        regions = s.get("AnatomicRegionSequence", [])
        assert [code_of(r) for r in regions] == ([json_code(entry["anatomic_region"])] if entry["anatomic_region"] else [])
        if entry["anatomic_region_modifier"]:
            assert [code_of(m) for m in regions[0].AnatomicRegionModifierSequence] == \
                [json_code(entry["anatomic_region_modifier"])]
        rgb = hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb(clip=True)
        assert np.max(np.abs(np.subtract(rgb, entry["color"]))) <= 1, (s.SegmentLabel, rgb, entry["color"])
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ALGORITHM[:2]
        assert ALGORITHM[2] in algorithm.AlgorithmParameters
    laterality = {s.SegmentLabel: code_of(s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0])
                  for s in segments if "SegmentedPropertyTypeModifierCodeSequence" in s.SegmentedPropertyTypeCodeSequence[0]}
    assert laterality["kidney_left"][1] == "7771000" and laterality["kidney_right"][1] == "24028007"
    # The source series is referenced, patient/study/frame of reference are the source's, the series is new.
    first = pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True)
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    sources = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == sources


def test_labelmap_is_rle_on_every_slice_and_binary_omits_empty_frames(synthetic, tmp_path):
    folder, source, labels = synthetic["oblique"]
    labelmap = pydicom.dcmread(str(write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "l.dcm",
                                                   algorithm=ALGORITHM)))
    assert labelmap.SOPClassUID == LABEL_MAP_SEG_STORAGE and labelmap.SegmentationType == "LABELMAP"
    assert labelmap.file_meta.TransferSyntaxUID == RLE_LOSSLESS
    assert int(labelmap.NumberOfFrames) == source.shape[2]
    binary = pydicom.dcmread(str(write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "b.dcm",
                                                 algorithm=ALGORITHM, seg_type="binary")))
    assert binary.SegmentationType == "BINARY" and binary.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    # One frame per (segment, slice) that holds the structure, and none that is empty.
    expected = sum(int(np.any(labels.array[:, :, k] == v)) for v in set(np.unique(labels.array).tolist()) - {0}
                   for k in range(source.shape[2]))
    assert int(binary.NumberOfFrames) == expected
    frames = binary.pixel_array.reshape(expected, -1)
    assert np.all(frames.max(axis=1) == 1)


def test_uids_are_fresh_for_every_write(synthetic, tmp_path):
    folder, _, labels = synthetic["oblique"]
    a = pydicom.dcmread(str(write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "a.dcm", algorithm=ALGORITHM)))
    b = pydicom.dcmread(str(write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "b.dcm", algorithm=ALGORITHM)))
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_dciodvfy_finds_no_errors(synthetic, tmp_path, geometry, seg_type):
    folder, _, labels = synthetic[geometry]
    out = write_dicom_seg(labels, phantom_labels(), folder, tmp_path / "seg.dcm", algorithm=ALGORITHM,
                          seg_type=seg_type)
    assert dciodvfy_errors(out, tmp_path) == []


# --- refusals --------------------------------------------------------------------------------------


def assert_one_line_refusal(call, *words) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.strip(), message
    for w in words:
        assert w.lower() in message.lower(), message
    return message


def shifted(image: Image, **change) -> Image:
    return Image(image.array, change.get("spacing", image.spacing), change.get("origin", image.origin),
                 change.get("direction", image.direction))


def test_a_label_map_off_the_source_grid_is_refused_in_one_line(synthetic, tmp_path):
    folder, source, labels = synthetic["oblique"]
    out = tmp_path / "seg.dcm"
    info = phantom_labels()
    off_grid = {
        "shape": Image(labels.array[:, :, 1:], labels.spacing, labels.origin, labels.direction),
        "half a voxel": shifted(labels, origin=labels.origin + 0.5 * labels.spacing[0] * labels.direction[:, 0]),
        "one slice": shifted(labels, origin=labels.origin + labels.spacing[2] * labels.direction[:, 2]),
        "spacing": shifted(labels, spacing=labels.spacing * [1.1, 1, 1]),
        "mirrored": shifted(labels, direction=labels.direction * [-1, 1, 1]),
    }
    for what, image in off_grid.items():
        assert_one_line_refusal(lambda: write_dicom_seg(image, info, folder, out, algorithm=ALGORITHM), "grid")
        assert not out.exists(), what
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_dicom_series_is_refused_in_one_line(synthetic, tmp_path):
    _, _, labels = synthetic["oblique"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not DICOM", encoding="utf-8")
    out = tmp_path / "seg.dcm"
    assert_one_line_refusal(lambda: write_dicom_seg(labels, phantom_labels(), notes, out, algorithm=ALGORITHM),
                            "no DICOM image files")
    assert_one_line_refusal(lambda: write_dicom_seg(labels, phantom_labels(), tmp_path / "absent", out,
                                                    algorithm=ALGORITHM), "no such folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_unnamed_values_empty_maps_unknown_types_and_existing_outputs_are_refused(synthetic, tmp_path):
    folder, _, labels = synthetic["oblique"]
    out = tmp_path / "seg.dcm"
    without_liver = [x for x in phantom_labels() if x.name != "liver"]
    assert_one_line_refusal(lambda: write_dicom_seg(labels, without_liver, folder, out, algorithm=ALGORITHM),
                            "without a label", "3")
    empty = labels.with_array(np.zeros_like(labels.array))
    assert_one_line_refusal(lambda: write_dicom_seg(empty, phantom_labels(), folder, out, algorithm=ALGORITHM),
                            "empty")
    assert_one_line_refusal(lambda: write_dicom_seg(labels, phantom_labels(), folder, out, algorithm=ALGORITHM,
                                                    seg_type="fractional"), "labelmap", "binary")
    out.write_bytes(b"the user's file")
    assert_one_line_refusal(lambda: write_dicom_seg(labels, phantom_labels(), folder, out, algorithm=ALGORITHM),
                            "exists")
    assert out.read_bytes() == b"the user's file"
    write_dicom_seg(labels, phantom_labels(), folder, out, algorithm=ALGORITHM, overwrite=True)
    assert hd.seg.segread(str(out)).SegmentationType == "LABELMAP"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
