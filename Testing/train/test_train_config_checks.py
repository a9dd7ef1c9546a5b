"""Issue 17, defect 7: a training configuration is checked in full before any scan is preprocessed.

Before: the configuration, the data sources and the output folder were checked one problem at a time
(the first one raised, the others found on the next tries), ``pretrain.projection`` had to be matched by
hand to ``model.init_filters`` (its default ``[512, 256, 128]`` refused any other encoder), a failed run
left its output folder behind (the marker and an empty-handed cache), and config.py documented the cache
at ``<out_dir>/data`` while it lands in ``data/`` of the folder given with ``--out``.

Each test names in its docstring how it failed on the code before this change (checked against a copy of
the old ``train/config.py``, ``train/run.py`` and ``train/data.py`` on PYTHONPATH).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from ctfm_testing.hostile import ctfm, tree_digest


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Two 48 x 48 x 60 phantom CTs at 2 mm: they pass CT-FM's pretraining filters."""
    from ctfm_testing.phantoms import write_pretraining_scans

    return write_pretraining_scans(tmp_path_factory.mktemp("scans"))


def write_config(path: Path, sources, **sections) -> Path:
    """A tiny pretraining configuration, ``sections`` merged in. Its projection is given (the one the encoder
    needs) so that each test fails on the old code for the reason its docstring names."""
    config = {
        "data": {"source": [str(s) for s in sources], "workers": 0},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 2},
        "run": {"seed": 0, "device": "cpu", "checkpoint_every": 100, "log_every": 1, "scans_per_step": 2},
        "pretrain": {"crops_per_scan": 3, "crop_size": [8, 16, 16], "projection": [16, 8, 4]},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(json.dumps(config))
    return path


def stderr_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- every problem at once ------------------------------------------------------------------------------------------


def test_load_config_lists_every_problem_in_one_line():
    """A typo'd key, an infinite learning rate, a wrong projection width and a crop the encoder's levels do not
    divide are four problems: all named in one ConfigError (one line), each in ``problems``.
    Before: the first one alone (the unknown key) was raised."""
    from CTFMLib.train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, "pretrain", {"optim.learning_rate": 1e-3, "optim.max_steps": 0,
                                       "model.init_filters": 8, "pretrain.projection": [512, 256, 128]})
    message = str(info.value)
    assert "\n" not in message and message.startswith("3 problems: (1) ")
    assert len(info.value.problems) == 3
    for words in ("optim.learning_rate", "optim.max_steps", "pretrain.projection [512, 256, 128]"):
        assert words in message, (words, message)
    assert "128" in info.value.problems[2]  # the width the encoder gives: 8 * 2**4

    with pytest.raises(ConfigError) as info:
        load_config(None, "segment", {"segment.crop_size": [96, 100, 160], "segment.dsdepth": 9,
                                      "run.device": "banana"})
    assert len(info.value.problems) == 3, info.value.problems
    assert all(key in str(info.value) for key in ("segment.crop_size", "segment.dsdepth", "run.device"))


def test_micro_batch_and_memory_budget_are_checked_with_the_rest():
    """``pretrain.micro_batch`` takes "auto", null or a whole number of crops, ``run.max_memory_gb`` a positive
    number or null; wrong ones are listed with the other problems. Before: both were unknown keys."""
    from CTFMLib.train.config import ConfigError, load_config

    assert load_config(None, "pretrain")["pretrain"]["micro_batch"] == "auto"
    assert load_config(None, "pretrain")["run"]["max_memory_gb"] is None
    for value in ("auto", None, 0, 6):
        assert load_config(None, "pretrain", {"pretrain.micro_batch": value})["pretrain"]["micro_batch"] == value
    assert load_config(None, "pretrain", {"run.max_memory_gb": 3.5})["run"]["max_memory_gb"] == 3.5
    with pytest.raises(ConfigError) as caught:
        load_config(None, "pretrain", {"pretrain.micro_batch": "half", "run.max_memory_gb": -1,
                                       "optim.lr": 0})
    message = str(caught.value)
    assert len(caught.value.problems) == 3 and "\n" not in message
    assert "pretrain.micro_batch must be 'auto', null or a whole number of crops per forward pass" in message
    assert "run.max_memory_gb must be a number of GB" in message and "optim.lr" in message
    for bad in (-1, 2.5, True, [4]):
        with pytest.raises(ConfigError, match="pretrain.micro_batch"):
            load_config(None, "pretrain", {"pretrain.micro_batch": bad})


def test_projection_input_width_is_derived_from_the_encoder():
    """``pretrain.projection`` left out (or null) follows the encoder: ``[C, C/2, C/4]`` for its deepest width C.
    Before: the default ``[512, 256, 128]`` refused every encoder but the published one, so changing
    ``model.init_filters`` needed a second, hand-matched edit."""
    from CTFMLib.train.config import DEFAULTS, load_config
    from CTFMLib.train.pretrain import PretrainTask

    assert load_config(None, "pretrain")["pretrain"]["projection"] == [512, 256, 128]  # upstream's head
    assert load_config(None, "pretrain", {"model.init_filters": 8})["pretrain"]["projection"] == [128, 64, 32]
    small = load_config(None, "pretrain", {"model.init_filters": 4, "model.blocks_down": [1, 1, 1]})
    assert small["pretrain"]["projection"] == [16, 8, 4]
    given = load_config(None, "pretrain", {"model.init_filters": 4, "model.blocks_down": [1, 1, 1],
                                           "pretrain.projection": [16, 32, 8]})
    assert given["pretrain"]["projection"] == [16, 32, 8]  # a matching list is used as given
    assert DEFAULTS["pretrain"]["pretrain"]["projection"] is None  # untouched

    # A configuration built by hand with a null projection gets the same head.
    config = json.loads(json.dumps(small))
    config["pretrain"]["projection"] = None
    model = PretrainTask(config, [np.zeros((8, 16, 16), np.float32)]).build_model()
    linears = [m for m in model.head if hasattr(m, "weight")]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 4)]


def test_wrong_projection_and_missing_source_refused_at_once_before_any_preprocessing(tmp_path, scans):
    """The issue's case: a projection that does not fit the encoder, an unknown key and a data source that does
    not exist. One line lists all three; no output folder and no cache folder are made, no scan is read.
    Before: only the projection was named; the missing source was found on the next try."""
    missing = tmp_path / "scans-typo"
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "pretrain.json", [scans, missing],
                          data={"cache_dir": str(cache)}, pretrain={"projection": [99, 16, 8]},
                          optim={"max_stepz": 3})
    before = tree_digest(scans)
    result = ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "new" / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("ctfm: error: 3 problems: "), result
    assert "pretrain.projection [99, 16, 8]" in lines[0] and "16" in lines[0]
    assert "optim.max_stepz" in lines[0] and str(missing) in lines[0] and "do not exist" in lines[0]
    assert not (tmp_path / "new").exists() and not cache.exists()
    assert tree_digest(scans) == before


def test_output_folder_problems_join_the_list(tmp_path, scans):
    """An output folder that holds someone else's files is one more problem in the same line as the
    configuration's. Before: the configuration's problem alone."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    config = write_config(tmp_path / "pretrain.json", [scans], run={"seed": -1})
    result = ctfm("train", "pretrain", "--config", config, "--out", user)
    lines = stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result
    assert "2 problems" in lines[0] and "run.seed" in lines[0] and "notes.txt" in lines[0]
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


# --- nothing left behind ---------------------------------------------------------------------------------------------


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    """Scans that all fail the pretraining filters (20 slices each): refused with the reasons in the line, and
    the output folder (and the parent it made) are gone. Before: ``new/run`` stayed with its marker and a
    ``data/`` holding only skip records, and the message pointed into it."""
    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import write_image

    short = tmp_path / "short"
    for seed in (1, 2):
        write_image(body_phantom(shape=(32, 32, 20), spacing=(2.0, 2.0, 2.0), seed=seed), short / f"s{seed}.nii.gz")
    config = write_config(tmp_path / "pretrain.json", [short])
    result = ctfm("--progress", "none", "train", "pretrain", "--config", config, "--out", tmp_path / "new" / "run")
    assert result.returncode == 2, result
    assert "none of the 2 scans can be used" in result.stderr and "too few slices: 20" in result.stderr
    assert "s1.nii.gz" in result.stderr and "s2.nii.gz" in result.stderr
    assert not (tmp_path / "new").exists(), sorted(str(p) for p in (tmp_path / "new").rglob("*"))


@pytest.mark.slow
def test_a_run_that_fails_in_training_keeps_only_its_prepared_scans(tmp_path, scans):
    """A run whose loss turns NaN at step 2 (lr 1e30), before its first checkpoint: the folder keeps the marker
    and the preprocessed scans (the next run reuses them), nothing else. Before: config.json, metrics.csv and
    an empty checkpoints/ stayed too, a run folder with no run in it."""
    from CTFMLib.train.run import run
    from CTFMLib.train.trainer import TrainingError

    config = write_config(tmp_path / "pretrain.json", [scans], optim={"lr": 1e30, "warmup_steps": 0, "max_steps": 5})
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="not finite"):
        run("pretrain", config, out)
    assert sorted(p.name for p in out.iterdir()) == ["ctfm-run.json", "data"]
    assert len(list((out / "data").glob("*.npy"))) == 2

    messages = []
    good = write_config(tmp_path / "good.json", [scans], optim={"max_steps": 1})
    summary = run("pretrain", good, out, progress=lambda f, m: messages.append(m))
    assert summary["steps"] == 1 and summary["scans"] == 2
    assert any("preparing 0 of 2 scans (2 cached)" in m for m in messages), messages


# --- where the cache is ----------------------------------------------------------------------------------------------


def test_the_cache_lands_where_config_py_documents_it(tmp_path, scans):
    """The module docstring of config.py names the default cache folder; a run with ``--out`` different from
    ``run.out_dir`` puts it exactly there (in the folder given with ``--out``) and writes nothing at
    ``run.out_dir``. Before: the docstring said ``<out_dir>/data`` (run.out_dir's), the cache went to
    ``<--out>/data``."""
    from CTFMLib.train import config as config_module
    from CTFMLib.train.run import run

    doc = " ".join(config_module.__doc__.split())
    documented = re.search(r"``None`` = ``data/`` in the run's output folder, i\.e\. ``<--out>/data``", doc)
    assert documented, "config.py no longer documents the cache folder as data/ of the --out folder"
    elsewhere = tmp_path / "configured"
    config = write_config(tmp_path / "pretrain.json", [scans], run={"out_dir": str(elsewhere)},
                          optim={"max_steps": 1})
    out = tmp_path / "given"
    run("pretrain", config, out)
    assert len(list((out / "data").glob("*.npy"))) == 2
    assert not elsewhere.exists()
