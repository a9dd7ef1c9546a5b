"""``ctfm train pretrain`` across two "nodes" (two torchrun launchers meeting through a c10d rendezvous, one process
each, as on two machines) ends with the weights one process reaches with the same global batch.

Real child processes; the tiny pretraining of :func:`ctfm_testing.training.tiny_pretraining` (two phantom CTs,
two scans a step: one on each node).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ctfm_testing.processes import child_env, ctfm_pythonpath, two_node_launch
from ctfm_testing.training import tiny_pretraining


@pytest.mark.slow
def test_two_nodes_pretrain_to_the_weights_of_one_process(tmp_path):
    from safetensors.torch import load_file

    config = tiny_pretraining(tmp_path)
    settings = json.loads(config.read_text())
    settings["run"]["deterministic"] = True
    config.write_text(json.dumps(settings))
    assert settings["run"]["scans_per_step"] == 2  # the global batch: one scan a step on each node
    train = ["train", "pretrain", "--config", str(config), "--max-steps", "3", "--device", "cpu"]

    errs = []
    for p in two_node_launch(*train, "--out", tmp_path / "two"):
        try:
            _, err = p.communicate(timeout=240)
        except BaseException:
            p.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    assert "".join(errs).count("training 3 steps on cpu x 2 processes") == 1, errs  # one run of two, told once
    one = subprocess.run([sys.executable, "-m", "CTFMLib.cli", *train, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env={**child_env(), "PYTHONPATH": ctfm_pythonpath()},
                         timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]

    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5
    losses = [row.split(",")[1] for row in (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and len(set(losses)) > 1, losses  # it trained: the loss moved
