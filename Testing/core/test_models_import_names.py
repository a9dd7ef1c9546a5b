"""Issue 17, defect 3: imports are usable by the name they are given, and the offline messages print the
exact command that works.

``ctfm models import FOLDER`` without ``--id`` (what the offline messages told users to run) printed a name
that no command could use: a folder called ``whole-body`` was imported as ``whole-body`` and ``--model
whole-body`` still asked for the catalogue model; the offline message's ``ctfm models import FOLDER_OR_ZIP``
filed the model under the folder's name, so the command that failed failed again. Here every name an
import prints, and every command an error prints, is followed literally, as a user would.
"""

from __future__ import annotations

import re
import shlex

import pytest

from ctfm_testing.hostile import ctfm, small_ct

COMMAND = re.compile(r"`(ctfm models import [^`]*)`")


def _segmenter(folder, out_channels: int, labels=None):
    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    model = monai_segresnet(out_channels=out_channels, init_filters=4, blocks_down=(1, 1, 1), dsdepth=1)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "init_filters": 4,
              "blocks_down": [1, 1, 1], "dsdepth": 1}
    folder = write_published_layout(model, folder, config)
    if labels:
        import json

        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def _encoder(folder):
    from ctfm_testing.checkpoints import write_monai_encoder

    return write_monai_encoder(folder, init_filters=4, blocks_down=(1, 1, 1))


def _printed_name(stdout: str) -> str:
    """The name `ctfm models import` says the model is used by (``use it as --model NAME``)."""
    match = re.search(r"use it as --model (.+?) or --weights", stdout)
    assert match, stdout
    return shlex.split(match.group(1))[0]


def _run_printed(line: str, **replace) -> object:
    """Run the backticked `ctfm models import ...` command of an error line, with its placeholders filled."""
    found = COMMAND.findall(line)
    assert found, line
    words = shlex.split(found[0])[1:]
    return ctfm(*[str(replace.get(w, w)) for w in words])


@pytest.mark.parametrize("name", ["whole-body", "whole_body_segmentation", "Whole_Body"])
def test_every_name_an_import_prints_is_one_the_commands_take(ctfm_cache, tmp_path, name):
    """A folder is imported under its own name; a name that already means a catalogue model (an id or an alias
    like whole-body) is refused with the commands that work instead of an import no command can use."""
    folder = _segmenter(tmp_path / "src" / name, 3, {"0": "background", "1": "liver", "2": "spleen"})
    ct = small_ct(tmp_path / "ct.nii.gz")
    result = ctfm("models", "import", folder)
    if result.returncode != 0:
        assert result.returncode == 2 and len(result.lines) == 1 and "Traceback" not in result.stderr, result
        assert not (ctfm_cache / "models").exists() or not any((ctfm_cache / "models").iterdir())
        result = _run_printed(result.lines[0], NAME="site-wb")
        assert result.returncode == 0, result
    model_name = _printed_name(result.stdout)
    run = ctfm("segment", ct, "--model", model_name, "--structures", "spleen", "--plan")
    assert run.returncode == 0, (model_name, run)
    listing = ctfm("models", "list").stdout
    assert any(ln.startswith(model_name + " ") or ln.startswith(shlex.quote(model_name) + " ")
               for ln in listing.splitlines()), listing


@pytest.mark.parametrize("command", ["segment", "embed"])
def test_the_command_an_offline_error_prints_makes_the_failed_command_work(ctfm_cache, tmp_path, command):
    """Offline with an empty store: the error's import command, run with a copy of the model's folder, makes the
    very command that failed work (the whole-body labels included for segment)."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    if command == "segment":
        copy = _segmenter(tmp_path / "usb" / "model", 118)  # as published: no labels.json
        args = ("segment", ct, "--model", "whole-body", "--structures", "liver", "--plan")
    else:
        copy = _encoder(tmp_path / "usb" / "model")
        args = ("embed", ct, "--out", tmp_path / "e.npy")
    failed = ctfm(*args)
    assert failed.returncode == 2 and len(failed.lines) == 1, failed
    imported = _run_printed(failed.lines[0], FOLDER_OR_ZIP=copy)
    assert imported.returncode == 0, imported
    again = ctfm(*args)
    assert again.returncode == 0, again
    assert command == "segment" or (tmp_path / "e.npy").is_file()
