"""Outputs never replace inputs or users' files (adversarial report A2, A3, A9, A17, A21).

Each test reproduces a finding of ``../shared/reviews/adversarial.md`` section A with its own tiny
models and phantoms, and checks what the user keeps afterwards.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctfm_testing.hostile import assert_refused, ctfm, small_ct, tiny_encoder, tiny_segmenter, tiny_triage, tree_digest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"enc": tiny_encoder(root / "enc"), "seg": tiny_segmenter(root / "seg"), "triage": tiny_triage(root / "tri")}


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- A2: an output that is the input -------------------------------------------------------------

def test_a2_segment_out_equal_to_the_input_is_refused_and_the_ct_kept(models, tmp_path):
    ct = small_ct(tmp_path / "a.nii.gz")
    before = tree_digest(tmp_path)
    line = assert_refused(ctfm("segment", ct, "--model", models["seg"], "--out", ct), "is the input")
    assert str(ct) in line
    assert tree_digest(tmp_path) == before


def test_a2_batch_out_dir_equal_to_the_input_folder_replaces_no_ct(models, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("p1.nii.gz", "p2.nii.gz"):
        small_ct(scans / name)
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", scans, "--model", models["seg"], "--out-dir", scans), "is the input")
    assert tree_digest(tmp_path) == before


def test_a2_an_input_reached_through_a_link_is_still_the_input(models, tmp_path):
    ct = small_ct(tmp_path / "a.nii.gz")
    os.link(ct, tmp_path / "hard.nii.gz")
    (tmp_path / "soft.nii.gz").symlink_to(ct)
    before = tree_digest(tmp_path)
    for out in ("hard.nii.gz", "soft.nii.gz"):
        assert_refused(ctfm("segment", ct, "--model", models["seg"], "--out", tmp_path / out, "--overwrite"),
                       "is the input")
    assert tree_digest(tmp_path) == before


def test_a2_saliency_and_triage_never_write_over_their_input(models, tmp_path):
    ct = small_ct(tmp_path / "s.nii.gz")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("saliency", ct, "--weights", models["enc"], "--target", "embedding", "--method", "gradient",
                        "--out", ct, "--overwrite"), "is the input")
    head = small_ct(tmp_path / "t.nii.gz")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("triage", head, "--model", models["triage"], "--json-out", head), "--json-out")
    assert_refused(ctfm("triage", head, "--model", models["triage"], "--saliency", head, "--overwrite"),
                   "is the input")
    assert tree_digest(tmp_path) == before


def test_a2_existing_outputs_need_overwrite(models, tmp_path):
    ct = small_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "mine.npy").write_bytes(b"my notes")
    (tmp_path / "seg.labels.json").write_text("my labels")
    assert_refused(ctfm("embed", ct, "--weights", models["enc"], "--out", tmp_path / "mine.npy"), "--overwrite")
    # The sidecar is an output too: a user's file of that name is not replaced without --overwrite.
    assert_refused(ctfm("segment", ct, "--model", models["seg"], "--out", tmp_path / "seg.nii.gz"), "--overwrite")
    assert (tmp_path / "mine.npy").read_bytes() == b"my notes"
    assert (tmp_path / "seg.labels.json").read_text() == "my labels" and not (tmp_path / "seg.nii.gz").exists()
    ok = ctfm("embed", ct, "--weights", models["enc"], "--out", tmp_path / "mine.npy", "--overwrite")
    assert ok.returncode == 0, ok
    assert np.load(tmp_path / "mine.npy").shape == (16,)


@pytest.mark.slow
def test_a2_batch_skips_existing_outputs_and_redoes_them_with_overwrite(models, tmp_path):
    scans, outs = tmp_path / "scans", tmp_path / "outs"
    scans.mkdir()
    small_ct(scans / "p1.nii.gz")
    small_ct(scans / "p2.nii.gz", seed=1)
    outs.mkdir()
    (outs / "p1.nii.gz").write_bytes(b"an earlier result")
    first = ctfm("segment", scans, "--model", models["seg"], "--out-dir", outs)
    assert first.returncode == 0, first
    assert "p1.nii.gz exists: skipped" in first.stdout and "segmented 1 of 1" in first.stdout
    assert (outs / "p1.nii.gz").read_bytes() == b"an earlier result" and (outs / "p2.nii.gz").is_file()
    again = ctfm("segment", scans, "--model", models["seg"], "--out-dir", outs, "--overwrite")
    assert again.returncode == 0 and "segmented 2 of 2" in again.stdout, again
    assert (outs / "p1.nii.gz").read_bytes() != b"an earlier result"


# --- A3: a CSV's out column ------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["../elsewhere/keep.nii.gz", "{abs}", "..", "sub/../x.nii.gz", "x.nii.gz\\..\\..\\y"])
def test_a3_a_csv_out_value_cannot_leave_the_out_dir(models, tmp_path, out):
    work = tmp_path / "c"
    (work / "elsewhere").mkdir(parents=True)
    (work / "elsewhere" / "keep.nii.gz").write_bytes(b"user file")
    small_ct(work / "x.nii.gz")
    out = out.format(abs=tmp_path / "abs_written.nii.gz")
    (work / "list.csv").write_text(f"image,out\nx.nii.gz,{out}\n")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", work / "list.csv", "--model", models["seg"], "--out-dir", work / "outs"),
                   "list.csv line 2")
    assert tree_digest(tmp_path) == before


def test_a3_a_csv_out_naming_the_input_or_the_list_is_refused(models, tmp_path):
    small_ct(tmp_path / "x.nii.gz")
    for value, words in (("x.nii.gz", "is the input"), ("list.csv", "cannot write labels")):
        (tmp_path / "list.csv").write_text(f"image,out\nx.nii.gz,{value}\n")
        before = tree_digest(tmp_path)
        assert_refused(ctfm("segment", tmp_path / "list.csv", "--model", models["seg"], "--out-dir", tmp_path,
                            "--overwrite"), words)
        assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("second, words", [("same.nii.gz", "same file"), ("./same.nii.gz", "'/'")])
def test_a3_two_rows_writing_one_file_are_refused(models, tmp_path, second, words):
    """Held up for equal strings; ``./same.nii.gz`` (a path, the same file) was not seen as a duplicate."""
    small_ct(tmp_path / "x.nii.gz")
    small_ct(tmp_path / "y.nii.gz", seed=3)
    (tmp_path / "list.csv").write_text(f"image,out\nx.nii.gz,same.nii.gz\ny.nii.gz,{second}\n")
    assert_refused(ctfm("segment", tmp_path / "list.csv", "--model", models["seg"], "--out-dir", tmp_path / "o"),
                   words)
    assert not (tmp_path / "o").exists()


# --- A9: predictable temporary names -----------------------------------------------------------

@pytest.mark.slow
def test_a9_links_planted_at_temporary_names_redirect_no_write(models, tmp_path):
    """The old writers used ``.NAME.tmp<PID>...`` in the output folder and followed links planted there.

    The in-process CLI has this process's PID, so every name the old code would have used is planted.
    """
    ct = small_ct(tmp_path / "ct.nii.gz")
    shared = tmp_path / "shared"
    shared.mkdir()
    pid = os.getpid()
    victims = {}
    for planted in (f".out.labels.json.tmp{pid}", f".out.tmp{pid}.nii.gz", f".e.tmp{pid}.npy",
                    f".heat.json.tmp{pid}", f".heat.tmp{pid}.nii.gz", f".t.json.tmp{pid}"):
        victim = tmp_path / f"victim{len(victims)}.txt"
        victim.write_text("precious")
        (shared / planted).symlink_to(victim)
        victims[victim] = "precious"
    runs = [
        ctfm("segment", ct, "--model", models["seg"], "--out", shared / "out.nii.gz"),
        ctfm("embed", ct, "--weights", models["enc"], "--out", shared / "e.npy"),
        ctfm("saliency", ct, "--weights", models["enc"], "--target", "embedding", "--method", "gradient",
             "--out", shared / "heat.nii.gz"),
        ctfm("triage", ct, "--model", models["triage"], "--json-out", shared / "t.json"),
    ]
    for r in runs:
        assert r.returncode == 0, r
    for victim, text in victims.items():
        assert victim.read_text() == text
    for name in ("out.nii.gz", "out.labels.json", "e.npy", "heat.nii.gz", "heat.json", "t.json"):
        assert (shared / name).is_file() and not (shared / name).is_symlink(), name
    assert json.loads((shared / "t.json").read_text())["decision"] in ("normal", "abnormal")


# --- A17: CLI values and output paths --------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/e.npy", "--threads", "-1"], ["--threads"]),
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/e.npy", "--threads", "0"], ["--threads"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--threads", "-2", "--out", "{t}/h.nii.gz"],
     ["--threads"]),
    (["segment", "{ct}", "--model", "{seg}", "--out", "{t}/s.nii.gz", "--max-memory-gb", "nan"], ["--max-memory-gb"]),
    (["segment", "{ct}", "--model", "{seg}", "--out", "{t}/s.nii.gz", "--max-memory-gb", "-1"], ["--max-memory-gb", "above 0"]),
    (["segment", "{ct}", "--model", "{seg}", "--out", "{t}/s.nii.gz", "--batch-size", "0"], ["--batch-size"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--spacing", "0", "--out", "{t}/h.nii.gz"],
     ["--spacing"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--spacing", "nan", "--out",
      "{t}/h.nii.gz"], ["--spacing"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--spacing", "0.01", "--out",
      "{t}/h.nii.gz"], ["--spacing"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--method", "gradient", "--spacing", "0.05",
      "--out", "{t}/h.nii.gz"], ["coarser voxel size"]),
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/e.npy", "--point=nan,nan,nan"], ["point"]),
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/e.npy", "--point=inf,0,0", "--mode", "point"], ["point"]),
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/e.npy", "--mode", "volume", "--point=0,-150,130"],
     ["--mode point"]),
    (["embed", "{ct}", "--weights", "{enc}", "--out", "{t}/adir.npy"], ["folder"]),
    (["segment", "{ct}", "--model", "{seg}", "--out", "{t}/adir.nii.gz"], ["folder"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--out", "{t}/adir.nii.gz"], ["folder"]),
    (["segment", "{ct}", "--model", "{seg}", "--out", "{t}/labels.txt"], ["cannot write labels"]),
    (["saliency", "{ct}", "--weights", "{enc}", "--target", "embedding", "--out", "{t}/h.png"], ["heatmap"]),
    (["triage", "{ct}", "--model", "{tri}", "--json-out", "{t}/result.txt"], ["--json-out"]),
])
def test_a17_bad_values_and_outputs_are_refused_before_any_work(models, tmp_path, args, words):
    ct = small_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "adir.npy").mkdir()
    (tmp_path / "adir.nii.gz").mkdir()
    values = {"ct": ct, "enc": models["enc"], "seg": models["seg"], "tri": models["triage"], "t": tmp_path}
    before = tree_digest(tmp_path)
    assert_refused(ctfm(*[a.format(**values) for a in args]), *words)
    assert tree_digest(tmp_path) == before


def test_a21_a_closed_pipe_ends_quietly(tmp_path):
    """``ctfm models list | head``: no BrokenPipeError traceback (the reader here leaves before any output)."""
    import CTFMLib

    env = {**os.environ, "CTFM_CACHE": str(tmp_path), "PYTHONPATH": os.path.dirname(os.path.dirname(CTFMLib.__file__))}
    cmd = f"{sys.executable} -m CTFMLib.cli models list | true"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_unexpected_failures_are_one_line_unless_debug(models, tmp_path, monkeypatch):
    """Any failure the code did not foresee still reaches the user as one line; --debug shows the trace."""
    import CTFMLib.embed as embed

    def broken(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(embed, "embed_image", broken)
    ct = small_ct(tmp_path / "ct.nii.gz")
    r = ctfm("embed", ct, "--weights", models["enc"], "--out", tmp_path / "e.npy")
    assert r.returncode == 1 and len(r.lines) == 1 and "first line second line" in r.lines[0], r
    assert "--debug" in r.lines[0] and not (tmp_path / "e.npy").exists()
    with pytest.raises(RuntimeError):
        ctfm("--debug", "embed", ct, "--weights", models["enc"], "--out", tmp_path / "e.npy")
