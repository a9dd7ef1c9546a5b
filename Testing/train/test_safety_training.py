"""Training never harms a user's files and never reports an unfinished run as a success (issue 14).

Findings of ``../shared/reviews/adversarial.md`` covered here: A4 (``--out`` into a folder that is not a
run), A17 (``--out`` naming a file), A18 (configuration and data checks), A20 (a checkpoint on a full disk,
leftovers of killed runs), A21 (a SIGTERM stop exits 0). Section B's training items (SIGKILLs and SIGTERM
then resume give the uninterrupted run, a truncated ``last.pt`` falls back to a numbered checkpoint,
config refusals) keep a test here or in test_train_runner.py.

Every run is a real ``ctfm train`` (in process through ``hostile.ctfm``, or a child process where a
signal is sent) of a tiny encoder on two small phantom CTs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctfm_testing.hostile import assert_refused, ctfm, fill, leftovers, small_tmpfs, tree_digest

ROOT = Path(__file__).resolve().parents[2]
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals, FIFOs and devices")


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- material -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Two 48 x 48 x 60 phantom CTs at 2 mm (they pass CT-FM's pretraining filters)."""
    from ctfm_testing.phantoms import write_pretraining_scans

    return write_pretraining_scans(tmp_path_factory.mktemp("scans"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A preprocessed-scan cache shared by the runs of this module (outside every run folder)."""
    return tmp_path_factory.mktemp("cache")


def write_config(path: Path, sources, cache_dir=None, **sections) -> Path:
    """A tiny pretraining configuration (4 steps, checkpoint every 2), with ``sections`` merged in."""
    config = {
        "data": {"source": [str(s) for s in (sources if isinstance(sources, list) else [sources])], "workers": 0,
                 "cache_dir": None if cache_dir is None else str(cache_dir)},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4},
        "run": {"seed": 0, "device": "cpu", "checkpoint_every": 2, "log_every": 1, "scans_per_step": 2},
        "pretrain": {"crops_per_scan": 3, "crop_size": [8, 16, 16], "projection": [16, 16, 8]},
    }
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config.setdefault(name, {}).get(key), dict):
                config[name][key].update(value)
            else:
                config.setdefault(name, {})[key] = value
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def config(tmp_path, scans, cache) -> Path:
    return write_config(tmp_path / "pretrain.json", scans, cache)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, scans, cache) -> Path:
    """A pretraining run stopped after 3 of its 4 steps (checkpoints: step 2 and last.pt at step 3)."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = write_config(folder / "pretrain.json", scans, cache)
    result = ctfm("train", "pretrain", "--config", cfg, "--out", folder / "run", "--max-steps", "3")
    assert result.returncode == 0, result
    return folder / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def steps_logged(run: Path) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def summary_of(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- A4: --out is a new or empty folder, or a run of the same task --------------------------------


def test_a4_out_into_a_user_folder_is_refused_and_nothing_in_it_changes(tmp_path, config):
    """A4: `ctfm train --out userdir` replaced the user's config.json, metrics.csv and model/ files."""
    user = tmp_path / "userdir"
    (user / "data").mkdir(parents=True)
    (user / "model").mkdir()
    (user / "config.json").write_text('{"my": "precious config"}')
    (user / "metrics.csv").write_text("my,metrics\n")
    (user / "model" / "config.json").write_text('{"mine": 1}')
    (user / "model" / "model.safetensors").write_text("weights")
    before = tree_digest(user)
    line = assert_refused(ctfm("train", "pretrain", "--config", config, "--out", user),
                          "config.json", "model/", "not a CT-FM pretrain run", "empty or new")
    assert str(user) in line
    assert tree_digest(user) == before
    # The same rule for run.out_dir in the configuration (no --out).
    data = json.loads(config.read_text())
    data["run"]["out_dir"] = str(user)
    config.write_text(json.dumps(data))
    assert_refused(ctfm("train", "pretrain", "--config", config), "not a CT-FM pretrain run")
    assert tree_digest(user) == before


def test_a4_a_model_folder_given_as_out_is_refused(tmp_path, config):
    """A4: a model folder (config.json + model.safetensors) is a likely mix-up with Slicer's model folder."""
    from ctfm_testing.hostile import tiny_encoder

    model = tiny_encoder(tmp_path / "my_model")
    before = tree_digest(model)
    assert_refused(ctfm("train", "pretrain", "--config", config, "--out", model), "model.safetensors",
                   "not a CT-FM pretrain run")
    assert tree_digest(model) == before


@pytest.mark.slow
def test_a4_a_run_of_another_task_is_refused_naming_its_task(tmp_path, scans, trained_run):
    """A4: a pretraining run is not overwritten by a classification run (marker, and checkpoints of old runs)."""
    run = copy_run(trained_run, tmp_path / "run")
    other = tmp_path / "classify.json"
    other.write_text(json.dumps({"data": {"source": [str(scans)]}}))
    before = tree_digest(run)
    assert_refused(ctfm("train", "classify", "--config", other, "--out", run), "pretrain run", "classify")
    assert tree_digest(run) == before
    # A run made before the marker existed: its checkpoint tells the task.
    (run / "ctfm-run.json").unlink()
    before = tree_digest(run)
    assert_refused(ctfm("train", "classify", "--config", other, "--out", run), "pretrain run", "checkpoints")
    assert tree_digest(run) == before


def test_a4_a_run_of_the_same_task_resumes_and_an_unmarked_one_gets_the_marker(tmp_path, config, trained_run):
    """A4: an earlier run of the same task is still accepted (resume), with or without its marker."""
    run = copy_run(trained_run, tmp_path / "run")
    marker = json.loads((run / "ctfm-run.json").read_text())
    assert marker["task"] == "pretrain" and marker["format"] == "ctfm-train-run" and marker["ctfm_version"]
    # Without --resume a run with checkpoints is refused as before, in one line, before any work.
    before = tree_digest(run)
    assert_refused(ctfm("train", "pretrain", "--config", config, "--out", run), "already holds checkpoints", "resume")
    assert tree_digest(run) == before

    (run / "ctfm-run.json").unlink()  # as a run of an older CT-FM
    result = ctfm("train", "pretrain", "--config", config, "--out", run, "--resume", "--json")
    assert result.returncode == 0, result
    assert summary_of(result)["steps"] == 4 and steps_logged(run) == [1, 2, 3, 4]
    assert json.loads((run / "ctfm-run.json").read_text())["task"] == "pretrain"


def test_a4_new_and_empty_folders_are_accepted(tmp_path, config):
    """A4: what stays allowed: a folder that does not exist (parents made) and an empty one (OS clutter ignored)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0finder")
    for out in (empty, tmp_path / "new" / "deeper"):
        result = ctfm("train", "pretrain", "--config", config, "--out", out, "--max-steps", "1")
        assert result.returncode == 0, result
        assert (out / "ctfm-run.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert (empty / ".DS_Store").read_bytes() == b"\0finder"


def test_a4_the_slicer_hub_refuses_a_user_folder_before_starting(tmp_path, config, trained_run):
    """A4: the hub's Train section checks the output folder by the same rules (torch-free) before the CLI runs."""
    from CTFMSlicer.train import TrainSetupError, trainRequest

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(TrainSetupError, match="notes.txt.*not a CT-FM pretrain run"):
        trainRequest("pretrain", config, user)
    with pytest.raises(TrainSetupError, match="pretrain run"):
        trainRequest("classify", _classify_config(tmp_path), trained_run)
    assert trainRequest("pretrain", config, trained_run, resume=True).parameters["resume"] is True


def _classify_config(tmp_path: Path) -> Path:
    path = tmp_path / "classify.json"
    path.write_text(json.dumps({"data": {"source": [str(tmp_path)]}}))
    return path


@pytest.mark.slow
def test_a4_the_slicer_cli_module_refuses_a_user_folder_and_leaves_it_alone(tmp_path, config):
    """A4: CTFMTrain (the Slicer CLI module) created the folder and trained into whatever it held."""
    from test_cli_module import run_cli, slicer_command_line

    user = tmp_path / "user"
    (user / "model").mkdir(parents=True)
    (user / "model" / "model.safetensors").write_text("weights")
    before = tree_digest(user)
    result = run_cli(slicer_command_line({"task": "pretrain", "device": "cpu", "configFile": config,
                                          "outputDirectory": user}), env=child_env(), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not a CT-FM pretrain run" in result.stderr
    assert tree_digest(user) == before


# --- A17: --out naming a file ----------------------------------------------------------------------


def test_a17_out_naming_a_file_is_refused_in_one_line(tmp_path, config):
    """A17: `ctfm train ... --out afile.txt` gave a FileExistsError traceback."""
    target = tmp_path / "afile.txt"
    target.write_text("my notes")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("train", "pretrain", "--config", config, "--out", target), "afile.txt", "is a file")
    assert tree_digest(tmp_path) == before


# --- A18: configuration and data checks --------------------------------------------------------------

INF, NAN = float("inf"), float("nan")

BAD_VALUES = [
    ({"optim": {"lr": INF}}, "optim.lr"),
    ({"optim": {"lr": NAN}}, "optim.lr"),
    ({"pretrain": {"crop_size": [4000, 4000, 4000]}}, "pretrain.crop_size"),
    ({"pretrain": {"crop_size": [4, 16, 16]}}, "pretrain.crop_size"),
    ({"pretrain": {"hu_range": [100, 100]}}, "pretrain.hu_range"),
    ({"pretrain": {"hu_range": [100, -100]}}, "pretrain.hu_range"),
    ({"pretrain": {"hu_range": [-1024, INF]}}, "pretrain.hu_range"),
    ({"pretrain": {"spacing": [-3, 1, 1]}}, "pretrain.spacing"),
    ({"pretrain": {"spacing": [0.01, 1, 1]}}, "pretrain.spacing"),
    ({"pretrain": {"temperature": INF}}, "pretrain.temperature"),
    ({"pretrain": {"projection": [99, 16, 8]}}, "pretrain.projection"),
    ({"pretrain": {"views": {"smooth_sigma": [0.5, INF]}}}, "pretrain.views.smooth_sigma"),
    ({"run": {"seed": -1}}, "run.seed"),
    ({"run": {"device": "banana"}}, "run.device"),
    ({"data": {"workers": -1}}, "data.workers"),
]


@pytest.mark.parametrize("change, key", BAD_VALUES, ids=[k + "=" + json.dumps(c)[:40] for c, k in BAD_VALUES])
def test_a18_a_bad_value_is_refused_in_one_line_before_any_folder_is_made(tmp_path, scans, cache, change, key):
    """A18: Infinity lr, a 4000^3 crop, hu_range [100, 100] ... were accepted (or crashed), and a config that
    failed validation still created the --out folder."""
    cfg = write_config(tmp_path / "bad.json", scans, cache, **change)
    out = tmp_path / "new" / "run"
    assert_refused(ctfm("train", "pretrain", "--config", cfg, "--out", out), key)
    assert not (tmp_path / "new").exists()


def test_a18_every_key_is_range_checked_when_the_configuration_is_loaded():
    """A18: each numeric option of every task is checked at load time, naming the key (one line)."""
    from CTFMLib.train.config import ConfigError, load_config

    refused = {
        "pretrain": [("data.val_fraction", 1.0), ("data.workers", 10_000), ("data.source", [1, 2]),
                     ("optim.weight_decay", -1e-3), ("optim.max_steps", 0), ("optim.grad_clip", 0),
                     ("optim.grad_clip", INF), ("optim.warmup_steps", -1), ("run.checkpoint_every", 0),
                     ("run.log_every", 0), ("run.scans_per_step", 0), ("run.seed", 2 ** 40),
                     ("model.init_filters", 0), ("model.init_filters", 100_000), ("model.blocks_down", []),
                     ("model.blocks_down", [1, 0]), ("pretrain.crops_per_scan", 1),
                     ("pretrain.crop_size", [8, 16]), ("pretrain.temperature", 0), ("pretrain.views.flip_p", 1.5),
                     ("pretrain.views.scale", [0.9, 0.2]), ("pretrain.views.hist_points", 2),
                     ("pretrain.hu_range", ["a", 1])],
        "segment": [("segment.spacing", [0, 1, 1]), ("segment.crop_size", [2000, 2000, 2000]),
                    ("segment.val_overlap", 1.0), ("segment.augment.noise_p", -0.1),
                    ("segment.augment.rotate", INF), ("segment.dsdepth", 0), ("segment.labels", 3)],
        "classify": [("classify.threshold", 1.0), ("classify.size", [0, 16, 16]), ("classify.windows", [[80, 0]]),
                     ("classify.spacing", [5, 2, 100]), ("classify.val_batch", 0), ("classify.flip_p", 2.0),
                     ("classify.mode", "lora")],
    }
    for task, cases in refused.items():
        for key, value in cases:
            with pytest.raises(ConfigError) as info:
                load_config(None, task, {key: value})
            message = str(info.value)
            assert key.rsplit(".", 1)[0] in message and "\n" not in message, (key, value, message)
    # 238 GiB of input for a single crop: refused by the voxel limit, and a step of many crops by its input size.
    with pytest.raises(ConfigError, match=r"pretrain.crop_size .* voxels"):
        load_config(None, "pretrain", {"pretrain.crop_size": [1024, 1024, 1024]})
    with pytest.raises(ConfigError, match=r"GiB of input.*scans_per_step"):
        load_config(None, "pretrain", {"pretrain.crop_size": [256, 256, 256], "run.scans_per_step": 64})
    for task in ("pretrain", "segment", "classify"):
        load_config(None, task)  # the defaults pass


@POSIX_ONLY
def test_a18_csv_rows_that_are_not_scans_are_reported_in_skipped_csv(tmp_path, scans):
    """A18: a CSV row naming a FIFO or a folder with no scans was silently dropped (not in skipped.csv), and a
    folder row made the DICOM probe read every file of its tree (e.g. /etc)."""
    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import write_image

    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    tree = tmp_path / "tree"  # like /etc: nothing at its top; a scan deep inside is not this row's scan
    (tree / "x" / "y").mkdir(parents=True)
    (tree / "README.txt").write_text("not a scan")
    (tree / "x" / "notes.txt").write_text("not a scan")
    write_image(body_phantom(shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0), seed=5), tree / "x" / "y" / "deep.nii.gz")
    study = tmp_path / "study"  # a study folder: its series (here an image) one level down is accepted
    write_image(body_phantom(shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0), seed=6), study / "s1" / "ct.nii.gz")
    rows = [scans / "ct1.nii.gz", scans / "ct2.nii.gz", fifo, Path(os.devnull), empty, tree, study]
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{p}\n" for p in rows))
    cfg = write_config(tmp_path / "pretrain.json", tmp_path / "list.csv")
    result = ctfm("train", "pretrain", "--config", cfg, "--out", tmp_path / "run", "--max-steps", "1", "--json")
    assert result.returncode == 0, result
    summary = summary_of(result)
    assert summary["scans"] == 3
    with open(tmp_path / "run" / "data" / "skipped.csv", newline="") as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert "FIFO" in skipped[str(fifo)]
    assert "character device" in skipped[os.devnull]
    assert "no DICOM or image file" in skipped[str(empty)]
    assert "top of this folder" in skipped[str(tree)]
    assert set(skipped) == {str(fifo), os.devnull, str(empty), str(tree)}
    assert {p for p, _ in summary["skipped"]} == set(skipped)


def test_b_a_scan_that_cannot_be_resampled_is_skipped_with_its_reason(tmp_path, scans):
    """B: a scan whose resampling is absurd (spacing -3 mm, or so fine that it would be gigabytes) is skipped
    with the reason in skipped.csv, never a crash; the size is refused before any allocation."""
    from CTFMLib.train.data import ScanCache, ScanRef

    scan = ScanRef(str(scans / "ct1.nii.gz"))
    for spacing, words in (((-3.0, 1.0, 1.0), "positive"), ((0.05, 0.05, 0.05), "voxels")):
        cache = ScanCache(tmp_path / f"cache{spacing[0]}", spacing=spacing)
        usable, skipped = cache.prepare([scan], workers=0)
        assert usable == [] and len(skipped) == 1 and words in skipped[0][1], skipped
        with open(cache.folder / "skipped.csv", newline="") as f:
            assert [row["reason"] for row in csv.DictReader(f)] == [skipped[0][1]]


def test_run_folder_rules(tmp_path):
    """The rules of CTFMLib.train.runfolder on their own (torch-free, as the Slicer hub uses them)."""
    from CTFMLib.train.runfolder import RunFolderError, claim_run_folder, inspect_run_folder

    assert inspect_run_folder(tmp_path / "new", "pretrain").state == "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".ctfm-tmp-x1").mkdir()  # a leftover of ours does not make it "used"
    assert inspect_run_folder(tmp_path / "empty", "pretrain").state == "empty"
    claimed = claim_run_folder(tmp_path / "a" / "b", "segment")
    assert claimed.state == "new" and claimed.marker["task"] == "segment"
    assert inspect_run_folder(tmp_path / "a" / "b", "segment").state == "run"
    with pytest.raises(RunFolderError, match="segment run"):
        inspect_run_folder(tmp_path / "a" / "b", "pretrain")
    assert claim_run_folder(tmp_path / "a" / "b", "segment").state == "run"  # a second claim: same run
    (tmp_path / "a" / "b" / "ctfm-run.json").write_text("{broken")
    with pytest.raises(RunFolderError, match="cannot be read"):
        inspect_run_folder(tmp_path / "a" / "b", "segment")
    # Without a checkpoint reader (the hub), a folder with checkpoints but no marker is left to the CLI.
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.pt").write_bytes(b"x")
    assert inspect_run_folder(old, "pretrain").state == "legacy?"
    with pytest.raises(RunFolderError, match="checkpoints/.*not a CT-FM pretrain run"):
        inspect_run_folder(old, "pretrain", legacy_task=lambda folder: None)  # unreadable checkpoint
    many = tmp_path / "many"
    many.mkdir()
    for i in range(8):
        (many / f"f{i}.txt").write_text("x")
    with pytest.raises(RunFolderError, match=r"f0.txt, .*f4.txt and 3 more"):
        inspect_run_folder(many, "classify")


# --- A20: a full disk, and what killed runs leave -------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped otherwise), unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def test_a20_a_checkpoint_on_a_full_disk_stops_in_one_line_and_leaves_no_temporary(tmp_path, config, small_disk):
    """A20: a checkpoint written on a full disk gave a RuntimeError traceback ("unexpected pos ...") and left a
    700 KB .last.pt.tmpPID. The tiny encoder's checkpoint is ~330 KB; ~150 KB are left free."""
    out = small_disk / "run"
    fill(small_disk, 0)  # not even the run's marker fits: refused, and the folder it made is gone again
    assert_refused(ctfm("train", "pretrain", "--config", config, "--out", out), "no space left")
    assert not out.exists() and leftovers(small_disk) == []
    (small_disk / "filler").unlink()
    fill(small_disk, 150 * 1024)
    line = assert_refused(ctfm("train", "pretrain", "--config", config, "--out", out), "cannot write checkpoint",
                          "no space left")
    assert "last.pt" in line
    assert leftovers(small_disk) == []
    assert not (out / "checkpoints" / "last.pt").exists()


def test_a20_leftovers_of_a_killed_run_are_removed_at_start_but_only_inside_the_run(tmp_path, config, trained_run):
    """A20: temporaries a SIGKILLed run left (private .ctfm-tmp-* folders, old .NAME.tmpPID files) in the run
    folder and its own subfolders are removed when the run starts again; nothing outside the run is touched."""
    run = copy_run(trained_run, tmp_path / "run")
    planted = [run / ".ctfm-tmp-a1", run / "checkpoints" / ".ctfm-tmp-b2", run / "data" / ".ctfm-tmp-c3",
               run / "model" / ".ctfm-tmp-d4"]
    for folder in planted:
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"\0" * 1000)
    (run / "checkpoints" / ".last.pt.tmp4242").write_bytes(b"\0" * 1000)
    outside = tmp_path / ".ctfm-tmp-not-ours"
    outside.mkdir()
    (outside / "keep.txt").write_text("a user's file beside the run")
    result = ctfm("train", "pretrain", "--config", config, "--out", run, "--resume")
    assert result.returncode == 0, result
    assert leftovers(run) == []
    assert (outside / "keep.txt").read_text() == "a user's file beside the run"


# --- A21: a run stopped by a signal does not exit 0 -----------------------------------------------------


def child_env() -> dict:
    path = os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_ctfm(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(steps_logged(run)) >= rows:
                return
        except (OSError, KeyError, ValueError):
            pass
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ctfm ended early ({proc.returncode})\n{out}\n{err[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("training did not start in time")


def model_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_run(run: Path, reference: Path) -> None:
    import torch

    got, expected = model_tensors(run), model_tensors(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    def losses(folder):
        with open(folder / "metrics.csv", newline="") as f:
            return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]

    assert losses(run) == losses(reference)


@pytest.mark.slow
@POSIX_ONLY
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a21_a_run_stopped_by_a_signal_keeps_its_checkpoint_but_does_not_exit_0(tmp_path, scans, cache, sig, code):
    """A21: training stopped by SIGTERM exited 0 ("stopped": true), which schedulers read as success. It still
    checkpoints, prints its summary and resumes to exactly the uninterrupted run (section B)."""
    slow = {"optim": {"max_steps": 16}, "run": {"checkpoint_every": 1000, "deterministic": True},
            "pretrain": {"crops_per_scan": 4, "crop_size": [16, 32, 32], "projection": [16, 16, 8]}}
    cfg = write_config(tmp_path / "pretrain.json", scans, cache, **slow)
    run = tmp_path / "run"
    proc = start_ctfm("train", "pretrain", "--config", cfg, "--out", run, "--json")
    try:
        wait_for_rows(run, 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] and summary["stop_reason"] == signal.Signals(sig).name and summary["exported"] is None
    assert summary["steps"] < 16 and "Traceback" not in err and "--resume" in err
    from CTFMLib.train.trainer import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == summary["steps"] == steps_logged(run)[-1]
    if sig != signal.SIGTERM:
        return
    resumed = ctfm("train", "pretrain", "--config", cfg, "--out", run, "--resume", "--json")
    assert resumed.returncode == 0 and not summary_of(resumed)["stopped"], resumed
    reference = ctfm("train", "pretrain", "--config", cfg, "--out", tmp_path / "whole")
    assert reference.returncode == 0, reference
    assert_same_run(run, tmp_path / "whole")


def test_a21_the_slicer_hub_reports_a_signal_stop_as_not_finished(tmp_path, config):
    """A21: CTFMTrain now exits 143 after SIGTERM (Slicer: completed with errors); the hub's Train section says
    the run did not finish and how to continue, instead of "completed"."""
    pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
    from test_slicer_train import cli_scene, start

    from CTFMSlicer.train import trainRequest

    run, node, seen, logic = start(cli_scene(), trainRequest("pretrain", config, tmp_path / "out"))
    logic.status(node, node.Running)
    logic.output(node, stderr="ERROR: training stopped (SIGTERM) at step 3 before the end of its schedule; the "
                              "checkpoint /x/checkpoints/last.pt is kept: run again with Resume to continue\n")
    logic.status(node, node.CompletedWithErrors)
    outcome, message, _ = seen.done[0]
    assert outcome == "failed" and "did not finish" in message and "Resume" in message


# --- section B: what held up -----------------------------------------------------------------------------


@pytest.mark.slow
@POSIX_ONLY
def test_b_sigkills_then_resume_end_with_the_uninterrupted_run(tmp_path, scans, cache):
    """B: random SIGKILLs during pretraining with a checkpoint every step, each followed by --resume: the final
    weights and metrics.csv equal an uninterrupted run's (here 2 kills of `ctfm train`)."""
    slow = {"optim": {"max_steps": 16}, "run": {"checkpoint_every": 1, "deterministic": True},
            "pretrain": {"crops_per_scan": 4, "crop_size": [16, 32, 32], "projection": [16, 16, 8]}}
    cfg = write_config(tmp_path / "pretrain.json", scans, cache, **slow)
    run = tmp_path / "run"
    import random

    rng = random.Random(14)
    killed = 0
    for kill in range(2):
        args = ["train", "pretrain", "--config", cfg, "--out", run] + (["--resume"] if kill else [])
        proc = start_ctfm(*args)
        try:
            wait_for_rows(run, (kill + 1) * 4, proc)
            time.sleep(rng.uniform(0.0, 0.1))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode
        killed += proc.returncode == -signal.SIGKILL
    assert killed >= 1
    finished = ctfm("train", "pretrain", "--config", cfg, "--out", run, "--resume")
    assert finished.returncode == 0, finished
    assert steps_logged(run) == list(range(1, 17)) and leftovers(run) == []
    reference = ctfm("train", "pretrain", "--config", cfg, "--out", tmp_path / "whole")
    assert reference.returncode == 0, reference
    assert_same_run(run, tmp_path / "whole")


def test_b_a_truncated_last_checkpoint_falls_back_to_the_newest_numbered_one(tmp_path, config, trained_run):
    """B: a truncated last.pt (step 3) is skipped; training resumes from step_00000002.pt."""
    from CTFMLib.train.trainer import load_checkpoint

    run = copy_run(trained_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    result = ctfm("train", "pretrain", "--config", config, "--out", run, "--resume", "--json")
    assert result.returncode == 0, result
    assert steps_logged(run) == [1, 2, 3, 4]  # step 3 redone after the fallback, logged once
    assert load_checkpoint(last)["step"] == 4 and math.isfinite(summary_of(result)["last_loss"])
