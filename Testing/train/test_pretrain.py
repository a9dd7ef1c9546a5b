"""CT-FM pretraining task: within-scan NT-Xent, the views, the data split, learning on a real CT, export."""

import copy
import math
import time

import numpy as np
import pytest
import torch

from CTFMLib.networks import SegResEncoder
from CTFMLib.preprocess import PreprocessConfig, foreground_box, preprocess
from CTFMLib.train import views as V
from CTFMLib.train.losses import ntxent_within_scan
from CTFMLib.train.pretrain import PretrainTask, ProjectionModel
from CTFMLib.weights import load_model

OFF = {"scale": [1.0, 1.0], "flip_p": 0.0, "hist_shift_p": 0.0, "hist_points": 5, "smooth_p": 0.0,
       "smooth_sigma": [0.5, 1.0]}
RECIPE_VIEWS = {"scale": [0.33, 1.0], "flip_p": 0.5, "hist_shift_p": 0.5, "hist_points": 5, "smooth_p": 0.5,
                "smooth_sigma": [0.5, 1.0]}


def make_config(pretrain=None, model=None, run=None, views=None):
    """A config shaped like DEFAULTS["pretrain"], with a tiny encoder and small crops."""
    cfg = {
        "pretrain": {"crops_per_scan": 8, "crop_size": [16, 32, 32], "temperature": 0.1, "projection": [32, 32, 16],
                     "spacing": [3, 1, 1], "hu_range": [-1024, 2048], "views": dict(RECIPE_VIEWS)},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1, 1], "weights": None},
        "run": {"seed": 0, "device": "cpu", "precision": "auto", "checkpoint_every": 100, "log_every": 10,
                "deterministic": False, "out_dir": None, "scans_per_step": 1},
        "optim": {"lr": 2e-3, "weight_decay": 1e-6, "warmup_steps": 0, "max_steps": 200, "grad_clip": None},
    }
    cfg["pretrain"].update(pretrain or {})
    cfg["pretrain"]["views"].update(views or {})
    cfg["model"].update(model or {})
    cfg["run"].update(run or {})
    return cfg


@pytest.fixture(scope="module")
def phantom_volume():
    from ctfm_testing.phantoms import body_phantom

    return preprocess(body_phantom(), PreprocessConfig(spacing=(3, 1, 1))).array


@pytest.fixture(scope="module")
def real_ct_volume():
    """The example CT the way pretraining sees it: SPL, 3 x 1 x 1 mm, cropped to the HU > 0 box, HU -> [0, 1]."""
    from ctfm_testing.data import require_shared_data
    from CTFMLib.image import read_image

    path = require_shared_data("totalsegmentator_example", "example_ct.nii.gz")
    array = preprocess(read_image(path), PreprocessConfig(spacing=(3, 1, 1), crop_foreground=False)).array
    start, end = foreground_box(array - np.float32(1024 / 3072))  # scaled value > 1024/3072 <=> HU > 0
    return np.ascontiguousarray(array[tuple(slice(s, e) for s, e in zip(start, end))])


# --- the loss ------------------------------------------------------------------------------


def reference_ntxent(z, n_crops, temperature):
    """NT-Xent within each scan, written out with plain Python loops."""
    rows = [list(map(float, r)) for r in z]
    group = 2 * n_crops
    total, count = 0.0, 0
    for s in range(len(rows) // group):
        unit = []
        for r in rows[s * group:(s + 1) * group]:
            norm = math.sqrt(sum(v * v for v in r))
            unit.append([v / norm for v in r])
        for i in range(group):
            positive = i + n_crops if i < n_crops else i - n_crops
            denominator = 0.0
            for k in range(group):
                if k != i:
                    denominator += math.exp(sum(a * b for a, b in zip(unit[i], unit[k])) / temperature)
            similarity = sum(a * b for a, b in zip(unit[i], unit[positive])) / temperature
            total += -(similarity - math.log(denominator))
            count += 1
    return total / count


def test_ntxent_equals_explicit_reference_on_random_embeddings():
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        z = torch.randn(2 * 2 * 15, 12, generator=g, dtype=torch.float64)
        got = float(ntxent_within_scan(z.to(dtype), 15, 0.1))
        assert abs(got - reference_ntxent(z.tolist(), 15, 0.1)) < tol


def test_ntxent_of_identical_embeddings_is_log_of_the_candidates():
    z = torch.ones(2 * 2 * 15, 7) * torch.tensor([0.3, -1, 2, 0.5, 0, 1, 4])
    assert abs(float(ntxent_within_scan(z, 15, 0.1)) - math.log(29)) < 1e-5


def test_ntxent_never_compares_crops_of_different_scans():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    together = float(ntxent_within_scan(torch.cat([a, b]), 15, 0.1))
    separately = (float(ntxent_within_scan(a, 15, 0.1)) + float(ntxent_within_scan(b, 15, 0.1))) / 2
    assert abs(together - separately) < 1e-6
    # Making scan b identical to scan a would be a disaster for a cross-scan loss; here it changes nothing.
    assert abs(float(ntxent_within_scan(torch.cat([a, a]), 15, 0.1)) - float(ntxent_within_scan(a, 15, 0.1))) < 1e-6


def test_ntxent_rejects_a_batch_that_is_not_whole_scans():
    with pytest.raises(ValueError, match="whole number of scans"):
        ntxent_within_scan(torch.randn(29, 4), 15, 0.1)


def test_loss_of_a_fresh_model_on_phantom_crops_is_near_chance(phantom_volume):
    task = PretrainTask(make_config(pretrain={"crops_per_scan": 15}), [phantom_volume])
    model = task.build_model()
    with torch.no_grad():
        loss = float(task.loss(model, task.batch(0), torch.device("cpu")))
    assert abs(loss - math.log(29)) < 0.3


def test_projection_head_must_take_the_encoders_channels():
    with pytest.raises(ValueError, match=r"deepest channel count 32 .*\[32, 16, 8\]"):
        PretrainTask(make_config(pretrain={"projection": [512, 256, 128]}), [np.zeros((8, 8, 8), np.float32)])
    model = ProjectionModel(SegResEncoder(init_filters=4, blocks_down=(1, 1, 1, 1)), [32, 32, 16])
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Linear"]  # no batch norm in the head
    assert model(torch.rand(3, 1, 16, 16, 16)).shape == (3, 16)


# --- the views -------------------------------------------------------------------------------


def random_crop_values(seed=0, shape=(16, 24, 24)):
    rng = np.random.default_rng(seed)
    x = rng.random(shape).astype(np.float32)
    x[:, :4] = 0.0  # a block of air, so the range touches 0 as in CT
    return x


def test_views_keep_shape_dtype_and_range():
    crop = random_crop_values()
    cfg = {**RECIPE_VIEWS, "flip_p": 1.0, "hist_shift_p": 1.0, "smooth_p": 1.0}
    for seed in range(4):
        for view in V.make_views(crop, np.random.default_rng(seed), cfg):
            assert view.shape == crop.shape and view.dtype == np.float32
            assert view.min() >= 0.0 and view.max() <= 1.0


def test_each_augmentation_changes_the_crop_only_when_drawn():
    crop = random_crop_values()
    a, b = V.make_views(crop, np.random.default_rng(1), OFF)
    assert np.array_equal(a, crop) and np.array_equal(b, crop)
    for change in ({"scale": [0.5, 0.5]}, {"flip_p": 1.0}, {"hist_shift_p": 1.0}, {"smooth_p": 1.0}):
        for view in V.make_views(crop, np.random.default_rng(1), {**OFF, **change}):
            assert not np.allclose(view, crop, atol=1e-3), change
    flipped, _ = V.make_views(crop, np.random.default_rng(1), {**OFF, "flip_p": 1.0})
    assert np.array_equal(flipped, crop[::-1])  # axis 0: superior-inferior in SPL


def test_views_are_a_function_of_the_generator_state():
    crop = random_crop_values()
    first = V.make_views(crop, np.random.default_rng(7), RECIPE_VIEWS)
    again = V.make_views(crop, np.random.default_rng(7), RECIPE_VIEWS)
    other = V.make_views(crop, np.random.default_rng(8), RECIPE_VIEWS)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])  # the two views are drawn independently


def test_histogram_shift_is_monotone_and_keeps_the_range():
    x = np.linspace(0.1, 0.7, 1000, dtype=np.float32).reshape(10, 10, 10)
    for seed in range(10):
        y = V.histogram_shift(x, np.random.default_rng(seed), 5).ravel()
        assert np.all(np.diff(y) >= 0)
        assert y[0] == pytest.approx(0.1) and y[-1] == pytest.approx(0.7)
        assert not np.allclose(y, x.ravel(), atol=1e-3)


def test_histogram_shift_matches_monai_for_the_same_control_points():
    from monai.transforms import RandHistogramShift

    crop = random_crop_values(2)
    reference, moved = V.histogram_points(np.random.default_rng(4), 5)
    monai = RandHistogramShift(num_control_points=5, prob=1.0)
    monai.randomize()
    monai.reference_control_points, monai.floating_control_points = reference, moved
    expected = np.asarray(monai(torch.from_numpy(crop[None]), randomize=False))[0]
    np.testing.assert_allclose(V.remap_intensities(crop, reference, moved), expected, atol=1e-6)


def test_gaussian_smoothing_matches_monai_away_from_the_edges():
    from monai.transforms import GaussianSmooth

    crop = random_crop_values(3, (20, 24, 24))
    sigmas = (0.6, 0.9, 0.75)
    ours = V.gaussian_smooth(crop, sigmas)
    theirs = np.asarray(GaussianSmooth(sigma=sigmas, approx="erf")(torch.from_numpy(crop[None])))[0]
    inner = (slice(4, -4),) * 3  # MONAI pads with zeros; we replicate the edge
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=2e-4)
    assert np.allclose(V.gaussian_smooth(np.full((8, 8, 8), 0.3, np.float32), sigmas), 0.3, atol=1e-6)


def test_crops_of_a_small_scan_are_padded_with_air_around_it():
    volume = np.full((4, 40, 10), 0.5, dtype=np.float32)
    crop = V.random_crop(volume, (8, 16, 16), np.random.default_rng(0))
    assert crop.shape == (8, 16, 16)
    assert np.all(crop[2:6, :, 3:13] == 0.5)  # centred on the short axes, any 16 of the 40 on the long one
    assert crop.sum() == pytest.approx(0.5 * 4 * 16 * 10)


def test_raw_hounsfield_units_are_refused():
    task = PretrainTask(make_config(), [np.full((20, 40, 40), 40.0, np.float32)])
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*not raw Hounsfield units"):
        task.batch(0)


def test_unknown_view_option_is_named():
    with pytest.raises(ValueError, match="flip_prob.*allowed"):
        V.make_views(random_crop_values(), np.random.default_rng(0), {"flip_prob": 0.5})


# --- data split and model ----------------------------------------------------------------------


def test_batch_is_pure_and_ranks_split_the_global_batch():
    volumes = [np.random.default_rng(i).random((20, 40, 40)).astype(np.float32) for i in range(5)]
    task = PretrainTask(make_config(pretrain={"crops_per_scan": 3}, run={"scans_per_step": 2}), volumes)
    whole = task.batch(7, 0, 1)
    assert whole["views"].shape == (2, 2, 3, 1, 16, 32, 32) and whole["views"].dtype == torch.float32
    assert torch.equal(task.batch(7, 0, 1)["views"], whole["views"])
    halves = [task.batch(7, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["views"] for h in halves]), whole["views"])
    assert [h["scans"][0] for h in halves] == whole["scans"]
    assert not torch.equal(task.batch(8, 0, 1)["views"], whole["views"])
    # Scans are drawn without replacement within a pass: steps 0-4 (10 slots) show every scan twice.
    seen = [s for step in range(5) for s in task.batch(step)["scans"]]
    assert sorted(seen) == sorted(list(range(5)) * 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        task.batch(0, 0, 4)


def test_model_is_built_from_the_seed():
    task = PretrainTask(make_config(), [np.zeros((8, 8, 8), np.float32)])
    a, b = task.build_model().state_dict(), task.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = PretrainTask(make_config(run={"seed": 1}), [np.zeros((8, 8, 8), np.float32)]).build_model().state_dict()
    assert not torch.equal(a["encoder.conv_init.weight"], c["encoder.conv_init.weight"])


# --- learning and export -------------------------------------------------------------------------


STEPS = 80


@pytest.mark.slow
def test_80_steps_on_a_real_ct_lower_the_loss(real_ct_volume):
    # The recipe's views without the histogram shift: a 4-filter network cannot become invariant to random
    # intensity remapping in 80 steps, and the point here is that crops, views, model and loss learn together.
    cfg = make_config(views={"scale": [0.5, 1.0], "hist_shift_p": 0.0})
    task = PretrainTask(cfg, [real_ct_volume])
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)  # the decay ends on a settled model
    cpu = torch.device("cpu")
    probes = [task.batch(10_000 + i) for i in range(4)]  # fixed unseen batches: a noise-free before/after

    def probe_loss():
        with torch.no_grad():
            return float(np.mean([float(task.loss(model, b, cpu)) for b in probes]))

    before, losses, start = probe_loss(), [], time.perf_counter()
    for step in range(STEPS):
        loss = task.loss(model, task.batch(step), cpu)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 20 == 19:
            print(f"step {step + 1}: mean loss of the last 20 steps {np.mean(losses[-20:]):.3f}")
    after = probe_loss()
    print(f"probe loss {before:.3f} -> {after:.3f} (chance ln(15) = {math.log(15):.3f}); "
          f"{time.perf_counter() - start:.1f} s; validate: {task.validate(model, cpu)}")
    assert abs(before - math.log(15)) < 0.3
    assert after < 0.8 * before
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])


def test_export_gives_the_training_encoder(tmp_path, phantom_volume):
    task = PretrainTask(make_config(pretrain={"crops_per_scan": 4}), [phantom_volume])
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = task.loss(model, task.batch(step), torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = task.validate(model, torch.device("cpu"))
    assert set(metrics) == {"val_loss", "val_top1"} and model.training
    task.export(model, tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors"}
    loaded, info = load_model(tmp_path / "model", expect="SegResEncoder")
    assert info.config["init_filters"] == 4 and info.config["blocks_down"] == [1, 1, 1, 1]
    x = torch.from_numpy(phantom_volume[None, None, :32, :48, :48].copy())
    encoder = copy.deepcopy(model.encoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), encoder.embed(x), atol=1e-6, rtol=0)

    # The exported folder is also a starting point (model.weights), with the encoder's weights exactly.
    again = PretrainTask(make_config(model={"weights": str(tmp_path / "model")}), [phantom_volume]).build_model()
    exported = loaded.state_dict()
    assert all(torch.equal(again.encoder.state_dict()[k], exported[k]) for k in exported)
    with pytest.raises(ValueError, match="set model.init_filters"):
        PretrainTask(make_config(model={"weights": str(tmp_path / "model"), "init_filters": 8},
                                 pretrain={"projection": [64, 32, 16]}), [phantom_volume]).build_model()
