"""Saliency heat maps as DICOM Parametric Maps (CTFMLib.dicom_pmap, ``ctfm saliency ... --out heat.dcm``).

Each map is read back twice: frame by frame with pydicom (every frame's position and orientation compared with
a source slice read from its file, its pixels with that slice of the heat map), and with highdicom's own reader
(``ParametricMap.from_dataset``, ``get_volume``) put back on the source grid through the affines alone, so a
mirrored axis, a slice-order mix-up or a shifted frame shows as a mismatch. The codes expected in the value
mapping are the DICOM standard's (PS3.16), written out here, not read from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.data import require_shared_data  # noqa: E402
from ctfm_testing.dicom_checks import GEOMETRIES, REAL_SERIES, run_dciodvfy  # noqa: E402
from ctfm_testing.hostile import assert_refused, ctfm, small_ct, tiny_encoder  # noqa: E402
from ctfm_testing.phantoms import body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import Image, read_image  # noqa: E402

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def write_parametric_map(*args, **kwargs):
    from CTFMLib.dicom_pmap import write_parametric_map as write

    return write(*args, **kwargs)


def random_heat(grid: Image, seed: int = 0) -> Image:
    """A heat map on ``grid``: float32 in 0..1 with its maximum 1, different in every voxel."""
    heat = np.random.default_rng(seed).random(grid.shape, dtype=np.float32)
    heat.flat[int(np.argmax(heat))] = 1.0
    return grid.with_array(heat)


# --- reading a map back ------------------------------------------------------------------------------


def frames_against_source(path, folder, heat: Image) -> None:
    """Every frame of the map lies on a slice of the series in ``folder`` (position, orientation and pixel spacing
    as that slice's file says) and holds that slice of ``heat`` within float32 rounding; every slice is covered."""
    ds = pydicom.dcmread(str(path))
    sources = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(Path(folder).iterdir())]
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    orientation = [float(v) for v in sources[0].ImageOrientationPatient]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], orientation,
                       atol=1e-5)
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                       [float(v) for v in sources[0].PixelSpacing], atol=1e-6)
    assert (int(ds.Rows), int(ds.Columns)) == (int(sources[0].Rows), int(sources[0].Columns))
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    assert pixels.dtype == np.float32
    covered = set()
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        distance = np.linalg.norm(positions - position, axis=1)
        s = int(np.argmin(distance))
        assert distance[s] < 1e-3, f"frame {f} at {position} lies on no source slice"
        covered.add(s)
        # The heat map's voxel at the slice's first pixel, by position alone; row r runs along j, column c along i.
        i, j, k = np.rint(heat.physical_to_index(positions[s][None, :])[0]).astype(int)
        assert (i, j) == (0, 0)
        np.testing.assert_allclose(pixels[f], heat.array[:, :, k].T, rtol=1e-6, atol=0)
    assert covered == set(range(len(sources)))


def volume_on_grid(path, grid: Image) -> np.ndarray:
    """The map at ``path`` read by highdicom, placed on ``grid`` by the affines (highdicom's index -> LPS, then
    LPS -> the grid's index); it must cover the grid exactly."""
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(str(path)))
    volume = pm.get_volume()
    m = np.linalg.inv(grid.affine) @ volume.affine
    p = np.rint(m[:3, :3])
    assert np.allclose(m[:3, :3], p, atol=1e-4), f"the map's voxel axes are not the grid's axes:\n{m}"
    assert np.allclose(np.abs(p).sum(axis=0), 1) and np.allclose(np.abs(p).sum(axis=1), 1), m
    t = m[:3, 3]
    assert np.allclose(t, np.rint(t), atol=1e-3), f"the map's voxel centres are off the grid's by {t - np.rint(t)}"
    axes = [int(np.flatnonzero(p[a])[0]) for a in range(3)]  # grid axis a is volume axis axes[a]
    moved = np.transpose(volume.array, axes)
    start = []
    for a in range(3):
        if p[a, axes[a]] < 0:
            moved = np.flip(moved, axis=a)
            start.append(int(np.rint(t[a])) - (moved.shape[a] - 1))
        else:
            start.append(int(np.rint(t[a])))
    assert start == [0, 0, 0] and moved.shape == tuple(grid.shape), (start, moved.shape, grid.shape)
    return moved


def check_value_mapping(path) -> None:
    """One real-world value mapping: identity on 0..1, no units (UCUM "1"), quantity DCM 130404 Saliency."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    mappings = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert len(mappings) == 1
    rwvm = mappings[0]
    assert (float(rwvm.DoubleFloatRealWorldValueFirstValueMapped),
            float(rwvm.DoubleFloatRealWorldValueLastValueMapped)) == (0.0, 1.0)
    assert (float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)) == (1.0, 0.0)
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
    (quantity,) = rwvm.QuantityDefinitionSequence
    assert (quantity.ConceptNameCodeSequence[0].CodingSchemeDesignator,
            quantity.ConceptNameCodeSequence[0].CodeValue) == ("SCT", "246205007")  # "Quantity"
    code = quantity.ConceptCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning) == ("DCM", "130404", "Saliency")


def dciodvfy_errors(path) -> list:
    """dciodvfy's Error lines for a Parametric Map (an IOD every dicom3tools release knows)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    return [line for line in run_dciodvfy(exe, path).splitlines() if line.startswith("Error")]


# --- series ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """name -> (series folder, the series read back) for each synthetic geometry."""
    cases = {}
    for name, direction in GEOMETRIES.items():
        ct = body_phantom(shape=(28, 24, 12), spacing=(3.5, 3.5, 4.0), direction=direction, noise_hu=0)
        folder = tmp_path_factory.mktemp(name) / "series"
        write_ct_series(folder, ct)
        cases[name] = (folder, read_dicom_series(folder))
    return cases


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_synthetic_series_reads_back_on_the_source_grid(synthetic, tmp_path, geometry):
    folder, source = synthetic[geometry]
    first = pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True)
    if geometry == "negated_columns":
        assert np.allclose([float(v) for v in first.ImageOrientationPatient], [1, 0, 0, 0, -1, 0])
    else:
        assert np.all(np.abs(source.direction) < 0.99), "no axis of the oblique series may be an LPS axis"
    heat = random_heat(source)
    out = write_parametric_map(heat, folder, tmp_path / "heat.dcm", description="CT-FM saliency",
                               target="class:liver", method="gradient")
    assert out == tmp_path / "heat.dcm"
    frames_against_source(out, folder, heat)
    np.testing.assert_allclose(volume_on_grid(out, source), heat.array, rtol=1e-6, atol=0)
    check_value_mapping(out)
    ds = pydicom.dcmread(str(out), stop_before_pixels=True)
    assert ds.SOPClassUID == PARAMETRIC_MAP_STORAGE
    assert "class:liver" in ds.ContentDescription and "gradient" in ds.ContentDescription
    assert ds.SeriesDescription == "CT-FM saliency"
    # Patient, study and frame of reference are the source's; the series and instance are new, every write.
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.PatientID == first.PatientID and ds.SeriesInstanceUID != first.SeriesInstanceUID
    again = pydicom.dcmread(str(write_parametric_map(heat, folder, tmp_path / "again.dcm", description="x",
                                                     target="embedding", method="occlusion")),
                            stop_before_pixels=True)
    assert again.SeriesInstanceUID != ds.SeriesInstanceUID and again.SOPInstanceUID != ds.SOPInstanceUID
    assert dciodvfy_errors(out) == []


@pytest.mark.slow
def test_real_series_reads_back_on_the_source_grid(tmp_path):
    folder = require_shared_data(*REAL_SERIES)
    ct = read_dicom_series(folder)
    heat = random_heat(ct, seed=1)
    out = write_parametric_map(heat, folder, tmp_path / "heat.dcm", description="CT-FM saliency",
                               target="embedding", method="occlusion")
    frames_against_source(out, folder, heat)
    np.testing.assert_allclose(volume_on_grid(out, ct), heat.array, rtol=1e-6, atol=0)
    check_value_mapping(out)
    # The anonymised series has empty SOPInstanceUIDs in its data sets: the map references the file meta's.
    ds = pydicom.dcmread(str(out), stop_before_pixels=True)
    files = {pydicom.dcmread(str(p), stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
             for p in folder.iterdir()}
    referenced = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {r.ReferencedSOPInstanceUID for r in referenced} == files
    assert dciodvfy_errors(out) == []


# --- refusals --------------------------------------------------------------------------------------------


def assert_one_line_refusal(call, *words) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.strip(), message
    for w in words:
        assert w.lower() in message.lower(), message
    return message


def test_a_map_off_the_source_grid_or_without_a_series_is_refused_in_one_line(synthetic, tmp_path):
    folder, source = synthetic["oblique"]
    heat = random_heat(source)
    out = tmp_path / "heat.dcm"

    def moved(**change) -> Image:
        return Image(heat.array, change.get("spacing", heat.spacing), change.get("origin", heat.origin),
                     change.get("direction", heat.direction))

    off_grid = {
        "shape": Image(heat.array[:, :, 1:], heat.spacing, heat.origin, heat.direction),
        "half a voxel": moved(origin=heat.origin + 0.5 * heat.spacing[0] * heat.direction[:, 0]),
        "one slice": moved(origin=heat.origin + heat.spacing[2] * heat.direction[:, 2]),
        "mirrored": moved(direction=heat.direction * [-1, 1, 1]),
    }
    write = dict(description="CT-FM saliency", target="embedding", method="gradient")
    for what, image in off_grid.items():
        message = assert_one_line_refusal(lambda: write_parametric_map(image, folder, out, **write), "grid",
                                          "heat map")
        assert "Parametric Map" in message, (what, message)
        assert not out.exists(), what
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not DICOM", encoding="utf-8")
    assert_one_line_refusal(lambda: write_parametric_map(heat, notes, out, **write), "no DICOM image files")
    assert_one_line_refusal(lambda: write_parametric_map(heat.with_array(heat.array * 2), folder, out, **write),
                            "0..1")
    nan = heat.array.copy()
    nan[0, 0, 0] = np.nan
    assert_one_line_refusal(lambda: write_parametric_map(heat.with_array(nan), folder, out, **write), "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    out.write_bytes(b"the user's file")
    assert_one_line_refusal(lambda: write_parametric_map(heat, folder, out, **write), "exists")
    assert out.read_bytes() == b"the user's file"


# --- the command line ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctfm_saliency_writes_the_nifti_heat_map_as_a_parametric_map(synthetic, tmp_path, ctfm_cache):
    folder, source = synthetic["negated_columns"]
    weights = tiny_encoder(tmp_path / "enc")
    centre = ",".join(f"{v:g}" for v in source.index_to_physical(np.array(source.shape) / 2.0))
    common = ("saliency", folder, "--weights", weights, "--target", "embedding", "--method", "gradient",
              "--cube", "40", "--center", centre, "--steps", "2")
    (tmp_path / "nifti").mkdir()
    nifti = ctfm(*common, "--out", tmp_path / "nifti" / "heat.nii.gz")
    assert nifti.returncode == 0, nifti
    dicom = ctfm(*common, "--out", tmp_path / "heat.dcm", "--json")
    assert dicom.returncode == 0, dicom
    assert "Traceback" not in dicom.stderr, dicom
    expected = read_image(tmp_path / "nifti" / "heat.nii.gz")
    assert float(expected.array.max()) == 1.0, "the cube must hold some heat for the comparison to mean anything"
    frames_against_source(tmp_path / "heat.dcm", folder, expected)
    np.testing.assert_allclose(volume_on_grid(tmp_path / "heat.dcm", source), expected.array, rtol=1e-5, atol=1e-6)
    check_value_mapping(tmp_path / "heat.dcm")
    ds = pydicom.dcmread(str(tmp_path / "heat.dcm"), stop_before_pixels=True)
    assert "embedding" in ds.ContentDescription and "gradient" in ds.ContentDescription
    # The JSON sidecar is written as for the other formats: heat.json beside heat.dcm, naming it.
    sidecar = json.loads((tmp_path / "heat.json").read_text(encoding="utf-8"))
    assert sidecar["heatmap"] == str(tmp_path / "heat.dcm")
    assert sidecar["target"] == "embedding" and sidecar["method"] == "gradient"
    assert json.loads(dicom.stdout.strip().splitlines()[-1]) == sidecar


def test_ctfm_saliency_refuses_a_dicom_map_of_a_file_input_at_once(tmp_path, ctfm_cache):
    ct = small_ct(tmp_path / "ct.nii.gz", shape=(20, 18, 8))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = ctfm("saliency", ct, "--weights", tmp_path / "no_such_encoder", "--target", "embedding", "--method",
                  "gradient", "--out", tmp_path / "heat.dcm")
    assert_refused(result, "heat.dcm", "DICOM series", ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
