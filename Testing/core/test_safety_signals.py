"""SIGTERM (what Slicer's Cancel sends first) leaves no temporary file behind (adversarial report A20).

Real ``ctfm`` child processes; the signal is sent the moment the command starts writing into its
output folder (the first new entry there), the moment the old code left files behind.
"""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import CTFMLib
from ctfm_testing.hostile import leftovers, small_ct, tiny_encoder, tiny_segmenter

CTFM_ROOT = str(Path(CTFMLib.__file__).resolve().parents[1])


def start(args, tmp_path, **env):
    environment = {**os.environ, "PYTHONPATH": CTFM_ROOT, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"),
                   "CTFM_CACHE": str(tmp_path / "cache"), **env}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "CTFMLib.cli", "--progress", "json", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def terminate_when(child, appeared, timeout=300.0) -> bool:
    """Send SIGTERM as soon as ``appeared()`` is true; returns whether it was sent before the child ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if appeared():
            child.send_signal(signal.SIGTERM)
            return True
        time.sleep(0.0005)
    return False


def new_entries(folder, before=()):
    def check():
        try:
            return any(name not in before for name in os.listdir(folder))
        except FileNotFoundError:
            return False
    return check


def assert_terminated_cleanly(child, *folders):
    out, err = child.communicate(timeout=120)
    for folder in folders:
        assert leftovers(folder) == [], leftovers(folder)
    assert child.returncode == 128 + signal.SIGTERM, (child.returncode, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ctfm: terminated", err[-2000:]


@pytest.fixture(scope="module")
def big_ct(tmp_path_factory):
    return small_ct(tmp_path_factory.mktemp("ct") / "big.nii.gz", shape=(192, 192, 96), spacing=(1.5, 1.5, 2.0))


@pytest.mark.slow
def test_a20_sigterm_while_segment_writes_leaves_nothing(tmp_path, big_ct):
    seg = tiny_segmenter(tmp_path / "seg")
    out = tmp_path / "out"
    out.mkdir()
    child = start(["segment", big_ct, "--model", seg, "--out", out / "labels.nii.gz"], tmp_path)
    assert terminate_when(child, new_entries(out)), "finished before writing"
    assert_terminated_cleanly(child, out, tmp_path / "tmp")
    assert os.listdir(out) == []


@pytest.mark.slow
def test_a20_sigterm_while_saliency_writes_leaves_nothing(tmp_path, big_ct):
    enc = tiny_encoder(tmp_path / "enc")
    out = tmp_path / "out"
    out.mkdir()
    child = start(["saliency", big_ct, "--weights", enc, "--target", "embedding", "--method", "gradient",
                   "--out", out / "heat.nii.gz"], tmp_path)
    assert terminate_when(child, new_entries(out)), "finished before writing"
    assert_terminated_cleanly(child, out, tmp_path / "tmp")
    assert os.listdir(out) == []


@pytest.mark.slow
def test_a20_sigterm_during_model_import_leaves_nothing(tmp_path):
    """A model of ~80 MB in a zip: SIGTERM as soon as the import starts writing anywhere."""
    from CTFMLib.networks import build_network
    from CTFMLib.weights import save_pretrained

    config = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4]}
    folder = save_pretrained(build_network(config), tmp_path / "big_model", config)
    archive = tmp_path / "big_model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in folder.iterdir():
            z.write(f, f"big_model/{f.name}")
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    child = start(["models", "import", archive, "--id", "site/big"], tmp_path)
    watched = [new_entries(tmp_path / "tmp"), new_entries(cache / "models")]
    assert terminate_when(child, lambda: any(w() for w in watched)), "finished before writing"
    assert_terminated_cleanly(child, tmp_path / "tmp", cache)
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(cache / "models") == []


@pytest.mark.slow
def test_a20_sigterm_during_index_add_leaves_no_temporary_file_and_a_consistent_index(tmp_path):
    enc = tiny_encoder(tmp_path / "enc")
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(6):
        small_ct(scans / f"s{i}.nii.gz", shape=(96, 96, 48), spacing=(2.0, 2.0, 3.0), seed=i)
    index = tmp_path / "index"
    child = start(["index", "add", index, scans, "--weights", enc], tmp_path)
    # Terminate in the middle: after the first scan is committed, while the next is embedded or added.
    first = child.stdout.readline()
    assert "added as scan" in first, (first, child.stderr.read() if child.poll() is not None else "")
    child.send_signal(signal.SIGTERM)
    assert_terminated_cleanly(child, index, tmp_path / "tmp")
    from CTFMLib.retrieval.index import VectorIndex

    with VectorIndex.open(index) as ix:
        assert ix.check(deep=True) == [] and 1 <= len(ix) < 6
