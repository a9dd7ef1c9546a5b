"""Saliency heatmaps: MONAI's occlusion exactly, gradients of the same objective, faithful on a trained model,
exact on every issue-2 geometry, region limits, the four targets, cancel, and `ctfm saliency`."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ctfm_testing.checkpoints import monai_encoder, monai_segresnet, write_published_layout
from ctfm_testing.phantoms import GEOMETRIES, HEAD_HU, body_phantom, head_phantom
from CTFMLib.image import read_image, write_image
from CTFMLib.networks import SegResEncoder
from CTFMLib.preprocess import PreprocessConfig, preprocess
from CTFMLib.progress import Cancelled
from CTFMLib.saliency import parse_target, saliency_image

SPL = GEOMETRIES["spl"]["direction"]
SHAPE_GEOMETRIES = ["lps", "ras", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "spl", "permuted"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny convolutions are slower on two busy threads (see test_classify)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_head(**kwargs):
    """A head CT on a 3 mm grid whose model grid (3 mm, foreground crop) is small: 20 x 24 x 24."""
    return head_phantom(shape=(24, 24, 20), spacing=(3.0, 3.0, 3.0), head_radius_mm=30,
                        lesion={"center_lps": (6.0, -5.0, 4.0), "radius_mm": 6.0, "hu": 80.0}, **kwargs)


def voxel_lps(image) -> np.ndarray:
    """LPS mm of every voxel centre, ``(*shape, 3)``, from the image's own geometry."""
    ijk = np.indices(image.shape).reshape(3, -1).T
    return image.index_to_physical(ijk).reshape(image.shape + (3,))


def centroid(image) -> np.ndarray:
    w = image.array.astype(np.float64).reshape(-1)
    return (voxel_lps(image).reshape(-1, 3) * w[:, None]).sum(axis=0) / w.sum()


class UpstreamEmbedding(nn.Module):
    """Upstream's EmbeddingModel (notebooks/generate_saliency_maps.py): last encoder map -> avg pool -> flatten."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.pool = nn.AdaptiveAvgPool3d((1, 1, 1))

    def forward(self, x):
        return self.pool(self.encoder(x)[-1]).flatten(start_dim=1)


# --- occlusion is MONAI's OcclusionSensitivity --------------------------------------------------


def test_occlusion_equals_monai_with_upstream_settings(tiny_encoder_folder):
    """Upstream: OcclusionSensitivity(encoder, n_batch=12, activate=False, mask_size=10, overlap=0.25), then
    1 - cosine(base embedding, the per-voxel occluded embedding); here through saliency_image, weights read
    from the published layout that MONAI's encoder (same seed) wrote."""
    from monai.visualize import OcclusionSensitivity

    image = small_head()
    result = saliency_image(image, weights=str(tiny_encoder_folder), target="embedding", method="occlusion",
                            device="cpu")
    x = torch.from_numpy(preprocess(image, PreprocessConfig(spacing=(3.0, 3.0, 3.0))).array)[None, None]
    assert tuple(x.shape[2:]) == result.model_heat.shape and x.shape[2] % 7 != 3  # a last window flush with the end
    reference = UpstreamEmbedding(monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=0)).eval()
    occ_map, _ = OcclusionSensitivity(nn_module=reference, n_batch=12, activate=False, mask_size=10, overlap=0.25,
                                      verbose=False)(x)
    with torch.no_grad():
        base = reference(x)
    expected = 1 - nn.functional.cosine_similarity(base.flatten()[None], occ_map.view(base.shape[-1], -1).t(), dim=1)
    expected = expected.view(*occ_map.shape[2:]).numpy()
    assert np.abs(expected).max() > 1e-4  # the map has content to compare
    np.testing.assert_allclose(result.model_heat, expected, rtol=0, atol=1e-5)
    assert np.abs(result.model_heat - expected).max() < 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize("settings", [
    {"mask_size": 10, "overlap": 0.25, "mode": "gaussian", "n_batch": 12},  # upstream
    {"mask_size": (6, 7, 5), "overlap": 0.5, "mode": 0.0, "n_batch": 5},  # a constant, uniform blending
])
@pytest.mark.slow
def test_occlusion_of_the_objective_equals_monai_on_a_wrapped_encoder(tiny_encoder_folder, settings):
    """MONAI run on a module whose output is the objective 1 - cos(e(x), e(occluded)) = blend="objective"."""
    from monai.visualize import OcclusionSensitivity

    from CTFMLib.saliency.methods import occlusion

    encoder = UpstreamEmbedding(monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=0)).eval()
    x = torch.from_numpy(preprocess(small_head(), PreprocessConfig(spacing=(3.0, 3.0, 3.0))).array)[None, None]
    with torch.no_grad():
        base = encoder(x)

    class Objective(nn.Module):
        def forward(self, batch):
            return (1 - nn.functional.cosine_similarity(encoder(batch), base, dim=1))[:, None]

    expected, _ = OcclusionSensitivity(nn_module=Objective(), n_batch=settings["n_batch"], activate=False,
                                       mask_size=settings["mask_size"], overlap=settings["overlap"],
                                       mode=settings["mode"], verbose=False)(x)
    expected = expected[0, 0].numpy()
    ref = base.double().numpy()[0]

    def cosine(v):
        return v @ ref / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref))

    ours, details = occlusion(encoder, x[0], cosine, mask_size=settings["mask_size"], overlap=settings["overlap"],
                              mode=settings["mode"], blend_mode="objective", batch_size=settings["n_batch"])
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.abs(ours - expected).max() < 1e-2 * np.abs(expected).max()


def test_gradient_attributions_add_up_to_the_objective(tiny_encoder_folder):
    """Integrated gradients of cos(e(x), e(.)) from air: their sum is 1 - cos(e(x), e(air)), the drop occlusion
    measures for the whole image (completeness; the midpoint rule's error shrinks with the steps)."""
    image = small_head()
    encoder = UpstreamEmbedding(monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=0)).eval()
    x = torch.from_numpy(preprocess(image, PreprocessConfig(spacing=(3.0, 3.0, 3.0))).array)[None, None]
    with torch.no_grad():
        expected = 1 - float(nn.functional.cosine_similarity(encoder(x), encoder(torch.zeros_like(x))))
    assert expected > 1e-3
    result = saliency_image(image, weights=str(tiny_encoder_folder), method="gradient", steps=48, batch_size=8,
                            device="cpu")
    assert result.model_heat.sum() == pytest.approx(expected, rel=0.03)


# --- the heatmap lands on the input grid exactly ----------------------------------------------------


class BrightSpot(nn.Module):
    """A fixed 'encoder' that sees only voxels above ~1430 HU: its map is (relu(x - 0.8), 1) per voxel."""

    def forward(self, x):
        return [torch.cat([torch.relu(x - 0.8), torch.ones_like(x)], dim=1)]


BLOB = np.array([12.0, -9.0, 10.0])  # LPS mm: left, anterior, superior of the head's centre
BLOB_RADIUS = 8.0


def bright_blob_head(name, noise_hu=5.0):
    g = {k: v for k, v in GEOMETRIES[name].items() if k != "dtype"}
    return head_phantom(**g, head_radius_mm=45, noise_hu=noise_hu,
                        lesion={"center_lps": tuple(BLOB), "radius_mm": BLOB_RADIUS, "hu": 2000.0})


@pytest.mark.slow
@pytest.mark.parametrize("name", SHAPE_GEOMETRIES)
def test_heatmap_lands_on_the_blob_in_every_geometry(name):
    image = bright_blob_head(name)
    for method in ("gradient", "occlusion"):
        result = saliency_image(image, weights=BrightSpot(), method=method, device="cpu")
        heat = result.heatmap
        assert heat.geometry.same_grid(image.geometry) and heat.array.dtype == np.float32
        assert heat.array.min() >= 0 and heat.array.max() == pytest.approx(1.0)
        assert heat.array.flat[np.argmax(heat.array)] == 1.0
        np.testing.assert_allclose(result.peak_lps, image.index_to_physical(np.unravel_index(
            np.argmax(heat.array), image.shape)))
        if method == "gradient":  # only the blob's voxels have a gradient: the map is the blob
            assert np.linalg.norm(result.peak_lps - BLOB) <= BLOB_RADIUS
            assert np.linalg.norm(centroid(heat) - BLOB) <= 1.5  # half a voxel of the 3 mm model grid
        else:  # 10-voxel (30 mm) cubes every 7 voxels
            assert np.linalg.norm(result.peak_lps - BLOB) <= 30.0
            assert np.linalg.norm(centroid(heat) - BLOB) <= 6.0
    # the patch around a point: its 3 x 1 x 1 mm grid, shifted by the point, maps back as exactly
    result = saliency_image(image, weights=BrightSpot(), target="point", point_lps=BLOB + [6.0, -4.0, 5.0],
                            method="gradient", device="cpu")
    assert np.linalg.norm(centroid(result.heatmap) - BLOB) <= 1.5


def test_occlusion_heat_is_the_same_physical_map_on_equivalent_grids():
    """LPS, RAS, SPL and permuted grids sample the same voxels in different index orders: same model grid,
    so the same heat at the same physical places (without noise, which is drawn in index order)."""
    results = {name: saliency_image(bright_blob_head(name, noise_hu=0.0), weights=BrightSpot(), device="cpu")
               for name in ("lps", "ras", "spl", "permuted")}
    reference = results["lps"].heatmap
    for name, result in results.items():
        lps = voxel_lps(result.heatmap).reshape(-1, 3)
        same_voxel = np.rint(reference.physical_to_index(lps)).astype(int)  # the LPS image's voxel at each centre
        np.testing.assert_allclose(result.heatmap.array.reshape(-1), reference.array[tuple(same_voxel.T)], atol=1e-6)
        # the peak is one of the map's maxima (ties are broken in each grid's own index order)
        peak = tuple(np.rint(reference.physical_to_index(result.peak_lps)).astype(int))
        assert reference.array[peak] == 1.0


# --- region limits ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["occlusion", "gradient"])
@pytest.mark.parametrize("geometry", ["lps", "oblique20"])  # a tight and a loose index box around the LPS box
def test_region_limits_the_heat_and_keeps_its_values(tiny_encoder_folder, method, geometry):
    image = head_phantom(**GEOMETRIES[geometry], head_radius_mm=45,
                         lesion={"center_lps": (10.0, -5.0, 8.0), "radius_mm": 8.0, "hu": 90.0})
    box = (np.array([-5.0, -20.0, -6.0]), np.array([25.0, 6.0, 20.0]))
    whole = saliency_image(image, weights=str(tiny_encoder_folder), method=method, device="cpu")
    part = saliency_image(image, weights=str(tiny_encoder_folder), method=method, region_lps=box, device="cpu")
    lps = voxel_lps(image)
    inside = np.all((lps >= box[0]) & (lps <= box[1]), axis=-1)
    assert 0 < inside.sum() < inside.size / 4
    assert not part.heatmap.array[~inside].any()
    assert part.heatmap.array[inside].max() == pytest.approx(1.0)
    raw_whole, raw_part = whole.heatmap.array * whole.scale, part.heatmap.array * part.scale
    np.testing.assert_allclose(raw_part[inside], raw_whole[inside], rtol=1e-4, atol=1e-6 * whole.scale)
    assert part.summary()["region"] == {"min_lps": box[0].tolist(), "max_lps": box[1].tolist()}
    if method == "occlusion":
        assert part.details["windows"] < whole.details["windows"] == whole.details["windows_whole_grid"]


def test_cube_region_around_the_point():
    image = bright_blob_head("lps")
    result = saliency_image(image, weights=BrightSpot(), target="point", point_lps=BLOB, cube_mm=12.0,
                            method="occlusion", device="cpu")
    inside = np.all(np.abs(voxel_lps(image) - BLOB) <= 6.0, axis=-1)
    assert result.heatmap.array[inside].max() == 1.0 and not result.heatmap.array[~inside].any()
    assert result.details["windows"] < result.details["windows_whole_grid"]


# --- faithfulness on a model trained here -------------------------------------------------------------

TRIAGE_SIZE = (8, 24, 20)
HEAD_RADIUS = 24.0  # a small head on the 5 x 2 x 2 mm triage grid itself (SPL): no resampling to wait for
BRAIN_SEMI_AXES = 0.88 * np.array([0.75, 0.95, 0.85]) * HEAD_RADIUS


def triage_head(seed, centre=None, radius=8.0, hu=75.0):
    lesion = None if centre is None else {"center_lps": tuple(centre), "radius_mm": radius, "hu": hu}
    return head_phantom(shape=(10, 24, 20), spacing=(5.0, 2.0, 2.0), direction=SPL, head_radius_mm=HEAD_RADIUS,
                        seed=seed, noise_hu=5.0, lesion=lesion, dtype=np.float32)


def random_centre(rng):
    while True:
        u = rng.uniform(-1, 1, 3)
        if (u ** 2).sum() <= 1:
            return u * 0.5 * BRAIN_SEMI_AXES


@pytest.fixture(scope="module")
def bleed_model():
    """A TriageModel trained here (40 Adam steps of 16 scans) on heads with and without a 60-80 HU bleed
    of random size and place; inputs from triage_preprocess, as saliency feeds it."""
    from CTFMLib.networks import TriageModel
    from CTFMLib.triage import triage_preprocess

    rng = np.random.default_rng(0)
    scans, labels = [], []
    for i in range(64):
        bleed = bool(i % 2)
        image = triage_head(100 + i, random_centre(rng) if bleed else None, rng.uniform(7, 9), rng.uniform(60, 80))
        scans.append(triage_preprocess(image, size=TRIAGE_SIZE).array)
        labels.append(float(bleed))
    x, y = torch.from_numpy(np.stack(scans)), torch.tensor(labels)
    torch.manual_seed(0)
    model = TriageModel(SegResEncoder(init_filters=4, blocks_down=(1, 1)), hidden=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(40):
        pick = torch.from_numpy(np.random.default_rng([1, step]).choice(len(scans), 16, replace=False))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, {"_preprocessing": {"size": list(TRIAGE_SIZE)}, "threshold": 0.5, "name": "bleed test model"}


def triage_probability(model, image) -> float:
    from CTFMLib.triage import triage_preprocess

    with torch.no_grad():
        return float(torch.sigmoid(model[0](torch.from_numpy(triage_preprocess(image, size=TRIAGE_SIZE).array[None]))))


CASES = [np.array([5.0, -6.0, 4.0]), np.array([-6.0, 5.0, -4.0])]


@pytest.mark.slow
@pytest.mark.parametrize("centre", CASES, ids=["left-anterior", "right-posterior"])
def test_heat_peaks_inside_the_bleed_and_deleting_it_matters_most(bleed_model, centre):
    radius = 8.0
    image = triage_head(7, centre, radius)
    with_bleed, without = triage_probability(bleed_model, image), triage_probability(bleed_model, triage_head(7))
    assert with_bleed - without > 0.05  # the model does respond to the bleed
    for method, mask in (("gradient", None), ("occlusion", (2, 5, 5))):  # a 10 mm cube on this 48 mm head
        result = saliency_image(image, target="triage", triage_model=bleed_model, method=method, mask_size=mask,
                                device="cpu")
        assert result.heatmap.geometry.same_grid(image.geometry)
        assert np.linalg.norm(result.peak_lps - centre) <= radius, method
        # Deletion: the top 1% of voxels by heat set to brain (what the bleed sits in) vs a random 1% of the head.
        heat = result.heatmap.array.reshape(-1)
        n = int(round(0.01 * heat.size))
        top = np.argsort(heat)[-n:]
        head = np.flatnonzero(image.array.reshape(-1) > -500)
        drops = []
        for voxels in [top] + [np.random.default_rng(s).choice(head, n, replace=False) for s in range(5)]:
            edited = image.array.copy().reshape(-1)
            edited[voxels] = HEAD_HU["brain"]
            edited = image.with_array(edited.reshape(image.shape))
            drops.append(abs(with_bleed - triage_probability(bleed_model, edited)))
        assert drops[0] > max(drops[1:]), (method, drops)


# --- targets, errors, cancel ---------------------------------------------------------------------------

SEG_LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left"}


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    """A small SegResNetDS written by MONAI in the published layout, with its labels.json."""
    model = monai_segresnet(out_channels=4, init_filters=4, blocks_down=(1, 1, 1), dsdepth=2, seed=3)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 4, "blocks_down": [1, 1, 1],
              "dsdepth": 2}
    folder = write_published_layout(model, tmp_path_factory.mktemp("seg"), config)
    (folder / "labels.json").write_text(json.dumps({"0": "background", **SEG_LABELS}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["occlusion", "gradient"])
def test_class_target_explains_a_class_probability_over_the_region(seg_folder, method):
    """The mean softmax probability of "liver" over the region's voxels: occlusion equals MONAI's on a module
    that computes it, and the gradient attributions add up to its value on the image minus on air."""
    from monai.visualize import OcclusionSensitivity

    from CTFMLib.weights import load_model

    image = body_phantom(shape=(40, 36, 12), spacing=(2.0, 2.0, 6.0))
    box = (np.array([-30.0, -20.0, -20.0]), np.array([0.0, 10.0, 20.0]))
    result = saliency_image(image, weights=str(seg_folder), target="class", class_name="Liver", region_lps=box,
                            method=method, device="cpu")
    inside = np.all((voxel_lps(image) >= box[0]) & (voxel_lps(image) <= box[1]), axis=-1)
    assert not result.heatmap.array[~inside].any()
    assert result.heatmap.array.max() in (0.0, 1.0) and result.heatmap.array.min() == 0.0
    assert "class 'liver' (channel 1)" in result.notes[0]
    # The network saw the model-card grid (no resampling), zero-padded to a multiple of 4 (two downsamplings).
    pre = preprocess(image)
    grid = tuple(-(-n // 4) * 4 for n in pre.array.shape)
    assert tuple(result.details["grid"]) == grid
    x = np.zeros((1, 1) + grid, np.float32)
    x[(0, 0) + tuple(slice(0, n) for n in pre.array.shape)] = pre.array
    centres = pre.geometry.index_to_physical(np.indices(grid).reshape(3, -1).T)
    in_box = np.all((centres >= box[0]) & (centres <= box[1]), axis=1).reshape(grid)
    model = load_model(seg_folder)[0]

    class LiverInRegion(nn.Module):
        def forward(self, batch):
            return torch.softmax(model(batch), 1)[:, 1][:, torch.from_numpy(in_box)].mean(dim=1, keepdim=True)

    with torch.no_grad():
        p_image, p_air = (float(LiverInRegion()(torch.from_numpy(v))) for v in (x, np.zeros_like(x)))
    start, end = result.details["box_start"], result.details["box_end"]
    rows = tuple(slice(s, e) for s, e in zip(start, end))
    if method == "occlusion":
        occluded, _ = OcclusionSensitivity(nn_module=LiverInRegion(), n_batch=12, activate=False, mask_size=10,
                                           overlap=0.25, verbose=False)(torch.from_numpy(x))
        expected = p_image - occluded[0, 0].numpy()
        assert np.abs(expected[rows]).max() > 1e-5
        np.testing.assert_allclose(result.model_heat[rows], expected[rows], rtol=0, atol=1e-6)
        assert result.details["windows"] < result.details["windows_whole_grid"]
    else:
        assert abs(p_image - p_air) > 1e-4
        assert result.model_heat.sum() == pytest.approx(p_image - p_air, rel=0.1, abs=1e-5)


def test_class_target_refuses_a_class_the_model_lacks(seg_folder):
    with pytest.raises(ValueError, match=r"no class 'pancreas'.*liver, spleen, kidney_left"):
        saliency_image(body_phantom(shape=(24, 24, 8)), weights=str(seg_folder), target="class",
                       class_name="pancreas", device="cpu")


def test_cancel_stops_the_work_and_restores_the_model():
    image = bright_blob_head("lps")
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU())  # a trainable network in training mode
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if "occluded window" in message:
            raise Cancelled()

    with pytest.raises(Cancelled):
        saliency_image(image, weights=model, method="occlusion", batch_size=4, progress=progress, device="cpu")
    assert model.training and all(p.requires_grad for p in model.parameters())
    fractions = [f for f in seen if f is not None]
    assert fractions == sorted(fractions) and 0.1 < fractions[-1] < 0.95


def test_bad_arguments_name_the_problem():
    image = bright_blob_head("lps")
    with pytest.raises(ValueError, match="target must be one of"):
        saliency_image(image, weights=BrightSpot(), target="organ")
    with pytest.raises(ValueError, match="needs its centre"):
        saliency_image(image, weights=BrightSpot(), cube_mm=20)
    with pytest.raises(ValueError, match="needs a triage model"):
        saliency_image(image, target="triage")
    with pytest.raises(Exception, match="holds no voxel of the image"):
        saliency_image(image, weights=BrightSpot(), region_lps=((500, 500, 500), (600, 600, 600)))
    with pytest.raises(Exception, match="lies outside the image"):
        saliency_image(image, weights=BrightSpot(), target="point", point_lps=(500.0, 0.0, 0.0))
    assert parse_target("point:1,-2.5,3")[0] == "point" and parse_target("class:liver")[2] == "liver"
    for bad in ("point:1,2", "class:", "embedding:3", "organ"):
        with pytest.raises(ValueError):
            parse_target(bad)


# --- ctfm saliency ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctfm_saliency_end_to_end(tmp_path, tiny_encoder_folder):
    from ctfm_testing.plugin import run_ctfm

    image = head_phantom(**GEOMETRIES["ras"], head_radius_mm=45,
                         lesion={"center_lps": (10.0, -5.0, 8.0), "radius_mm": 8.0, "hu": 90.0})
    write_image(image, tmp_path / "head.nii.gz")
    roi_ras = "--roi=-30,-10,-10,10,25,30"  # RAS; x and y flip: the LPS box is x -10..30, y -25..10, z -10..30
    out = tmp_path / "out" / "heat.nii.gz"
    proc = run_ctfm("--progress", "none", "saliency", tmp_path / "head.nii.gz", "--weights", tiny_encoder_folder,
                    "--target", "embedding", "--method", "occlusion", roi_ras, "--ras", "--out", out,
                    "--device", "cpu", "--threads", "1", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "out" / "heat.json").read_text())
    assert printed["target"] == "embedding" and printed["method"] == "occlusion"
    assert printed["region"] == {"min_lps": [-10.0, -25.0, -10.0], "max_lps": [30.0, 10.0, 30.0]}
    heat = read_image(out)
    assert heat.geometry.same_grid(image.geometry)
    lps = voxel_lps(heat)
    inside = np.all((lps >= [-10, -25, -10]) & (lps <= [30, 10, 30]), axis=-1)
    assert heat.array.max() == pytest.approx(1.0) and not heat.array[~inside].any()
    peak = np.unravel_index(np.argmax(heat.array), heat.shape)
    np.testing.assert_allclose(printed["peak_lps"], lps[peak], atol=1e-3)
    np.testing.assert_allclose(printed["peak_ras"], lps[peak] * [-1, -1, 1], atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--target", "point:1,2"], "point needs three numbers"),
    (["--target", "lesion"], "unknown saliency target"),
    (["--target", "point:400,0,0", "--method", "gradient", "--weights", "ENC"], "lies outside the image"),
    (["--target", "class:pancreas", "--weights", "SEG"], "no class 'pancreas'"),
    (["--target", "triage"], "--target triage needs --model"),
    (["--target", "embedding", "--cube", "20"], "--cube needs a centre"),
])
def test_ctfm_saliency_errors(tmp_path, capsys, seg_folder, tiny_encoder_folder, args, message):
    from CTFMLib.cli import main

    write_image(body_phantom(shape=(24, 24, 8)), tmp_path / "ct.nii.gz")
    # a model that is on this computer, so that the error under test is the one reported
    args = [{"SEG": str(seg_folder), "ENC": str(tiny_encoder_folder)}.get(a, a) for a in args]
    rc = main(["--progress", "none", "saliency", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "h.nii.gz"),
               "--device", "cpu", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "h.nii.gz").exists()
