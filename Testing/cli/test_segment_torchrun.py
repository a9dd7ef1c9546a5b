"""``ctfm segment FOLDER --out-dir DIR`` under torchrun across two "nodes" (two launchers meeting through a c10d
rendezvous, one process each, as on two machines): rank 0 plans, each rank segments its share, each output is
written once and equals a single process's, rank 0 alone sums up, and both launchers exit alike.

Real child processes (``python -m torch.distributed.run --nnodes 2 ... -m CTFMLib.cli segment ...``), a tiny
segmentation model at random weights and small phantom CTs; one input is corrupt.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ctfm_testing.hostile import ctfm, small_ct, tiny_segmenter
from ctfm_testing.phantoms import body_phantom
from ctfm_testing.processes import ctfm_pythonpath, two_node_launch
from CTFMLib.image import read_image

RUN = ("--device", "cpu", "--quality", "fast", "--precision", "fp32")


def launch(*args, timeout: float = 240) -> list:
    """``ctfm ARGS`` on two nodes: ``[(exit status, stdout, stderr)]`` of each launcher."""
    done = []
    for p in two_node_launch("--progress", "none", *args):
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            p.kill()
            raise
        done.append((p.returncode, out, err))
    return done


def worker_codes(launcher_stderr: str) -> list:
    """The exit statuses of a launcher's failed processes, as torchrun reports them (its own status is 1)."""
    return [int(c) for c in re.findall(r"failed \(exitcode: (-?\d+)\)", launcher_stderr)]


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_segmenter(tmp_path_factory.mktemp("seg-model"))


def test_shares_are_disjoint_and_cover_the_batch_and_ranks_loads_without_torch(monkeypatch):
    from CTFMLib import ranks

    jobs = list("abcdefg")
    parts = [ranks.share(jobs, r, 3) for r in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    for world in ("1", "", None):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert not ranks.requested()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ranks.requested() and ranks.world() == 4
    run = subprocess.run([sys.executable, "-c", "import sys, CTFMLib.ranks; print('torch' in sys.modules)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ctfm_pythonpath()},
                         timeout=60)
    assert run.stdout.strip() == "False", run


@pytest.mark.slow
def test_two_nodes_segment_a_folder_as_one_process_does_each_output_once(model, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nrrd", "c.nii.gz")):
        small_ct(inputs / name, seed=i)
    (inputs / "d.nii.gz").write_bytes(b"\x1f\x8b not an image at all")
    one = ctfm("segment", inputs, "--model", model, *RUN, "--out-dir", tmp_path / "one")
    assert one.returncode == 1, one

    two = tmp_path / "two"
    runs = launch("segment", inputs, "--model", model, *RUN, "--out-dir", two)
    assert [code for code, _, _ in runs] == [1, 1], runs  # d failed on some rank: every rank says so
    assert [worker_codes(e) for _, _, e in runs] == [[1], [1]], runs
    out = "".join(o for _, o, _ in runs)
    err = "".join(e for _, _, e in runs)
    assert "Traceback" not in out, runs
    # The summary of a single process, printed once (by rank 0), naming the corrupt input.
    assert re.findall(r"^segmented .*$", out, re.M) == ["segmented 3 of 4 images; failed: " + str(inputs / "d.nii.gz")]
    failures = re.findall(r"^ctfm: rank \d: FAILED (.*)$", err, re.M)  # (torchrun adds its own report)
    assert len(failures) == 1 and failures[0].startswith(str(inputs / "d.nii.gz")), err
    # Each output written by exactly one rank; both ranks worked.
    wrote = re.findall(r"^rank (\d): \[\d/4\] \S+: wrote (\S+?),", out, re.M)
    assert sorted(path for _, path in wrote) == sorted(str(two / f"{s}.nii.gz") for s in "abc"), out
    assert {rank for rank, _ in wrote} == {"0", "1"}
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for stem in "abc":
        np.testing.assert_array_equal(read_image(two / f"{stem}.nii.gz").array,
                                      read_image(tmp_path / "one" / f"{stem}.nii.gz").array)
        assert (two / f"{stem}.labels.json").read_text() == (tmp_path / "one" / f"{stem}.labels.json").read_text()
    assert not [p for p in two.rglob(".*")]  # no temporary file left

    # Without the corrupt input a rerun has nothing to do: said once, nothing written, exit 0 on both.
    os.remove(inputs / "d.nii.gz")
    times = mtimes(two)
    again = launch("segment", inputs, "--model", model, *RUN, "--out-dir", two)
    assert [code for code, _, _ in again] == [0, 0], again
    assert "".join(o for _, o, _ in again).count("nothing to do: all 3 outputs exist") == 1, again
    assert mtimes(two) == times


@pytest.mark.slow
def test_two_nodes_segment_a_dicom_tree_with_the_summary_of_one_process(model, tmp_path):
    from ctfm_testing.synthetic_dicom import write_ct_series

    tree = tmp_path / "tree"
    for i, where in enumerate(("p1/ct", "p2/ct", "p3/ct")):
        write_ct_series(tree / where, body_phantom(shape=(36, 32, 10), spacing=(6.0, 6.0, 6.0), noise_hu=0, seed=i))
    for f in (tree / "p3" / "ct").iterdir():  # truncated in the pixel data: that series fails
        f.write_bytes(f.read_bytes()[:-1500])
    one = ctfm("segment", tree, "--dicom-tree", "--model", model, *RUN, "--out-dir", tmp_path / "one")
    runs = launch("segment", tree, "--dicom-tree", "--model", model, *RUN, "--out-dir", tmp_path / "two")
    assert [worker_codes(e) for _, _, e in runs] == [[one.returncode]] * 2 == [[1], [1]], (one, runs)
    assert "".join(o for _, o, _ in runs).count("summary in") == 1, runs

    def summary(folder):
        with open(folder / "summary.csv", newline="", encoding="utf-8") as f:
            # (ITK's messages name the address of its reader object: the one thing that differs)
            return [{k: re.sub(r"0x[0-9a-f]+", "0x..", v) for k, v in row.items() if k != "seconds"}
                    for row in csv.DictReader(f)]

    rows = summary(tmp_path / "two")
    assert rows == summary(tmp_path / "one")
    assert sorted(r["status"] for r in rows) == ["failed", "written", "written"]
    segs = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("labels.nii.gz"))
    assert segs == sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("labels.nii.gz"))
    for rel in segs:
        np.testing.assert_array_equal(read_image(tmp_path / "two" / rel).array, read_image(tmp_path / "one" / rel).array)


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_said_once_and_every_rank_exits_2(model, tmp_path):
    """Rank 0's plan fails (a folder without images): it says why once, before the others exit (torchrun stops the
    processes still running as soon as one ends with an error). `--out` under torchrun goes the same way."""
    (tmp_path / "empty").mkdir()
    runs = launch("segment", tmp_path / "empty", "--model", model, *RUN, "--out-dir", tmp_path / "out")
    assert [worker_codes(e) for _, _, e in runs] == [[2], [2]], runs
    errors = [line for _, _, e in runs for line in e.splitlines() if line.startswith("ctfm: error:")]
    assert len(errors) == 1 and "no images found" in errors[0], runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
