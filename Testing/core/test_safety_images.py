"""Reading and validating images (issue 14, findings A15, A16 and A21's error texts of
``../shared/reviews/adversarial.md``; section B's "Images" items keep a test here or in
test_dicom.py / test_preprocess.py).

Every hostile file is built here: NIfTI headers by hand with ``struct`` (so pixdim, byte order,
scaling and offsets are exactly what a test says), NRRD and MetaImage headers as text plus raw
bytes, DICOM series with pydicom (:mod:`ctfm_testing.synthetic_dicom`). A "clean twin" of each
hostile file is read too, so a refusal is known to come from the defect and not from the writer.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctfm_testing.hostile import assert_refused, ctfm, leftovers, small_ct, tiny_encoder
from ctfm_testing.synthetic_dicom import edit_dicom, write_ct_series, write_enhanced_ct
from CTFMLib.dicom import read_dicom_series
from CTFMLib.dicom_write import write_dicom_series
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.preprocess import validate_ct

# --- writers of hostile files ------------------------------------------------------------------------

_NIFTI_TYPES = {"int8": 256, "uint8": 2, "int16": 4, "uint16": 512, "int32": 8, "float32": 16, "float64": 64}


def nifti(path, array, pixdim=(1.0, 1.0, 1.0), order="<", slope=1.0, inter=0.0, vox_offset=352, dim=None,
          sform=None, data=None) -> Path:
    """A NIfTI-1 file written byte by byte (``.gz`` compressed by name): voxels ``array[i, j, k]``.

    ``dim`` overrides the header's dimensions (a header that claims more than the file holds);
    ``sform`` (3x4) sets sform_code 1 with those rows; ``data`` replaces the voxel bytes.
    """
    array = np.asarray(array)
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    shape = array.shape if dim is None else dim
    struct.pack_into(order + "8h", header, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into(order + "2h", header, 70, _NIFTI_TYPES[array.dtype.name], array.dtype.itemsize * 8)
    struct.pack_into(order + "8f", header, 76, 1.0, *pixdim, *([0.0] * (7 - len(pixdim))))
    struct.pack_into(order + "3f", header, 108, vox_offset, slope, inter)
    if sform is not None:
        struct.pack_into(order + "h", header, 254, 1)
        struct.pack_into(order + "12f", header, 280, *np.asarray(sform, dtype=np.float64).reshape(-1))
    header[344:348] = b"n+1\0"
    voxels = array.astype(array.dtype.newbyteorder(order)).tobytes(order="F") if data is None else data
    raw = bytes(header) + b"\0" * (vox_offset - 348) + voxels
    path = Path(path)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def nrrd(path, array, directions="(1,0,0) (0,1,0) (0,0,1)", origin="(0,0,0)", sizes=None, data=None,
         encoding="raw") -> Path:
    """An NRRD file with a text header; ``array`` int16 ``[i, j, k]`` (or float32)."""
    array = np.asarray(array)
    kind = {"int16": "short", "float32": "float"}[array.dtype.name]
    sizes = " ".join(str(n) for n in (array.shape if sizes is None else sizes))
    body = array.astype(array.dtype.newbyteorder("<")).tobytes(order="F") if data is None else data
    if encoding == "gzip":
        body = gzip.compress(body)
    header = (f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
              f"space directions: {directions}\nkinds: domain domain domain\nendian: little\n"
              f"encoding: {encoding}\nspace origin: {origin}\n\n")
    path = Path(path)
    path.write_bytes(header.encode() + body)
    return path


def mha(path, array, spacing="1 1 1", offset="0 0 0", matrix="1 0 0 0 1 0 0 0 1", dims=None, data=None) -> Path:
    """A MetaImage file (header text + raw int16 data, ``ElementDataFile = LOCAL``)."""
    array = np.asarray(array, dtype=np.int16)
    dims = " ".join(str(n) for n in (array.shape if dims is None else dims))
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = False\nTransformMatrix = {matrix}\nOffset = {offset}\nElementSpacing = {spacing}\n"
              f"DimSize = {dims}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    body = array.astype("<i2").tobytes(order="F") if data is None else data
    path = Path(path)
    path.write_bytes(header.encode() + body)
    return path


def ct_values(shape=(10, 9, 8), seed=0) -> np.ndarray:
    """HU-like values with air, so a clean twin passes :func:`validate_ct`."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    values[0] = -1000
    return values


def message(excinfo) -> str:
    return str(excinfo.value)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("tiny-enc") / "enc")


def embed(image, encoder, out) -> object:
    return ctfm("embed", image, "--weights", encoder, "--out", out, "--device", "cpu")


# --- A15: NaN voxels in NIfTI ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype, order",
    [("f32.nii", "float32", "<"), ("f32be.nii.gz", "float32", ">"), ("f64.nii.gz", "float64", "<"),
     ("f64be.nii", "float64", ">")],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a15_nan_and_inf_voxels_in_nifti_are_refused(tmp_path, name, dtype, order, bad):
    """A15: SimpleITK's NIfTI reader returns 0 for NaN (and inf) voxels; the raw data is checked instead."""
    values = ct_values().astype(dtype)
    clean = read_image(nifti(tmp_path / f"clean_{name}", values, order=order))
    np.testing.assert_array_equal(clean.array, values)
    values[1, 2, 3] = values[4, 5, 6] = values[9, 8, 7] = bad
    with pytest.raises(ImageError) as e:
        read_image(nifti(tmp_path / name, values, order=order))
    assert "contains 3 NaN or infinite voxels" in message(e)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a15_nan_count_is_exact_where_values_straddle_read_chunks(tmp_path, suffix):
    """A15: the one pass reads a 540-byte header, then 4 MiB chunks; float64 voxels after the
    352-byte header straddle both boundaries (bytes 540 and 540 + 4 MiB), and each must count once."""
    values = np.full((90, 90, 75), -1000.0)  # 607,500 float64 voxels: 4.86 MB, past the second chunk
    flat = values.reshape(-1, order="F")
    first_split = (540 - 352) // 8  # voxel 23 holds bytes 536..543
    second_split = (540 + (1 << 22) - 352) // 8
    for index in (0, first_split, first_split + 1, second_split, second_split + 1, flat.size - 1):
        flat[index] = np.nan
    values = flat.reshape(values.shape, order="F")
    assert np.isnan(values).sum() == 6
    with pytest.raises(ImageError, match="contains 6 NaN or infinite voxels"):
        read_image(nifti(tmp_path / f"split{suffix}", values))


def test_a15_nifti2_header_is_read_for_nan_and_named(tmp_path):
    """A15: NIfTI-2 headers (540 bytes, 64-bit fields) are parsed too; this SimpleITK cannot read
    NIfTI-2 voxels, which is said in so many words."""
    nibabel = pytest.importorskip("nibabel")
    values = ct_values().astype(np.float64)
    nibabel.save(nibabel.Nifti2Image(values, np.eye(4)), tmp_path / "clean2.nii.gz")
    with pytest.raises(ImageError, match="NIfTI-2"):
        read_image(tmp_path / "clean2.nii.gz")
    values[3, 3, 3] = np.nan
    nibabel.save(nibabel.Nifti2Image(values, np.eye(4)), tmp_path / "nan2.nii.gz")
    with pytest.raises(ImageError, match="contains 1 NaN or infinite voxels"):
        read_image(tmp_path / "nan2.nii.gz")


def test_a15_nan_nifti_is_refused_by_embed_in_one_line(tmp_path, encoder):
    """A15: ``ctfm embed nan2.nii.gz`` exited 0 with the embedding of the scan with NaN read as 0 HU."""
    values = ct_values().astype(np.float32)
    values[2:6, 2:6, 2:6] = np.nan
    result = embed(nifti(tmp_path / "nan2.nii.gz", values), encoder, tmp_path / "e.npy")
    assert_refused(result, "nan2.nii.gz", "64 NaN or infinite voxels")
    assert not (tmp_path / "e.npy").exists() and leftovers(tmp_path) == []


def test_a21_all_nan_nifti_names_the_nan_not_the_value_range(tmp_path, encoder):
    """A21: an all-NaN NIfTI was reported as "voxel values span [0, 0]"."""
    result = embed(nifti(tmp_path / "allnan.nii.gz", np.full((10, 9, 8), np.nan, np.float32)), encoder, tmp_path / "e.npy")
    line = assert_refused(result, "720 NaN or infinite voxels")
    assert "span" not in line


def test_a15_nifti_scaling_that_cannot_give_numbers_is_refused(tmp_path):
    """A15 (scl_slope/scl_inter): an infinite slope, or a slope with a NaN intercept, cannot give HU;
    a NaN slope is NIfTI's "no scaling" (nibabel writes it) and keeps the stored values."""
    values = ct_values()
    unscaled = read_image(nifti(tmp_path / "nan_slope.nii", values, slope=math.nan, inter=math.nan))
    np.testing.assert_array_equal(unscaled.array, values)
    scaled = read_image(nifti(tmp_path / "scaled.nii", values, slope=2.0, inter=-24.0))
    np.testing.assert_array_equal(scaled.array, values * 2.0 - 24.0)
    for name, slope, inter in (("inf_slope.nii", math.inf, 0.0), ("nan_inter.nii.gz", 2.0, math.nan)):
        with pytest.raises(ImageError, match="scl_slope"):
            read_image(nifti(tmp_path / name, values, slope=slope, inter=inter))


# --- A16: geometry --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, spacing, axis",
    [("nrrd", (1e9, 1e9, 1e9), 0), ("nrrd", (1.0, 1e-9, 1.0), 1), ("nifti", (1.0, 1.0, 1e-9), 2),
     ("nifti", (80.0, 1.0, 1.0), 0), ("mha", (1.0, 100.0, 1.0), 1), ("mha", (1.0, 1.0, 0.04), 2)],
)
def test_a16_spacing_outside_0_05_to_50_mm_is_refused_naming_the_axis(tmp_path, fmt, spacing, axis):
    """A16: 1e9 and 1e-9 mm voxels were accepted (memory errors later, or "all air")."""
    values = ct_values()
    if fmt == "nrrd":
        directions = " ".join(f"({','.join(repr(s if a == b else 0.0) for b in range(3))})" for a, s in enumerate(spacing))
        path = nrrd(tmp_path / "s.nrrd", values, directions=directions)
    elif fmt == "nifti":
        path = nifti(tmp_path / "s.nii.gz", values, pixdim=spacing)
    else:
        path = mha(tmp_path / "s.mha", values, spacing=" ".join(repr(s) for s in spacing))
    with pytest.raises(ImageError) as e:
        read_image(path)
    assert f"axis {axis}" in message(e) and f"{spacing[axis]:g} mm" in message(e)


def test_a16_every_test_geometry_and_the_real_data_pass_the_grid_check():
    """A16's limits must not refuse real scans: every phantom grid of the suite, and the shared CT."""
    from ctfm_testing.data import require_shared_data
    from ctfm_testing.phantoms import GEOMETRIES, body_phantom
    from CTFMLib.image import check_read_geometry

    for name, geometry in GEOMETRIES.items():
        check_read_geometry(body_phantom(**geometry), name)
    folder = require_shared_data("totalsegmentator_example")
    for path in sorted(folder.glob("*.nii.gz")) + [folder / "example_ct_dicom"]:
        assert read_image(path).shape[0] > 100


def test_a16_spacing_at_the_limits_is_accepted(tmp_path):
    """A16's range is 0.05-50 mm inclusive; a clean grid at both ends reads unchanged."""
    image = Image(ct_values(), spacing=(0.05, 50.0, 1.0), origin=(-3.0, 4.0, 5.0))
    back = read_image(write_image(image, tmp_path / "edge.nrrd"))
    np.testing.assert_allclose(back.spacing, [0.05, 50.0, 1.0])
    np.testing.assert_array_equal(back.array, image.array)


@pytest.mark.parametrize("bad", [0.0, math.nan, math.inf])
@pytest.mark.parametrize("axis", [1, 3])
def test_a16_nifti_pixdim_zero_nan_or_inf_is_refused(tmp_path, bad, axis):
    """A16: ITK substitutes 1 mm for a NIfTI pixdim of 0, NaN or inf."""
    pixdim = [0.7, 0.7, 2.5]
    pixdim[axis - 1] = bad
    with pytest.raises(ImageError, match=rf"pixdim\[{axis}\]"):
        read_image(nifti(tmp_path / "pixdim.nii.gz", ct_values(), pixdim=pixdim))


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_a16_sheared_directions_are_refused(tmp_path, fmt):
    """A16: sheared NRRD ``space directions`` (and a MetaImage TransformMatrix) were accepted by ITK."""
    values = ct_values()
    if fmt == "nrrd":
        path = nrrd(tmp_path / "shear.nrrd", values, directions="(1,0,0) (0.5,1,0) (0,0,1)")
    else:
        path = mha(tmp_path / "shear.mha", values, matrix="1 0 0 0.5 1 0 0 0 1")
    with pytest.raises(ImageError, match="not orthonormal"):
        read_image(path)


def test_a16_sheared_image_from_elsewhere_is_refused_by_validate_ct():
    """A16: images that do not come from a file (Slicer volume nodes) meet the same grid check."""
    image = small_ct()
    validate_ct(image)
    sheared = Image(image.array, image.spacing, image.origin, [[1, 0.2, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ImageError, match="not orthonormal"):
        validate_ct(sheared)
    with pytest.raises(ImageError, match="axis 2"):
        validate_ct(Image(image.array, (1.0, 1.0, 1e9)))


def test_a21_colinear_nrrd_directions_are_named(tmp_path):
    """A21: two parallel NRRD axes were reported with ITK's last line, "(0 0 1)"."""
    with pytest.raises(ImageError) as e:
        read_image(nrrd(tmp_path / "colinear.nrrd", ct_values(), directions="(1,0,0) (1,0,0) (0,0,1)"))
    assert "not independent" in message(e) and "0 0 1" not in message(e)


@pytest.mark.parametrize("offset", ["nan 0 0", "0 inf 0", "0 0 x"])
def test_a16_non_finite_origin_is_refused(tmp_path, offset):
    """A16: MetaIO reads ``Offset = nan 0 0`` as the origin (0, 0, 0) without a word."""
    with pytest.raises(ImageError, match="Offset"):
        read_image(mha(tmp_path / "origin.mha", ct_values(), offset=offset))


def test_a21_truncated_metaimage_is_called_truncated(tmp_path):
    """A21: a cut-off .mha was reported as "Reason: No such file or directory"."""
    import SimpleITK as sitk

    image = small_ct()
    for compress in (False, True):
        whole = tmp_path / f"whole{int(compress)}.mha"
        sitk.WriteImage(sitk.GetImageFromArray(image.array.transpose(2, 1, 0)), str(whole), compress)
        cut = tmp_path / f"cut{int(compress)}.mha"
        cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.8)])
        with pytest.raises(ImageError) as e:
            read_image(cut)
        assert "truncated or corrupt" in message(e) and "No such file" not in message(e)


def test_a21_a_refused_file_gives_one_line_without_itk_noise(tmp_path, encoder):
    """A21: in a real ``ctfm`` process, what MetaIO prints on stderr while failing ("data not read
    completely", here for an element type whose size is left to MetaIO) is held back, so a refusal
    is the one ``ctfm: error:`` line, worded "truncated or corrupt"."""
    from ctfm_testing.plugin import run_ctfm

    cut = tmp_path / "cut.mha"
    cut.write_bytes(b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                    b"CompressedData = False\nDimSize = 10 12 14\nElementType = MET_LONG\nElementDataFile = LOCAL\n"
                    + bytes(500))
    result = run_ctfm("--progress", "none", "embed", cut, "--weights", encoder, "--out", tmp_path / "e.npy",
                      "--device", "cpu", timeout=300)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ctfm: error: cannot read cut.mha: the file is truncated or corrupt")
    assert "No such file" not in lines[0]


@pytest.mark.parametrize("suffix, end_of_header", [(".mha", b"ElementDataFile = LOCAL\n"), (".nrrd", b"\n\n")])
def test_a21_damaged_compressed_metaimage_or_nrrd_is_refused_not_garbage(tmp_path, suffix, end_of_header):
    """A21 (found while fixing the .mha message): MetaIO fills a damaged zlib stream with zeros or
    garbage (printing only "Uncompress failed"), and teem reads a damaged gzip NRRD without checking
    its CRC; the stream is checked before ITK reads it."""
    import SimpleITK as sitk

    image = small_ct()
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(image.array.transpose(2, 1, 0)), str(whole), True)
    np.testing.assert_array_equal(read_image(whole).array, image.array)
    data = bytearray(whole.read_bytes())
    middle = data.index(end_of_header) + len(end_of_header) + 200
    for k in range(middle, middle + 30):
        data[k] ^= 0x55
    (tmp_path / f"damaged{suffix}").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(tmp_path / f"damaged{suffix}")


def test_a21_metaimage_with_a_missing_data_file_says_so(tmp_path):
    """A21 (the same MetaIO error): a .mhd whose .raw is gone is named as such, not as a missing header."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(small_ct().array.transpose(2, 1, 0)), str(tmp_path / "ct.mhd"))
    read_image(tmp_path / "ct.mhd")
    (tmp_path / "ct.raw").rename(tmp_path / "elsewhere.raw")
    with pytest.raises(ImageError, match="data file ct.raw is missing"):
        read_image(tmp_path / "ct.mhd")


# --- A16/A21: DICOM -----------------------------------------------------------------------------------


def dicom_series(folder, image=None, **kw) -> list:
    """A CT series stored as unsigned HU + 2048 with RescaleIntercept -2048 (the phantom's noise dips below -1024)."""
    return write_ct_series(folder, small_ct(shape=(12, 10, 6)) if image is None else image, intercept=-2048.0, **kw)


def edit_all(paths, **tags) -> None:
    for p in paths:
        edit_dicom(p, **tags)


def test_a16_dicom_pixel_spacing_that_is_not_positive_is_refused(tmp_path):
    """A16: PixelSpacing [-0.9, 0] was read as spacing [1.0, 0.9]."""
    paths = dicom_series(tmp_path)
    edit_all(paths, PixelSpacing=[-0.9, 0])
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert "PixelSpacing (-0.9, 0)" in message(e) and "positive" in message(e)


def test_a16_dicom_without_pixel_spacing_is_refused_in_one_line(tmp_path, encoder):
    """A16: a CT series without PixelSpacing was read with 1 mm pixels."""
    paths = dicom_series(tmp_path / "series")
    edit_all(paths, PixelSpacing=None)
    assert_refused(embed(tmp_path / "series", encoder, tmp_path / "e.npy"), "lack PixelSpacing")
    assert not (tmp_path / "e.npy").exists()


def test_a16_dicom_spacing_outside_the_range_is_refused(tmp_path):
    """A16: the 0.05-50 mm range holds for DICOM too: in-plane (PixelSpacing) and between slices."""
    paths = dicom_series(tmp_path / "fine")
    edit_all(paths, PixelSpacing=[0.01, 0.01])
    with pytest.raises(ImageError, match=r"axis 0 \(i\) is 0.01 mm"):
        read_image(tmp_path / "fine")
    dicom_series(tmp_path / "far", small_ct(shape=(12, 10, 6), spacing=(1.0, 1.0, 60.0)))
    with pytest.raises(ImageError, match=r"axis 2 \(k\) is 60 mm"):
        read_image(tmp_path / "far")


def test_a16_dicom_without_rescale_and_raw_stored_values_is_refused(tmp_path):
    """A16: without RescaleSlope/Intercept the stored values 0..~3000 were taken as HU (1024 too high)."""
    paths = dicom_series(tmp_path)  # stored = HU + 2048 as uint16
    edit_all(paths, RescaleSlope=None, RescaleIntercept=None)
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert "no RescaleSlope/RescaleIntercept" in message(e) and "Hounsfield" in message(e)


def test_a16_dicom_without_rescale_but_stored_in_hu_is_accepted_with_a_warning(tmp_path, capsys):
    """A16 (the documented exception): stored values with air at -1000 are HU already; a warning says so."""
    image = small_ct(shape=(12, 10, 6))
    paths = write_dicom_series(image, tmp_path / "hu")  # int16 stored = HU, slope 1, intercept 0
    edit_all(paths, RescaleSlope=None, RescaleIntercept=None)
    result = read_image(tmp_path / "hu")
    np.testing.assert_array_equal(result.array, image.array)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "taken as Hounsfield units" in err


def test_a16_dicom_rescale_that_cannot_give_numbers_is_refused(tmp_path, capsys):
    """A16: a RescaleSlope of 0 cannot give HU; with one of the two tags missing, the values read
    (slope 1 or intercept 0 in its place) are judged like a series without both."""
    paths = dicom_series(tmp_path / "zero")
    edit_all(paths, RescaleSlope=0)
    with pytest.raises(ImageError, match="RescaleSlope 0"):
        read_image(tmp_path / "zero")
    image = small_ct(shape=(12, 10, 6))
    paths = dicom_series(tmp_path / "no_slope", image)
    edit_all(paths, RescaleSlope=None)  # intercept -2048 with slope 1 still gives HU
    np.testing.assert_array_equal(read_image(tmp_path / "no_slope").array, image.array)
    assert "has no RescaleSlope;" in capsys.readouterr().err
    paths = dicom_series(tmp_path / "no_intercept", image)
    edit_all(paths, RescaleIntercept=None)  # stored HU + 2048: no air
    with pytest.raises(ImageError, match="has no RescaleIntercept"):
        read_image(tmp_path / "no_intercept")


def test_a16_enhanced_ct_without_pixel_measures_is_refused(tmp_path):
    """A16: a multi-frame file without PixelSpacing is refused like a series."""
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", small_ct(shape=(12, 10, 6)), intercept=-2048.0)
    read_dicom_series(tmp_path)  # the clean file reads
    ds = pydicom.dcmread(path)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    ds.save_as(path)
    with pytest.raises(ImageError, match="lack PixelSpacing"):
        read_dicom_series(tmp_path)
    with pytest.raises(ImageError, match="lack PixelSpacing"):
        read_image(path)  # the file itself, not its folder: the same checks


def test_a16_single_dicom_file_gets_the_series_checks(tmp_path):
    """A16: a DICOM file given as a file (not a folder) was read by GDCM alone, 1 mm without PixelSpacing."""
    paths = dicom_series(tmp_path)
    assert read_image(paths[0]).shape == (12, 10, 1)  # a single slice reads (validate_ct refuses it as 2-D)
    edit_dicom(paths[0], PixelSpacing=None)
    with pytest.raises(ImageError, match="lack PixelSpacing"):
        read_image(paths[0])
    edit_dicom(paths[1], RescaleSlope=None, RescaleIntercept=None)
    with pytest.raises(ImageError, match="no RescaleSlope/RescaleIntercept"):
        read_image(paths[1])


def test_a21_non_orthogonal_dicom_orientation_is_not_called_gantry_tilt(tmp_path):
    """A21: row and column directions 16 degrees off a right angle were reported as gantry tilt."""
    paths = dicom_series(tmp_path)
    edit_all(paths, ImageOrientationPatient=[1, 0, 0, 0.28, 0.96, 0])
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert "not at right angles" in message(e) and "73.7 degrees" in message(e) and "tilt" not in message(e)


def test_a21_dicom_spacing_mismatch_shows_plain_numbers(tmp_path):
    """A21: mixed PixelSpacing was listed as ``(np.float64(0.9766), ...)``."""
    paths = dicom_series(tmp_path)
    edit_dicom(paths[2], PixelSpacing=[0.9766, 0.9766])
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert "differ in PixelSpacing" in message(e) and "(0.9766, 0.9766)" in message(e) and "np." not in message(e)


# --- B: what held up keeps working ----------------------------------------------------------------------------


def test_b_nan_in_nrrd_is_refused_by_embed(tmp_path, encoder):
    """B (Images): NaN/inf voxels in a float NRRD are refused (read as they are, refused by validate_ct)."""
    values = ct_values().astype(np.float32)
    values[1, 1, 1], values[2, 2, 2] = np.nan, np.inf
    path = nrrd(tmp_path / "nan.nrrd", values)
    assert np.isnan(read_image(path).array).sum() == 1
    assert_refused(embed(path, encoder, tmp_path / "e.npy"), "2 NaN or infinite voxels")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_b_nifti_claiming_more_voxels_than_it_holds_is_refused_before_reading(tmp_path, suffix):
    """B (Images): a 2 KB NIfTI claiming 30000^3 voxels is refused by the size check, not allocated."""
    path = nifti(tmp_path / f"huge{suffix}", ct_values(), dim=(30000, 30000, 30000))
    with pytest.raises(ImageError, match="truncated"):
        read_image(path)


def test_b_nrrd_and_metaimage_claiming_huge_sizes_are_refused(tmp_path):
    """B (Images): NRRD/MHA headers claiming 100000^3 voxels are refused, not allocated."""
    with pytest.raises(ImageError, match="huge.mha"):  # now "truncated": its header needs 2e15 bytes
        read_image(mha(tmp_path / "huge.mha", ct_values(), dims=(100000, 100000, 100000)))
    with pytest.raises(ImageError):
        read_image(nrrd(tmp_path / "huge.nrrd", ct_values(), sizes=(100000, 100000, 100000)))


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_b_truncated_nrrd_is_refused(tmp_path, encoding):
    """B (Images): truncated NRRD (raw and gzip) is refused with the reader's reason."""
    whole = nrrd(tmp_path / "whole.nrrd", ct_values(), encoding=encoding).read_bytes()
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(whole[: int(len(whole) * 0.8)])
    with pytest.raises(ImageError) as e:
        read_image(cut)
    assert "cut.nrrd" in message(e) and any(w in message(e) for w in ("fread got only", "but received", "truncated"))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "float64", "int16"])
def test_b_ct_voxel_types_read_correctly(tmp_path, dtype):
    """B (Images): int8/uint8/float64 CT files read their exact values."""
    values = (np.arange(10 * 9 * 8).reshape(10, 9, 8) % 120).astype(dtype)
    for path in (nifti(tmp_path / "v.nii.gz", values), write_image(Image(values), tmp_path / "v.nrrd")):
        back = read_image(path)
        assert back.array.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back.array, values)


def test_b_sheared_nifti_sform_is_refused(tmp_path):
    """B (Images): a sheared sform NIfTI is refused (by ITK, or by the grid check)."""
    path = nifti(tmp_path / "shear.nii", ct_values(), sform=[[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    with pytest.raises(ImageError):
        read_image(path)


def test_b_images_ctfm_cannot_use_are_refused_clearly(tmp_path):
    """B (Images): 1-row, RGB, constant and uint32 4e9 images are refused with a reason."""
    import SimpleITK as sitk

    with pytest.raises(ImageError, match="3-D volume"):
        validate_ct(read_image(nifti(tmp_path / "row.nii", ct_values((10, 1, 8)))))
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(ImageError, match="scalar"):
        read_image(tmp_path / "rgb.nrrd")
    with pytest.raises(ImageError, match="Hounsfield"):
        validate_ct(read_image(nifti(tmp_path / "flat.nii", np.full((10, 9, 8), 40, np.int16))))
    with pytest.raises(ImageError, match="Hounsfield"):
        validate_ct(Image(np.full((10, 9, 8), 4_000_000_000, np.uint32)))


def test_b_broken_dicom_series_are_refused_with_the_file_named(tmp_path):
    """B (Images): zero orientation, missing PixelData, a 65535 x 65535 claim and MR are refused clearly."""
    paths = dicom_series(tmp_path / "iop")
    edit_dicom(paths[1], ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    with pytest.raises(ImageError, match=paths[1].name):
        read_image(tmp_path / "iop")
    paths = dicom_series(tmp_path / "nopixels")
    ds = pydicom.dcmread(paths[3])
    del ds.PixelData
    ds.save_as(paths[3])
    with pytest.raises(ImageError, match=paths[3].name):
        read_image(tmp_path / "nopixels")
    paths = dicom_series(tmp_path / "claim")
    edit_dicom(paths[0], Rows=65535, Columns=65535)
    with pytest.raises(ImageError, match="matrix size"):
        read_image(tmp_path / "claim")
    dicom_series(tmp_path / "mr", Modality="MR")
    with pytest.raises(ImageError, match="modality is MR"):
        validate_ct(read_image(tmp_path / "mr"))


def test_b_unicode_and_punctuation_in_paths_read(tmp_path):
    """B (Images): unicode, spaces, quotes, commas and semicolons in file and folder names work."""
    image = small_ct(shape=(12, 10, 6))
    folder = tmp_path / "Pätient 空 'x', y;"
    path = write_image(image, folder / "scan ü 空 'q', r;.nii.gz")
    np.testing.assert_array_equal(read_image(path).array, image.array)
    write_dicom_series(image, folder / "séries ;,")
    np.testing.assert_array_equal(read_image(folder / "séries ;,").array, image.array)


def test_written_dicom_series_leave_no_temporary_files_and_never_overwrite(tmp_path):
    """dicom_write goes through CTFMLib.files: nothing but the final files, an existing folder of
    DICOM files is refused untouched, and a cancelled write leaves no folder it made."""
    from CTFMLib.progress import Cancelled

    image = small_ct(shape=(12, 10, 6))
    paths = write_dicom_series(image, tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == sorted(p.name for p in paths)
    assert leftovers(tmp_path) == []
    before = {p.name: p.read_bytes() for p in paths}
    with pytest.raises(ImageError, match="already holds 6 DICOM"):
        write_dicom_series(image, tmp_path / "a" / "b")
    assert {p.name: p.read_bytes() for p in paths} == before

    def cancel(fraction, text):
        if fraction and fraction > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        write_dicom_series(small_ct(shape=(12, 10, 25)), tmp_path / "new" / "deeper" / "series", progress=cancel)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
