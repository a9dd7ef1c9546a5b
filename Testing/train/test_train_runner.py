"""The training loop (CTFMLib.train: config, schedule, distributed, trainer) on a tiny real network.

The toy task regresses each volume's brightness level with a small SegResEncoder (batch norm inside, so
synchronised batch norm matters) + a linear head. Samples are seeded by (seed, step, global sample index),
so a resumed run and any number of processes see the same data. Runs that must be killed, signalled or
launched by torchrun are real child processes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctfm_testing.processes import child_env, free_port
from CTFMLib.networks import SegResEncoder
from CTFMLib.progress import Cancelled
from CTFMLib.train.config import DEFAULTS, ConfigError, load_config
from CTFMLib.train.distributed import rank_indices
from CTFMLib.train.schedule import lr_factor, make_scheduler
from CTFMLib.train.trainer import Task, TrainingError, load_checkpoint, resolve_device, train
from CTFMLib.weights import load_model, save_pretrained

ROOT = Path(__file__).resolve().parents[2]
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")
SHAPE = (16, 32, 32)  # voxels per toy volume


# --- the toy task ------------------------------------------------------------------------------


class ToyModel(nn.Module):
    def __init__(self, init_filters: int, blocks_down):
        super().__init__()
        self.encoder = SegResEncoder(init_filters=init_filters, blocks_down=tuple(blocks_down))
        self.head = nn.Linear(self.encoder.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(x)).squeeze(1)


def toy_sample(seed: int, step: int, index: int):
    """One (1, *SHAPE) volume and its target, a pure function of (seed, step, global sample index)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))
    level = torch.rand((), generator=g)
    return torch.rand((1, *SHAPE), generator=g) * 0.5 + level, 2 * level - 1


class ToyTask:
    def __init__(self, config: dict, nan_at: int | None = None):
        self.config = config
        self.nan_at = nan_at

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config["run"]["seed"])
        return ToyModel(self.config["model"]["init_filters"], self.config["model"]["blocks_down"])

    def batch(self, step: int, rank: int, world: int):
        seed = self.config["run"]["seed"]
        samples = [toy_sample(seed, step, i) for i in rank_indices(self.config["run"]["scans_per_step"], rank, world)]
        return {"step": step, "x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    def loss(self, model, batch, device) -> torch.Tensor:
        loss = F.mse_loss(model(batch["x"].to(device)), batch["y"].to(device))
        return loss * float("nan") if batch["step"] == self.nan_at else loss

    def validate(self, model, device) -> dict:
        samples = [toy_sample(self.config["run"]["seed"], 10**6, i) for i in range(2)]
        x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        return {"val_mse": float(F.mse_loss(model(x.to(device)), y.to(device)))}

    def export(self, model, folder: Path) -> None:
        m = self.config["model"]
        save_pretrained(model.encoder, folder, {"spatial_dims": 3, "in_channels": 1,
                                                "init_filters": m["init_filters"], "blocks_down": m["blocks_down"]})


def toy_config(extra: dict | None = None) -> dict:
    overrides = {"model.init_filters": 4, "model.blocks_down": [1, 1, 1], "optim.lr": 1e-3,
                 "optim.warmup_steps": 2, "optim.max_steps": 8, "run.scans_per_step": 2,
                 "run.checkpoint_every": 2, "run.log_every": 1}
    return load_config(None, "pretrain", {**overrides, **(extra or {})})


# --- child processes ---------------------------------------------------------------------------

RUNNER = r'''
import json, os, sys, time
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads(1)  # fixed threads: bitwise-reproducible CPU kernels
from test_train_runner import ToyTask, toy_config
from CTFMLib.train.trainer import TrainingError, train

args = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
if args.get("bn_check"):
    import torch.distributed as dist
    from CTFMLib.train.distributed import convert_sync_batchnorm
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 6, 7, generator=g) * 3 + 1
    w = torch.randn(4, 3, 5, 6, 7, generator=g)
    bn = torch.nn.BatchNorm3d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    bn = convert_sync_batchnorm(bn, "cpu").train()
    part = slice(2 * rank, 2 * rank + 2)
    xr = x[part].clone().requires_grad_(True)
    y = bn(xr)
    (y * w[part]).sum().backward()
    torch.save({{"y": y.detach(), "x_grad": xr.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}}, args["bn_check"] + f"/{{rank}}.pt")
    try:  # 3 scans per step cannot be split over 2 processes
        train(ToyTask(toy_config({{"run.scans_per_step": 3}})), args["out"] + "-uneven")
    except TrainingError as e:
        open(args["bn_check"] + f"/uneven{{rank}}.txt", "w").write(str(e))

slow, slow_from = args.get("slow", 0), args.get("slow_from", 0)  # seconds per step, from this step on
summary = train(ToyTask(toy_config(args.get("config"))), args["out"], resume=args.get("resume", False),
                progress=lambda f, m: time.sleep(slow if m.startswith("step ") and int(m.split()[1]) >= slow_from else 0))
if rank == 0:
    print("SUMMARY " + json.dumps(summary), flush=True)
'''


def runner_script(tmp_path: Path) -> Path:
    script = tmp_path / "run_toy.py"
    script.write_text(RUNNER.format(paths=[str(ROOT / "CTFM"), str(ROOT / "Testing"), str(Path(__file__).parent)]))
    return script


def start(script: Path, args: dict, torchrun: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, str(script), json.dumps(args)]
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(torchrun),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"no summary printed\n{out}\n{err[-4000:]}"
    return json.loads(lines[-1][len("SUMMARY "):])


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child ended early ({proc.returncode})\n{out}\n{err[-4000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("condition not met in time")


def metric_rows(out_dir: Path) -> list:
    path = out_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_state(out_dir: Path) -> dict:
    return load_checkpoint(out_dir / "checkpoints" / "last.pt")["model"]


# --- the loop in child processes --------------------------------------------------------------


@pytest.mark.slow
@POSIX_ONLY
def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    script = runner_script(tmp_path)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    config = {"run.deterministic": True}
    reference = start(script, {"out": str(whole), "config": config})
    victim = start(script, {"out": str(broken), "config": config, "slow": 0.5, "slow_from": 4})  # time to kill it
    wait_for(lambda: (broken / "checkpoints" / "step_00000004.pt").is_file(), victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(broken / "checkpoints" / "last.pt")["step"]
    assert 4 <= interrupted_at < 8, "the run was not interrupted mid-way"
    assert not (broken / "model").exists()

    summary = finish(start(script, {"out": str(broken), "config": config, "resume": True}))
    assert summary["steps"] == 8 and not summary["stopped"]
    finish(reference)
    expected, resumed = model_state(whole), model_state(broken)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    # Each step logged once, the redone ones replacing what the killed run had written after its checkpoint.
    rows = metric_rows(broken)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in metric_rows(whole)]


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process_with_the_same_global_batch(tmp_path):
    script = runner_script(tmp_path)
    config = {"run.scans_per_step": 4, "optim.max_steps": 5, "run.checkpoint_every": 5}
    bn_dir = tmp_path / "bn"
    bn_dir.mkdir()
    single = start(script, {"out": str(tmp_path / "one"), "config": config})
    ddp = start(script, {"out": str(tmp_path / "two"), "config": config, "bn_check": str(bn_dir)}, torchrun=2)
    summary = finish(ddp, timeout=240)
    assert summary["world"] == 2 and summary["steps"] == 5
    assert finish(single)["world"] == 1
    one, two = model_state(tmp_path / "one"), model_state(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        if one[name].is_floating_point():
            assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), (name, (one[name] - two[name]).abs().max())
        else:
            assert torch.equal(one[name], two[name]), name
    assert not torch.equal(one["encoder.conv_init.weight"], ToyTask(toy_config()).build_model().encoder.conv_init.weight)
    assert "scans_per_step=3" in (bn_dir / "uneven0.txt").read_text()

    # The synchronised batch norm itself: two halves of a batch == nn.BatchNorm3d on the whole batch.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 6, 7, generator=g) * 3 + 1
    w = torch.randn(4, 3, 5, 6, 7, generator=g)
    bn = nn.BatchNorm3d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    x.requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    ranks = [torch.load(bn_dir / f"{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["y"], y[2 * r:2 * r + 2].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["x_grad"], x.grad[2 * r:2 * r + 2], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(got["running_var"], bn.running_var, rtol=0, atol=1e-5)
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], bn.weight.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], bn.bias.grad, rtol=0, atol=1e-4)


@pytest.mark.slow
@POSIX_ONLY
def test_sigterm_writes_a_checkpoint_and_exits_within_10_seconds(tmp_path):
    out = tmp_path / "run"
    proc = start(runner_script(tmp_path), {"out": str(out), "slow": 0.05,
                                           "config": {"optim.max_steps": 500, "run.checkpoint_every": 1000}})
    wait_for(lambda: len(metric_rows(out)) >= 3, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    summary = finish(proc, timeout=30)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert summary["stopped"] and summary["stop_reason"] == "SIGTERM" and summary["exported"] is None
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 3 <= state["step"] == summary["steps"] == int(metric_rows(out)[-1]["step"]) < 500
    model = ToyTask(toy_config()).build_model()
    model.load_state_dict(state["model"])  # strict: a complete, usable checkpoint


# --- the loop in this process ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the child processes: faster for these tiny tensors on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"at step 5\b") as info:
        train(ToyTask(toy_config({"run.deterministic": True}), nan_at=5), tmp_path)
    assert "last.pt" in str(info.value)
    ckpt = tmp_path / "checkpoints"
    last = load_checkpoint(ckpt / "last.pt")
    assert last["step"] == 4
    for name, value in load_checkpoint(ckpt / "step_00000004.pt")["model"].items():
        assert torch.equal(value, last["model"][name])
    model = ToyTask(toy_config()).build_model()
    model.load_state_dict(last["model"])
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "step_00000002.pt", "step_00000004.pt"]
    assert [int(r["step"]) for r in metric_rows(tmp_path)] == [1, 2, 3, 4]
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored


def test_a_full_run_logs_checkpoints_atomically_reports_progress_and_exports(tmp_path):
    config = toy_config({"optim.warmup_steps": 2, "optim.max_steps": 100, "run.val_every": 3,
                         "run.keep_checkpoints": 2})
    task = ToyTask(config)
    assert isinstance(task, Task)
    calls, held = [], {}

    def progress(fraction, message):
        calls.append((fraction, message))
        if message.startswith("step 3 of"):  # last.pt is the checkpoint of step 2: keep it open
            held["file"] = open(tmp_path / "checkpoints" / "last.pt", "rb")  # noqa: SIM115 - closed below

    summary = train(task, tmp_path, max_steps=6, progress=progress)  # max_steps overrides the config's 100
    assert summary["steps"] == 6 and summary["device"] == "cpu" and summary["world"] == 1
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "last.pt") and not summary["stopped"]
    assert math.isfinite(summary["last_loss"])

    # Progress: every step from rank 0, fraction step / max_steps.
    steps = [(f, m) for f, m in calls if m.startswith("step ")]
    assert [m.split(",")[0] for _, m in steps] == [f"step {k} of 6" for k in range(1, 7)]
    assert [f for f, _ in steps] == pytest.approx([k / 6 for k in range(1, 7)])
    assert calls[-1][0] == 1.0

    # Checkpoints: replaced, never rewritten in place; no temporary files left; old numbered ones pruned.
    with held["file"] as f:
        assert os.fstat(f.fileno()).st_ino != os.stat(tmp_path / "checkpoints" / "last.pt").st_ino
        assert torch.load(f, weights_only=True)["step"] == 2  # whoever opened the old one reads it whole
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.pt", "step_00000004.pt", "step_00000006.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 6

    # Metrics: step, loss, lr, seconds every step; the lr follows warmup + cosine over max_steps=6.
    rows = metric_rows(tmp_path)
    assert list(rows[0])[:4] == ["step", "loss", "lr", "seconds"] and "val_mse" in rows[0]
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for r in rows:
        s = int(r["step"]) - 1  # update index
        want = 1e-3 * ((s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / (6 - 2))))
        assert float(r["lr"]) == pytest.approx(want, rel=1e-9, abs=1e-15)
        assert math.isfinite(float(r["loss"])) and float(r["seconds"]) > 0
    assert [r["val_mse"] != "" for r in rows] == [False, False, True, False, False, True]

    # TensorBoard event files when the tensorboard package is installed.
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # The export is the trained encoder, loadable by the extension's strict loader.
    encoder, _ = load_model(tmp_path / "model", expect="SegResEncoder")
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, trained["encoder." + name]), name

    # An output folder with checkpoints is not silently overwritten.
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(ToyTask(config), tmp_path, max_steps=6)


def test_cancel_from_the_progress_callback_checkpoints_then_reraises(tmp_path):
    def progress(fraction, message):
        if message.startswith("step 3 of"):
            raise Cancelled("stop please")

    with pytest.raises(Cancelled):
        train(ToyTask(toy_config({"run.checkpoint_every": 100})), tmp_path, progress=progress)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    summary = train(ToyTask(toy_config({"run.checkpoint_every": 100})), tmp_path, resume=True, max_steps=4)
    assert summary["steps"] == 4 and summary["exported"]


def test_device_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            resolve_device("cuda")


# --- schedule and configuration ----------------------------------------------------------------


def test_warmup_then_cosine_to_zero_at_max_steps():
    base, warmup, max_steps = 0.5, 10, 50

    def expected(s):  # update index s = 0, 1, ...
        if s < warmup:
            return base * (s + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * min(s - warmup, max_steps - warmup) / (max_steps - warmup)))

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt, warmup, max_steps)
    got = []
    for _ in range(max_steps + 1):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([expected(s) for s in range(max_steps + 1)], rel=1e-12, abs=1e-15)
    assert got[:warmup] == sorted(got[:warmup]) and got[warmup - 1] == pytest.approx(base)
    assert got[warmup:] == sorted(got[warmup:], reverse=True) and got[max_steps] == pytest.approx(0, abs=1e-15)
    assert lr_factor(0, 0, 10) == 1.0 and lr_factor(20, 0, 10) == 0.0


def test_load_config_deep_merges_a_file_onto_the_task_defaults(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"optim": {"lr": 3e-4}, "pretrain": {"views": {"flip_p": 0.25}},
                                "data": {"source": "/scans/list.csv"}}))
    config = load_config(path, "pretrain", {"run.seed": 7, "model": {"init_filters": 8}})
    assert config["optim"]["lr"] == 3e-4 and config["optim"]["max_steps"] == DEFAULTS["pretrain"]["optim"]["max_steps"]
    assert config["pretrain"]["views"]["flip_p"] == 0.25 and config["pretrain"]["views"]["hist_points"] == 5
    assert config["run"]["seed"] == 7 and config["model"]["init_filters"] == 8
    assert config["model"]["blocks_down"] == [1, 2, 2, 4, 4] and config["data"]["source"] == ["/scans/list.csv"]
    assert DEFAULTS["pretrain"]["optim"]["lr"] == 1e-4 and DEFAULTS["pretrain"]["run"]["seed"] == 0  # untouched
    assert load_config(None, "segment")["run"]["scans_per_step"] == 2
    json.dumps(config)  # stored in checkpoints as is


def test_load_config_rejects_unknown_keys_bad_values_and_tasks(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"optim": {"learning_rate": 1e-3}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, "pretrain")
    assert "optim.learning_rate" in str(info.value)
    for allowed in ("optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.max_steps", "optim.grad_clip"):
        assert allowed in str(info.value)
    with pytest.raises(ConfigError, match="'nonsense'.*allowed here: task, data, optim"):
        load_config(None, "pretrain", {"nonsense": 1})
    with pytest.raises(ConfigError, match="'pretrain'"):
        load_config(None, "segment", {"pretrain.temperature": 0.2})  # a section of another task
    with pytest.raises(ConfigError, match="unknown training task 'pretraining'.*pretrain, segment, classify"):
        load_config(None, "pretraining")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, "pretrain", {"optim.lr": "fast"})
    with pytest.raises(ConfigError, match="run.precision"):
        load_config(None, "pretrain", {"run.precision": "fp8"})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json", "pretrain")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json", "pretrain")
