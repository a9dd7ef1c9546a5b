"""Retrieval thumbnails: the axial plane through a hit, sampled in patient space, written as PNG.

- Geometry: a volume whose HU is a linear function of the LPS position is sampled exactly by
  linear interpolation, so each thumbnail pixel must equal that function at the pixel's LPS point
  (computed here from the documented pixel layout), in every test grid (oblique, permuted, ...).
- Orientation: a marker on the patient's left appears right of the centre, an anterior one above.
- PNG: decoded by Qt's reader (not ours), pixels equal the array written.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from ctfm_testing.phantoms import GEOMETRIES, phantom_grid, voxel_centres
from CTFMLib.image import Image, read_image
from CTFMLib.retrieval import thumbnails

GRADIENT = np.array([2.0, -3.0, 5.0])  # HU per mm along LPS x, y, z


def linear_volume(name: str) -> Image:
    g = GEOMETRIES[name]
    grid = phantom_grid(g["shape"], g["spacing"], g.get("direction"), None)
    x, y, z = voxel_centres(grid)
    hu = GRADIENT[0] * x + GRADIENT[1] * y + GRADIENT[2] * z + 10.0
    return Image.from_geometry(hu.astype(np.float32), grid)


@pytest.mark.parametrize("name", ["lps", "ras", "oblique20", "spl", "permuted", "odd_sizes"])
def test_axial_slice_samples_the_documented_lps_points(name):
    image = linear_volume(name)
    centre = np.array([3.0, -4.0, 6.5])
    size, pixel = 17, 1.25
    plane = thumbnails.axial_slice(image, centre, size=size, pixel_mm=pixel)
    assert plane.shape == (size, size)
    offsets = (np.arange(size) - (size - 1) / 2) * pixel
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    expected = GRADIENT[0] * (centre[0] + cols) + GRADIENT[1] * (centre[1] + rows) + GRADIENT[2] * centre[2] + 10.0
    np.testing.assert_allclose(plane, expected, atol=1e-2)


def test_markers_appear_where_radiologists_expect():
    g = GEOMETRIES["permuted"]
    grid = phantom_grid(g["shape"], g["spacing"], g.get("direction"), None)
    x, y, z = voxel_centres(grid)
    hu = np.full(grid.shape, -1000.0, np.float32)
    hu[(np.abs(x - 30) < 4) & (np.abs(y) < 4) & (np.abs(z) < 4)] = 300.0  # patient's left
    hu[(np.abs(x) < 4) & (np.abs(y + 30) < 4) & (np.abs(z) < 4)] = 600.0  # anterior
    plane = thumbnails.axial_slice(Image.from_geometry(hu, grid), (0.0, 0.0, 0.0), size=81, pixel_mm=1.0)
    left = np.argwhere((plane > 150) & (plane < 450)).mean(axis=0) - 40
    front = np.argwhere(plane > 450).mean(axis=0) - 40
    assert left == pytest.approx([0, 30], abs=1.5)  # same row, 30 px to the right
    assert front == pytest.approx([-30, 0], abs=1.5)  # 30 px up, same column


def test_window_and_mark():
    hu = np.array([[-1000.0, -160.0, 40.0], [240.0, 3000.0, np.nan], [0.0, 0.0, 0.0]])
    rgb = thumbnails.window_rgb(hu, window=(40, 400), mark=False)
    assert rgb[..., 0].tolist() == [[0, 0, 128], [255, 255, 0], [102, 102, 102]]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    marked = thumbnails.window_rgb(np.zeros((32, 32)), mark=True)
    red = np.all(marked == thumbnails.MARK_RGB, axis=2)
    assert red.any() and not red[16, 16]  # a cross around the matched pixel, which stays visible
    assert set(np.argwhere(red)[:, 0]) | set(np.argwhere(red)[:, 1]) >= {16}


def test_png_decodes_to_the_same_pixels_with_qt(tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtGui = pytest.importorskip("PySide6.QtGui", reason="PySide6 decodes the PNG independently")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    path = thumbnails.write_png(rgb, tmp_path / "sub" / "t.png")
    image = QtGui.QImage(str(path))
    assert not image.isNull() and (image.width(), image.height()) == (31, 23)
    decoded = np.array([[QtGui.QColor(image.pixel(c, r)).getRgb()[:3] for c in range(31)] for r in range(23)])
    np.testing.assert_array_equal(decoded, rgb)
    with pytest.raises(ValueError, match="rows, columns, 3"):
        thumbnails.write_png(np.zeros((4, 4)), tmp_path / "bad.png")


def test_write_thumbnail_defaults_to_the_scan_centre(tmp_path):
    image = linear_volume("oblique20")
    centre = thumbnails.scan_centre_lps(image)
    np.testing.assert_allclose(centre, image.index_to_physical((np.array(image.shape) - 1) / 2))
    path = thumbnails.write_thumbnail(image, tmp_path / "t.png", size=16)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a point"):
        thumbnails.axial_slice(image, (np.nan, 0, 0))


@pytest.mark.slow
def test_cli_query_writes_thumbnails_excludes_a_scan_and_centres_scan_hits(tmp_path, tiny_encoder_folder):
    import json

    from ctfm_testing.phantoms import body_phantom
    from ctfm_testing.plugin import run_ctfm
    from CTFMLib.image import write_image

    scans = [write_image(body_phantom(**GEOMETRIES[g], seed=i), tmp_path / f"{g}.nii.gz")
             for i, g in enumerate(("oblique20", "permuted", "spl"))]
    idx = tmp_path / "idx"
    assert run_ctfm("--progress", "none", "index", "add", idx, *scans, "--weights", tiny_encoder_folder,
                    "--device", "cpu").returncode == 0
    out = run_ctfm("--progress", "none", "index", "query", idx, scans[0], "--json", "--device", "cpu",
                   f"--exclude-scan={scans[1]}", "--thumbnails", tmp_path / "thumbs")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert [h["path"] for h in hits] == [str(scans[0].resolve()), str(scans[2].resolve())]
    for hit in hits:  # a whole-scan hit is shown at its scan's centre: the middle of the voxel grid, by hand
        image = read_image(hit["path"])
        middle = image.origin + image.direction @ (image.spacing * (np.array(image.shape) - 1) / 2)
        np.testing.assert_allclose(hit["centre_lps"], middle, atol=1e-3)
        assert hit["thumbnail"] == str(tmp_path / "thumbs" / f"{hit['rank']}.png")
        assert Path(hit["thumbnail"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
