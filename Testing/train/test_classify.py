"""Scan-level triage fine-tuning: windowed input, AUROC, the task under the real trainer, export round trip."""

import json
import time

import numpy as np
import pytest
import torch

from ctfm_testing.phantoms import GEOMETRIES, head_phantom
from CTFMLib.networks import SegResEncoder, TriageModel
from CTFMLib.train.classify import (
    ClassifyTask,
    auroc,
    center_pad_crop,
    load_triage_model,
    triage_input,
    youden_threshold,
)
from CTFMLib.train.config import load_config
from CTFMLib.train.trainer import train

SPL = GEOMETRIES["spl"]["direction"]  # array axes: i Superior, j Posterior, k Left
PHANTOM_SHAPE = (10, 36, 28)  # cropped on S and P, padded on L to the triage size below
TRIAGE_SIZE = (8, 32, 32)


def phantom(seed: int, bleed: bool) -> np.ndarray:
    """A small SPL head CT (HU float32); with ``bleed`` a 60-80 HU sphere of random size and place in the brain."""
    rng = np.random.default_rng([seed, 7])
    radius = float(rng.uniform(44, 46))
    lesion = None
    if bleed:
        # A point well inside the brain ellipsoid (brain semi-axes 0.88 * (0.75, 0.95, 0.85) * radius).
        while True:
            u = rng.uniform(-1, 1, 3)
            if (u ** 2).sum() <= 1:
                break
        centre = u * 0.55 * 0.88 * np.array([0.75, 0.95, 0.85]) * radius
        lesion = {"center_lps": tuple(centre), "radius_mm": float(rng.uniform(12, 16)),
                  "hu": float(rng.uniform(60, 80))}
    image = head_phantom(shape=PHANTOM_SHAPE, spacing=(8.0, 3.0, 3.0), direction=SPL, dtype=np.float32,
                         seed=seed, noise_hu=5.0, lesion=lesion, head_radius_mm=radius)
    return np.asarray(image.array, dtype=np.float32)


def dataset(seeds) -> list:
    return [(phantom(s, bleed=bool(i % 2)), i % 2) for i, s in enumerate(seeds)]


def tiny_config(**overrides):
    base = {
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "classify": {"size": list(TRIAGE_SIZE), "hidden": 16, "val_batch": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "max_steps": 100, "weight_decay": 1e-6},
        "run": {"seed": 0, "device": "cpu", "scans_per_step": 8, "checkpoint_every": 1000, "log_every": 10,
                "val_every": 50},
    }
    return load_config(None, "classify", {**base, **overrides})


# --- preprocessing ------------------------------------------------------------------------------


def test_triage_input_windows_and_stacking():
    vol = np.full((4, 6, 6), 40.0, dtype=np.float32)  # 40 HU everywhere
    vol[0, 0, 0] = 2000.0
    vol[1, 0, 0] = -2000.0
    vol[2, 0, 0] = 32.0
    x = triage_input(vol, size=(4, 6, 6))
    assert x.shape == (1, 16, 6, 6) and x.dtype == np.float32
    blood, subdural, stroke, bone = (x[0, 4 * w:4 * (w + 1)] for w in range(4))
    # Windows by hand: blood 0..80, subdural -125..175, stroke 28..36, bone -900..2100.
    assert blood[3, 3, 3] == pytest.approx(0.5)
    assert subdural[3, 3, 3] == pytest.approx(165 / 300)
    assert stroke[3, 3, 3] == pytest.approx(1.0)  # 40 > 36: clipped
    assert bone[3, 3, 3] == pytest.approx(940 / 3000)
    assert stroke[2, 0, 0] == pytest.approx(0.5)
    assert [w[0, 0, 0] for w in (blood, subdural, stroke, bone)] == pytest.approx([1, 1, 1, 2900 / 3000])
    assert [w[1, 0, 0] for w in (blood, subdural, stroke, bone)] == pytest.approx([0, 0, 0, 0])
    assert x.min() >= 0 and x.max() <= 1


def test_triage_input_default_size_is_upstream_shape():
    x = triage_input(np.zeros((30, 140, 100), dtype=np.int16))
    assert x.shape == (1, 192, 128, 128)


def test_triage_input_centre_pads_with_line_minimum_and_crops():
    vol = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)  # 0..104 HU, distinct per voxel
    x = triage_input(vol, size=(3, 7, 6), windows=[(0, 1000)])
    assert x.shape == (1, 3, 7, 6)
    # S: 5 -> 3 keeps slices 1..3; L: 3 -> 6 puts 1 column before and 2 after (odd leftover at the end).
    np.testing.assert_allclose(x[0, :, :, 1:4], vol[1:4] / 1000, rtol=1e-6)
    # Upstream's SpatialPad(mode="minimum"): each padded L line takes the lowest HU of that line (its first voxel).
    for column in (0, 4, 5):
        np.testing.assert_allclose(x[0, :, :, column], vol[1:4, :, 0] / 1000, rtol=1e-6)
    # A head surrounded by air is padded with air: 0 in every default window (-1000 HU is below them all).
    head = np.full((5, 7, 3), -1000.0, dtype=np.float32)
    head[1:4, 2:5, 1] = 40.0
    y = triage_input(head, size=(5, 7, 5))
    for w in range(4):
        assert (y[0, 5 * w:5 * (w + 1), :, 0] == 0).all() and (y[0, 5 * w:5 * (w + 1), :, 4] == 0).all()
    assert center_pad_crop(np.ones((4, 4, 4)), (2, 6, 4), -5)[0, 0, 0] == -5


def test_triage_input_refuses_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        triage_input(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="hi > lo"):
        triage_input(np.zeros((4, 4, 4)), size=(4, 4, 4), windows=[(10, 0)])


# --- metrics ------------------------------------------------------------------------------------


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    scores = rng.normal(size=n) + labels
    if seed % 2:  # many ties
        scores = np.round(scores)
    assert auroc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_youden_threshold_separates_when_possible():
    p = [0.1, 0.2, 0.35, 0.6, 0.7, 0.9]
    y = [0, 0, 0, 1, 1, 1]
    t = youden_threshold(p, y)
    assert 0.35 < t <= 0.6
    assert youden_threshold([0.2, 0.4], [1, 1]) is None


# --- model --------------------------------------------------------------------------------------


def test_frozen_mode_trains_only_the_head():
    cfg = tiny_config(classify={"size": list(TRIAGE_SIZE), "hidden": 16, "mode": "frozen"})
    task = ClassifyTask(cfg, dataset([1, 2]))
    model = task.build_model()
    model.train()
    assert not model.encoder.training and model.head.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    loss = task.loss(model, task.batch(1), torch.device("cpu"))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head[0].weight.grad is not None
    for k, v in model.encoder.state_dict().items():  # running statistics untouched too
        assert torch.equal(v, before[k]), k


def test_batch_is_a_function_of_step_and_global_index():
    cfg = tiny_config(run={"scans_per_step": 4, "seed": 3})
    data = dataset(range(10, 16))
    a = ClassifyTask(cfg, data)
    b = ClassifyTask(cfg, data)
    whole = a.batch(5, 0, 1)
    halves = [b.batch(5, r, 2) for r in range(2)]
    assert whole["x"].shape == (4, 1, 32, 32, 32)
    assert torch.equal(whole["x"], torch.cat([h["x"] for h in halves]))
    assert torch.equal(whole["y"], torch.cat([h["y"] for h in halves]))
    assert whole["items"] == halves[0]["items"] + halves[1]["items"]
    # One pass over the data visits every item once (6 items, 4 per step: steps 1-2 hold 8 slots).
    first_pass = (a.batch(1)["items"] + a.batch(2)["items"])[:6]
    assert sorted(first_pass) == list(range(6))
    assert not torch.equal(a.batch(1)["x"], a.batch(2)["x"])


# --- training with the real trainer -------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine oneDNN's 2-thread conv3d backward of these tiny maps
    was measured 10-30x slower (threads waiting on each other) than a single thread (0.25 s per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_triage_learns_bleeds_and_exports(tmp_path, one_thread):
    t0 = time.perf_counter()
    train_set = dataset(range(100, 164))  # 32 with a bleed, 32 without
    held_out = dataset(range(500, 524))  # other seeds: other heads, noise, lesions
    cfg = tiny_config()
    task = ClassifyTask(cfg, train_set, validation=held_out)
    summary = train(task, tmp_path / "run", device="cpu")
    assert summary["steps"] == 100 and not summary["stopped"]

    folder = tmp_path / "run" / "model"
    model, config = load_triage_model(folder)
    assert isinstance(model, TriageModel) and not model.training
    logits = task.predict(model, [v for v, _ in held_out])
    labels = [y for _, y in held_out]
    auc = auroc(logits, labels)
    print(f"held-out AUC {auc:.3f}, {time.perf_counter() - t0:.1f} s")
    assert auc >= 0.95

    # The export records what it is and how well it did; the metrics CSV has the validation columns.
    assert config["architecture"] == "TriageModel"
    assert config["encoder"]["init_filters"] == 4 and config["encoder"]["blocks_down"] == [1, 1, 1]
    assert config["validation"]["val_auc"] == pytest.approx(auc, abs=1e-6)
    assert config["threshold_source"] == "youden" and 0 < config["threshold"] < 1
    probs = 1 / (1 + np.exp(-logits))
    predicted = probs >= config["threshold"]
    accuracy = (predicted == np.array(labels, bool)).mean()
    assert accuracy >= 0.85
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val_auc" in header and "val_loss" in header
    saved = json.loads((folder / "config.json").read_text())
    assert saved["_preprocessing"]["size"] == list(TRIAGE_SIZE)

    # The folder holds the trained weights exactly: same logits as the task's own export path.
    rebuilt = task.build_model()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x = torch.from_numpy(np.stack([triage_input(v, TRIAGE_SIZE) for v, _ in held_out[:6]]))
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), rebuilt(x).numpy(), atol=1e-6)
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head"}


def test_load_triage_model_refuses_other_folders(tmp_path):
    from CTFMLib.weights import WeightsError, save_pretrained

    save_pretrained(SegResEncoder(init_filters=4, blocks_down=(1, 1)), tmp_path / "enc",
                    {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1]})
    with pytest.raises(WeightsError, match="not a triage model"):
        load_triage_model(tmp_path / "enc")
    with pytest.raises(WeightsError, match="no config.json"):
        load_triage_model(tmp_path / "missing")


def test_frozen_training_keeps_the_encoder(tmp_path, one_thread):
    cfg = tiny_config(classify={"size": list(TRIAGE_SIZE), "hidden": 16, "mode": "frozen"},
                      optim={"lr": 1e-2, "warmup_steps": 0, "max_steps": 3},
                      run={"scans_per_step": 4, "checkpoint_every": 1000, "val_every": 0})
    task = ClassifyTask(cfg, dataset(range(20, 28)))
    initial = task.build_model().state_dict()
    train(task, tmp_path / "run", device="cpu")
    model, config = load_triage_model(tmp_path / "run" / "model")
    assert config["mode"] == "frozen" and config["threshold_source"] == "default" and config["threshold"] == 0.5
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, initial[k]), k  # weights and batch-norm statistics
    assert not torch.equal(model.state_dict()["head.0.weight"], initial["head.0.weight"])


# --- linear probe on cached embeddings ----------------------------------------------------------


def probe_config(**sections):
    base = {"classify": {"size": list(TRIAGE_SIZE), "mode": "probe", "val_batch": 16},
            "optim": {"lr": 0.3, "warmup_steps": 0, "max_steps": 600, "weight_decay": 0.0},
            "run": {"seed": 0, "device": "cpu", "scans_per_step": 64, "checkpoint_every": 1000, "log_every": 100,
                    "val_every": 300}}
    return tiny_config(**{**base, **sections})


@pytest.fixture
def encoder_calls():
    """Counts forward calls of every SegResEncoder (a real PyTorch global hook, removed afterwards)."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: calls.append(1) if isinstance(module, SegResEncoder) else None)
    yield calls
    handle.remove()


def logistic_regression(features, labels, iterations=100):
    """Maximum-likelihood weights (last entry: intercept) by Newton's method, float64."""
    a = np.c_[np.asarray(features, np.float64), np.ones(len(features))]
    y = np.asarray(labels, np.float64)
    w = np.zeros(a.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-a @ w))
        w -= np.linalg.solve((a.T * (p * (1 - p))) @ a, a.T @ (p - y))
    return w


@pytest.mark.slow
def test_probe_is_logistic_regression_on_cached_embeddings(tmp_path, one_thread, encoder_calls):
    train_set = dataset(range(100, 164))  # 64 scans, 16 features: not separable, so the MLE is finite
    held_out = dataset(range(500, 516))
    task = ClassifyTask(probe_config(), train_set, validation=held_out, cache_dir=tmp_path / "emb")
    model_before = task.build_model()
    batch = task.batch(1)
    assert "x" not in batch and len(batch["items"]) == 64  # steps carry item numbers, not images
    summary = train(task, tmp_path / "run", device="cpu")
    assert summary["steps"] == 600 and not summary["stopped"]
    # Each scan went through the encoder once: 64 + 16 scans, 16 per forward pass.
    assert len(encoder_calls) == 5

    (cache,) = (tmp_path / "emb").glob("embeddings-*.npz")
    with np.load(cache) as f:
        train_emb, val_emb = f["train"], f["validation"]
    assert train_emb.shape == (64, 16) and val_emb.shape == (16, 16)
    model, config = load_triage_model(tmp_path / "run" / "model")
    assert config["mode"] == "probe" and config["head"] == [16, 1] and isinstance(model.head, torch.nn.Linear)
    # The cache holds the embeddings of the (unchanged) encoder: global average of its deepest map, eval mode.
    for k, v in model_before.encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k
    with torch.no_grad():
        x = torch.from_numpy(np.stack([triage_input(v, TRIAGE_SIZE) for v, _ in held_out]))
        direct = model.encoder(x)[-1].mean(dim=(2, 3, 4)).numpy()
        whole = model(x).numpy()
        head_on_cache = model.head(torch.from_numpy(val_emb)).squeeze(-1).numpy()
    np.testing.assert_allclose(val_emb, direct, rtol=1e-5, atol=1e-7)
    # The exported model (encoder + folded linear head) = the probe head on the cached embeddings.
    np.testing.assert_allclose(whole, head_on_cache, rtol=1e-4, atol=1e-4)

    # Full-batch AdamW to convergence = the maximum-likelihood logistic regression (Newton, raw features).
    w = logistic_regression(train_emb, [y for _, y in train_set])
    expected = np.c_[train_emb.astype(np.float64), np.ones(64)] @ w
    with torch.no_grad():
        got = model.head(torch.from_numpy(train_emb)).squeeze(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    expected_val = np.c_[val_emb.astype(np.float64), np.ones(16)] @ w
    assert config["validation"]["val_auc"] == pytest.approx(auroc(expected_val, [y for _, y in held_out]))


def test_probe_embeddings_cache_is_reused_and_invalidated(tmp_path, one_thread, encoder_calls, tiny_encoder_folder):
    data, held_out = dataset(range(30, 38)), dataset(range(40, 44))
    cfg = probe_config(model={"init_filters": 4, "blocks_down": [1, 1, 1, 1]},
                       optim={"lr": 0.1, "warmup_steps": 0, "max_steps": 2, "weight_decay": 0.0},
                       run={"scans_per_step": 4, "checkpoint_every": 1000, "val_every": 1})
    cache = tmp_path / "emb"
    train(ClassifyTask(cfg, data, held_out, cache_dir=cache), tmp_path / "a", device="cpu")
    assert len(encoder_calls) == 2  # 8 training + 4 validation scans, 16 per pass
    (first,) = cache.glob("embeddings-*.npz")
    stamp = first.stat().st_mtime_ns

    # Another run, and a resumed one, over the same weights and scans: no encoder pass at all.
    train(ClassifyTask(cfg, data, held_out, cache_dir=cache), tmp_path / "b", device="cpu")
    train(ClassifyTask(cfg, data, held_out, cache_dir=cache), tmp_path / "b", resume=True, max_steps=4,
          device="cpu")
    assert len(encoder_calls) == 2 and first.stat().st_mtime_ns == stamp
    assert list(cache.glob("embeddings-*.npz")) == [first]

    # Other encoder weights (a MONAI-written encoder) or other scans: recomputed into another file.
    weighted = load_config(None, "classify", {**cfg, "model": {**cfg["model"], "weights": str(tiny_encoder_folder)}})
    task = ClassifyTask(weighted, data, held_out, cache_dir=cache)
    emb = task.embeddings(task.build_model(), "cpu")
    assert len(encoder_calls) == 4 and len(list(cache.glob("embeddings-*.npz"))) == 2
    with np.load(first) as f:
        assert not np.allclose(emb["train"].numpy(), f["train"])
    other = ClassifyTask(cfg, data, held_out[:3], cache_dir=cache)
    other.embeddings(other.build_model(), "cpu")
    assert len(encoder_calls) == 6 and len(list(cache.glob("embeddings-*.npz"))) == 3
    # A damaged file is recomputed, not trusted.
    first.write_bytes(b"not an npz")
    again = ClassifyTask(cfg, data, held_out, cache_dir=cache)
    again.embeddings(again.build_model(), "cpu")
    assert len(encoder_calls) == 8 and np.load(first)["train"].shape == (8, 32)


@pytest.mark.slow
def test_ctfm_train_classify_probe_end_to_end(tmp_path):
    from ctfm_testing.phantoms import head_phantom
    from ctfm_testing.plugin import run_ctfm
    from CTFMLib.image import write_image

    rows = ["path,label"]
    for i in range(4):
        lesion = {"center_lps": (0.0, 10.0, 20.0), "radius_mm": 14.0, "hu": 70.0} if i % 2 else None
        image = head_phantom(shape=(48, 48, 60), spacing=(4.0, 4.0, 3.0), seed=i, lesion=lesion)
        write_image(image, tmp_path / f"head{i}.nii.gz")
        rows.append(f"head{i}.nii.gz,{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "probe.json"
    config.write_text(json.dumps({
        "data": {"source": [str(tmp_path / "labels.csv")], "workers": 0, "val_fraction": 0.5},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "classify": {"size": [8, 16, 16], "mode": "probe"},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 5},
        "run": {"seed": 0, "device": "cpu", "scans_per_step": 2, "val_every": 5, "log_every": 1},
    }))
    out = tmp_path / "run"
    result = run_ctfm("train", "classify", "--config", config, "--out", out, "--device", "cpu", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 5
    (cache,) = (out / "embeddings").glob("embeddings-*.npz")
    with np.load(cache) as f:
        assert f["train"].shape == (2, 16) and f["validation"].shape == (2, 16)
        val_emb = f["validation"]
    model, saved = load_triage_model(out / "model")
    assert saved["mode"] == "probe" and saved["head"] == [16, 1]
    assert "val_auc" in (out / "metrics.csv").read_text().splitlines()[0]
    assert set(saved["validation"]) == {"val_auc", "val_loss"} and 0 < saved["threshold"] < 1
    with torch.no_grad():
        logits = model.head(torch.from_numpy(val_emb)).squeeze(-1).numpy()
    assert np.isfinite(logits).all() and logits.shape == (2,)
