"""`ctfm train`: the same pretraining from the command line, and clear refusals."""

import json

from conftest import run_ctfm
from test_cli_module import tiny_pretraining


def test_ctfm_train_pretrain_writes_a_loadable_encoder_and_metrics(tmp_path):
    config = tiny_pretraining(tmp_path)
    out = tmp_path / "run"
    result = run_ctfm("--progress", "json", "train", "pretrain", "--config", config, "--out", out, "--max-steps", "3",
                      "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["scans"] == 2 and summary["skipped"] == []
    from CTFMLib.weights import load_model

    encoder, _ = load_model(out / "model", expect="SegResEncoder")
    assert encoder.init_filters == 4
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lr") and len(rows) == 4


def test_ctfm_train_refuses_unknown_keys_and_says_what_is_not_available(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1e-3}}))
    result = run_ctfm("train", "pretrain", "--config", bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "optim.learning_rate" in result.stderr and "optim.lr" in result.stderr and "Traceback" not in result.stderr

    later = run_ctfm("train", "segment", "--config", bad, "--out", tmp_path / "out")
    assert later.returncode == 3 and "not implemented yet" in later.stderr
