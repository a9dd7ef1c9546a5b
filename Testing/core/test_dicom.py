"""DICOM series reading: the real series as SimpleITK reads it, and broken series refused clearly.

Reference results come from SimpleITK's own series reader (GDCM) or from the
synthetic image a series was written from; broken series are made by copying
the real slices, or writing synthetic ones, and then deleting files or
changing tags.
"""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctfm_testing.data import require_shared_data
from ctfm_testing.phantoms import GEOMETRIES, body_phantom
from ctfm_testing.synthetic_dicom import edit_dicom, write_ct_series, write_enhanced_ct
from CTFMLib.dicom import list_dicom_series, read_dicom_series
from CTFMLib.dicom_write import write_dicom_series
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.progress import Cancelled

REAL_SERIES = ("totalsegmentator_example", "example_ct_dicom")


# --- helpers ---------------------------------------------------------------------


def sitk_series(folder, series_uid: str = ""):
    """What SimpleITK's series reader makes of one series in ``folder``."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    assert files, f"GDCM found no series {series_uid!r} in {folder}"
    return sitk.ReadImage(files)


def assert_same_as_sitk(image: Image, ref) -> None:
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_allclose(image.spacing, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-6)


def real_slices_by_z(folder):
    """The real series' files ordered by ImagePositionPatient z (its slices are axial)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def rotation_x(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def small_ct(shape=(6, 5, 4), spacing=(0.8, 0.7, 2.5), origin=(-10.0, 20.0, -30.0), direction=None, offset=0) -> Image:
    """A tiny image whose every voxel holds a different HU value, so any flip or transpose shows."""
    i, j, k = np.indices(shape)
    hu = (-500 + offset + i + 10 * j + 100 * k).astype(np.int16)
    return Image(hu, np.asarray(spacing, float), np.asarray(origin, float), np.eye(3) if direction is None else direction)


def write_series(folder, image=None, **kw):
    image = small_ct() if image is None else image
    return image, write_ct_series(folder, image, **kw)


def message_of(excinfo) -> str:
    return str(excinfo.value)


# --- the real series -----------------------------------------------------------------


def test_real_series_equals_simpleitk_series_reader():
    folder = require_shared_data(*REAL_SERIES)
    image = read_image(folder)
    assert_same_as_sitk(image, sitk_series(folder))
    assert image.shape == (512, 512, 20)
    assert image.metadata["modality"] == "CT"
    assert image.metadata["series_description"] == "CT Body 3.0"
    assert image.metadata["slice_thickness"] == 3.0
    assert image.metadata["source"] == str(folder)


def test_real_series_is_in_hounsfield_units():
    # Stored values are 0..~2400 with RescaleIntercept -1024: without rescaling air would read about +24.
    image = read_dicom_series(require_shared_data(*REAL_SERIES))
    air_in_front_of_patient = image.array[240:270, 50:80, :]
    soft_tissue_in_abdomen = image.array[226:286, 270:330, :]
    assert abs(np.median(air_in_front_of_patient) + 1000) < 30
    assert -100 < np.median(soft_tissue_in_abdomen) < 150
    assert image.array.min() >= -1024


def test_real_series_listing_orders_files_by_position():
    folder = require_shared_data(*REAL_SERIES)
    (info,) = list_dicom_series(folder)
    assert info.uid == ""  # this anonymised series has an empty SeriesInstanceUID
    assert (info.modality, info.description, info.num_files) == ("CT", "CT Body 3.0", 20)
    assert list(info.files) == real_slices_by_z(folder)


def test_real_series_with_a_middle_slice_removed_is_refused(tmp_path):
    ordered = real_slices_by_z(require_shared_data(*REAL_SERIES))
    for n, path in enumerate(ordered):
        if n != 10:
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    text = message_of(e)
    assert "between slices 10 and 11 of 19" in text
    assert "4.00 mm, expected 2.00 mm" in text
    assert "missing slices?" in text


@pytest.mark.slow
def test_real_slices_copied_into_two_series_need_a_choice(tmp_path):
    ordered = real_slices_by_z(require_shared_data(*REAL_SERIES))
    copy_uid = pydicom.uid.generate_uid()
    for path in ordered:
        shutil.copy(path, tmp_path / path.name)
        # The copy is a second series whose intercept differs, so reading it is distinguishable.
        copy = tmp_path / f"copy_{path.name}"
        shutil.copy(path, copy)
        edit_dicom(copy, SeriesInstanceUID=copy_uid, SeriesDescription="CT Body copy", RescaleIntercept=-1000)
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    text = message_of(e)
    assert "2 DICOM image series" in text and "series_uid" in text and "--series" in text
    assert copy_uid in text and "'CT Body copy'" in text and "'CT Body 3.0'" in text
    assert text.count("20 file(s)") == 2

    original = read_image(tmp_path, series_uid="")
    assert_same_as_sitk(original, sitk_series(tmp_path, ""))
    copy = read_dicom_series(tmp_path, series_uid=copy_uid)
    assert_same_as_sitk(copy, sitk_series(tmp_path, copy_uid))
    np.testing.assert_array_equal(copy.array.astype(np.int32), original.array.astype(np.int32) + 24)
    assert copy.metadata["series_uid"] == copy_uid


# --- synthetic series: geometry and values --------------------------------------------------


@pytest.mark.parametrize("direction", [np.eye(3), rotation_x(20), np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]])], ids=["axial", "oblique", "coronal"])
def test_synthetic_series_reads_back_voxels_and_geometry(tmp_path, direction):
    image, _ = write_series(tmp_path, small_ct(direction=direction), shuffle_names=True)
    result = read_image(tmp_path)
    np.testing.assert_array_equal(result.array, image.array)
    np.testing.assert_allclose(result.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(result.origin, image.origin, atol=1e-5)
    np.testing.assert_allclose(result.direction, image.direction, atol=1e-6)
    assert_same_as_sitk(result, sitk_series(tmp_path, list_dicom_series(tmp_path)[0].uid))


def test_slices_stacked_against_the_normal_come_back_in_normal_order(tmp_path):
    # The writer's slice axis is -z, so instance numbers run opposite to cross(row, col).
    flipped = np.column_stack([[1, 0, 0], [0, 1, 0], [0, 0, -1]])
    image, paths = write_series(tmp_path, small_ct(direction=flipped))
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array[:, :, ::-1])
    np.testing.assert_allclose(result.origin, image.origin + (image.shape[2] - 1) * image.spacing[2] * flipped[:, 2])
    np.testing.assert_allclose(result.direction, np.eye(3), atol=1e-6)
    assert list(list_dicom_series(tmp_path)[0].files) == paths[::-1]


def test_metadata_names_the_series(tmp_path):
    write_series(tmp_path, series_uid="1.2.3.4", study_uid="1.2.3", description="chest", PatientID="P7")
    metadata = read_dicom_series(tmp_path).metadata
    assert metadata["series_uid"] == "1.2.3.4"
    assert metadata["study_uid"] == "1.2.3"
    assert metadata["patient_id"] == "P7"
    assert metadata["series_description"] == "chest"
    assert metadata["modality"] == "CT"
    assert metadata["slice_thickness"] == pytest.approx(2.5)
    assert metadata["num_slices"] == 4
    assert "skipped_files" not in metadata


def test_slices_with_different_rescale_keep_their_fractions(tmp_path):
    # Slices 0-2 are stored with slope 1 (integer HU), slices 3-5 with slope 0.5 (half HU);
    # the series reader takes its pixel type from the first file unless told otherwise.
    whole = small_ct(shape=(6, 5, 6)).array.astype(np.float64)
    whole[:, :, 3:] += 0.5
    first = Image(whole[:, :, :3], [0.8, 0.7, 2.5], [0, 0, 0])
    second = Image(whole[:, :, 3:], [0.8, 0.7, 2.5], [0, 0, 7.5])
    write_ct_series(tmp_path, first, series_uid="1.2.9", study_uid="1.2", name_prefix="A")
    write_ct_series(tmp_path, second, series_uid="1.2.9", study_uid="1.2", name_prefix="B", slope=0.5, intercept=-1000)
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, whole)


def test_enhanced_ct_multiframe_file_reads_like_a_series(tmp_path):
    image = small_ct(shape=(6, 5, 5), direction=rotation_x(15))
    write_enhanced_ct(tmp_path / "enhanced.dcm", image)
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array)
    np.testing.assert_allclose(result.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(result.origin, image.origin, atol=1e-5)
    np.testing.assert_allclose(result.direction, image.direction, atol=1e-5)


def test_enhanced_ct_frames_stored_in_reverse_keep_their_positions(tmp_path):
    image = small_ct(shape=(6, 5, 5))
    write_enhanced_ct(tmp_path / "enhanced.dcm", image, frame_order=[4, 3, 2, 1, 0])
    result = read_dicom_series(tmp_path)
    # Whatever the stacking, each voxel value must sit at the same physical point as in the source.
    for ijk in [(0, 0, 0), (5, 4, 4), (2, 3, 1)]:
        source_ijk = np.round(image.physical_to_index(result.index_to_physical(ijk))).astype(int)
        assert result.array[ijk] == image.array[tuple(source_ijk)]


@pytest.mark.parametrize(
    "frame_order, expected",
    [([0, 2, 1, 3, 4], "not stored in position order"), ([0, 1, 3, 4], "missing frames?")],
    ids=["shuffled", "missing-frame"],
)
def test_broken_enhanced_ct_is_refused(tmp_path, frame_order, expected):
    write_enhanced_ct(tmp_path / "enhanced.dcm", small_ct(shape=(6, 5, 5)), frame_order=frame_order)
    with pytest.raises(ImageError, match=expected):
        read_dicom_series(tmp_path)


def test_position_jitter_within_rounding_is_accepted(tmp_path):
    image, paths = write_series(tmp_path, small_ct(shape=(6, 5, 6)))
    edit_dicom(paths[2], ImagePositionPatient=list(image.origin + [0, 0, 2 * 2.5 + 0.004]))
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array)


def test_progress_is_reported_to_the_end(tmp_path):
    write_series(tmp_path)
    seen = []
    read_dicom_series(tmp_path, progress=lambda fraction, message: seen.append(fraction))
    assert seen and seen[-1] == 1.0
    assert all(0 <= f <= 1 for f in seen if f is not None)


# --- choosing among several series -------------------------------------------------------


def test_two_synthetic_series_need_a_choice(tmp_path):
    first, first_paths = write_series(tmp_path, small_ct(), series_uid="1.2.111", description="first", name_prefix="A")
    second, second_paths = write_series(tmp_path, small_ct(shape=(6, 5, 3), offset=7), series_uid="1.2.222", description="second", name_prefix="B")
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    text = message_of(e)
    assert "2 DICOM image series" in text and "series_uid" in text
    assert "1.2.111 | CT | 'first' | 4 file(s)" in text
    assert "1.2.222 | CT | 'second' | 3 file(s)" in text
    np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid="1.2.222").array, second.array)
    np.testing.assert_array_equal(read_image(tmp_path, series_uid="1.2.111").array, first.array)

    listed = {info.uid: info for info in list_dicom_series(tmp_path)}
    assert list(listed["1.2.111"].files) == first_paths
    assert list(listed["1.2.222"].files) == second_paths
    assert (listed["1.2.222"].description, listed["1.2.222"].modality, listed["1.2.222"].num_files) == ("second", "CT", 3)


def test_unknown_series_uid_names_the_available_ones(tmp_path):
    write_series(tmp_path, series_uid="1.2.111", description="first")
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path, series_uid="9.9.9")
    assert "9.9.9" in message_of(e) and "1.2.111" in message_of(e)


# --- broken series ------------------------------------------------------------------------


def test_missing_slice_is_refused_with_its_place(tmp_path):
    _, paths = write_series(tmp_path, small_ct(shape=(6, 5, 6)))
    paths[3].unlink()
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    text = message_of(e)
    assert "between slices 3 and 4 of 5" in text
    assert "5.00 mm, expected 2.50 mm" in text
    assert "missing slices?" in text


def test_uneven_spacing_is_refused(tmp_path):
    image, paths = write_series(tmp_path, small_ct(shape=(6, 5, 6)))
    edit_dicom(paths[2], ImagePositionPatient=list(image.origin + [0, 0, 2 * 2.5 + 0.6]))
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    text = message_of(e)
    assert "uneven slice spacing" in text
    assert "3.10 mm, expected 2.50 mm" in text and "1.90 mm, expected 2.50 mm" in text
    assert "missing slices?" not in text


def test_two_slices_at_one_position_are_refused(tmp_path):
    image, paths = write_series(tmp_path)
    edit_dicom(paths[2], ImagePositionPatient=list(image.origin + [0, 0, 2.5]))
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "share a position" in message_of(e)
    assert paths[1].name in message_of(e) and paths[2].name in message_of(e)


def test_slices_of_different_orientation_are_refused(tmp_path):
    _, paths = write_series(tmp_path)
    tilted = rotation_x(5)
    edit_dicom(paths[1], ImageOrientationPatient=[*tilted[:, 0], *tilted[:, 1]])
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "differ in orientation" in message_of(e) and paths[1].name in message_of(e)


def test_gantry_tilt_is_refused(tmp_path):
    image, paths = write_series(tmp_path, small_ct(shape=(6, 5, 6)))
    for k, path in enumerate(paths):
        # Each slice steps 2.5 mm up and 2.5 * tan(10 degrees) mm back, as on a tilted gantry.
        edit_dicom(path, ImagePositionPatient=list(image.origin + [0, k * 2.5 * np.tan(np.radians(10)), k * 2.5]))
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "gantry tilt of about 10.0 degrees" in message_of(e)


def test_localizer_mixed_into_a_series_is_refused(tmp_path):
    _, paths = write_series(tmp_path)
    edit_dicom(paths[0], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "localizer" in message_of(e) and paths[0].name in message_of(e)


def test_single_slice_is_refused_as_2d(tmp_path):
    write_series(tmp_path, small_ct(shape=(6, 5, 1)))
    with pytest.raises(ImageError, match="single slice.*2-D"):
        read_dicom_series(tmp_path)


def test_slice_without_position_is_refused(tmp_path):
    _, paths = write_series(tmp_path)
    edit_dicom(paths[2], ImagePositionPatient=None)
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "ImagePositionPatient" in message_of(e) and paths[2].name in message_of(e)


def test_slices_of_different_size_are_refused(tmp_path):
    write_series(tmp_path, small_ct(shape=(6, 5, 2)), series_uid="1.2.5", name_prefix="A")
    write_series(tmp_path, small_ct(shape=(7, 5, 2), origin=(-10, 20, -25)), series_uid="1.2.5", name_prefix="B")
    with pytest.raises(ImageError, match="matrix size"):
        read_dicom_series(tmp_path)


# --- what else lies in the folder ------------------------------------------------------------


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(ImageError, match="no DICOM image files"):
        read_dicom_series(tmp_path)


def test_folder_of_non_dicom_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert "no DICOM image files" in message_of(e) and "notes.txt" in message_of(e)


def test_junk_and_non_image_dicom_beside_a_series_are_skipped_and_reported(tmp_path):
    image, paths = write_series(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    # A structure set: DICOM, but without pixels.
    rtstruct = pydicom.dcmread(paths[0])
    rtstruct.file_meta.MediaStorageSOPClassUID = rtstruct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rtstruct.Modality = "RTSTRUCT"
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(rtstruct, keyword)
    rtstruct.save_as(tmp_path / "rtstruct.dcm")
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array)
    assert sorted(result.metadata["skipped_files"]) == ["notes.txt", "rtstruct.dcm"]


def test_truncated_slice_is_named(tmp_path):
    _, paths = write_series(tmp_path)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-20])  # pixel data cut short, header intact
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert f"{paths[2].name} is corrupt or truncated" in message_of(e)


def test_slice_cut_inside_its_header_is_not_silently_dropped(tmp_path):
    _, paths = write_series(tmp_path)
    paths[3].write_bytes(paths[3].read_bytes()[:600])  # the last slice, cut before Rows
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "cannot be read" in message_of(e) and paths[3].name in message_of(e)


def test_garbage_after_dicom_preamble_is_not_silently_dropped(tmp_path):
    write_series(tmp_path)
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(0).bytes(200))
    with pytest.raises(ImageError) as e:
        read_dicom_series(tmp_path)
    assert "broken.dcm" in message_of(e)


def test_series_in_a_subfolder_needs_recursive(tmp_path):
    image, _ = write_series(tmp_path / "patient" / "series1")
    with pytest.raises(ImageError, match="subfolders"):
        read_dicom_series(tmp_path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path, recursive=True).array, image.array)
    assert list_dicom_series(tmp_path) == []
    assert len(list_dicom_series(tmp_path, recursive=True)) == 1


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ImageError, match="no such folder"):
        read_dicom_series(tmp_path / "absent")


# --- writing a series ----------------------------------------------------------------------------

WRITE_GEOMETRIES = ["lps", "oblique20", "aniso_0.7x0.7x5"]


def sitk_read_files(folder):
    """An independent reading of a written folder: GDCM's own file list and series reader."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_grid(result: Image, image: Image, atol: float = 1e-4) -> None:
    assert result.shape == image.shape
    np.testing.assert_allclose(result.spacing, image.spacing, atol=atol)
    np.testing.assert_allclose(result.origin, image.origin, atol=atol)
    np.testing.assert_allclose(result.direction, image.direction, atol=atol)


def folder_state(folder) -> dict:
    """Every file in ``folder`` (hidden ones too) with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("geometry", WRITE_GEOMETRIES)
def test_written_int16_series_reads_back_identically(tmp_path, geometry):
    image = body_phantom(**GEOMETRIES[geometry])
    assert image.array.dtype == np.int16
    paths = write_dicom_series(image, tmp_path / "out")
    assert len(paths) == image.shape[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temporary files left
    result = read_dicom_series(tmp_path / "out")
    assert result.array.dtype == np.int16
    np.testing.assert_array_equal(result.array, image.array)
    assert_same_grid(result, image)
    assert result.metadata["series_description"] == "CT-FM"
    assert result.metadata["modality"] == "CT"


@pytest.mark.parametrize("geometry", WRITE_GEOMETRIES)
def test_written_series_reads_identically_with_simpleitk(tmp_path, geometry):
    image = body_phantom(**GEOMETRIES[geometry])
    write_dicom_series(image, tmp_path)
    ref = sitk_read_files(tmp_path)
    assert ref.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref).transpose(2, 1, 0), image.array)
    np.testing.assert_allclose(ref.GetSpacing(), image.spacing, atol=1e-4)
    np.testing.assert_allclose(ref.GetOrigin(), image.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(ref.GetDirection(), (3, 3)), image.direction, atol=1e-4)


def test_written_headers_place_each_slice(tmp_path):
    image = body_phantom(**GEOMETRIES["odd_sizes"], direction=rotation_x(20))
    paths = write_dicom_series(image, tmp_path, series_uid="1.2.3.44", SeriesNumber=901)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert ds.SeriesInstanceUID == "1.2.3.44" and ds.SeriesNumber == 901
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (image.shape[1], image.shape[0])
        assert (ds.PixelRepresentation, float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1, 1.0, 0.0)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], image.index_to_physical((0, 0, k)), atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [*image.direction[:, 0], *image.direction[:, 1]], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [2.0, 2.5])  # between rows (j), between columns (i)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 4.0
        # Pixel rows run along j: row 3, column 5 of slice k is voxel [5, 3, k].
        assert ds.pixel_array[3, 5] == image.array[5, 3, k]


def test_float_image_comes_back_within_the_documented_quantisation(tmp_path):
    image = body_phantom(**GEOMETRIES["float32"], noise_hu=20.0, seed=3)
    values = image.array.astype(np.float64)
    assert not np.array_equal(values, np.rint(values))  # fractions that int16 cannot hold as they are
    paths = write_dicom_series(image, tmp_path)
    # Documented: min..max spread over all 65536 int16 steps, so half a step is (max - min) / 131070.
    bound = (values.max() - values.min()) / 131070
    result = read_dicom_series(tmp_path)
    error = np.abs(result.array.astype(np.float64) - values)
    assert error.max() <= bound * (1 + 1e-6)
    assert error.max() < 1e-5 * (values.max() - values.min())
    assert_same_grid(result, image)
    ref = sitk.GetArrayFromImage(sitk_read_files(tmp_path)).transpose(2, 1, 0)
    np.testing.assert_array_equal(ref, result.array)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) != 1.0


def test_float_image_of_whole_hu_is_stored_exactly(tmp_path):
    image = body_phantom(**GEOMETRIES["float32"], noise_hu=0.0)
    paths = write_dicom_series(image, tmp_path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path).array, image.array)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)


def test_integers_beyond_int16_are_stored_exactly_with_an_intercept(tmp_path):
    i, j, k = np.indices((6, 5, 4))
    values = (40000 + 1000 * i + 100 * j + 7 * k).astype(np.uint16)  # all above 32767
    write_dicom_series(Image(values, [1.0, 1.0, 2.0]), tmp_path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path).array, values)


def test_left_handed_grid_comes_back_reversed_at_the_same_points(tmp_path):
    flipped = np.column_stack([[1, 0, 0], [0, 1, 0], [0, 0, -1]])
    image = small_ct(direction=flipped)
    write_dicom_series(image, tmp_path)
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array[:, :, ::-1])
    np.testing.assert_allclose(result.origin, image.index_to_physical((0, 0, image.shape[2] - 1)), atol=1e-4)
    np.testing.assert_allclose(result.direction, np.eye(3), atol=1e-6)


def test_patient_and_study_come_from_the_source_series(tmp_path):
    write_ct_series(tmp_path / "source", small_ct(), study_uid="1.2.77", PatientID="P7", PatientName="Doe^Jane")
    source = read_dicom_series(tmp_path / "source")
    derived = source.with_array(source.array // 2)

    write_dicom_series(derived, tmp_path / "copy")
    fresh = Image(derived.array, derived.spacing, derived.origin, derived.direction)  # no metadata of its own
    write_dicom_series(fresh, tmp_path / "referenced", reference=source, description="halved")
    for name in ("copy", "referenced"):
        written = read_dicom_series(tmp_path / name)
        np.testing.assert_array_equal(written.array, derived.array)
        assert written.metadata["study_uid"] == "1.2.77"
        assert written.metadata["patient_id"] == "P7"
        assert written.metadata["patient_name"] == "Doe^Jane"
        assert written.metadata["frame_of_reference_uid"] == source.metadata["frame_of_reference_uid"]
        assert written.metadata["series_uid"] != source.metadata["series_uid"]
    assert read_dicom_series(tmp_path / "referenced").metadata["series_description"] == "halved"
    assert read_dicom_series(tmp_path / "copy").metadata["series_uid"] != read_dicom_series(tmp_path / "referenced").metadata["series_uid"]
    # The reference's identity wins over the image's own metadata; an explicit study UID wins over both.
    stranger = derived.with_array(derived.array, patient_id="OTHER", study_uid="9.9")
    write_dicom_series(stranger, tmp_path / "stranger", reference=source)
    metadata = read_dicom_series(tmp_path / "stranger").metadata
    assert (metadata["patient_id"], metadata["study_uid"]) == ("P7", "1.2.77")
    write_dicom_series(derived, tmp_path / "other", study_uid="1.2.88")
    assert read_dicom_series(tmp_path / "other").metadata["study_uid"] == "1.2.88"


def test_folder_holding_dicom_files_is_refused_and_left_untouched(tmp_path):
    write_ct_series(tmp_path, small_ct(), name_prefix="CT", shuffle_names=False)  # CT0000.dcm ...
    (tmp_path / "notes.txt").write_text("keep me")
    before = folder_state(tmp_path)
    with pytest.raises(ImageError) as e:
        write_dicom_series(small_ct(offset=3), tmp_path)
    assert "already holds 4 DICOM file(s)" in message_of(e)
    with pytest.raises(ImageError, match="already holds"):
        write_image(small_ct(offset=3), tmp_path)
    assert folder_state(tmp_path) == before


def test_files_with_the_series_names_are_never_overwritten(tmp_path):
    # Not DICOM, so the folder is accepted, but a file already has a name the writer wants.
    (tmp_path / "CT0002.dcm").write_text("someone's notes")
    before = folder_state(tmp_path)
    with pytest.raises(ImageError, match="never overwritten"):
        write_dicom_series(small_ct(), tmp_path)
    assert folder_state(tmp_path) == before


def test_other_files_may_stay_beside_a_written_series(tmp_path):
    (tmp_path / "README.txt").write_text("series written by CT-FM")
    image = small_ct()
    write_dicom_series(image, tmp_path)
    assert (tmp_path / "README.txt").read_text() == "series written by CT-FM"
    result = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(result.array, image.array)
    assert result.metadata["skipped_files"] == ["README.txt"]


def cancel_on_second_report(seen: list):
    """A progress callback that records fractions and cancels on its second call."""

    def report(fraction, message):
        seen.append(fraction)
        if len(seen) == 2:
            raise Cancelled()

    return report


def test_cancelled_write_removes_what_it_wrote(tmp_path):
    image = small_ct(shape=(6, 5, 25))
    seen = []
    with pytest.raises(Cancelled):
        write_dicom_series(image, tmp_path / "new" / "series", progress=cancel_on_second_report(seen))
    assert 0 < seen[1] < 1  # some slices were written before the cancel
    # The series folder it made is gone, and so is the parent it made for it (issue 14: leave nothing behind).
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "kept").mkdir()  # a folder the caller made stays, empty
    with pytest.raises(Cancelled):
        write_dicom_series(image, tmp_path / "kept", progress=cancel_on_second_report([]))
    assert list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image(np.full((4, 4, 3), np.nan, np.float32)), "NaN or infinite"),
        (Image(np.zeros((4, 4, 3), np.int16), direction=[[1, 0.2, 0], [0, 1, 0], [0, 0, 1]]), "not orthonormal"),
    ],
    ids=["nan", "sheared"],
)
def test_images_dicom_cannot_hold_are_refused_before_writing(tmp_path, image, expected):
    with pytest.raises(ImageError, match=expected):
        write_dicom_series(image, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_image_to_a_folder_writes_a_dicom_series(tmp_path):
    image = body_phantom(**GEOMETRIES["oblique20"])
    (tmp_path / "empty").mkdir()
    assert write_image(image, tmp_path / "empty") == tmp_path / "empty"
    assert write_image(image, tmp_path / "new_series") == tmp_path / "new_series"  # no suffix: a folder
    for name in ("empty", "new_series"):
        assert all(pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT" for p in (tmp_path / name).iterdir())
        result = read_image(tmp_path / name)
        np.testing.assert_array_equal(result.array, image.array)
        assert_same_grid(result, image)
    # Files keep their formats.
    nifti = write_image(image, tmp_path / "ct.nii.gz")
    assert nifti.is_file()
    np.testing.assert_array_equal(read_image(nifti).array, image.array)
    with pytest.raises(ImageError, match="folder without a suffix"):
        write_image(image, tmp_path / "ct.dcm")
