"""Organ statistics (issue 19 item 2): volumes of phantoms whose voxel counts are known, HU statistics against
numpy on the masked input, centroids on an oblique grid against the physical centre worked out by hand, the
border flag, slab independence, and ``ctfm stats`` / ``ctfm segment --statistics`` as a user runs them."""

import csv
import json
import math

import numpy as np
import pytest

from ctfm_testing.hostile import assert_refused, ctfm, leftovers, small_ct, tiny_segmenter, tree_digest
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.statistics import structure_statistics

SPACING = (0.7, 1.3, 2.5)  # anisotropic: a voxel is 2.275 mm3


def _ct(shape=(40, 34, 22), seed=0, dtype=np.int16, **geometry):
    rng = np.random.default_rng(seed)
    return Image(rng.integers(-1024, 1800, shape).astype(dtype), spacing=geometry.pop("spacing", SPACING), **geometry)


def _ball(shape, centre, radius, spacing):
    """A sphere in mm on the voxel grid (its voxel count is whatever numpy counts)."""
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def test_volumes_are_voxel_counts_times_the_voxel_volume():
    image = _ct()
    labels = np.zeros(image.shape, np.uint8)
    labels[3:13, 4:9, 5:12] = 1  # a box of 10 x 5 x 7 = 350 voxels
    ball = _ball(image.shape, (18.0, 25.0, 30.0), 7.0, SPACING) & (labels == 0)
    labels[ball] = 2
    stats = structure_statistics(image, image.with_array(labels), {1: "liver", 2: "spleen"})
    voxel = 0.7 * 1.3 * 2.5
    assert list(stats) == ["liver", "spleen"]
    box, sphere = stats["liver"], stats["spleen"]
    assert box["voxels"] == 350 and math.isclose(box["volume"], 350 * voxel, rel_tol=1e-3)
    assert math.isclose(box["volume_ml"], 350 * voxel / 1000, rel_tol=1e-3)
    n = int(ball.sum())
    assert n > 100 and sphere["voxels"] == n
    assert math.isclose(sphere["volume"], n * voxel, rel_tol=1e-3)
    # TotalSegmentator's statistics.json fields: volume in mm3, intensity the mean
    assert sphere["intensity"] == sphere["hu_mean"] and box["label"] == 1 and sphere["label"] == 2


@pytest.mark.parametrize("slab", [None, 3])  # one slab, and partial results merged across slabs
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_hu_statistics_equal_numpy_on_the_masked_input(dtype, slab):
    image = _ct(seed=3, dtype=dtype)
    if dtype == np.float32:
        image.array += np.float32(0.37)
        image.array[:, :, ::2] += np.float32(400.0)  # slabs with other means: the merge must account for them
    labels = np.random.default_rng(4).integers(0, 5, image.shape).astype(np.uint8)
    labels[labels == 3] = 0  # a value absent: no entry for it
    stats = structure_statistics(image, image.with_array(labels), slab=slab)
    assert list(stats) == ["label_1", "label_2", "label_4"]
    for name, s in stats.items():
        values = image.array[labels == s["label"]].astype(np.float64)
        assert s["voxels"] == values.size
        assert s["hu_mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-9)
        assert s["hu_std"] == pytest.approx(values.std(), rel=1e-9)
        assert s["hu_min"] == values.min() and s["hu_max"] == values.max()


def test_centroid_and_box_of_a_box_on_an_oblique_grid():
    angle = math.radians(30)
    direction = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                          [math.sin(angle), math.cos(angle), 0.0],
                          [0.0, 0.0, -1.0]])  # rotated in plane, slices running towards the feet
    origin = np.array([-120.0, 35.5, 410.0])
    image = _ct(direction=direction, origin=origin)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:11, 6:20, 3:9] = 7  # i 4..10, j 6..19, k 3..8
    s = structure_statistics(image, image.with_array(labels))["label_7"]
    # by hand: the box's centre in index space is (7, 12.5, 5.5); LPS = origin + sum_a index_a * spacing_a * d_a
    centre = origin + 7 * 0.7 * direction[:, 0] + 12.5 * 1.3 * direction[:, 1] + 5.5 * 2.5 * direction[:, 2]
    assert np.allclose(s["centroid_lps"], centre, atol=1e-9)
    assert s["bbox_index"] == {"min": [4, 6, 3], "max": [10, 19, 8]}
    corners = [origin + i * 0.7 * direction[:, 0] + j * 1.3 * direction[:, 1] + k * 2.5 * direction[:, 2]
               for i in (4, 10) for j in (6, 19) for k in (3, 8)]
    assert np.allclose(s["bbox_lps"]["min"], np.min(corners, axis=0)) and np.allclose(s["bbox_lps"]["max"],
                                                                                     np.max(corners, axis=0))
    assert s["touches_border"] is False and s["note"] is None


@pytest.mark.parametrize("where", ["i0", "i_last", "j0", "j_last", "k0", "k_last"])
def test_an_organ_cut_by_the_field_of_view_is_flagged(where):
    image = _ct()
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 10:20, 8:14] = 1  # inside
    ball = _ball(image.shape, (14.0, 22.0, 27.0), 6.0, SPACING)  # centred well inside: not flagged
    labels[ball & (labels == 0)] = 3
    axis, end = "ijk".index(where[0]), where[2:]
    organ = [slice(2, 8), slice(2, 8), slice(2, 6)]
    organ[axis] = slice(0, 3) if end == "0" else slice(image.shape[axis] - 3, None)
    labels[tuple(organ)] = 2
    stats = structure_statistics(image, image.with_array(labels), {1: "inside", 2: "cut", 3: "ball"})
    assert stats["cut"]["touches_border"] is True and "lower bound" in stats["cut"]["note"]
    assert stats["inside"]["touches_border"] is False and stats["ball"]["touches_border"] is False
    assert stats["inside"]["note"] is None


@pytest.mark.parametrize("order", ["C", "F"])
def test_slabs_of_every_size_give_identical_results(order):
    image = _ct(shape=(23, 19, 17), seed=5)
    labels = np.random.default_rng(6).integers(0, 9, image.shape).astype(np.uint16)
    labels[labels == 8] = 300  # values need not be dense
    image.array = np.asarray(image.array, order=order)
    labels = np.asarray(labels, order=order)
    results = [structure_statistics(image, image.with_array(labels), slab=slab) for slab in (None, 1, 2, 5, 16, 17, 99)]
    assert all(r == results[0] for r in results[1:])
    assert "label_300" in results[0] and len(results[0]) == 8


def test_labels_on_another_grid_or_not_labels_are_refused():
    image = _ct()
    labels = np.zeros(image.shape, np.uint8)
    moved = Image(labels, spacing=SPACING, origin=(0.0, 0.0, 5.0))
    with pytest.raises(ImageError, match="not on the image's grid"):
        structure_statistics(image, moved)
    with pytest.raises(ImageError, match="whole numbers"):
        structure_statistics(image, image.with_array(np.full(image.shape, 0.5, np.float32)))
    with pytest.raises(ImageError, match="outside 0"):
        structure_statistics(image, image.with_array(np.full(image.shape, -1, np.int16)))


# --- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def scan(tmp_path):
    """A CT file, its label map with a sidecar of names (one organ cut by the border), as a user has them."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    image = read_image(ct)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 8:16, 3:8] = 1
    labels[0:5, 20:30, 4:9] = 2
    write_image(image.with_array(labels), tmp_path / "labels.nii.gz")
    (tmp_path / "labels.labels.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    return ct, tmp_path / "labels.nii.gz", image, labels


def test_ctfm_stats_writes_json_and_csv(tmp_path, scan):
    ct, labels_file, image, labels = scan
    out, table = tmp_path / "stats.json", tmp_path / "stats.csv"
    result = ctfm("stats", ct, labels_file, "--out", out, "--csv", table)
    assert result.returncode == 0, result
    assert "liver" in result.stdout and "spleen" in result.stdout and "lower bound" in result.stdout
    stats = json.loads(out.read_text())
    voxel = float(np.prod(image.spacing))
    for value, name in ((1, "liver"), (2, "spleen")):
        mask = labels == value
        assert stats[name]["voxels"] == int(mask.sum())
        assert stats[name]["volume"] == pytest.approx(mask.sum() * voxel, rel=1e-3)
        assert stats[name]["intensity"] == pytest.approx(image.array[mask].astype(float).mean())
    assert stats["spleen"]["touches_border"] and not stats["liver"]["touches_border"]
    rows = list(csv.DictReader(table.open()))
    assert [r["structure"] for r in rows] == ["liver", "spleen"]
    assert float(rows[0]["volume_ml"]) == pytest.approx(stats["liver"]["volume_ml"])
    assert rows[1]["touches_border"] == "True" and "lower bound" in rows[1]["note"]
    # --json: one object, the statistics in it; the files exist now, so without --overwrite it is refused
    printed = ctfm("stats", ct, labels_file, "--json")
    assert printed.returncode == 0 and json.loads(printed.stdout.strip().splitlines()[-1])["statistics"] == stats
    before = tree_digest(tmp_path)
    assert_refused(ctfm("stats", ct, labels_file, "--out", out), "exists", "--overwrite")
    assert tree_digest(tmp_path) == before


def test_ctfm_stats_refusals_are_one_line_and_write_nothing(tmp_path, scan):
    ct, labels_file, image, labels = scan
    other = tmp_path / "other.nii.gz"
    write_image(Image(labels, spacing=image.spacing * 2, origin=image.origin, direction=image.direction), other)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not an image")
    before = tree_digest(tmp_path)
    out = tmp_path / "stats.json"
    assert_refused(ctfm("stats", ct, other, "--out", out, "--csv", tmp_path / "s.csv"), "other.nii.gz", "grid")
    assert_refused(ctfm("stats", ct, broken, "--out", out), "broken.nii.gz")
    assert_refused(ctfm("stats", broken, labels_file, "--out", out), "broken.nii.gz")
    assert_refused(ctfm("stats", ct, labels_file, "--out", tmp_path / "labels.labels.json"), "input")
    assert_refused(ctfm("stats", ct, labels_file, "--out", tmp_path / "stats.txt"), ".json")
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []


def test_segment_statistics_match_ctfm_stats_of_the_result(tmp_path, ctfm_cache):
    model = tiny_segmenter(tmp_path / "model")
    ct = small_ct(tmp_path / "ct.nii.gz")
    common = ("--model", model, "--device", "cpu", "--spacing", "native")
    stats_file = tmp_path / "stats.json"
    result = ctfm("segment", ct, *common, "--out", tmp_path / "seg.nii.gz", "--statistics", stats_file)
    assert result.returncode == 0, result
    written = json.loads(stats_file.read_text())
    labels = read_image(tmp_path / "seg.nii.gz").array
    image = read_image(ct)
    names = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}
    present = [v for v in names if (labels == v).any()]
    assert present and list(written) == [names[v] for v in present]
    for v in present:
        assert written[names[v]]["voxels"] == int((labels == v).sum())
        assert written[names[v]]["hu_mean"] == pytest.approx(image.array[labels == v].astype(float).mean())
    rows = list(csv.DictReader((tmp_path / "stats.csv").open()))
    assert [r["structure"] for r in rows] == list(written)
    again = tmp_path / "again.json"
    assert ctfm("stats", ct, tmp_path / "seg.nii.gz", "--out", again).returncode == 0
    assert json.loads(again.read_text()) == written
    # refused before any work: in a batch, next to an input, or over an existing file
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", ct, *common, "--out", tmp_path / "b.nii.gz", "--statistics", stats_file),
                   "exists")
    assert_refused(ctfm("segment", tmp_path, *common, "--out-dir", tmp_path / "o", "--statistics",
                        tmp_path / "x.json"), "--out")
    assert_refused(ctfm("segment", ct, *common, "--out", tmp_path / "c.nii.gz", "--statistics",
                        tmp_path / "c.labels.json"), ".json")
    assert tree_digest(tmp_path) == before and leftovers(tmp_path) == []
