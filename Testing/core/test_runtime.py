"""Precision ``auto`` (CTFMLib.runtime): accepted by ``ctfm embed`` and ``ctfm index``, resolved by the documented
rule (bf16 on CUDA with bf16 and on CPUs with AVX512-BF16/AMX, fp32 elsewhere), reported with the device."""

import json

import numpy as np
import pytest
import torch

from ctfm_testing.hardware import DEVICES, expected_precision
from ctfm_testing.hostile import ctfm, small_ct, tiny_encoder
from CTFMLib.runtime import Runner, RunOptions


def progress_messages(stderr: str) -> list:
    return [json.loads(ln).get("message", "") for ln in stderr.splitlines() if ln.startswith("{")]


@pytest.mark.parametrize("device", DEVICES)
def test_runner_resolves_auto_precision_on_its_device(device):
    asked = RunOptions(device=device, precision="auto")
    runner = Runner(torch.nn.Conv3d(1, 2, 1), asked)
    assert runner.options.precision == expected_precision(device)
    assert asked.precision == "auto"  # the caller's options are left as they were asked
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        RunOptions(precision="fp16")


@pytest.mark.parametrize("device", DEVICES)
def test_embed_and_index_add_accept_precision_auto(device, tmp_path, ctfm_cache):
    want = expected_precision(device)
    weights = tiny_encoder(tmp_path / "enc")
    scan = small_ct(tmp_path / "ct.nii.gz")

    out = tmp_path / "vector.npy"
    result = ctfm("embed", scan, "--weights", weights, "--device", device, "--precision", "auto",
                  "--progress", "json", "--out", out)
    assert result.returncode == 0, result
    assert np.isfinite(np.load(out)).all()
    said = progress_messages(result.stderr)
    assert any(f"{device}, {want}" in m for m in said), said  # the device and the precision it resolved to

    index = tmp_path / "index"
    result = ctfm("index", "add", index, scan, "--weights", weights, "--device", device, "--precision", "auto",
                  "--progress", "json")
    assert result.returncode == 0, result
    said = progress_messages(result.stderr)
    assert any(f"{device}, {want}" in m for m in said), said

    result = ctfm("index", "query", index, scan, "--device", device, "--precision", "auto", "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["hits"]

