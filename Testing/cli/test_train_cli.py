"""`ctfm train`: the same pretraining from the command line, and clear refusals."""

import json

import pytest

from ctfm_testing.plugin import run_ctfm
from ctfm_testing.training import tiny_pretraining


@pytest.mark.slow
def test_ctfm_train_pretrain_writes_a_loadable_encoder_and_metrics(tmp_path):
    config = tiny_pretraining(tmp_path)
    out = tmp_path / "run"
    result = run_ctfm("--progress", "json", "train", "pretrain", "--config", config, "--out", out, "--max-steps", "3",
                      "--device", "cpu", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["scans"] == 2 and summary["skipped"] == []
    from CTFMLib.weights import load_model

    encoder, _ = load_model(out / "model", expect="SegResEncoder")
    assert encoder.init_filters == 4
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lr") and len(rows) == 4


@pytest.mark.slow
def test_ctfm_train_refuses_unknown_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1e-3}}))
    result = run_ctfm("train", "pretrain", "--config", bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "optim.learning_rate" in result.stderr and "optim.lr" in result.stderr and "Traceback" not in result.stderr

    segment = run_ctfm("train", "segment", "--config", bad, "--out", tmp_path / "out")
    assert segment.returncode == 2 and "optim.learning_rate" in segment.stderr


@pytest.mark.slow
def test_ctfm_train_classify_reads_csv_labels_and_exports_a_triage_model(tmp_path):
    import numpy as np

    from ctfm_testing.phantoms import head_phantom
    from CTFMLib.image import write_image

    rows = ["path,label"]
    for i in range(4):  # 60 slices of 3 mm: passes the upstream filters
        lesion = {"center_lps": (0.0, 10.0, 20.0), "radius_mm": 14.0, "hu": 70.0} if i % 2 else None
        image = head_phantom(shape=(48, 48, 60), spacing=(4.0, 4.0, 3.0), seed=i, lesion=lesion)
        write_image(image, tmp_path / f"head{i}.nii.gz")
        rows.append(f"head{i}.nii.gz,{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "classify.json"
    config.write_text(json.dumps({
        "data": {"source": [str(tmp_path / "labels.csv")], "workers": 0, "val_fraction": 0.5},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "classify": {"size": [8, 16, 16], "hidden": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 3},
        "run": {"seed": 0, "device": "cpu", "scans_per_step": 2, "val_every": 3, "log_every": 1},
    }))
    out = tmp_path / "run"
    result = run_ctfm("train", "classify", "--config", config, "--out", out, "--device", "cpu", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["scans"] == 4
    from CTFMLib.train.classify import load_triage_model

    model, saved = load_triage_model(out / "model")
    assert 0 < saved["threshold"] < 1 and "val_auc" in (out / "metrics.csv").read_text().splitlines()[0]
    x = np.zeros((1, 1, 32, 16, 16), dtype=np.float32)
    import torch

    assert model(torch.from_numpy(x)).shape == (1,)

    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("path\nhead0.nii.gz\n")
    config.write_text(config.read_text().replace("labels.csv", "unlabelled.csv"))
    refused = run_ctfm("train", "classify", "--config", config, "--out", tmp_path / "run2", "--device", "cpu")
    assert refused.returncode == 2 and "0/1 label" in refused.stderr and "label" in refused.stderr
