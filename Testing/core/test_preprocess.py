"""Preprocessing equals the model card's MONAI pipeline, and model outputs map back onto the input grid exactly."""

import numpy as np
import pytest

from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.preprocess import PreprocessConfig, axis_codes, preprocess, validate_ct

SIX = ["ras", "lps", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "int16", "float32", "permuted"]


def model_card_transform():
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange

    return Compose([
        LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
        ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground(),
    ])


def scaled(hu):
    return np.clip((np.asarray(hu, np.float32) + 1024) / 3072, 0, 1)


@pytest.mark.parametrize("name", ["example_ct.nii.gz", "example_ct_sm.nii.gz"])
def test_equals_model_card_pipeline_on_real_ct(name):
    from ctfm_testing.data import require_shared_data

    path = require_shared_data("totalsegmentator_example", name)
    ref = np.asarray(model_card_transform()(str(path))[0])
    pre = preprocess(read_image(path))
    assert pre.array.shape == ref.shape
    np.testing.assert_array_equal(pre.array, ref)


@pytest.mark.parametrize("geometry", SIX)
def test_equals_model_card_pipeline_in_every_geometry(geometry, tmp_path):
    image = body_phantom(**GEOMETRIES[geometry])
    path = write_image(image, tmp_path / "phantom.nii.gz")
    ref = np.asarray(model_card_transform()(str(path))[0])
    pre = preprocess(read_image(path))
    assert pre.array.shape == ref.shape
    np.testing.assert_allclose(pre.array, ref, atol=1e-6)


@pytest.mark.parametrize("geometry", SIX)
def test_identity_output_maps_back_voxel_exact(geometry):
    image, labels = body_phantom(**GEOMETRIES[geometry], return_labels=True)
    pre = preprocess(image)
    back = pre.to_input_image(pre.array, mode="linear")
    assert back.geometry.same_grid(image.geometry, atol=0)
    np.testing.assert_array_equal(back.array, scaled(image.array))

    # A label output where each model voxel carries its own id: every input voxel
    # must get the id of the model voxel at the same physical point.
    ids = np.arange(pre.array.size, dtype=np.int64).reshape(pre.array.shape) + 1
    back_ids = pre.to_input(ids, mode="nearest", fill=0)
    ijk = np.argwhere(np.ones(image.shape, bool))
    model_idx = np.rint(pre.geometry.physical_to_index(image.index_to_physical(ijk))).astype(int)
    inside = np.all((model_idx >= 0) & (model_idx < np.array(pre.array.shape)), axis=1)
    expected = np.zeros(len(ijk), np.int64)
    expected[inside] = ids[tuple(model_idx[inside].T)]
    np.testing.assert_array_equal(back_ids[tuple(ijk.T)], expected)
    assert inside.sum() == pre.array.size  # the crop keeps exactly the model grid


@pytest.mark.parametrize("geometry", SIX)
def test_model_space_is_spl_and_left_stays_left(geometry):
    image, labels = body_phantom(**GEOMETRIES[geometry], return_labels=True)
    pre = preprocess(image)
    assert axis_codes(pre.geometry.direction) == "SPL"
    # carry the labels through the same steps: orientation and crop, as a model output would be
    pre_labels = preprocess(image.with_array(np.where(labels.array > 0, 0, -2000).astype(np.float32)),
                            PreprocessConfig(crop_foreground=False), validate=False)
    assert pre_labels.oriented_shape == pre.oriented_shape
    oriented_labels = np.transpose(labels.array, pre.perm)[tuple(slice(None, None, -1) if f else slice(None) for f in pre.flip)]
    box = tuple(slice(s, e) for s, e in zip(pre.crop_start, pre.crop_end))
    model_labels = oriented_labels[box]
    k_marker = np.argwhere(model_labels == BODY_LABELS["left_marker"])[:, 2].mean()
    k_liver = np.argwhere(model_labels == BODY_LABELS["liver"])[:, 2].mean()
    assert k_marker > k_liver  # axis 2 runs toward the patient's Left
    j_spine = np.argwhere(model_labels == BODY_LABELS["vertebra"])[:, 1].mean()
    j_aorta = np.argwhere(model_labels == BODY_LABELS["aorta"])[:, 1].mean()
    assert j_spine > j_aorta  # axis 1 runs toward Posterior
    # and the marker's model voxels sit where the marker is in the patient
    marker_lps = image.index_to_physical(np.argwhere(labels.array == BODY_LABELS["left_marker"])).mean(0)
    model_marker = pre.geometry.index_to_physical(np.argwhere(model_labels == BODY_LABELS["left_marker"])).mean(0)
    np.testing.assert_allclose(model_marker, marker_lps, atol=1e-6)
    assert marker_lps[0] > 0  # LPS +x is the patient's left


@pytest.mark.parametrize("geometry", ["lps", "oblique20", "aniso_0.7x0.7x5", "odd_sizes"])
def test_resampled_pipeline_maps_back_onto_the_input_grid(geometry):
    image, labels = body_phantom(**{**GEOMETRIES[geometry], "noise_hu": 0}, return_labels=True)
    pre = preprocess(image, PreprocessConfig(spacing=(3.0, 1.0, 1.0)))
    np.testing.assert_allclose(pre.geometry.spacing, [3.0, 1.0, 1.0])
    back = pre.to_input_image(pre.array, mode="linear")
    assert back.geometry.same_grid(image.geometry, atol=0)
    # down- and up-sampling blurs edges but must not shift anatomy: the marker comes back in place
    marker = labels.array == BODY_LABELS["left_marker"]
    bright = back.array > scaled(1100)  # above any bone: only the (blurred) 2000 HU marker
    assert bright.sum() > 0
    c_true = image.index_to_physical(np.argwhere(marker)).mean(0)
    c_back = image.index_to_physical(np.argwhere(bright)).mean(0)
    assert np.linalg.norm(c_true - c_back) < 2.0
    labels_back = pre.to_input(np.rint(pre.array * 100).astype(np.int16), mode="nearest")
    assert labels_back.dtype == np.int16 and labels_back.shape == image.shape


def test_clear_errors_for_inputs_ctfm_cannot_use():
    base = body_phantom(**GEOMETRIES["lps"])
    with pytest.raises(ImageError, match="single slice"):
        validate_ct(Image(base.array[:, :, :1]))
    nan = base.array.astype(np.float32)
    nan[3, 3, 3] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        validate_ct(base.with_array(nan))
    with pytest.raises(ImageError, match="Hounsfield"):
        validate_ct(base.with_array(scaled(base.array)))
    with pytest.raises(ImageError, match="modality is MR"):
        validate_ct(Image(base.array, metadata={"modality": "MR"}))
    with pytest.raises(ImageError, match="all air"):
        preprocess(base.with_array(np.full(base.shape, -1024, np.int16)), validate=False)
    with pytest.raises(ImageError, match="3-D"):
        Image(np.zeros((4, 4)))
    with pytest.raises(ImageError, match="3-D"):
        Image(np.zeros((4, 4, 4, 2)))


def test_reading_2d_and_4d_and_corrupt_files_fails_clearly(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp_path / "slice.nrrd"))
    with pytest.raises(ImageError, match="3-D"):
        read_image(tmp_path / "slice.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.int16), isVector=False), str(tmp_path / "vol4d.nii.gz"))
    with pytest.raises(ImageError, match="3-D"):
        read_image(tmp_path / "vol4d.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageError, match="corrupt"):
        read_image(tmp_path / "broken.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_cut_off_nifti_is_refused_not_zero_filled(tmp_path, suffix):
    """ITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros."""
    whole = write_image(body_phantom(**GEOMETRIES["lps"]), tmp_path / f"whole{suffix}").read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: int(len(whole) * 0.9)])
    with pytest.raises(ImageError, match="truncated"):
        read_image(cut)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_write_read_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    image = body_phantom(**GEOMETRIES["oblique20"])
    back = read_image(write_image(image, tmp_path / f"out{suffix}"))
    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry.same_grid(image.geometry, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
