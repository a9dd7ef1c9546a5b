"""The training loop shared by every CT-FM task (pretraining, fine-tuning), independent of what is trained.

A :class:`Task` supplies the model, the batches, the loss, validation and export; :func:`train` does the
rest: AdamW with linear warmup + cosine decay, DDP under ``torchrun`` (batch norms synchronised), mixed
precision on CUDA, checkpoints, exact resume, metrics, graceful stop and the final export.

Steps are numbered 1..N: step ``k`` is the k-th optimizer update; ``task.batch(k, rank, world)`` gives its
data, ``metrics.csv`` row ``k`` its loss and learning rate, and a checkpoint at step ``k`` holds the state
after it (a resumed run continues with step ``k + 1``).

Files (rank 0 only) under ``out_dir``:

- ``checkpoints/last.pt`` (after every checkpoint, on stop and at the end) and ``checkpoints/step_XXXXXXXX.pt``
  every ``run.checkpoint_every`` steps (the newest ``run.keep_checkpoints`` kept). Each is written through
  :func:`CTFMLib.files.atomic_output` (a private temporary folder, renamed into place), so a kill at any
  moment leaves the previous one intact, and a write that fails (disk full) stops training with a
  :class:`TrainingError` and leaves nothing behind. They hold model,
  optimizer, scheduler, grad-scaler, step, the RNG states of every process and the configuration, in
  plain types (``torch.load(..., weights_only=True)`` reads them).
- ``metrics.csv``: step, loss (mean over the steps since the previous row and over processes), lr (of that
  step), seconds (per step, mean since the previous row) and any validation keys.
- ``tensorboard/`` event files when ``torch.utils.tensorboard`` imports (the ``tensorboard`` package).
- ``config.json``: the configuration of the run. ``model/``: what ``task.export`` writes at the end (exported
  into a private temporary folder, then each file moved into place through :func:`CTFMLib.files.atomic_outputs`).

At start the temporaries a killed run left in ``out_dir`` and ``checkpoints/`` are removed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..files import WriteError, atomic_output, atomic_outputs, atomic_write_text, describe_os_error, temporary_folder
from ..runtime import rank_device
from ..text import count
from .distributed import DistInfo, all_reduce_sum, convert_sync_batchnorm, init_distributed, per_rank, shutdown
from .runfolder import remove_temporaries
from .schedule import make_scheduler

CHECKPOINT_FORMAT = "ctfm-train-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError, ValueError):
    """Training cannot go on (non-finite loss, unusable checkpoint or setup, a failed write); the one-line
    message says what to do. Also a ``ValueError``: the refusals of ``ctfm`` are ``ValueError`` s."""


@runtime_checkable
class Task(Protocol):
    """What is trained. ``config`` is a :func:`CTFMLib.train.config.load_config` dict (optim/run sections used here)."""

    config: dict

    def build_model(self) -> nn.Module:
        """The trainable module on the CPU, its initial weights a pure function of the config (seed, weights)."""

    def batch(self, step: int, rank: int, world: int) -> Any:
        """This process's share of step ``step`` (1-based): a pure function of (config seed, step, rank, world).

        Seed every sample by its global index (``distributed.rank_indices``) so that resume and any number of
        processes see identical data.
        """

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """Scalar loss, the MEAN over this process's samples. ``model`` may be the DDP wrapper: call it, and
        reach attributes through ``unwrap(model)``."""

    # Optional: ``backward(model, batch, device, scale, autocast) -> loss`` (detached), for a task whose step
    # does not fit one forward pass: it accumulates the gradients of ``scale(loss)`` itself (``scale`` is the
    # GradScaler's, ``autocast`` a context factory; under DDP it must let gradients be reduced exactly once,
    # e.g. ``model.no_sync()`` for all passes but the last). Without it the loop runs ``loss`` and backward.

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        """Validation metrics (``{}`` for none), called on rank 0 in eval mode under ``torch.no_grad()``."""

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the usable model folder (config.json + model.safetensors ...) from the trained ``model``."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def resolve_device(name: str | None) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; an explicit but unavailable CUDA is an error.

    Stricter than :func:`CTFMLib.runtime.select_device`, which falls back to the CPU: a training run
    that silently lands on the CPU would take days."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was requested but PyTorch {torch.__version__} sees no CUDA GPU; "
                            "use device 'cpu' or 'auto', or install a CUDA build of PyTorch")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def train(task: Task, out_dir, resume: bool = False, max_steps: int | None = None, progress=None,
          device: str = "auto") -> dict:
    """Train ``task`` into ``out_dir``; returns ``{"steps", "last_loss", "checkpoint", "exported", "stopped", ...}``.

    ``max_steps`` overrides ``config["optim"]["max_steps"]`` (also the end of the cosine schedule);
    ``device`` other than ``auto`` overrides ``config["run"]["device"]``. ``resume=True`` continues from
    ``out_dir/checkpoints/last.pt`` (from scratch if there is none); without it an ``out_dir`` that already
    holds checkpoints is refused. SIGTERM/SIGINT (or a progress callback raising ``Cancelled``) finish the
    current step, write a checkpoint and return with ``stopped=True`` (``Cancelled`` is re-raised).
    ``progress(fraction, message)`` is called by rank 0 after every step. Raises :class:`TrainingError`.
    """
    config = task.config
    n_steps = int(max_steps if max_steps is not None else config["optim"]["max_steps"])
    if n_steps < 1:
        raise TrainingError(f"max_steps must be >= 1, got {n_steps}")
    requested = device if device not in (None, "", "auto") else config["run"].get("device", "auto")
    dev = resolve_device(requested)
    info = init_distributed(dev.type)
    if info.enabled and dev.type == "cuda":
        dev = torch.device(rank_device("cuda", info.local_rank))
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _Run(task, Path(out_dir), resume, n_steps, progress, dev, info).run()
    except OSError as e:  # e.g. a cache or log write that failed (files.WriteError: disk full, read-only, ...)
        raise TrainingError(_os_message(e, out_dir)) from None
    finally:
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:
            torch.use_deterministic_algorithms(deterministic_before)
        shutdown(info)


class _Run:
    def __init__(self, task, out_dir: Path, resume: bool, n_steps: int, progress, device: torch.device,
                 info: DistInfo):
        self.task, self.out_dir, self.resume, self.n_steps = task, out_dir, resume, n_steps
        self.device, self.info = device, info
        self.config = task.config
        self.optim_cfg, self.run_cfg = self.config["optim"], self.config["run"]
        self.progress = progress if info.is_main else None
        self.ckpt_dir = out_dir / "checkpoints"
        self.stop_reason: str | None = None
        self.metrics: MetricsLog | None = None
        self.tb = None
        self.last_loss = None
        self.cancelled = None

    # --- setup -------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            per_rank(int(self.run_cfg["scans_per_step"]), self.info.world)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if self.run_cfg.get("deterministic"):
            # cuBLAS needs this before its first use to be deterministic; harmless elsewhere.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            if not torch.are_deterministic_algorithms_enabled():  # the first call imports torch._inductor (~2 s)
                torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        seed = int(self.run_cfg["seed"])
        _seed_everything(seed)  # the same initial weights in every process
        base = self.task.build_model().to(self.device)
        _seed_everything(seed + 1_000_003 * (self.info.rank + 1))  # per-process streams (dropout, augmentation)
        if self.info.enabled:
            base = convert_sync_batchnorm(base, self.device.type)
        self.base = base
        self.optimizer = torch.optim.AdamW(
            [p for p in base.parameters() if p.requires_grad],
            lr=float(self.optim_cfg["lr"]), weight_decay=float(self.optim_cfg["weight_decay"]))
        self.scheduler = make_scheduler(self.optimizer, int(self.optim_cfg["warmup_steps"]), self.n_steps)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        # Before DDP's constructor (a collective), so every process decides on the same files.
        start = self._restore()
        model = base
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(base, device_ids=ids)
        self.model = model

        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            # Left by a run killed while writing; only this process writes there.
            remove_temporaries(self.out_dir, self.out_dir, (".config.json.tmp*", ".metrics.csv.tmp*"))
            remove_temporaries(self.ckpt_dir, self.out_dir)
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.config, indent=2))
            self.metrics = MetricsLog(self.out_dir / "metrics.csv", keep_until=start)
            self.tb = _tensorboard(self.out_dir / "tensorboard", start)
        with self._signals():
            try:
                return self._loop(start)
            finally:
                if self.tb is not None:
                    self.tb.close()

    def _amp_dtype(self):
        precision = self.run_cfg.get("precision", "auto")
        if self.device.type != "cuda":
            if precision in ("bf16", "fp16"):
                self._report(None, f"precision {precision} is used on CUDA only; training in fp32 on {self.device}")
            return None
        if precision == "fp32":
            return None
        if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _restore(self) -> int:
        existing = checkpoint_candidates(self.ckpt_dir)
        if not self.resume:
            if existing:
                raise TrainingError(f"{self.ckpt_dir} already holds checkpoints; resume to continue that run, "
                                    "or choose an empty output folder")
            return 0
        if not existing:
            self._report(0.0, f"no checkpoint in {self.ckpt_dir}; starting from step 0")
            return 0
        errors = []
        for path in existing:
            try:
                state = load_checkpoint(path)
                break
            except TrainingError as e:
                errors.append(str(e))
        else:
            raise TrainingError("no usable checkpoint to resume from: " + "; ".join(errors)
                                + ". Remove the checkpoints folder to start again")
        if state["config"].get("model") != self.config.get("model"):
            raise TrainingError(f"{path} was trained with model settings {state['config'].get('model')} but the "
                                f"configuration now says {self.config.get('model')}; restore them or use a new "
                                "output folder")
        try:
            self.base.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{path} does not fit this model: {e}. Use the configuration it was trained with "
                                "or a new output folder") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state.get("rng") or []
        if len(rng) == self.info.world:
            _set_rng_state(rng[self.info.rank], self.device)
        else:
            self._report(None, f"{path} was written by {len(rng)} process(es), now {self.info.world}: random "
                               "streams restart (the data order stays the same)")
        self.last_loss = state.get("loss")
        step = int(state["step"])
        self._report(step / self.n_steps, f"resumed from {path.name} at step {step}")
        return step

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT set a flag (a second one interrupts at once); only in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):
            if self.stop_reason is not None:
                raise KeyboardInterrupt
            self.stop_reason = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # --- the loop ------------------------------------------------------------------------

    def _loop(self, start: int) -> dict:
        task, model, info = self.task, self.model, self.info
        params = [p for p in self.base.parameters() if p.requires_grad]
        clip = self.optim_cfg.get("grad_clip")
        log_every, ckpt_every = int(self.run_cfg["log_every"]), int(self.run_cfg["checkpoint_every"])
        val_every = int(self.run_cfg.get("val_every") or 0)
        autocast = (lambda: torch.autocast("cuda", dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        backward = getattr(task, "backward", None)
        if start == 0:
            self._report(0.0, f"training {count(self.n_steps, 'step')} on {self.device}"
                              + (f" x {info.world} processes" if info.enabled else ""))
        last_loss = self.last_loss
        interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
        step = start
        model.train()
        ready = None  # the first step's batch, made before the loop to time the data side of a step
        if start < self.n_steps:
            t0 = time.perf_counter()
            ready = task.batch(start + 1, info.rank, info.world)
            self._expect(start, time.perf_counter() - t0)
        while step < self.n_steps:
            step += 1
            t0 = time.perf_counter()
            batch = ready if ready is not None else task.batch(step, info.rank, info.world)
            ready = None
            if backward is not None:  # the task runs its own (e.g. micro-batched) backward passes
                loss = backward(model, batch, self.device, self.scaler.scale, autocast)
            else:
                with autocast():
                    loss = task.loss(model, batch, self.device)
                self.scaler.scale(loss).backward()
            local = float(loss.detach().float())
            total, bad = all_reduce_sum([local, 0.0 if math.isfinite(local) else 1.0], self.device)
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(self._nan_message(step, local))
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params, float(clip))
            lr = self.optimizer.param_groups[0]["lr"]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            last_loss = total / info.world
            interval_loss += last_loss
            interval_steps += 1
            interval_time += time.perf_counter() - t0

            self._report(step / self.n_steps, f"step {step} of {self.n_steps}, loss {last_loss:.4g}")
            stop = self.stop_reason is not None
            if info.enabled:  # every process stops after the same step, or the others would wait forever
                stop = all_reduce_sum([1.0 if stop else 0.0], self.device)[0] > 0
                if stop and self.stop_reason is None:
                    self.stop_reason = "stopped by another process"
            final = step == self.n_steps or stop
            validate = val_every > 0 and (step % val_every == 0 or step == self.n_steps)
            if step % log_every == 0 or final or validate:
                row = {"step": step, "loss": interval_loss / interval_steps, "lr": lr,
                       "seconds": interval_time / interval_steps}
                if validate and info.is_main:
                    row.update(self._validate())
                self._log(row)
                interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
            if step % ckpt_every == 0 or final:
                self._checkpoint(step, last_loss, numbered=step % ckpt_every == 0)
            if stop:
                break

        exported = None
        stopped = step < self.n_steps
        if not stopped:
            if info.is_main:
                exported = self._export()
                self._report(1.0, f"finished {count(step, 'step')}; model written to {exported}")
        elif info.is_main:
            self._report(step / self.n_steps, f"stopped ({self.stop_reason}) after step {step}; checkpoint "
                                              f"{self.ckpt_dir / 'last.pt'}; resume to continue")
        if info.enabled:
            torch.distributed.barrier()
        if self.cancelled is not None:
            raise self.cancelled
        return {"steps": step, "last_loss": last_loss, "checkpoint": str(self.ckpt_dir / "last.pt"),
                "exported": exported, "stopped": stopped, "stop_reason": self.stop_reason,
                "out_dir": str(self.out_dir), "device": str(self.device), "world": info.world}

    def _nan_message(self, step: int, local: float) -> str:
        candidates = checkpoint_candidates(self.ckpt_dir)
        kept = (f"the last good checkpoint {candidates[0]} is kept; resume from it with a lower optim.lr "
                "or an optim.grad_clip") if candidates else "no checkpoint had been written yet"
        return (f"the loss is not finite ({local if not math.isfinite(local) else 'on another process'}) at step "
                f"{step}; training stopped before updating the weights. {kept}, or check the data of that step")

    def _validate(self) -> dict:
        self.base.eval()
        try:
            with torch.no_grad():
                result = self.task.validate(self.base, self.device) or {}
        finally:
            self.base.train()
        return {str(k): float(v) for k, v in result.items()}

    def _log(self, row: dict) -> None:
        if self.metrics is not None:
            try:
                self.metrics.append(row)
            except OSError as e:
                raise TrainingError(f"cannot write {self.metrics.path}: {_os_message(e, self.metrics.path)}") from None
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key if key.startswith(("val", "train")) else f"train/{key}", value,
                                       row["step"])
            self.tb.flush()

    def _expect(self, start: int, data_seconds: float) -> None:
        """Announce the expected time of the remaining steps (main process): the network's share from this
        computer's measured speed (:mod:`CTFMLib.costs`, for tasks that say their voxels per step,
        ``task.step_work``) plus the time the first batch took to make."""
        work = getattr(self.task, "step_work", None)
        if work is None or not self.info.is_main:
            return
        from ..costs import flops_per_voxel, network_seconds, rate
        from ..progress import Estimate

        voxels = work(self.info.world)
        precision = {torch.bfloat16: "bf16", torch.float16: "bf16"}.get(self.amp_dtype, "fp32")
        say = lambda m: self._report(None, m)  # noqa: E731
        try:
            flops = flops_per_voxel(self.base)
        except Exception:  # noqa: BLE001 - a network the meta device cannot run: counted as the encoder
            flops = None
        network = network_seconds(rate("train", self.device, precision, announce=say), voxels["train"], flops=flops)
        if voxels.get("forward"):
            network += network_seconds(rate("forward", self.device, precision, announce=say), voxels["forward"],
                                       flops=flops)
        steps = self.n_steps - start
        self._report(None, Estimate(steps * (network + data_seconds),
                                    f"{count(steps, 'step')} of about {network + data_seconds:.1f} s on {self.device}"))

    def _report(self, fraction, message: str) -> None:
        from ..progress import Cancelled

        if self.progress is not None:
            try:
                self.progress(fraction, message)
            except Cancelled as e:  # honoured after the current step, like a signal
                self.cancelled, self.stop_reason = e, self.stop_reason or "cancelled"

    # --- checkpoints and export ---------------------------------------------------------

    def _checkpoint(self, step: int, loss, numbered: bool) -> None:
        rng = _rng_state(self.device)
        if self.info.enabled:
            gathered = [None] * self.info.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if not self.info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "loss": None if loss is None else float(loss),
            "model": {k: v.detach().cpu() for k, v in self.base.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_states, "world": self.info.world, "config": self.config,
        }
        last = self.ckpt_dir / "last.pt"
        save_checkpoint(state, last)
        if numbered:  # after last.pt, so last.pt is never older than the newest numbered checkpoint
            numbered_path = self.ckpt_dir / f"step_{step:08d}.pt"
            try:
                with atomic_output(numbered_path) as tmp:
                    shutil.copyfile(last, tmp)
            except OSError as e:
                raise TrainingError(f"cannot write checkpoint {numbered_path}: "
                                    f"{_os_message(e, numbered_path)}") from None
            self._prune()

    def _prune(self) -> None:
        keep = int(self.run_cfg.get("keep_checkpoints") or 0)
        numbered = sorted(self.ckpt_dir.glob("step_*.pt"))
        for old in numbered[:-keep] if keep else []:
            old.unlink(missing_ok=True)

    def _export(self) -> str:
        # A fresh copy of the task's own model class: batch norms back to plain ones, on the CPU.
        model = self.task.build_model()
        model.load_state_dict({k: v.detach().cpu() for k, v in self.base.state_dict().items()})
        model.eval()
        folder = self.out_dir / "model"
        # The task writes into a private folder; its files then reach model/ together, each renamed into place.
        with temporary_folder(self.out_dir, "-export") as staging:
            try:
                self.task.export(model, staging)
                names = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith("."))
                with atomic_outputs([folder / name for name in names]) as temporaries:
                    for name, tmp in zip(names, temporaries):
                        os.replace(staging / name, tmp)
            except OSError as e:
                raise TrainingError(
                    f"cannot write the trained model to {folder}: {_os_message(e, folder)}") from None
            except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as "... (os error 28)"
                code = re.search(r"\(os error (\d+)\)", str(e))
                if code is None:
                    raise
                failure = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
                raise TrainingError(f"cannot write the trained model to {folder}: "
                                    f"{describe_os_error(failure, folder / 'model.safetensors')}") from None
        return str(folder)


# --- checkpoint files ------------------------------------------------------------------------


def checkpoint_candidates(ckpt_dir: Path) -> list:
    """Checkpoints to resume from, best first: ``last.pt``, then numbered ones newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = [ckpt_dir / "last.pt"] if (ckpt_dir / "last.pt").is_file() else []
    return out + sorted(ckpt_dir.glob("step_*.pt"), reverse=True)


def load_checkpoint(path) -> dict:
    """Read a training checkpoint (tensors on the CPU, plain types only); raises :class:`TrainingError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many kinds of errors
        raise TrainingError(f"{path} cannot be read as a training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a CT-FM training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise TrainingError(f"{path} was written by a newer CT-FM (checkpoint version {state['version']}); "
                            "update the extension to resume it")
    return state


def checkpoint_task(folder) -> str | None:
    """The task of the newest readable checkpoint in ``folder/checkpoints`` (``None`` when none can be read):
    how a run folder made before ``ctfm-run.json`` existed is recognised (see :mod:`.runfolder`)."""
    for path in checkpoint_candidates(Path(folder) / "checkpoints"):
        try:
            config = load_checkpoint(path).get("config")
        except TrainingError:
            continue
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            return config["task"]
    return None


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save(state)`` to ``path`` through :func:`CTFMLib.files.atomic_output`.

    A write that fails (disk full: torch reports "unexpected pos ..." with the OS error as its context)
    is a one-line :class:`TrainingError` and leaves neither a temporary nor a partial file.
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            with open(tmp, "xb") as f:
                try:
                    torch.save(state, f)
                except RuntimeError as e:
                    cause = e.__context__ or e.__cause__
                    if isinstance(cause, OSError):
                        raise cause from None
                    first = str(e).splitlines()[0] if str(e) else repr(e)
                    raise OSError(errno.EIO, f"torch.save failed: {first}") from None
    except OSError as e:
        raise TrainingError(f"cannot write checkpoint {path}: {_os_message(e, path)}") from None


def _os_message(e: OSError, where) -> str:
    """One line for an OS error: a :class:`~CTFMLib.files.WriteError` says it all; others get the cause."""
    if isinstance(e, WriteError):
        return str(e)
    return describe_os_error(e, getattr(e, "filename", None) or where)


# --- random number generators ----------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and numbers (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- metrics ---------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv``: one row per logged step; new columns (validation keys) rewrite the file with them.

    ``keep_until``: rows of an earlier run up to this step are kept (a resumed run redoes the later ones).
    The file is (re)written whole through :func:`CTFMLib.files.atomic_write_text` at start and when columns
    change; rows are appended in between (rewriting a growing log at every row would cost quadratic I/O).
    An append never replaces anything, and a row cut short by a kill is dropped when the run resumes.
    """

    BASE = ("step", "loss", "lr", "seconds")

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        self.columns = list(self.BASE)
        self.rows = []
        if keep_until > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns += [c for c in (reader.fieldnames or []) if c not in self.columns]
                self.rows = [r for r in reader if _complete(r) and int(r["step"]) <= keep_until]
        self._rewrite()

    def append(self, row: dict) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())


def _complete(row: dict) -> bool:
    """Whether a metrics row read back has every base column as a number (a row cut by a kill has not)."""
    try:
        int(row["step"])
        for key in MetricsLog.BASE[1:]:
            float(row[key])
        return True
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _fmt(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _tensorboard(folder: Path, start: int):
    """A ``SummaryWriter`` when the tensorboard package is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # purge_step drops events of an interrupted run past the resumed step.
    return SummaryWriter(log_dir=str(folder), purge_step=start + 1 if start else None)
