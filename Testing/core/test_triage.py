"""Head-CT triage at inference: upstream's preprocessing (against MONAI), heat maps back on the input grid,
the same network input as training, a model trained here on phantoms, and ``ctfm triage``."""

import json
import math
import time

import numpy as np
import pytest
import torch

from ctfm_testing.phantoms import GEOMETRIES, head_phantom
from ctfm_testing.plugin import run_ctfm
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.progress import null_progress, parse_json_progress
from CTFMLib.train.classify import (
    DEFAULT_WINDOWS,
    ClassifyTask,
    TriageScanCache,
    auroc,
    load_triage_model,
)
from CTFMLib.train.config import load_config
from CTFMLib.train.data import ScanRef, find_scans
from CTFMLib.train.trainer import train
from CTFMLib.triage import TRIAGE_SPACING, triage_image, triage_preprocess, triage_volume
from CTFMLib.weights import WeightsError

# The six issue-2 geometries (plus SPL, the model's own); dtype variants add nothing here.
SIX = ["lps", "ras", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "permuted", "spl"]
WINDOW_NAMES = ["blood", "subdural", "stroke", "bone"]
# MONAI and we resample in float32 with interpolation coordinates computed differently (MONAI: an affine
# grid; here: index * scale), so a sample may differ by float32 rounding of its coordinate (~1e-6 voxel)
# times the HU step to the next voxel (up to ~2000 HU at the skull): a few 1e-3 HU, measured up to 4e-3 HU
# on the oblique grid and 1e-4 HU on the others. 0.01 HU (a thousandth of CT noise) is the bound, checked
# per window as |difference| * window width.
HU_TOLERANCE = 0.01


def head(geometry: str, seed: int = 0, lesion=None, radius: float = 45.0, noise: float = 5.0) -> Image:
    g = {k: v for k, v in GEOMETRIES[geometry].items() if k != "dtype"}
    return head_phantom(**g, seed=seed, noise_hu=noise, lesion=lesion, head_radius_mm=radius)


def upstream_monai(path, size=(48, 128, 128), pixdim=TRIAGE_SPACING) -> np.ndarray:
    """evaluation/sinoct.yaml's transforms (validation/prediction branch), run by MONAI itself.

    One substitution: the ITK reader (``reader: ITKReader``) needs the ``itk`` package, which is not
    installed; LoadImage's default NIfTI reader (nibabel) gives the same voxels and affine for a .nii.gz.
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        ConcatItemsd,
        CopyItemsd,
        CropForegroundd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    steps = [
        LoadImaged(keys="image", ensure_channel_first=True),
        EnsureTyped(keys="image"),
        Orientationd(keys="image", axcodes="SPL"),
        CropForegroundd(keys="image", source_key="image"),
        Spacingd(keys="image", pixdim=list(pixdim), mode="bilinear"),
        SpatialPadd(keys="image", spatial_size=list(size), mode="minimum"),
        CenterSpatialCropd(keys="image", roi_size=list(size)),
        CopyItemsd(keys="image", times=4, names=WINDOW_NAMES),
    ]
    upstream_windows = [(0, 80), (-125, 175), (28, 36), (-900, 2100)]  # as written in the YAML
    steps += [ScaleIntensityRanged(keys=name, a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)
              for name, (lo, hi) in zip(WINDOW_NAMES, upstream_windows)]
    steps.append(ConcatItemsd(keys=WINDOW_NAMES, name="image", dim=1))
    return np.asarray(Compose(steps)({"image": str(path)})["image"])


def assert_matches_upstream(ours: np.ndarray, ref: np.ndarray, size) -> None:
    assert ours.shape == ref.shape == (1, 4 * size[0]) + tuple(size[1:])
    assert ours.dtype == np.float32
    for w, (lo, hi) in enumerate(DEFAULT_WINDOWS):
        diff = np.abs(ours[0, w * size[0]:(w + 1) * size[0]] - ref[0, w * size[0]:(w + 1) * size[0]])
        assert diff.max() * (hi - lo) <= HU_TOLERANCE, (WINDOW_NAMES[w], diff.max() * (hi - lo))


# --- preprocessing against MONAI -------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 128, 128), (80, 200, 200)], ids=["upstream-size-crops", "large-size-pads"])
def test_triage_preprocess_equals_upstream_monai_recipe_on_real_ct(size):
    from ctfm_testing.data import require_shared_data

    path = require_shared_data("totalsegmentator_example", "example_ct.nii.gz")
    x = triage_preprocess(read_image(path), size=size)
    assert_matches_upstream(x.array, upstream_monai(path, size), size)
    # The two sizes exercise both halves of pad/crop on this 3 mm abdomen (68 x 144 x 182 voxels at
    # 5 x 2 x 2 mm after the foreground crop): every axis cropped at the upstream size, padded at the other.
    resampled = x.volume.hu.shape
    assert all((n > s) == (size == (48, 128, 128)) for n, s in zip(resampled, size)), resampled


@pytest.mark.parametrize("geometry", SIX)
def test_triage_preprocess_equals_upstream_in_every_geometry(geometry, tmp_path):
    path = write_image(head(geometry, lesion={"center_lps": (12, -8, 10), "radius_mm": 9}), tmp_path / "h.nii.gz")
    size = (9, 64, 30)  # the head is ~16 x 43 x 34 voxels at 5 x 2 x 2 mm: S and L cropped, P padded
    assert_matches_upstream(triage_preprocess(read_image(path), size=size).array, upstream_monai(path, size), size)


def test_resampled_size_rounds_halves_like_monai(tmp_path):
    """A foreground box of n slices at 2.5 mm spans (n - 1) * 0.5 slices of 5 mm: a half for every even n.
    MONAI rounds ``distance + 1`` half-to-even (n = 6: 3.5 -> 4 slices, n = 8: 4.5 -> 4)."""
    for n, expected in [(6, 4), (8, 4), (10, 6)]:
        hu = np.full((20, 20, n + 4), -1000, dtype=np.int16)
        hu[5:15, 4:16, 2:2 + n] = 40  # the box: n slices along k (S)
        path = write_image(Image(hu, spacing=(1.0, 3.0, 2.5), metadata={"modality": "CT"}), tmp_path / f"b{n}.nii.gz")
        x = triage_preprocess(read_image(path), size=(5, 10, 11))
        assert x.volume.hu.shape[0] == expected
        assert_matches_upstream(x.array, upstream_monai(path, (5, 10, 11)), (5, 10, 11))


# --- heat maps back on the input grid ---------------------------------------------------------------


def voxel_positions(image: Image) -> np.ndarray:
    ijk = np.indices(image.shape, dtype=np.float64).reshape(3, -1).T
    return image.index_to_physical(ijk).reshape(image.shape + (3,))


@pytest.mark.parametrize("geometry", SIX)
def test_heat_maps_return_to_the_input_grid(geometry):
    image = head(geometry)
    x = triage_preprocess(image)  # the whole head fits 48 x 128 x 128: padded on every axis
    S, P, L = x.geometry.shape
    positions = voxel_positions(image)

    # A spike at the triage voxel nearest a point comes back as the trilinear tent around that voxel's
    # centre, in physical space along the triage axes, whichever window copy holds it.
    point = np.array([9.0, -7.0, 6.0])  # LPS mm, inside the brain
    nearest = np.round(x.geometry.physical_to_index(point)).astype(int)
    heat = np.zeros((4 * S, P, L), dtype=np.float32)
    heat[2 * S + nearest[0], nearest[1], nearest[2]] = 1.0  # in the stroke-window copy
    back = x.to_input(heat)
    assert back.shape == image.shape and back.dtype == np.float32
    centre = x.geometry.index_to_physical(nearest)
    along = (positions - centre) @ x.geometry.direction / x.geometry.spacing  # triage voxels, per triage axis
    tent = np.prod(np.clip(1 - np.abs(along), 0, None), axis=-1)
    np.testing.assert_allclose(back, tent, atol=1e-5)
    # Its peak: within half a triage voxel (the rounding to the triage grid) plus half an input voxel (the
    # peak sits on an input voxel centre) of the point, per axis; one triage voxel when the input is finer.
    peak = positions[np.unravel_index(np.argmax(back), back.shape)]
    input_spacing = np.abs(x.geometry.direction.T @ image.direction) @ image.spacing  # per triage axis
    assert np.all(np.abs((peak - point) @ x.geometry.direction) <= (x.geometry.spacing + input_spacing) / 2 + 1e-6)

    # A constant map comes back constant over the foreground box (HU > 0) and 0 outside it.
    box = np.zeros(image.shape, dtype=bool)
    inside = np.nonzero(image.array > 0)
    box[tuple(slice(i.min(), i.max() + 1) for i in inside)] = True
    flat = x.to_input(np.full((S, P, L), 0.7, dtype=np.float32))
    np.testing.assert_allclose(flat[box], 0.7, atol=1e-6)
    assert (flat[~box] == 0).all()


@pytest.mark.parametrize("geometry", ["oblique20", "permuted"])
def test_heat_map_is_zero_where_the_centre_crop_removed_the_scan(geometry):
    image = head(geometry)
    x = triage_preprocess(image, size=(9, 30, 24))  # S, P and L all cropped (head: ~16 x 43 x 34)
    back = x.to_input(np.ones((9, 30, 24), dtype=np.float32))
    index = x.geometry.physical_to_index(voxel_positions(image).reshape(-1, 3)).reshape(image.shape + (3,))
    kept = np.all((index > 0.5) & (index < np.array(x.geometry.shape) - 1.5), axis=-1)
    gone = np.any((index < -1.5) | (index > np.array(x.geometry.shape) + 0.5), axis=-1)
    np.testing.assert_allclose(back[kept], 1.0, atol=1e-6)
    assert kept.sum() > 1000 and (back[gone] == 0).all() and gone.any()


def test_to_input_refuses_a_map_on_another_grid():
    x = triage_preprocess(head("lps"), size=(9, 30, 24))
    with pytest.raises(ValueError, match=r"\(36, 30, 24\) or \(9, 30, 24\)"):
        x.to_input(np.zeros((9, 30, 25)))


# --- training and inference see the same input ------------------------------------------------------


def test_training_feeds_the_network_what_triage_feeds_it(tmp_path):
    """``ctfm train classify``'s data path (TriageScanCache through run.classify_task) and ClassifyTask's
    batches give, voxel for voxel, the network input triage_preprocess gives at inference."""
    from CTFMLib.train.run import classify_task

    rows = ["path,label"]
    images = {}
    # More than 50 slices of 3 mm, so the pretraining scan filters keep them; two geometries.
    for i, (direction, shape, spacing) in enumerate([
        (GEOMETRIES["oblique20"]["direction"], (48, 48, 60), (4.0, 4.0, 3.0)),
        (GEOMETRIES["permuted"]["direction"], (40, 60, 40), (4.0, 3.0, 4.0)),
    ]):
        lesion = {"center_lps": (10.0, 5.0, 15.0), "radius_mm": 12.0} if i else None
        image = head_phantom(shape=shape, spacing=spacing, direction=direction, seed=i, lesion=lesion,
                             head_radius_mm=60)
        images[f"head{i}.nii.gz"] = image
        write_image(image, tmp_path / f"head{i}.nii.gz")
        rows.append(f"head{i}.nii.gz,{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    size = (12, 40, 36)
    config = load_config(None, "classify", {
        "data": {"source": [str(tmp_path / "labels.csv")], "workers": 0},
        "model": {"init_filters": 4, "blocks_down": [1, 1]},
        "classify": {"size": list(size), "flip_p": 0.0},
        "run": {"scans_per_step": 2},
    })
    task, usable, skipped = classify_task(config, find_scans([tmp_path / "labels.csv"]), tmp_path / "out",
                                           null_progress)
    assert not skipped and len(usable) == 2
    batch = task.batch(1)
    for k, index in enumerate(batch["items"]):
        name = f"head{task.data[index][1]}.nii.gz"  # label i belongs to head i
        expected = triage_preprocess(read_image(tmp_path / name), size=size).array
        np.testing.assert_array_equal(batch["x"][k].numpy(), expected)
    # The cache holds triage_volume's HU grid as is (no scaling round trip to and from [0, 1]).
    cache = TriageScanCache(tmp_path / "out" / "data")
    scan = ScanRef(str(tmp_path / "head0.nii.gz"))
    np.testing.assert_array_equal(cache.cached(scan), triage_volume(images["head0.nii.gz"]).hu)


# --- a triage model trained here on phantoms ---------------------------------------------------------

MODEL_SPACING = (8.0, 4.0, 4.0)  # coarser than upstream's 5 x 2 x 2 mm so the test trains in seconds
MODEL_SIZE = (10, 24, 20)


def bleed(rng, radius: float) -> dict:
    """A 70-90 HU sphere of 14-18 mm radius well inside the brain (a clear bleed: 100 steps learn it)."""
    while True:
        u = rng.uniform(-1, 1, 3)
        if (u ** 2).sum() <= 1:
            break
    centre = u * 0.55 * 0.88 * np.array([0.75, 0.95, 0.85]) * radius
    return {"center_lps": tuple(centre), "radius_mm": float(rng.uniform(14, 18)), "hu": float(rng.uniform(70, 90))}


def random_head(seed: int, abnormal: bool, geometry: str) -> Image:
    rng = np.random.default_rng([seed, 7])
    radius = float(rng.uniform(44, 46))
    return head(geometry, seed=seed, lesion=bleed(rng, radius) if abnormal else None, radius=radius)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine these tiny conv3d steps run several times faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_triage_image_on_held_out_phantoms_in_every_geometry(tmp_path, one_thread):
    t0 = time.perf_counter()
    # Training and validation scans go through triage_volume, as `ctfm train classify` caches them.
    training = [(triage_volume(random_head(s, i % 2, ["lps", "spl"][(i // 2) % 2]), MODEL_SPACING).hu, i % 2)
                for i, s in enumerate(range(100, 164))]
    validation = [(triage_volume(random_head(s, i % 2, "ras"), MODEL_SPACING).hu, i % 2)
                  for i, s in enumerate(range(300, 312))]
    config = load_config(None, "classify", {
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "classify": {"size": list(MODEL_SIZE), "hidden": 16, "val_batch": 16, "spacing": list(MODEL_SPACING)},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "max_steps": 100, "weight_decay": 1e-6},
        "run": {"seed": 0, "device": "cpu", "scans_per_step": 8, "checkpoint_every": 1000, "val_every": 0},
    })
    task = ClassifyTask(config, training, validation=validation)
    train(task, tmp_path / "run", device="cpu")
    folder = tmp_path / "run" / "model"
    model, exported = load_triage_model(folder)
    assert exported["_preprocessing"]["spacing"] == list(MODEL_SPACING)

    # Held out: other seeds (heads, noise, bleeds), in the six geometries the model never saw.
    held_out = [(random_head(s, i % 2, g), i % 2) for g in ["ras", "oblique20", "aniso_0.7x0.7x5", "odd_sizes",
                                                            "permuted", "spl"]
                for i, s in enumerate(range(500 + 10 * SIX.index(g), 504 + 10 * SIX.index(g)))]
    results = [triage_image(image, folder, device="cpu") for image, _ in held_out]
    labels = [y for _, y in held_out]
    probabilities = [r.probability for r in results]
    auc = auroc(probabilities, labels)
    print(f"held-out AUC {auc:.3f}, {time.perf_counter() - t0:.1f} s")
    assert auc >= 0.95
    threshold = exported["threshold"]
    assert exported["threshold_source"] == "youden" and 0 < threshold < 1
    for r in results:
        assert r.threshold == threshold and r.model == str(folder)
        assert r.probability == pytest.approx(1 / (1 + math.exp(-r.logit)), abs=1e-12)
        assert r.decision == ("abnormal" if r.probability >= threshold else "normal")
    accuracy = np.mean([(r.decision == "abnormal") == bool(y) for r, y in zip(results, labels)])
    assert accuracy >= 0.8
    # The loaded-model form gives the same numbers; so does the training task's own prediction on the
    # triage grid, i.e. inference runs the network exactly as validation did.
    again = triage_image(held_out[0][0], (model, exported), device="cpu")
    assert again.logit == pytest.approx(results[0].logit, abs=1e-6)
    direct = task.predict(model, [triage_volume(image, MODEL_SPACING).hu for image, _ in held_out[:4]])
    np.testing.assert_allclose(direct, [r.logit for r in results[:4]], atol=1e-5)


# --- errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_triage_folder(tmp_path_factory):
    """An untrained, exported triage model (tiny encoder, default threshold)."""
    folder = tmp_path_factory.mktemp("triage") / "model"
    config = load_config(None, "classify", {"model": {"init_filters": 4, "blocks_down": [1, 1]},
                                            "classify": {"size": [8, 24, 20], "hidden": 4,
                                                         "spacing": [8.0, 4.0, 4.0]}})
    task = ClassifyTask(config, [(np.zeros((4, 4, 4), np.float32), 0)])
    task.export(task.build_model(), folder)
    return folder


def test_triage_refuses_what_it_cannot_use(tiny_triage_folder, tmp_path):
    good = head("lps", radius=45)
    for image, message in [
        (Image(good.array, metadata={"modality": "MR"}), "needs a CT scan"),
        (Image(good.array[:, :, :1]), "3-D volume"),
        (good.with_array(np.where(good.array > 900, np.nan, good.array.astype(np.float32))), "NaN"),
        (good.with_array(np.where(np.arange(good.shape[2]) % 2, -1000, -60) + np.zeros(good.shape, np.int16)),
         "no voxel above 0 HU"),  # HU-like values (air and fat), none above 0
    ]:
        with pytest.raises(ImageError, match=message):
            triage_image(image, tiny_triage_folder, device="cpu")


def test_triage_names_what_a_wrong_model_folder_holds(tiny_encoder_folder, tiny_triage_folder, tmp_path):
    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    segmentation = write_published_layout(
        monai_segresnet(out_channels=3, init_filters=4, blocks_down=(1, 1)), tmp_path / "seg",
        {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 4, "blocks_down": [1, 1],
         "dsdepth": 2})
    image = head("lps")
    for folder, message in [
        (tiny_encoder_folder, "holds a CT-FM encoder .*not a triage model"),
        (segmentation, "holds a segmentation network .*not a triage model"),
        (tiny_triage_folder / "model.safetensors", "is a file"),
        (tmp_path, "without config.json"),
        (tmp_path / "nowhere", "no file, folder or known model named"),
    ]:
        with pytest.raises(WeightsError, match=message):
            triage_image(image, folder, device="cpu")
    with pytest.raises(ValueError, match="TriageModel, config"):
        triage_image(image, (torch.nn.Linear(1, 1), {}), device="cpu")


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctfm_triage_prints_writes_json_and_a_saliency_map(tiny_triage_folder, tmp_path):
    image = head("oblique20", lesion={"center_lps": (5, 5, 5)})
    path = write_image(image, tmp_path / "head.nii.gz")
    out, heat_path = tmp_path / "result" / "triage.json", tmp_path / "heat.nii.gz"
    result = run_ctfm("--progress", "json", "triage", path, "--model", tiny_triage_folder, "--device", "cpu",
                      "--json-out", out, "--json", "--saliency", heat_path, "--method", "gradient", timeout=300)
    assert result.returncode == 0, result.stderr
    fractions = [parse_json_progress(line) for line in result.stderr.splitlines()]
    fractions = [f[0] for f in fractions if f is not None and f[0] is not None]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed) == {"probability", "logit", "decision", "threshold", "model", "seconds", "saliency"}
    assert json.loads(out.read_text()) == printed
    expected = triage_image(read_image(path), tiny_triage_folder, device="cpu")
    assert printed["logit"] == pytest.approx(expected.logit, abs=1e-5)
    assert printed["probability"] == pytest.approx(1 / (1 + math.exp(-printed["logit"])), abs=1e-9)
    assert printed["threshold"] == 0.5 and printed["decision"] == expected.decision
    assert printed["model"] == str(tiny_triage_folder) and printed["seconds"] > 0
    # The saliency map lies on the input grid, scaled to [0, 1], 0 outside the foreground box.
    assert printed["saliency"] == str(heat_path)
    heat = read_image(heat_path)
    assert heat.geometry.same_grid(image.geometry)
    assert heat.array.min() >= 0 and heat.array.max() == pytest.approx(1.0)
    inside = np.nonzero(image.array > 0)
    box = np.zeros(image.shape, dtype=bool)
    box[tuple(slice(i.min(), i.max() + 1) for i in inside)] = True
    assert (heat.array[~box] == 0).all()


def test_ctfm_triage_without_saliency_and_argument_errors(tiny_triage_folder, tmp_path, capsys):
    from CTFMLib.cli import main

    path = write_image(head("lps"), tmp_path / "head.nii.gz")
    assert main(["--progress", "none", "triage", str(path), "--model", str(tiny_triage_folder), "--device", "cpu",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["saliency"] is None and printed["decision"] in ("normal", "abnormal")
    for extra, message in [(["--method", "gradient"], "give --saliency"), (["--saliency", "heat.png"], ".nii.gz")]:
        assert main(["triage", str(path), "--model", str(tiny_triage_folder), *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ctfm_triage_wrong_model_folder_exits_2_with_the_reason(tiny_encoder_folder, tmp_path):
    path = write_image(head("lps"), tmp_path / "head.nii.gz")
    wrong = run_ctfm("triage", path, "--model", tiny_encoder_folder, "--device", "cpu", timeout=300)
    assert wrong.returncode == 2 and "CT-FM encoder" in wrong.stderr and "not a triage model" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not wrong.stdout.strip()


def test_an_imported_triage_model_runs_by_its_id(ctfm_cache, tiny_triage_folder):
    """`ctfm models import` (and the Models section) accept a triage folder; triage then finds it by id."""
    from CTFMLib.weights import import_model

    dest = import_model(tiny_triage_folder, repo_id="my-hospital/bleed-triage")
    assert (dest / "config.json").is_file()
    image = head("lps", seed=3)
    by_id = triage_image(image, "my-hospital/bleed-triage", device="cpu")
    by_folder = triage_image(image, tiny_triage_folder, device="cpu")
    assert by_id.logit == pytest.approx(by_folder.logit, abs=1e-6)
