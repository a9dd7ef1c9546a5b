"""Training data: scan discovery, CT-FM's scan filters, the pretraining preprocessing (against MONAI) and the cache."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from ctfm_testing.phantoms import GEOMETRIES, body_phantom
from ctfm_testing.synthetic_dicom import write_ct_series
from CTFMLib.dicom import list_dicom_series
from CTFMLib.image import Image, ImageError, read_image, to_sitk, write_image
from CTFMLib.preprocess import PreprocessConfig, preprocess
from CTFMLib.progress import Cancelled
from CTFMLib.train.data import (
    DataError,
    ScanCache,
    ScanRef,
    check_scan,
    find_scans,
    pretrain_preprocess,
    read_scan,
)

# A small CT that passes every filter: 60 slices of 2 mm along head-foot (k), 3 mm in plane.
GOOD = {"shape": (32, 32, 60), "spacing": (3.0, 3.0, 2.0)}


def ct(**kwargs) -> Image:
    return body_phantom(**{**GOOD, **kwargs})


def dicom_series(folder, image=None, **tags) -> str:
    """Write a CT series (HU offset so the phantom's noisy air fits uint16); returns its SeriesInstanceUID."""
    image = ct() if image is None else image
    paths = write_ct_series(folder, image, intercept=-2048.0, **tags)
    import pydicom

    return str(pydicom.dcmread(str(paths[0]), stop_before_pixels=True).SeriesInstanceUID)


def monai_pipeline(path, pixdim=(3, 1, 1)):
    """The upstream pretraining transforms, as MONAI runs them."""
    from monai.transforms import Compose, CropForeground, LoadImage, Orientation, ScaleIntensityRange, Spacing

    steps = [LoadImage(ensure_channel_first=True), Orientation(axcodes="SPL")]
    if pixdim is not None:
        steps.append(Spacing(pixdim=pixdim, mode="bilinear"))
    steps += [CropForeground(), ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True)]
    return np.asarray(Compose(steps)(str(path))[0])


# --- discovery ---------------------------------------------------------------------------------------


def test_find_scans_files_folders_csv_and_dicom_trees(tmp_path, monkeypatch):
    import SimpleITK as sitk

    small = body_phantom(shape=(16, 16, 6), spacing=(6.0, 6.0, 4.0))
    data = tmp_path / "data"
    write_image(small, data / "a.nii.gz")
    write_image(small, data / "sub" / "b.nrrd")
    write_image(small, data / "sub" / "c.mha")
    sitk.WriteImage(to_sitk(small), str(data / "sub" / "d.mhd"))  # + d.raw, which is not a scan
    write_image(small, data / ".hidden" / "e.nii.gz")
    (data / "notes.txt").write_text("not a scan")

    dicom = tmp_path / "dicom"
    images = {name: body_phantom(shape=(16, 16, 6), spacing=(6.0, 6.0, 4.0), seed=n) for n, name in enumerate("pqrst")}
    uid = {
        "p": dicom_series(dicom / "study" / "s1", images["p"]),
        "q": dicom_series(dicom / "study" / "s2", images["q"]),
        "r": dicom_series(dicom / "mixed", images["r"], name_prefix="R"),  # two series in one folder
        "s": dicom_series(dicom / "mixed", images["s"], name_prefix="S"),
        "t": dicom_series(dicom / "spread", images["t"]),
    }
    # A series whose files sit in two folders.
    (dicom / "spread" / "part2").mkdir()
    for f in sorted((dicom / "spread").glob("*.dcm"))[:3]:
        f.rename(dicom / "spread" / "part2" / f.name)

    scans = find_scans([data])
    assert sorted(os.path.relpath(s.path, data) for s in scans) == ["a.nii.gz", "sub/b.nrrd", "sub/c.mha", "sub/d.mhd"]
    assert all(s.series_uid is None and s.files == () and s.label == {} for s in scans)
    assert len({s.key for s in scans}) == 4
    assert find_scans([data], recursive=False) == [s for s in scans if s.path.endswith("a.nii.gz")]

    series = {s.series_uid: s for s in find_scans([dicom])}
    assert set(series) == set(uid.values())
    expected_folder = {"p": "study/s1", "q": "study/s2", "r": "mixed", "s": "mixed", "t": "spread"}
    for name, u in uid.items():
        assert series[u].path == str(dicom / expected_folder[name])
        assert len(series[u].files) == 6
        # each reference reads back as exactly the series that was written
        np.testing.assert_array_equal(read_scan(series[u]).array, images[name].array)
    assert len({s.key for s in series.values()}) == 5  # one folder, two series: two keys

    lists = tmp_path / "lists"
    lists.mkdir()
    with open(lists / "scans.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site"])
        w.writerow(["../data/a.nii.gz", "1", "A"])
        w.writerow(["../dicom/study/s1", "0", "B"])
        w.writerow([str(data / "sub" / "b.nrrd"), "1", "C"])
    from_csv = find_scans([lists / "scans.csv"])
    assert [(s.path, s.series_uid, s.label) for s in from_csv] == [
        (str(data / "a.nii.gz"), None, {"label": "1", "site": "A"}),
        (str(dicom / "study" / "s1"), uid["p"], {"label": "0", "site": "B"}),
        (str(data / "sub" / "b.nrrd"), None, {"label": "1", "site": "C"}),
    ]
    # The key depends on the scan, not on how it was named: CSV, folder and a relative path agree.
    monkeypatch.chdir(tmp_path)
    (relative,) = find_scans(["data/a.nii.gz"])
    assert relative.key == from_csv[0].key == next(s.key for s in scans if s.path.endswith("a.nii.gz"))
    assert from_csv[1].key == series[uid["p"]].key
    # Named twice: kept once, with the first label.
    both = find_scans([lists / "scans.csv", data])
    assert len(both) == 4 + 1 and both[0].label == {"label": "1", "site": "A"}


def test_find_scans_names_what_is_missing(tmp_path):
    write_image(body_phantom(shape=(8, 8, 4)), tmp_path / "ok.nii.gz")
    (tmp_path / "list.csv").write_text("path,label\nok.nii.gz,1\nlost.nii.gz,0\n")
    with pytest.raises(DataError) as e:
        find_scans([tmp_path / "list.csv", tmp_path / "nowhere"])
    message = str(e.value)
    assert "lost.nii.gz" in message and "row 3" in message and "nowhere" in message and "2 scan path(s)" in message

    (tmp_path / "bad.csv").write_text("file,label\nok.nii.gz,1\n")
    with pytest.raises(DataError, match="no 'path' column.*file, label"):
        find_scans([tmp_path / "bad.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no scans found"):
        find_scans([tmp_path / "empty"])


# --- filters ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_check_scan_applies_ct_fm_filters_from_headers_and_images(tmp_path):
    import SimpleITK as sitk

    spl = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # axis 0 towards Superior
    cases = {
        "good": (ct(), None),
        # 60 slices of 2 mm along axis 0, only 24 voxels along k: the slice axis is head-foot, not k.
        "good_spl": (body_phantom(shape=(60, 32, 24), spacing=(2.0, 3.0, 4.0), direction=spl), None),
        "short": (ct(shape=(32, 32, 20)), "too few slices: 20 (CT-FM pretraining uses scans with more than 50)"),
        "two_slices": (ct(shape=(32, 32, 2)), "localizer (scout) or single image: only 2 slice(s)"),
        "thin": (ct(spacing=(3.0, 3.0, 0.5)), "slice thickness 0.5 mm outside 1-5 mm"),
        "thick": (ct(spacing=(3.0, 3.0, 6.0)), "slice thickness 6 mm outside 1-5 mm"),
    }
    for name, (image, reason) in cases.items():
        assert check_scan(image) == reason, name
        path = write_image(image, tmp_path / f"{name}.nii.gz")
        assert check_scan(path) == reason, name  # from the header alone
        assert check_scan(read_image(path)) == reason, name

    mr = to_sitk(ct())
    mr.SetMetaData("0008|0060", "MR")
    sitk.WriteImage(mr, str(tmp_path / "mr.nrrd"))
    assert check_scan(tmp_path / "mr.nrrd") == "not CT: modality MR"
    assert check_scan(ct().with_array(ct().array, modality="MR")) == "not CT: modality MR"

    dicom = tmp_path / "dicom"
    dicom_series(dicom / "ct")
    dicom_series(dicom / "mr", Modality="MR")
    dicom_series(dicom / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    dicom_series(dicom / "thin_tag", SliceThickness="0.625")  # 2 mm apart, but 0.625 mm thick: the tag decides
    expected = {
        "ct": None,
        "mr": "not CT: modality MR",
        "scout": "localizer (scout) image: ImageType ORIGINAL\\PRIMARY\\LOCALIZER",
        "thin_tag": "slice thickness 0.625 mm outside 1-5 mm",
    }
    infos = {info.files[0].parent.name: info for info in list_dicom_series(dicom, recursive=True)}
    scans = {os.path.basename(s.path): s for s in find_scans([dicom])}
    for name, reason in expected.items():
        assert check_scan(infos[name]) == reason, name
        assert check_scan(scans[name]) == reason, name
    for name in ("ct", "mr", "thin_tag"):  # a localizer series is refused by the reader itself
        assert check_scan(read_scan(scans[name])) == expected[name], name


# --- preprocessing --------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_preprocess_equals_monai_recipe_on_real_ct():
    from ctfm_testing.data import require_shared_data

    path = require_shared_data("totalsegmentator_example", "example_ct.nii.gz")
    image = read_image(path)
    ours = pretrain_preprocess(image)  # (3, 1, 1) mm
    ref = monai_pipeline(path)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5
    # Without resampling the steps are the same voxels, exactly.
    np.testing.assert_array_equal(pretrain_preprocess(image, spacing=None), monai_pipeline(path, pixdim=None))


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["ras", "oblique20", "permuted", "aniso_0.7x0.7x5", "odd_sizes"])
def test_pretrain_preprocess_equals_monai_recipe_in_every_geometry(geometry, tmp_path):
    path = write_image(body_phantom(**GEOMETRIES[geometry]), tmp_path / "ct.nii.gz")
    image = read_image(path)
    for pixdim in [(3.0, 1.0, 1.0), (2.5, 1.5, 0.8)]:
        ours, ref = pretrain_preprocess(image, spacing=pixdim), monai_pipeline(path, pixdim)
        assert ours.shape == ref.shape, pixdim
        assert np.abs(ours - ref).max() < 1e-5, pixdim


def test_pretrain_crop_is_on_raw_hu():
    """The pretraining crop keeps the box of HU > 0: the fat layer (-100 HU) around the body is cut off,
    which the model-card crop (after scaling: HU > -1024) keeps."""
    image = body_phantom(**GEOMETRIES["lps"], noise_hu=0, left_marker=False)
    out = pretrain_preprocess(image, spacing=None)
    above_zero = (0 + 1024) / 3072
    for axis in (1, 2):  # the body is a cylinder along S: the crop bites in P and L only
        face = np.moveaxis(out, axis, 0)
        assert face[0].max() > above_zero and face[-1].max() > above_zero
    card = preprocess(image, PreprocessConfig()).array
    assert out.shape[0] == card.shape[0] and out.shape[1] < card.shape[1] and out.shape[2] < card.shape[2]
    assert out.min() >= 0 and out.max() <= 1


# --- the cache ------------------------------------------------------------------------------------


def test_cache_computes_once_memory_maps_and_invalidates(tmp_path):
    path = write_image(ct(seed=1), tmp_path / "scan.nii.gz")
    (scan,) = find_scans([path])
    cache = ScanCache(tmp_path / "cache")
    first = cache.get(scan)
    assert isinstance(first, np.memmap) and first.dtype == np.float32 and not first.flags.writeable
    np.testing.assert_array_equal(first, pretrain_preprocess(read_image(path)))
    npy = tmp_path / "cache" / f"{scan.key}.npy"
    info = json.loads((tmp_path / "cache" / f"{scan.key}.json").read_text())
    assert info["source"] == str(path) and info["shape"] == list(first.shape) and info["spacing"] == [3.0, 1.0, 1.0]
    assert info["config"]["hu_range"] == [-1024.0, 2048.0]

    # Again, from a new cache object: read from disk, not recomputed.
    before = npy.stat()
    again = ScanCache(tmp_path / "cache").get(scan)
    np.testing.assert_array_equal(again, first)
    assert (npy.stat().st_mtime_ns, npy.stat().st_ino) == (before.st_mtime_ns, before.st_ino)

    # A changed source file is preprocessed again.
    write_image(ct(seed=2, shape=(32, 32, 62)), path)
    os.utime(path, ns=(before.st_mtime_ns + 10**9, before.st_mtime_ns + 10**9))
    changed = cache.get(scan)
    np.testing.assert_array_equal(changed, pretrain_preprocess(read_image(path)))
    assert changed.shape != first.shape

    # Other settings: recomputed with them; back to the first settings: recomputed again.
    narrow = ScanCache(tmp_path / "cache", hu_range=(-1000, 1000)).get(scan)
    np.testing.assert_array_equal(narrow, pretrain_preprocess(read_image(path), hu_range=(-1000, 1000)))
    np.testing.assert_array_equal(cache.get(scan), changed)

    # A damaged entry is recomputed, and no temporary files are ever left behind.
    with open(npy, "r+b") as f:
        f.truncate(100)
    np.testing.assert_array_equal(cache.get(scan), changed)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{scan.key}.json", f"{scan.key}.npy"]


def bad_and_good_scans(root):
    """Two usable scans and four that prepare must skip, each for its own reason."""
    write_image(ct(seed=3), root / "good.nii.gz")
    dicom_series(root / "dicom" / "good_series", ct(seed=4))
    dicom_series(root / "dicom" / "mr_series", ct(seed=5), Modality="MR")
    write_image(ct(shape=(32, 32, 20)), root / "short.nii.gz")
    whole = write_image(ct(seed=6), root / "whole.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (root / "whole.nii.gz").unlink()
    (root / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    return {
        "good.nii.gz": None,
        "good_series": None,
        "mr_series": "not CT: modality MR",
        "short.nii.gz": "too few slices: 20",
        "truncated.nii.gz": "cannot read truncated.nii.gz: the file is truncated",
        "garbage.nii.gz": "cannot read garbage.nii.gz: not a readable image file",
    }


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_read_scan_refuses_a_truncated_nifti(suffix, tmp_path):
    """ITK's NIfTI reader fills a truncated file's missing voxels with zeros; training must not see that."""
    image = ct(seed=8)
    whole = write_image(image, tmp_path / f"whole{suffix}").read_bytes()
    np.testing.assert_array_equal(read_scan(ScanRef(str(tmp_path / f"whole{suffix}"))).array, image.array)
    for keep in (0.5, 0.99):
        (tmp_path / f"cut{suffix}").write_bytes(whole[: int(len(whole) * keep)])
        with pytest.raises(ImageError, match=f"cannot read cut{suffix}: the file is truncated"):
            read_scan(ScanRef(str(tmp_path / f"cut{suffix}")))


def test_prepare_with_workers_skips_bad_scans_and_reports(tmp_path):
    expected = bad_and_good_scans(tmp_path / "in")
    scans = find_scans([tmp_path / "in"])
    assert len(scans) == 6
    cache = ScanCache(tmp_path / "cache")
    calls = []
    usable, skipped = cache.prepare(scans, workers=2, progress=lambda f, m: calls.append((f, m)))

    assert [s.key for s in usable] == [s.key for s in scans if expected[os.path.basename(s.path)] is None]
    assert len(skipped) == 4
    for scan, reason in skipped:
        assert reason.startswith(expected[os.path.basename(scan.path)]), (scan.path, reason)
    for scan in usable:
        np.testing.assert_array_equal(cache.get(scan), pretrain_preprocess(read_scan(scan)))

    with open(tmp_path / "cache" / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["key"], r["reason"]) for r in rows] == [(s.path, s.key, why) for s, why in skipped]
    assert next(r for r in rows if "mr_series" in r["path"])["series_uid"] != ""

    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(calls) == 1 + len(scans)  # the start, then one call per finished scan
    assert "6 of 6 scans ready, 4 skipped" in calls[-1][1]

    # A second run reads nothing again: same answer from the cache, entries untouched.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    again = cache.prepare(scans, workers=2)
    assert [s.key for s in again[0]] == [s.key for s in usable] and again[1] == skipped
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == stamps


def test_prepare_in_process_agrees_and_can_be_cancelled(tmp_path):
    expected = bad_and_good_scans(tmp_path / "in")
    scans = find_scans([tmp_path / "in"])
    usable, skipped = ScanCache(tmp_path / "cache").prepare(scans, workers=0)
    assert {os.path.basename(s.path) for s in usable} == {k for k, v in expected.items() if v is None}
    assert {os.path.basename(s.path) for s, _ in skipped} == {k for k, v in expected.items() if v is not None}
    for scan, reason in skipped:
        assert reason.startswith(expected[os.path.basename(scan.path)]), (scan.path, reason)
    # A changed file is looked at again: the short scan, made long, becomes usable.
    short = next(s for s in scans if s.path.endswith("short.nii.gz"))
    write_image(ct(seed=7), short.path)
    os.utime(short.path, ns=(10**18, 10**18))
    usable, skipped = ScanCache(tmp_path / "cache").prepare(scans, workers=0)
    assert short.key in {s.key for s in usable} and len(skipped) == 3

    # A DICOM folder named without its file list: the filters run on what the reader reports.
    folder_only = ScanRef(str(tmp_path / "in" / "dicom" / "mr_series"))
    assert folder_only.key != next(s.key for s in scans if s.path.endswith("mr_series"))
    assert ScanCache(tmp_path / "cache").prepare([folder_only], workers=0)[1] == [(folder_only, "not CT: modality MR")]

    def cancel(fraction, message):
        if fraction > 0:
            raise Cancelled()

    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(Cancelled):
        ScanCache(tmp_path / "cache").prepare(scans, workers=0, progress=cancel)


def test_triage_cache_keeps_short_head_scans_that_pretraining_skips(tmp_path):
    """30 slices of 5 mm: too few for pretraining's filter, a normal head CT for triage fine-tuning."""
    from ctfm_testing.phantoms import head_phantom
    from CTFMLib.image import write_image
    from CTFMLib.train.classify import TriageScanCache
    from CTFMLib.train.data import ScanCache, ScanRef, check_scan

    image = head_phantom(shape=(48, 48, 30), spacing=(4.0, 4.0, 5.0))
    write_image(image, tmp_path / "head.nii.gz")
    scan = ScanRef(tmp_path / "head.nii.gz")
    assert "too few slices" in check_scan(image)
    assert check_scan(image, pretraining=False) is None
    assert check_scan({"modality": "MR", "num_slices": 30}, pretraining=False).startswith("not CT")
    _, skipped = ScanCache(tmp_path / "pretrain").prepare([scan], workers=0)
    assert len(skipped) == 1 and "too few slices" in skipped[0][1]
    usable, skipped = TriageScanCache(tmp_path / "triage").prepare([scan], workers=0)
    assert [s.path for s in usable] == [scan.path] and skipped == []
