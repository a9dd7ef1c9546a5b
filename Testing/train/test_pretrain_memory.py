"""Pretraining on a machine smaller than the recipe: micro-batches with the whole step's exact gradient, and a
memory check that picks the micro-batch or refuses, in seconds, before any scan is read (issue 17, defect 1)."""

import json
import time

import numpy as np
import pytest
import torch

from ctfm_testing.hostile import assert_refused, ctfm
from CTFMLib.train.pretrain import PretrainTask

CROPS, SCANS = 3, 2  # 2 scans x 2 views x 3 crops: 12 crops a step


def tiny_config(micro_batch):
    """A tiny encoder (4 filters, blocks (1, 1)) on 8 x 16 x 16 crops, shaped like DEFAULTS["pretrain"]."""
    views = {"scale": [0.5, 1.0], "flip_p": 0.5, "hist_shift_p": 0.5, "hist_points": 5, "smooth_p": 0.5,
             "smooth_sigma": [0.5, 1.0]}
    return {
        "pretrain": {"crops_per_scan": CROPS, "crop_size": [8, 16, 16], "temperature": 0.1, "projection": [8, 8, 4],
                     "spacing": [3, 1, 1], "hu_range": [-1024, 2048], "views": views, "micro_batch": micro_batch},
        "model": {"init_filters": 4, "blocks_down": [1, 1], "weights": None},
        "run": {"seed": 0, "device": "cpu", "scans_per_step": SCANS},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": 1, "grad_clip": None},
    }


def volumes():
    """Blocky scans (10 x 10 x 10 voxel blocks of random values): crops differ in what they hold, so that the
    fresh encoder's projections differ and float32 gradients are well conditioned."""
    rng = np.random.default_rng(7)
    return [np.kron(rng.random((2, 4, 4)), np.ones((10, 10, 10))).astype(np.float32) for _ in range(3)]


def reference_loss(z: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
    """NT-Xent within each scan written out anchor by anchor (rows ordered [scan][view][crop])."""
    total, anchors = 0.0, 0
    group = 2 * n
    for s in range(z.shape[0] // group):
        unit = z[s * group:(s + 1) * group]
        unit = unit / unit.norm(dim=1, keepdim=True)
        for i in range(group):
            positive = (i + n) % group
            others = torch.stack([unit[i] @ unit[k] / temperature for k in range(group) if k != i])
            total = total - (unit[i] @ unit[positive] / temperature - torch.logsumexp(others, 0))
            anchors += 1
    return total / anchors


def eval_mode_with_running_stats(model):
    """Batch norms in eval mode (no batch-dependent layer) with running statistics that are not 0/1."""
    g = torch.Generator().manual_seed(11)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("micro_batch", [2, 5])
def test_micro_batches_give_the_gradient_of_the_whole_step(micro_batch):
    data = volumes()
    task = PretrainTask(tiny_config(micro_batch), data)
    batch = task.batch(3)
    assert batch["views"].shape[:3] == (SCANS, 2, CROPS)

    # The reference: every crop in one plain forward pass, the loss written out here, autograd.
    reference = eval_mode_with_running_stats(task.build_model())
    x = batch["views"].reshape((-1, 1, 8, 16, 16))
    expected_loss = reference_loss(reference(x), CROPS, 0.1)
    expected_loss.backward()

    model = eval_mode_with_running_stats(task.build_model())
    seen = []
    hooks = model.encoder.conv_init.register_forward_hook(lambda m, i, o: seen.append(int(i[0].shape[0])))
    loss = task.backward(model, batch, torch.device("cpu"))
    hooks.remove()

    assert max(seen) <= micro_batch and len(seen) > 2, seen  # really run in micro-batches (twice each)
    assert abs(float(loss) - float(expected_loss.detach())) < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        scale = float(q.grad.abs().max())
        assert scale > 0, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=5e-4 * scale), (name, (p.grad - q.grad).abs().max())


def test_micro_batches_scale_the_loss_and_count_running_statistics_once_per_pass():
    task = PretrainTask(tiny_config(4), volumes())
    model = task.build_model().train()
    plain = task.build_model().train()
    batch = task.batch(1)
    unscaled = task.build_model().train()
    task.backward(model, batch, torch.device("cpu"), scale=lambda loss: loss * 8.0)
    task.backward(unscaled, batch, torch.device("cpu"))
    for p, q in zip(model.parameters(), unscaled.parameters()):  # the GradScaler's factor reaches every weight
        assert torch.allclose(p.grad, 8.0 * q.grad, rtol=1e-5, atol=1e-7)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert int(norm.num_batches_tracked) == 3  # 12 crops, passes of 4: the no-grad pass left no trace
    # The scaled gradient of micro-batch passes in train mode: each pass normalised by its own statistics, as
    # a plain forward of those crops alone would; the running means after 3 updates of momentum 0.1.
    x = batch["views"].reshape((-1, 1, 8, 16, 16))
    for a in range(0, 12, 4):
        plain(x[a:a + 4])
    plain_norm = next(m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert torch.allclose(norm.running_mean, plain_norm.running_mean, atol=1e-6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_default_config_is_refused_in_seconds_when_it_does_not_fit(tmp_path):
    from ctfm_testing.phantoms import write_pretraining_scans

    scans = write_pretraining_scans(tmp_path / "scans")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": {"source": [str(scans)]}}))  # everything else: the defaults
    out = tmp_path / "run"
    started = time.perf_counter()
    result = ctfm("train", "pretrain", "--config", config, "--out", out, "--max-steps", 1, "--max-memory-gb", 0.5)
    seconds = time.perf_counter() - started
    line = assert_refused(result, "needs about", "one crop of 32x128x128 with 32 filters", "0.5 GB are available",
                          "pretrain.crop_size", "model.init_filters", "--max-memory-gb")
    assert seconds < 5, (seconds, line)
    assert not out.exists()
    assert sorted(p.name for p in scans.iterdir()) == ["ct1.nii.gz", "ct2.nii.gz"]


def test_a_micro_batch_that_does_not_fit_is_refused_naming_one_that_does(tmp_path):
    from ctfm_testing.phantoms import write_pretraining_scans

    scans = write_pretraining_scans(tmp_path / "scans")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": {"source": [str(scans)]}, "pretrain": {"micro_batch": 0}}))
    result = ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "run", "--max-steps", 1,
                  "--max-memory-gb", 8)
    assert_refused(result, "pretrain.micro_batch 0", "all crops at once", "set pretrain.micro_batch to", "'auto'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_auto_micro_batches_run_a_step_that_does_not_fit_at_once(tmp_path, ctfm_cache):
    from ctfm_testing.phantoms import write_pretraining_scans
    from CTFMLib.train.run import run
    from CTFMLib.weights import load_model

    scans = write_pretraining_scans(tmp_path / "scans")
    overrides = {"data.source": [str(scans)], "data.workers": 0, "model.init_filters": 8,
                 "model.blocks_down": [1, 1, 1], "pretrain.crops_per_scan": 4, "pretrain.crop_size": [32, 64, 64]}
    # 16 crops of 32 x 64 x 64 with 8 filters keep ~0.5 GB of activations for the backward pass: more than a
    # 0.6 GB budget leaves after the process itself, so the step must be split.
    summary = run("pretrain", out_dir=tmp_path / "run", max_steps=1, overrides=overrides, max_memory_gb=0.6)
    assert summary["steps"] == 1 and not summary["stopped"]
    assert 1 <= summary["micro_batch"] < 16, summary
    assert summary["memory"]["crops"] == 16
    assert np.isfinite(summary["last_loss"])
    encoder, _ = load_model(tmp_path / "run" / "model", expect="SegResEncoder")
    assert encoder.init_filters == 8


# --- under torchrun ----------------------------------------------------------------------------------------------

class PerCropNormTask(PretrainTask):
    """The pretraining task with each batch norm replaced by a norm of each crop alone (GroupNorm, 1 group):
    no layer depends on which crops share a pass, so any split of a step (micro-batches, processes) must
    give the same training."""

    def build_model(self):
        model = super().build_model()
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.BatchNorm3d):
                    setattr(module, name, torch.nn.GroupNorm(1, child.num_features))
        return model


def ddp_config(micro_batch) -> dict:
    from CTFMLib.train.config import load_config

    return load_config(None, "pretrain", {
        "model.init_filters": 4, "model.blocks_down": [1, 1], "pretrain.crops_per_scan": CROPS,
        "pretrain.crop_size": [8, 16, 16], "pretrain.projection": [8, 8, 4], "pretrain.micro_batch": micro_batch,
        "run.scans_per_step": SCANS,
        "run.device": "cpu", "run.checkpoint_every": 3, "optim.max_steps": 3, "optim.warmup_steps": 0,
        "optim.lr": 1e-3})


DDP_RUNNER = r'''
import json, os, sys
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads(1)
from test_pretrain_memory import PerCropNormTask, ddp_config, volumes
from CTFMLib.train.trainer import train

args = json.loads(sys.argv[1])
summary = train(PerCropNormTask(ddp_config(args["micro_batch"]), volumes()), args["out"])
if int(os.environ.get("RANK", "0")) == 0:
    print("SUMMARY " + json.dumps(summary), flush=True)
'''


@pytest.mark.slow
def test_two_processes_in_micro_batches_train_as_one_process_all_at_once(tmp_path):
    """1 process, every crop in one pass == 2 processes under torchrun (DDP), 2 crops per pass: the same
    weights after 3 steps (each process's micro-batches accumulate; DDP reduces once per step)."""
    from pathlib import Path

    from test_train_runner import finish, model_state, start

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "run_pretrain.py"
    script.write_text(DDP_RUNNER.format(paths=[str(root / "CTFM"), str(root / "Testing"), str(Path(__file__).parent)]))
    single = start(script, {"out": str(tmp_path / "one"), "micro_batch": 0})
    ddp = start(script, {"out": str(tmp_path / "two"), "micro_batch": 2}, torchrun=2)
    assert finish(ddp, timeout=240)["world"] == 2
    assert finish(single)["world"] == 1
    one, two = model_state(tmp_path / "one"), model_state(tmp_path / "two")
    start_weights = PerCropNormTask(ddp_config(0), volumes()).build_model().state_dict()
    assert one.keys() == two.keys()
    for name in one:
        assert not torch.equal(one[name], start_weights[name]), name  # it trained
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
