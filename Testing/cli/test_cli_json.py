"""One CLI style for results (issue 17, defect 8): every command that prints a result prints sentences by
default and, with the flag ``--json``, ONE JSON object as the last and only line of stdout (progress,
notes and "expected time" lines go to stderr); ``ctfm triage --json-out FILE`` writes the object to a file."""

import argparse
import json

import numpy as np
import pytest

from ctfm_testing.hostile import ctfm, small_ct, tiny_segmenter, tiny_triage
from CTFMLib.cli import build_parser

# Every command that prints a result (all the leaves of the command tree): each must take the flag --json.
RESULT_COMMANDS = {
    ("info",), ("models",), ("embed",), ("segment",), ("stats",), ("export-seg",), ("train",), ("triage",), ("saliency",),
    ("index", "add"), ("index", "query"), ("index", "info"), ("index", "check"), ("index", "remove"),
    ("index", "compact"), ("index", "reembed"), ("index", "eval"),
}


def _leaves(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, path + (name,))


def test_json_is_a_flag_on_every_command_and_never_takes_a_value():
    leaves = dict(_leaves(build_parser()))
    assert set(leaves) == RESULT_COMMANDS, "a new command: does it print a result? add it here"
    problems = []
    for path, parser in leaves.items():
        options = {o: a for a in parser._actions for o in a.option_strings}
        flag = options.get("--json")
        if flag is None:
            problems.append(f"{' '.join(path)}: no --json")
        elif not isinstance(flag, argparse._StoreTrueAction):
            problems.append(f"{' '.join(path)}: --json takes a value")
        # a file is --json-out FILE: no other option spelled --json... takes a value either
        problems += [f"{' '.join(path)}: {o} takes a value" for o, a in options.items()
                     if o.startswith("--json") and o != "--json-out" and a.nargs != 0]
    assert problems == []
    triage = leaves[("triage",)]
    assert triage.parse_args(["ct.nii.gz", "--model", "m", "--json-out", "r.json"]).json_out == "r.json"


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def assert_sentences(result) -> list:
    """The default output: it succeeded and no stdout line is a JSON object."""
    assert result.returncode == 0, result
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert lines and not any(_is_json_object(ln) for ln in lines), result.stdout
    return lines


def assert_one_object(result, code: int = 0) -> dict:
    """The --json output: stdout is exactly one line, a JSON object."""
    assert result.returncode == code, result
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def both(*args, code: int = 0) -> tuple:
    """``(sentences, object)``: the command run without and with --json."""
    plain = ctfm(*args)
    assert plain.returncode == code, plain
    if code == 0:
        assert_sentences(plain)
    return plain, assert_one_object(ctfm(*args, "--json"), code)


def test_info_and_models(ctfm_cache, tmp_path, tiny_encoder_folder):
    _, info = both("info")
    assert {"versions", "device", "cache", "catalog"} <= set(info)
    _, listing = both("models", "list")
    assert {m["id"] for m in listing["models"]} >= {"ct_fm_feature_extractor", "whole_body_segmentation"}
    plain = ctfm("models", "import", tiny_encoder_folder, "--id", "enc-a")
    assert_sentences(plain)
    imported = assert_one_object(ctfm("models", "import", tiny_encoder_folder, "--id", "enc-b", "--json"))
    assert imported["id"] == "enc-b" and imported["folder"]
    listing = assert_one_object(ctfm("models", "list", "--json"))
    assert {"enc-a", "enc-b"} <= {m["id"] for m in listing["models"]}
    assert_sentences(ctfm("models", "remove", "enc-a"))
    removed = assert_one_object(ctfm("models", "remove", "enc-b", "--json"))
    assert removed["removed"], removed


@pytest.mark.slow
def test_embed(tmp_path, tiny_encoder_folder):
    ct = small_ct(tmp_path / "ct.nii.gz")
    common = ("--weights", tiny_encoder_folder, "--device", "cpu")
    assert_sentences(ctfm("embed", ct, *common, "--out", tmp_path / "a.npy"))
    result = assert_one_object(ctfm("embed", ct, *common, "--out", tmp_path / "b.npy", "--json"))
    assert result["out"] == str(tmp_path / "b.npy") and result["dim"] == np.load(tmp_path / "b.npy").shape[0]


@pytest.mark.slow
def test_segment_one_plan_and_batch(tmp_path):
    model = tiny_segmenter(tmp_path / "seg")
    images = tmp_path / "images"
    images.mkdir()
    ct = small_ct(images / "a.nii.gz")
    small_ct(images / "b.nii.gz", seed=1)
    (images / "broken.nii.gz").write_bytes(b"not an image")
    common = ("--model", model, "--device", "cpu", "--spacing", "native")
    plain = ctfm("segment", ct, *common, "--out", tmp_path / "one.nii.gz", "--progress", "bar")
    assert_sentences(plain)
    assert "expected time" in plain.stderr and "expected time" not in plain.stdout  # progress, not a result
    one = ctfm("segment", ct, *common, "--out", tmp_path / "two.nii.gz", "--json", "--progress", "bar")
    result = assert_one_object(one)
    assert "expected time" in one.stderr  # the lines a person reads move to stderr
    assert result["files"][0] == str(tmp_path / "two.nii.gz") and result["structures_present"] >= 0
    # --plan: sentences that name their axis order; the JSON keeps the plan's fields
    lines = assert_sentences(ctfm("segment", ct, *common, "--plan"))
    assert "voxels (x, y, z)" in lines[0] and "voxels (S, P, L)" in lines[1], lines
    plan = assert_one_object(ctfm("segment", ct, *common, "--plan", "--json"))
    assert plan["input"]["shape"] == [40, 36, 12] and plan["input"]["axes"] == "xyz"
    assert plan["working"]["axes"] == "SPL" and plan["windows"]["run"] >= 1
    # a batch with --json: one object at the end, with the results and the failures
    plain = ctfm("segment", images, *common, "--out-dir", tmp_path / "out1")
    assert plain.returncode == 1 and not any(_is_json_object(ln) for ln in plain.stdout.splitlines()), plain
    batch = assert_one_object(ctfm("segment", images, *common, "--out-dir", tmp_path / "out2", "--json"), code=1)
    assert sorted(r["image"] for r in batch["results"]) == [str(images / "a.nii.gz"), str(images / "b.nii.gz")]
    assert [f["image"] for f in batch["failed"]] == [str(images / "broken.nii.gz")] and batch["failed"][0]["error"]
    again = ctfm("segment", images, *common, "--out-dir", tmp_path / "out2", "--json")
    again_result = assert_one_object(again, code=1)  # the two done are skipped (said on stderr), broken fails again
    assert sorted(again_result["skipped"]) == sorted(r["image"] for r in batch["results"])
    assert again_result["results"] == [] and "exists: skipped" in again.stderr


@pytest.mark.slow
def test_triage_prints_sentences_or_json_and_json_out_writes_the_file(tmp_path):
    from ctfm_testing.phantoms import head_phantom
    from CTFMLib.image import write_image

    model = tiny_triage(tmp_path / "triage")
    head = write_image(head_phantom(shape=(40, 40, 16), spacing=(5.0, 5.0, 8.0)), tmp_path / "head.nii.gz")
    lines = assert_sentences(ctfm("triage", head, "--model", model, "--device", "cpu"))
    assert any("probability" in ln and "threshold" in ln for ln in lines), lines
    out = tmp_path / "result.json"
    plain = ctfm("triage", head, "--model", model, "--device", "cpu", "--json-out", out)
    assert_sentences(plain)
    written = json.loads(out.read_text())
    assert {"probability", "logit", "decision", "threshold", "model", "seconds", "saliency"} <= set(written)
    printed = assert_one_object(ctfm("triage", head, "--model", model, "--device", "cpu", "--json"))
    assert set(printed) == set(written) and printed["logit"] == pytest.approx(written["logit"], abs=1e-6)


@pytest.mark.slow
def test_saliency(tmp_path, tiny_encoder_folder):
    ct = small_ct(tmp_path / "ct.nii.gz")
    common = ("--weights", tiny_encoder_folder, "--target", "embedding", "--method", "gradient", "--steps", "1",
              "--device", "cpu")
    lines = assert_sentences(ctfm("saliency", ct, *common, "--out", tmp_path / "a.nii.gz"))
    assert any(str(tmp_path / "a.nii.gz") in ln and str(tmp_path / "a.json") in ln for ln in lines), lines
    result = assert_one_object(ctfm("saliency", ct, *common, "--out", tmp_path / "b.nii.gz", "--json"))
    assert result == json.loads((tmp_path / "b.json").read_text())  # the same object as the file beside the map


@pytest.mark.slow
def test_train(tmp_path):
    from ctfm_testing.training import tiny_pretraining

    config = tiny_pretraining(tmp_path)
    lines = assert_sentences(ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "a",
                                  "--max-steps", "1", "--device", "cpu"))
    assert any(ln.startswith("pretrain: 1 step on 2 scans") for ln in lines), lines
    summary = assert_one_object(ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "b",
                                     "--max-steps", "1", "--device", "cpu", "--json"))
    assert summary["steps"] == 1 and summary["scans"] == 2


@pytest.mark.slow
def test_index_commands(tmp_path, tiny_encoder_folder):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        small_ct(scans / f"s{i}.nii.gz", seed=i)
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"scans/s{i}.nii.gz,{i % 2}\n" for i in range(3)))
    idx, other = tmp_path / "idx", tmp_path / "idx2"
    run = ("--device", "cpu")
    assert_sentences(ctfm("index", "add", idx, scans / "s0.nii.gz", "--weights", tiny_encoder_folder, *run))
    added = ctfm("index", "add", idx, scans, *run, "--json")
    summary = assert_one_object(added)
    assert (summary["added"], summary["already_indexed"], summary["total"]) == (2, 1, 3)
    assert "already indexed: skipped" in added.stderr and "added as scan" in added.stderr
    _, hits = both("index", "query", idx, scans / "s1.nii.gz", "-k", "2", *run)
    assert len(hits["hits"]) == 2
    _, info = both("index", "info", idx)
    assert info["scans"] == 3
    _, report = both("index", "check", idx)
    assert report["consistent"]
    _, scores = both("index", "eval", idx, "--labels", tmp_path / "labels.csv", "-k", "1")
    assert scores["queries"] == 3
    _, reembedded = both("index", "reembed", idx, other, "--weights", tiny_encoder_folder, *run)
    assert reembedded["already_indexed"] == 3  # the first (plain) run embedded them all
    assert_sentences(ctfm("index", "remove", idx, "1"))
    removed = assert_one_object(ctfm("index", "remove", idx, "2", "--json"))
    assert removed["removed"] == 1
    assert_one_object(ctfm("index", "remove", idx, "2", "--json"), code=1)  # nothing left to remove: exit 1
    lines = assert_sentences(ctfm("index", "compact", idx))
    assert any("dropped 2 scan rows" in ln for ln in lines), lines
    ctfm("index", "remove", other, "1")
    compacted = assert_one_object(ctfm("index", "compact", other, "--json"))
    assert compacted["scan_rows_dropped"] == 1
