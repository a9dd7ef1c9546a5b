"""`ctfm index add` under torchrun: two CPU processes (gloo) build the index one process builds.

Real child processes, as a user runs them: ``python -m torch.distributed.run --nproc_per_node 2 -m CTFMLib.cli
index add ...`` and the plain ``ctfm index add``, with the CT-FM architecture at random weights (tiny) on
small synthetic CTs and one unreadable file among them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctfm_testing.checkpoints import write_monai_encoder
from ctfm_testing.hostile import ctfm
from ctfm_testing.phantoms import body_phantom, head_phantom
from ctfm_testing.plugin import ROOT
from CTFMLib.image import write_image
from CTFMLib.ranks import share
from CTFMLib.retrieval.index import VectorIndex
from CTFMLib.runtime import rank_device


def torchrun_ctfm(*args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    from ctfm_testing.processes import child_env, free_port

    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "CTFMLib.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def contents(path) -> tuple:
    """``({path: (scan vector, patch vectors, centres)}, info)`` of an index that passes a deep check."""
    with VectorIndex.open(path, readonly=True) as index:
        assert index.check(deep=True) == []
        rows = index.scans()
        paths = [rec.path for _, rec in rows]
        assert len(paths) == len(set(paths)), paths  # each scan exactly once
        return {rec.path: index.vectors(scan_id) for scan_id, rec in rows}, index.info()


def summary_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith("added ")]


def test_share_splits_the_list_disjointly_and_ranks_keep_cpu_devices():
    todo = list(range(7))
    parts = [share(todo, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == todo
    assert rank_device("cpu", 1) == "cpu"
    if not torch.cuda.is_available():
        assert rank_device("auto", 1) == "auto" and rank_device("cuda", 1) == "cuda"  # Runner falls back, warns


@pytest.mark.slow
def test_two_processes_under_torchrun_build_the_index_one_process_builds(tmp_path, tiny_encoder_folder):
    scans = tmp_path / "scans"
    for i in range(3):
        write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0), seed=i, body_radius_mm=80 + 10 * i),
                    scans / f"body{i}.nii.gz")
        write_image(head_phantom(shape=(40, 40, 12), spacing=(5.0, 5.0, 8.0), seed=i), scans / f"head{i}.nii.gz")
    broken = scans / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    run = ["index", "add", "--weights", tiny_encoder_folder, "--device", "cpu", "--threads", "1", "--batch-size", "4"]

    # A new index from the bodies and the broken file: created once (by rank 0), both ranks embed and add.
    bodies = sorted(scans.glob("body*.nii.gz"))
    first = torchrun_ctfm("--progress", "json", *run[:2], tmp_path / "two", *bodies, broken, *run[2:])
    assert first.returncode == 1, first.stdout + first.stderr  # one input failed: every rank exits 1
    assert summary_lines(first.stdout) == ["added 3, already indexed 0, failed 1 of 4; failed: "
                                           f"{broken.resolve()}"], first.stdout + first.stderr
    failures = [line for line in first.stderr.splitlines() if line.startswith("ctfm: ")]
    assert len(failures) == 1 and str(broken.resolve()) in failures[0], first.stderr  # reported once
    for rank in (0, 1):  # the list is [body0, body1, body2, broken]: rank 0 takes body0 and body2, rank 1 the rest
        added = [line for line in first.stdout.splitlines() if line.startswith(f"rank {rank}: [")]
        assert len(added) == 2 - rank and all("added as scan" in line for line in added), first.stdout
    assert "rank 1: FAILED" in failures[0]
    # --progress json: whole JSON lines on stderr, from rank 0 only (its lines say so).
    progress = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    # every line is progress (an expected time also carries its seconds)
    assert progress and all({"progress", "message"} <= set(p) <= {"progress", "message", "expected_seconds"}
                            for p in progress)
    assert any(p["message"].startswith("rank 0: [") for p in progress)
    assert not any("rank 1" in p["message"] for p in progress)

    # The whole folder into the existing index: the bodies are skipped, the heads are shared out.
    second = torchrun_ctfm("--progress", "none", *run[:2], tmp_path / "two", scans, *run[2:])
    assert second.returncode == 1, second.stdout + second.stderr
    assert summary_lines(second.stdout)[0].startswith("added 3, already indexed 3, failed 1 of 7"), second.stdout
    assert "3 of 7 scans are already indexed: skipped" in second.stdout

    # Run again without the broken file: nothing to do, nothing embedded, exit 0 on every rank.
    good = sorted(scans.glob("*0.nii.gz")) + sorted(scans.glob("*[12].nii.gz"))
    third = torchrun_ctfm("--progress", "none", *run[:2], tmp_path / "two", *good, *run[2:])
    assert third.returncode == 0, third.stdout + third.stderr
    assert summary_lines(third.stdout) == ["added 0, already indexed 6, failed 0 of 6"], third.stdout
    assert "added as scan" not in third.stdout

    # Other weights are refused while rank 0 plans: one error message, no rank embeds, the index is unchanged.
    other = write_monai_encoder(tmp_path / "other", init_filters=4, blocks_down=(1, 1, 1, 1), seed=5)
    extra = tmp_path / "extra.nii.gz"
    write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0), seed=7), extra)
    refused = torchrun_ctfm("--progress", "none", *run[:2], tmp_path / "two", extra, "--weights", other,
                            "--device", "cpu", "--threads", "1")
    assert refused.returncode != 0 and "added as scan" not in refused.stdout, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ctfm: ")]
    assert len(errors) == 1 and "not comparable" in errors[0], refused.stderr

    one = ctfm(*run[:2], tmp_path / "one", scans, *run[2:])  # one process (this one)
    assert one.returncode == 1 and summary_lines(one.stdout)[0].startswith("added 6, already indexed 0, failed 1"), \
        one.stdout + one.stderr

    two_scans, two_info = contents(tmp_path / "two")
    one_scans, one_info = contents(tmp_path / "one")
    assert sorted(two_scans) == sorted(one_scans) == sorted(str(p.resolve()) for p in good)
    for key in ("model_id", "weights_hash", "dim", "preprocessing", "scans", "patches"):
        assert two_info[key] == one_info[key], key
    for path, (scan, patches, centres) in one_scans.items():
        other = two_scans[path]
        assert patches.shape == other[1].shape and len(patches) > 1
        np.testing.assert_allclose(other[0], scan, atol=1e-5)
        np.testing.assert_allclose(other[1], patches, atol=1e-5)
        np.testing.assert_allclose(other[2], centres, atol=1e-5)
