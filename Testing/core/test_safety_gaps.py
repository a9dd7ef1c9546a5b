"""Reproductions of ``../shared/reviews/adversarial.md`` that the other safety tests did not run as the report did.

The coverage audit for issue 14 compared every reproduction of section A, and every "held up" item of
section B, with the suite. Where a test existed but exercised the case differently (another command, a
flag the old ``ctfm`` did not know, a disk so full that an earlier write failed first), or where no test
existed, the report's case is run here as the report ran it: the same command on the same kind of input,
with its own phantoms and tiny models (``ctfm_testing.hostile``). ``test_a...`` tests fail on the code
before issue 14 and pass after; ``test_b...`` tests keep what held up and pass on both.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctfm_testing.hostile import (
    assert_refused,
    ctfm,
    fill,
    leftovers,
    small_ct,
    small_tmpfs,
    tiny_encoder,
    tiny_segmenter,
    tiny_triage,
    tree_digest,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap-models")
    return {"enc": tiny_encoder(root / "enc"), "seg": tiny_segmenter(root / "seg"), "tri": tiny_triage(root / "tri"),
            "root": root}


@pytest.fixture(autouse=True)
def private_cache(ctfm_cache):
    """No test here may touch the user's model store."""
    return ctfm_cache


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), str(ROOT / "Testing")]),
            "OMP_NUM_THREADS": "1", **extra}


# === Section A ===================================================================================================

# --- A2: the report's commands, without --overwrite (which the old ctfm did not have) -----------------------------


@pytest.mark.parametrize("case", ["saliency --out", "triage --json-out", "triage --saliency"])
def test_a2_saliency_and_triage_outputs_named_as_the_input_keep_the_ct(models, tmp_path, case):
    """A2: `ctfm saliency s.nii.gz ... --out s.nii.gz` (CT replaced by the heatmap), `ctfm triage t.nii.gz --json-out
    t.nii.gz` (CT replaced by a line of JSON), `ctfm triage t2.nii.gz --saliency t2.nii.gz` (CT replaced by the
    heatmap): each exited 0. Now refused in one line, and the CT is the same file as before."""
    ct = small_ct(tmp_path / "s.nii.gz")
    args = {"saliency --out": ("saliency", ct, "--weights", models["enc"], "--target", "embedding", "--method",
                               "gradient", "--out", ct),
            "triage --json-out": ("triage", ct, "--model", models["tri"], "--json-out", ct),
            "triage --saliency": ("triage", ct, "--model", models["tri"], "--saliency", ct)}[case]
    before = tree_digest(tmp_path)
    assert_refused(ctfm(*args))
    assert tree_digest(tmp_path) == before


# --- A3: the CSV cases the report named -------------------------------------------------------------------------


def test_a3_csv_out_dotdot_input_name_keeps_the_input(models, tmp_path):
    """A3: a CSV row `x.nii.gz,../x.nii.gz` with `--out-dir c/outs` overwrote the input x.nii.gz with its labels."""
    work = tmp_path / "c"
    work.mkdir()
    small_ct(work / "x.nii.gz")
    (work / "list.csv").write_text("image,out\nx.nii.gz,../x.nii.gz\n")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", work / "list.csv", "--model", models["seg"], "--out-dir", work / "outs"),
                   "list.csv line 2")
    assert tree_digest(tmp_path) == before


def test_a3_rows_a_and_sub_dotdot_a_are_seen_as_one_output(models, tmp_path):
    """A3: the duplicate-output check compared strings, so rows writing `a.nii.gz` and `sub/../a.nii.gz` were not
    seen as one file: the second silently replaced the first (exit 0)."""
    small_ct(tmp_path / "x.nii.gz")
    small_ct(tmp_path / "y.nii.gz", seed=3)
    (tmp_path / "list.csv").write_text("image,out\nx.nii.gz,a.nii.gz\ny.nii.gz,sub/../a.nii.gz\n")
    before = tree_digest(tmp_path)
    assert_refused(ctfm("segment", tmp_path / "list.csv", "--model", models["seg"], "--out-dir", tmp_path / "o"),
                   "list.csv line 3")
    assert tree_digest(tmp_path) == before and not (tmp_path / "o").exists()


# --- A5: a disk with room for the .labels.json sidecar but not for the label map ---------------------------------


@pytest.fixture(scope="module")
def busy_labels(tmp_path_factory):
    """A CT of noise and a segmenter whose labels follow the noise: a label map that does not compress
    (about 60 kB as .nii.gz), so a disk with a few kB free truncates it, as the report's 57,344-byte file."""
    from CTFMLib.image import Image, write_image

    root = tmp_path_factory.mktemp("busy")
    rng = np.random.default_rng(0)
    ct = write_image(Image(rng.integers(-1000, 1500, size=(96, 96, 48)).astype(np.int16), spacing=(2.0, 2.0, 3.0)),
                     root / "noise.nii.gz")
    return {"ct": ct, "seg": tiny_segmenter(root / "seg", seed=2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii", "seg.nrrd", "seg.mha", "seg.seg.nrrd"])
def test_a5_label_map_that_does_not_fit_is_an_error_not_a_truncated_success(tmp_path, busy_labels, name):
    """A5: `ctfm segment big.nii.gz --out SMALL/seg.nii.gz` (and `.nii`) on a nearly full disk exited 0, "wrote ...",
    leaving a truncated label map; `.nrrd`/`.seg.nrrd`/`.mha` failed with a raw RuntimeError traceback. The disk
    here keeps room for the small sidecar, so the label map itself is what does not fit."""
    with small_tmpfs(tmp_path / "small", "2m") as small:
        fill(small, leave=24 * 1024)
        result = ctfm("segment", busy_labels["ct"], "--model", busy_labels["seg"], "--out", small / name,
                      "--precision", "fp32")
        line = assert_refused(result, "no space left")
        assert "Traceback" not in result.stderr and "wrote" not in result.stdout, line
        assert sorted(p.name for p in small.iterdir()) == ["filler"], os.listdir(small)


# --- A6: what `ctfm index info --check` says after an old add zero-filled vectors ---------------------------------


@pytest.mark.slow
def test_a6_info_check_flags_vectors_that_were_zero_filled(models, tmp_path):
    """A6: after `ctfm index add` had zero-filled the rows a truncation lost, `ctfm index info c1 --check` said
    "consistent" (and check(deep=True) == []). The same on-disk state (one scan's patch rows all zeros, the file
    of the right length) is now reported as a problem, naming the scan, with exit 1."""
    import sqlite3

    from CTFMLib.retrieval import store

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        small_ct(scans / f"s{i}.nii.gz", seed=i)
    idx = tmp_path / "idx"
    assert ctfm("index", "add", idx, scans, "--weights", models["enc"]).returncode == 0
    db = sqlite3.connect(idx / "index.sqlite")
    _, path, start, count = list(db.execute("SELECT id, path, patch_start, patch_count FROM scans ORDER BY id"))[1]
    db.close()
    size = os.path.getsize(idx / "patch-g0.f32")
    info = ctfm("index", "info", idx)
    dim = int(next(ln.split()[1] for ln in info.stdout.splitlines() if ln.startswith("dim ")))
    with open(idx / "patch-g0.f32", "r+b") as f:
        f.seek(store.HEADER + start * dim * 4)
        f.write(b"\0" * count * dim * 4)
    assert os.path.getsize(idx / "patch-g0.f32") == size
    result = ctfm("index", "info", idx, "--check")
    assert result.returncode == 1 and "PROBLEMS" in result.stdout and path in result.stdout, result
    assert "consistent" not in result.stdout.split("PROBLEMS")[-1], result


# --- A14: the commands of the report not run by test_safety_models ----------------------------------------------


def _negative_variance(folder, name) -> Path:
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    state = dict(load_file(str(path)))
    state[name][0] = -1.0
    save_file(state, str(path))
    return Path(folder)


@pytest.mark.parametrize("command", ["saliency", "embed --mode scan"])
def test_a14_negative_variance_is_refused_by_saliency_and_scan_embedding(tmp_path, command):
    """A14: with one BatchNorm running_var = -1, `ctfm saliency` wrote a heatmap with "scale": NaN and `ctfm embed
    --mode scan` an all-NaN embedding, both with exit 0."""
    enc = _negative_variance(tiny_encoder(tmp_path / "negvar"), "layers.0.blocks.0.norm1.running_var")
    ct = small_ct(tmp_path / "ct.nii.gz")
    if command == "saliency":
        args = ("saliency", ct, "--weights", enc, "--target", "embedding", "--method", "gradient",
                "--out", tmp_path / "h.nii.gz")
    else:
        args = ("embed", ct, "--weights", enc, "--mode", "scan", "--out", tmp_path / "e.npy")
    line = assert_refused(ctfm(*args), "variance")
    assert "layers.0.blocks.0.norm1.running_var" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "negvar"]


# --- A15: segment reads NaN NIfTI too ------------------------------------------------------------------------------


def test_a15_segment_refuses_a_nifti_with_nan_voxels(models, tmp_path):
    """A15: `ctfm segment nan2.nii.gz` (float32 NIfTI with NaN voxels, read by SimpleITK as 0 HU) exited 0."""
    from test_safety_images import ct_values, nifti

    values = ct_values((20, 18, 12)).astype(np.float32)
    values[2:6, 2:6, 2:6] = np.nan
    path = nifti(tmp_path / "nan2.nii.gz", values, pixdim=(4.0, 4.0, 4.0))
    assert_refused(ctfm("segment", path, "--model", models["seg"], "--out", tmp_path / "s.nii.gz"),
                   "64 NaN or infinite voxels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan2.nii.gz"]


# --- A16: the hostile geometries through the commands the report ran ------------------------------------------------


def _geometry_input(kind, folder: Path) -> Path:
    from test_safety_images import ct_values, dicom_series, edit_all, nifti, nrrd

    values = ct_values((20, 18, 12))
    if kind in ("huge", "tiny"):
        s = 1e9 if kind == "huge" else 1e-9
        return nrrd(folder / f"{kind}_spacing.nrrd", values, directions=f"({s!r},0,0) (0,{s!r},0) (0,0,{s!r})")
    if kind == "shear":
        return nrrd(folder / "shear.nrrd", values, directions="(3,0,0) (1.5,3,0) (0,0,3)")
    if kind.startswith("pixdim"):
        bad = {"pixdim 0": 0.0, "pixdim nan": float("nan"), "pixdim inf": float("inf")}[kind]
        return nifti(folder / "pixdim.nii.gz", values, pixdim=(3.0, bad, 3.0))
    paths = dicom_series(folder / "series")
    if kind == "dicom spacing -0.9,0":
        edit_all(paths, PixelSpacing=[-0.9, 0])
    elif kind == "dicom no rescale":
        edit_all(paths, RescaleSlope=None, RescaleIntercept=None)
    return folder / "series"


GEOMETRY_CASES = [
    ("huge", "embed", "axis"), ("huge", "embed --mode scan", "axis"), ("huge", "saliency", "axis"),
    ("huge", "segment --fast", "axis"),
    ("tiny", "embed", "axis"), ("tiny", "embed --mode scan", "axis"), ("tiny", "saliency", "axis"),
    ("tiny", "segment --fast", "axis"),
    ("shear", "embed", "not orthonormal"), ("shear", "segment", "not orthonormal"),
    ("dicom spacing -0.9,0", "embed", "PixelSpacing"), ("dicom no rescale", "embed", "RescaleSlope"),
    ("pixdim 0", "embed", "pixdim[2]"), ("pixdim nan", "embed", "pixdim[2]"), ("pixdim inf", "embed", "pixdim[2]"),
]


@pytest.mark.parametrize("kind, command, words", GEOMETRY_CASES, ids=[f"{k}-{c}" for k, c, _ in GEOMETRY_CASES])
def test_a16_hostile_geometry_is_refused_by_the_commands_the_report_ran(models, tmp_path, kind, command, words):
    """A16: 1e9 mm voxels (embed rc 0; scan mode, saliency: ArrayMemoryError; segment --fast: 5 GB then MemoryError),
    1e-9 mm voxels (embed rc 0; the rest "no voxel above -1024 HU", misleading), sheared NRRD directions (embed,
    segment rc 0), DICOM PixelSpacing [-0.9, 0] and DICOM without RescaleSlope/Intercept (embed rc 0), NIfTI pixdim
    0/NaN/inf (ITK's 1 mm, rc 0): each is refused in one line naming the defect, and nothing is written."""
    image = _geometry_input(kind, tmp_path)
    out = tmp_path / "out"
    args = {"embed": ("embed", image, "--weights", models["enc"], "--out", out / "e.npy"),
            "embed --mode scan": ("embed", image, "--weights", models["enc"], "--mode", "scan", "--out", out / "e.npy"),
            "saliency": ("saliency", image, "--weights", models["enc"], "--target", "embedding", "--method",
                         "gradient", "--out", out / "h.nii.gz"),
            "segment": ("segment", image, "--model", models["seg"], "--out", out / "s.nii.gz"),
            "segment --fast": ("segment", image, "--model", models["seg"], "--fast", "--out", out / "s.nii.gz"),
            }[command]
    assert_refused(ctfm(*args), words)
    assert not out.exists()


# --- A19: `ctfm index add` of a folder on a nearly full disk -------------------------------------------------------


@pytest.mark.slow
def test_a19_add_of_a_folder_on_a_nearly_full_disk_stops_at_once_with_the_cause(models, tmp_path):
    """A19: with ~40-60 KB free, `ctfm index add IDX scans` printed "FAILED scan: cannot rollback - no transaction is
    active" for every scan (each embedded, then failed the same way; the real cause, a full disk, hidden). Now one
    line naming the full disk, and the index as it was."""
    from CTFMLib.retrieval.index import VectorIndex

    first, more = tmp_path / "first", tmp_path / "more"
    first.mkdir()
    more.mkdir()
    for i in range(2):
        small_ct(first / f"s{i}.nii.gz", seed=i)
    for i in range(3):
        small_ct(more / f"m{i}.nii.gz", seed=10 + i)
    with small_tmpfs(tmp_path / "small", "4m") as small:
        idx = small / "idx"
        assert ctfm("index", "add", idx, first, "--weights", models["enc"]).returncode == 0
        before = tree_digest(idx)
        filler = fill(small, leave=40 * 1024)
        result = ctfm("index", "add", idx, more)
        line = assert_refused(result, "no space left")
        assert "rollback" not in result.stderr and "FAILED" not in result.stderr, line
        assert tree_digest(idx) == before
        filler.unlink()
        with VectorIndex.open(idx, readonly=True) as ix:
            assert len(ix) == 2 and ix.check(deep=True) == []


# --- A20: SIGKILL, which no process can clean up after ------------------------------------------------------------


@pytest.mark.slow
def test_a20_what_a_sigkilled_saliency_leaves_is_gone_after_the_next_run(tmp_path):
    """A20: `kw.py SIGKILL o3 ctfm saliency ... --out o3/heat.nii.gz` left `.heat.json.tmpPID` in o3. Nothing is
    ever left under the final names (section B); the temporary is expected to be gone once the same command has
    run again to completion."""
    enc = tiny_encoder(tmp_path / "enc")
    ct = small_ct(tmp_path / "big.nii.gz", shape=(192, 192, 96), spacing=(1.5, 1.5, 2.0))
    out = tmp_path / "o3"
    out.mkdir()
    args = ["saliency", ct, "--weights", enc, "--target", "embedding", "--method", "gradient",
            "--out", out / "heat.nii.gz"]
    child = subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline and not os.listdir(out):
        time.sleep(0.0005)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, "finished before writing"
    assert not (out / "heat.nii.gz").exists() and not (out / "heat.json").exists()
    assert leftovers(out), "the kill left nothing: it did not land during the write"
    again = ctfm(*args)
    assert again.returncode == 0, again
    assert leftovers(out) == [], leftovers(out)


# === Section B: what held up keeps a test ===========================================================================

# --- Model import / weights ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("variant", ["torch.save .pt", "torch.save .bin", "pickle.dump .ckpt", "legacy .pth"])
def test_b_pickled_code_in_weights_never_runs(tmp_path, variant):
    """B: `torch.save` with a `__reduce__` payload (.pt, .bin), a raw `pickle.dump` (.ckpt) and torch's legacy
    non-zip format (.pth) are refused ("not a plain-tensor checkpoint"), and the payload never runs."""
    import torch

    marker = tmp_path / "pwned"
    state = {"state_dict": {"conv_init.weight": torch.zeros(4, 1, 3, 3, 3)}, "payload": _Payload(str(marker))}
    path = tmp_path / {"torch.save .pt": "evil.pt", "torch.save .bin": "evil.bin", "pickle.dump .ckpt": "evil.ckpt",
                       "legacy .pth": "evil.pth"}[variant]
    if variant == "pickle.dump .ckpt":
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, str(path), _use_new_zipfile_serialization=variant != "legacy .pth")
    ct = small_ct(tmp_path / "ct.nii.gz")
    result = ctfm("embed", ct, "--weights", path, "--out", tmp_path / "e.npy")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert "plain-tensor" in result.stderr or "refused" in result.stderr, result
    assert not marker.exists() and not (tmp_path / "e.npy").exists()


def test_b_a_pickled_training_checkpoint_never_runs_on_resume(tmp_path):
    """B: training resume loads checkpoints with weights_only=True: a last.pt carrying a payload is not executed."""
    import torch
    from test_safety_training import write_config

    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import write_image

    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in (1, 2):
        write_image(body_phantom(shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0), seed=seed), scans / f"ct{seed}.nii.gz")
    config = write_config(tmp_path / "pretrain.json", scans, tmp_path / "cache")
    run = tmp_path / "run"
    assert ctfm("train", "pretrain", "--config", config, "--out", run, "--max-steps", "1").returncode == 0
    marker = tmp_path / "pwned"
    for name in ("last.pt", *sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))):
        torch.save({"step": 1, "payload": _Payload(str(marker))}, str(run / "checkpoints" / name))
    result = ctfm("train", "pretrain", "--config", config, "--out", run, "--resume")
    assert "Traceback" not in result.stderr, result
    assert not marker.exists()


def test_b_yaml_configs_are_read_safely(tmp_path):
    """B: a YAML configuration with a python/object tag is refused; the object is never built."""
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'data:\n  source: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    result = ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_b_no_loader_in_the_code_unpickles():
    """B: `torch.load` always with weights_only=True, YAML only through safe_load, `np.load` never with pickles."""
    sources = sorted((ROOT / "CTFM").rglob("*.py")) + sorted((ROOT / "CTFMSegment").rglob("*.py")) + \
        sorted((ROOT / "CTFMRetrieve").rglob("*.py"))
    found = {"torch.load": 0}
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            found["torch.load"] += 1
            assert "weights_only=True" in m.group(1), (path, m.group(0))
        assert "allow_pickle=True" not in text, path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
        assert "pickle.load" not in text and "pickle.loads" not in text, path
    assert found["torch.load"] >= 2


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_b_nan_and_inf_tensors_are_refused_with_the_tensor_name(tmp_path, bad):
    """B: NaN and inf tensors are refused with the tensor's name."""
    from safetensors.torch import load_file, save_file

    enc = tiny_encoder(tmp_path / "enc")
    state = dict(load_file(str(enc / "model.safetensors")))
    name = "layers.1.blocks.0.conv1.weight"
    assert name in state, sorted(state)
    state[name].view(-1)[3] = float(bad)
    save_file(state, str(enc / "model.safetensors"))
    ct = small_ct(tmp_path / "ct.nii.gz")
    result = ctfm("embed", ct, "--weights", enc, "--out", tmp_path / "e.npy")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert name in result.stderr and ("NaN" in result.stderr or "inf" in result.stderr), result


def test_b_module_prefixes_are_stripped(tmp_path):
    """B: a DDP checkpoint (`module.` before every name) loads as the model it holds."""
    import torch
    from safetensors.torch import load_file

    from CTFMLib.weights import load_model

    enc = tiny_encoder(tmp_path / "enc")
    state = load_file(str(enc / "model.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.pt"))
    reference, _ = load_model(enc)
    model, _ = load_model(tmp_path / "ddp.pt")
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference.embed(x), model.embed(x))


@pytest.mark.parametrize("case", ["10000 classes", "70000 classes", "--batch-size 100000"])
def test_b_huge_segmentations_are_refused_before_allocating(tmp_path, case):
    """B: a segmentation model with 10,000 classes or `--batch-size 100000`: refused before allocating (the memory
    estimate, or now the configuration check); 70,000 classes: refused (a label value above 65535)."""
    classes = {"10000 classes": 10000, "70000 classes": 70000}.get(case, 4)
    labels = {str(i): f"s{i}" for i in range(1, classes + 1)}
    seg = tiny_segmenter(tmp_path / "seg", labels=labels, init_filters=2, blocks_down=(1, 1))
    ct = small_ct(tmp_path / "ct.nii.gz")
    extra = ("--batch-size", "100000") if case.startswith("--batch") else ()
    start = time.time()
    result = ctfm("segment", ct, "--model", seg, "--out", tmp_path / "s.nii.gz", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.lines) == 1, result
    assert time.time() - start < 60
    assert not (tmp_path / "s.nii.gz").exists()


# --- Images ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["embed --mode scan", "segment", "saliency", "index add"])
def test_b_nan_and_inf_in_nrrd_are_refused_by_every_command(models, tmp_path, command):
    """B: NaN/inf voxels in a float NRRD are refused by embed (test_safety_images), scan mode, segment, saliency and
    index add."""
    from test_safety_images import ct_values, nrrd

    values = ct_values((20, 18, 12)).astype(np.float32)
    values[1, 1, 1], values[2, 2, 2] = np.nan, np.inf
    path = nrrd(tmp_path / "nan.nrrd", values)
    out = tmp_path / "out"
    args = {"embed --mode scan": ("embed", path, "--weights", models["enc"], "--mode", "scan", "--out", out / "e.npy"),
            "segment": ("segment", path, "--model", models["seg"], "--out", out / "s.nii.gz"),
            "saliency": ("saliency", path, "--weights", models["enc"], "--target", "embedding", "--method",
                         "gradient", "--out", out / "h.nii.gz"),
            "index add": ("index", "add", out / "idx", path, "--weights", models["enc"])}[command]
    result = ctfm(*args)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result
    assert "2 NaN or infinite voxels" in result.stderr, result
    if command == "index add":
        from CTFMLib.retrieval.index import VectorIndex

        if (out / "idx" / "index.sqlite").exists():
            with VectorIndex.open(out / "idx", readonly=True) as ix:
                assert len(ix) == 0
    else:
        assert not out.exists()


@pytest.mark.parametrize("sform", ["singular", "zero"])
def test_b_singular_and_zero_sform_nifti_are_refused(tmp_path, sform):
    """B: singular and zero sform NIfTI are refused (ITK), like the sheared one (test_safety_images)."""
    from test_safety_images import ct_values, nifti

    from CTFMLib.image import ImageError, read_image

    rows = {"singular": [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], "zero": [[0, 0, 0, 0]] * 3}[sform]
    path = nifti(tmp_path / f"{sform}.nii", ct_values(), sform=rows)
    with pytest.raises(ImageError):
        read_image(path)


@pytest.mark.parametrize("case", ["no ImageOrientationPatient", "no ImagePositionPatient in any file"])
def test_b_dicom_without_orientation_or_any_position_is_refused_naming_a_file(tmp_path, case):
    """B: missing ImageOrientationPatient, and ImagePositionPatient missing from every file (one file: test_dicom)."""
    from test_safety_images import dicom_series, edit_all

    from CTFMLib.image import ImageError, read_image

    paths = dicom_series(tmp_path)
    edit_all(paths, **({"ImageOrientationPatient": None} if case.startswith("no Image O")
                       else {"ImagePositionPatient": None}))
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert any(p.name in str(e.value) for p in paths) and "\n" not in str(e.value)


@pytest.mark.slow
def test_b_unicode_and_punctuation_in_paths_work_through_the_cli(models, tmp_path):
    """B: unicode, spaces, quotes, commas and semicolons in file, folder, model and index paths work for embed,
    segment, batch, index add/query/remove and model import."""
    folder = tmp_path / "Pätient 空 'x', y;"
    folder.mkdir()
    scan = small_ct(folder / "scan ü 空 'q', r;.nii.gz")
    small_ct(folder / "zweite; 'Aufnahme', ß.nii.gz", seed=4)
    out = tmp_path / "Ausgabe ö; 'o', 空"
    out.mkdir()
    r = ctfm("embed", scan, "--weights", models["enc"], "--out", out / "e ü;'.npy")
    assert r.returncode == 0 and np.load(out / "e ü;'.npy").ndim == 1, r
    r = ctfm("segment", scan, "--model", models["seg"], "--out", out / "s ü;'.nii.gz")
    assert r.returncode == 0 and (out / "s ü;'.nii.gz").is_file(), r
    r = ctfm("segment", folder, "--model", models["seg"], "--out-dir", out / "batch, ü; 'b'")
    assert r.returncode == 0 and len(list((out / "batch, ü; 'b'").glob("*.nii.gz"))) == 2, r
    idx = tmp_path / "Índex; 'i', 空"
    r = ctfm("index", "add", idx, folder, "--weights", models["enc"])
    assert r.returncode == 0 and "added 2" in r.stdout, r
    r = ctfm("index", "query", idx, scan, "-k", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["hits"][0]["path"] == str(scan.resolve()), r
    r = ctfm("index", "remove", idx, scan)
    assert r.returncode == 0, r
    model = tmp_path / "Modell ü; 'm', 空"
    model.mkdir()
    for f in models["enc"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    r = ctfm("models", "import", model, "--id", "site/unicode-model")
    assert r.returncode == 0, r
    r = ctfm("embed", scan, "--weights", "site/unicode-model", "--out", out / "via id.npy")
    assert r.returncode == 0, r


def test_b_directory_links_are_not_followed_when_folders_are_searched(tmp_path):
    """B: `rglob` does not follow directory symlinks: no loop on `up -> ..` or a link to `/` (training sources,
    recursive DICOM reading)."""
    from test_safety_images import dicom_series

    from CTFMLib.dicom import read_dicom_series
    from CTFMLib.train.data import find_scans

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    small_ct(data / "a" / "one.nii.gz")
    dicom_series(data / "b" / "series")
    for where in (data, data / "a", data / "b"):
        (where / "up").symlink_to("..", target_is_directory=True)
    (data / "root").symlink_to("/", target_is_directory=True)
    start = time.time()
    scans = find_scans([data])
    assert len(scans) == 2 and time.time() - start < 60, scans
    assert read_dicom_series(data / "b", recursive=True).shape == (12, 10, 6)


# --- Outputs ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_b_sigkill_during_segment_leaves_nothing_under_the_final_names(tmp_path):
    """B: no partial file ever appeared under a final name after SIGKILL during a segment write."""
    seg = tiny_segmenter(tmp_path / "seg")
    ct = small_ct(tmp_path / "big.nii.gz", shape=(192, 192, 96), spacing=(1.5, 1.5, 2.0))
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "segment", str(ct),
                              "--model", str(seg), "--out", str(out / "labels.nii.gz")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline and not os.listdir(out):
        time.sleep(0.0005)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, "finished before writing"
    assert not (out / "labels.nii.gz").exists() and not (out / "labels.labels.json").exists(), os.listdir(out)


# --- Retrieval index ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_b_sigkilled_index_adds_stay_consistent_and_a_restart_finishes_the_job(models, tmp_path):
    """B: random SIGKILLs of `ctfm index add scans/`: `info --check` consistent after every kill, and a restarted
    add skips what is in and ends with every scan exactly once."""
    import random

    from CTFMLib.retrieval.index import VectorIndex

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(6):
        small_ct(scans / f"s{i}.nii.gz", seed=i)
    idx = tmp_path / "idx"
    rng = random.Random(14)
    cmd = [sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "index", "add", str(idx), str(scans),
           "--weights", str(models["enc"]), "--device", "cpu", "--threads", "1"]
    for kill in range(3):
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=child_env(CTFM_CACHE=str(tmp_path / "cache")))
        line = child.stdout.readline()  # the first scan of this round is in
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        if "added as scan" not in line and "already indexed" not in line:
            continue
        check = ctfm("index", "info", idx, "--check")
        assert check.returncode == 0 and "consistent" in check.stdout, (kill, check)
    done = ctfm("index", "add", idx, scans, "--weights", models["enc"])
    assert done.returncode == 0, done
    with VectorIndex.open(idx, readonly=True) as ix:
        paths = [rec.path for _, rec in ix.scans()]
        assert ix.check(deep=True) == []
    assert sorted(paths) == sorted(str(p.resolve()) for p in scans.iterdir())


KILLED_WRITER = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from CTFMLib.retrieval import ScanRecord, VectorIndex

path, start = sys.argv[2], int(sys.argv[3])
ix = VectorIndex.open(path)
done = {rec.path for _, rec in ix.scans()}  # a scan committed just before the last kill is not added twice
for i in range(start, start + 400):
    if f"/s{i}" in done:
        continue
    rng = np.random.default_rng(i)
    n = 20 + i % 7
    sid = ix.add(ScanRecord(f"/s{i}"), rng.standard_normal(8), rng.standard_normal((n, 8)), rng.standard_normal((n, 3)))
    print("added", i, sid, flush=True)
    if i % 5 == 4:
        ix.remove(sid)
        print("removed", i, flush=True)
    if i % 17 == 16:
        ix.compact()
        print("compacted", i, flush=True)
"""


@pytest.mark.slow
def test_b_sigkilled_writer_with_removes_and_compactions_keeps_every_committed_vector(tmp_path):
    """B: SIGKILLs of a writer doing add, remove every 5th and compact now and then: `check(deep=True)` is empty and
    every stored scan/patch vector and centre is bit-identical to what was written."""
    import random

    from CTFMLib.retrieval import VectorIndex

    path = tmp_path / "ix"
    VectorIndex.create(path, "ctfm-test", "a" * 64, 8).close()
    rng = random.Random(14)
    start = 0
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT / "CTFM"), str(path), str(start)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        first = child.stdout.readline()  # the writer is under way
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        out = first + out
        added = [int(w[1]) for w in (ln.split() for ln in out.splitlines()) if w and w[0] == "added"]
        start = (max(added) + 1) if added else start
        with VectorIndex.open(path, readonly=True) as ix:
            assert ix.check(deep=True) == []
            for sid, rec in ix.scans():
                i = int(rec.path[2:])
                g = np.random.default_rng(i)
                n = 20 + i % 7
                sv, pv, centres = g.standard_normal(8), g.standard_normal((n, 8)), g.standard_normal((n, 3))
                got_sv, got_pv, got_c = ix.vectors(sid)
                np.testing.assert_array_equal(got_sv, sv.astype(np.float32))
                np.testing.assert_array_equal(got_pv, pv.astype(np.float32))
                np.testing.assert_allclose(got_c, centres, atol=1e-3)
    assert start > 0


def test_b_dicom_patient_ids_with_quotes_and_escapes_are_stored_verbatim_and_reembedded(models, tmp_path):
    """B: a DICOM PatientID with quotes, SQL and ESC is stored verbatim, the index stays intact, and `index reembed`
    reproduces it."""
    from ctfm_testing.synthetic_dicom import write_ct_series
    from CTFMLib.retrieval.index import VectorIndex

    patient = "O'Brien\"; DROP TABLE scans;--\x1b[31m"
    write_ct_series(tmp_path / "series", small_ct(shape=(24, 20, 10), spacing=(6.0, 6.0, 6.0)), intercept=-2048.0,
                    PatientID=patient)
    idx, new = tmp_path / "idx", tmp_path / "new"
    r = ctfm("index", "add", idx, tmp_path / "series", "--weights", models["enc"])
    assert r.returncode == 0, r
    other = tiny_encoder(tmp_path / "other", seed=4)
    r = ctfm("index", "reembed", idx, new, "--weights", other)
    assert r.returncode == 0, r
    for folder in (idx, new):
        with VectorIndex.open(folder, readonly=True) as ix:
            assert [rec.patient_id for _, rec in ix.scans()] == [patient] and ix.check(deep=True) == []


@pytest.mark.slow
def test_b_query_k_huge_returns_everything_and_odd_boxes_are_handled(models, tmp_path):
    """B: `-k 1000000000` returns every scan; degenerate (a point) and inverted boxes, and 1e300 boxes: a result or
    a one-line refusal, never a traceback."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        small_ct(scans / f"s{i}.nii.gz", seed=i)
    idx = tmp_path / "idx"
    assert ctfm("index", "add", idx, scans, "--weights", models["enc"]).returncode == 0
    query = scans / "s0.nii.gz"
    r = ctfm("index", "query", idx, query, "-k", "1000000000", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["hits"]) == 3, r
    for box in ("0,-100,30,0,-100,30", "60,0,60,-60,-200,0", "-1e300,-1e300,-1e300,1e300,1e300,1e300",
                "1e300,1e300,1e300,-1e300,-1e300,-1e300"):
        r = ctfm("index", "query", idx, query, f"--box={box}", "-k", "2", "--json")
        assert "Traceback" not in r.stderr and r.returncode in (0, 2), (box, r)
        if r.returncode == 2:
            assert len(r.lines) == 1, (box, r)


# --- Training ---------------------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "unknown key": ('{"optim": {"learning_rate": 0.001}}', "optim.lr"),
    "string for int": ('{"optim": {"max_steps": "ten"}}', "optim.max_steps"),
    "1e309": ('{"optim": {"max_steps": 1e309}}', "optim.max_steps"),  # an lr of Infinity is A18 (refused now)
    "NaN lr": ('{"optim": {"lr": NaN}}', "optim.lr"),
    "negative max_steps": ('{"optim": {"max_steps": -5}}', "optim.max_steps"),
    "list instead of a mapping": ('{"optim": [1, 2]}', "optim"),
    "crop size 0": ('{"pretrain": {"crop_size": [0, 16, 16]}}', "crop_size"),
    "crop size -1": ('{"pretrain": {"crop_size": [-1, 16, 16]}}', "crop_size"),
    "init_filters 0": ('{"model": {"init_filters": 0}}', "init_filters"),
    "temperature 0": ('{"pretrain": {"temperature": 0}}', "temperature"),
    "crops_per_scan 1": ('{"pretrain": {"crops_per_scan": 1}}', "crops_per_scan"),
    "wrong projection width": ('{"pretrain": {"projection": [99, 16, 8]}}', "projection"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_b_bad_training_configs_are_clear_errors(tmp_path, case):
    """B (Training): an unknown key (naming the allowed ones), a string for an int, 1e309, a NaN lr, negative
    max_steps, a list instead of a mapping, crop size 0/-1, init_filters 0, temperature 0, crops_per_scan 1 and a
    wrong projection width: one clear line naming the setting, before any training."""
    text, key = CONFIG_CASES[case]
    scans = tmp_path / "scans"
    scans.mkdir()
    small_ct(scans / "ct.nii.gz", shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0))
    data = json.loads(text)
    data.setdefault("data", {})["source"] = [str(scans)]
    config = tmp_path / "pretrain.json"
    config.write_text(json.dumps(data).replace("Infinity", "1e309"))  # as the report wrote it
    result = ctfm("train", "pretrain", "--config", config, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.lines) == 1, result
    assert key in result.lines[0], result
    if case == "unknown key":
        assert "optim.weight_decay" in result.lines[0], result
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- CLI -------------------------------------------------------------------------------------------------------------


CLI_CASES = [
    ("embed", ["--batch-size", "0"]), ("embed", ["--batch-size", "-3"]), ("segment", ["--batch-size", "0"]),
    ("segment", ["--batch-size", "-3"]), ("embed", ["--device", "banana"]), ("segment", ["--device", "banana"]),
    ("segment", ["--structures", ",,,"]), ("segment", ["--structures", "lung"]), ("embed", ["--mode", "point"]),
    ("saliency", ["--method", "gradient", "--steps", "0"]), ("saliency", ["--method", "gradient", "--steps", "-5"]),
    ("saliency", ["--mask-size", "0"]), ("saliency", ["--overlap", "1"]), ("saliency", ["--overlap", "-5"]),
    ("saliency", ["--cube", "-10", "--center", "0,0,0"]), ("saliency", ["--spacing", "-1"]),
    ("saliency-point", ["--target", "point:nan,0,0"]), ("saliency", ["--cube", "20", "--center", "nan,0,0"]),
]


@pytest.mark.parametrize("command, extra", CLI_CASES, ids=[f"{c} {' '.join(e)}" for c, e in CLI_CASES])
def test_b_bad_cli_values_are_clear_errors(models, tmp_path, command, extra):
    """B (CLI): `--batch-size 0/-3`, `--device banana`, `--structures ,,,`, unknown structures, `--mode point`
    without a point, `--steps 0/-5`, `--mask-size 0`, `--overlap 1/-5`, `--cube -10`, `--spacing -1`, `point:nan`
    targets and a NaN `--center`: refused (exit 2, a ctfm error line, no traceback), nothing written."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    base = {"embed": ["embed", ct, "--weights", models["enc"], "--out", out / "e.npy"],
            "segment": ["segment", ct, "--model", models["seg"], "--out", out / "s.nii.gz"],
            "saliency": ["saliency", ct, "--weights", models["enc"], "--target", "embedding", "--out", out / "h.nii.gz"],
            "saliency-point": ["saliency", ct, "--weights", models["enc"], "--out", out / "h.nii.gz"]}[command]
    r = ctfm(*base, *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert r.lines and r.lines[-1].startswith("ctfm") and "error" in r.lines[-1], r
    assert not out.exists()


def test_b_unavailable_cuda_device_falls_back_to_the_cpu(models, tmp_path):
    """B (CLI): `--device cuda:99` without such a GPU runs on the CPU (with a warning)."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    r = ctfm("embed", ct, "--weights", models["enc"], "--out", tmp_path / "e.npy", "--device", "cuda:99")
    assert r.returncode == 0 and (tmp_path / "e.npy").is_file(), r
