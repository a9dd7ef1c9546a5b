"""TensorBoard event files of a real training run: the same numbers as metrics.csv, no duplicated steps on resume."""

import csv

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from test_classify import dataset, probe_config  # noqa: E402

from CTFMLib.train.classify import ClassifyTask  # noqa: E402
from CTFMLib.train.trainer import train  # noqa: E402

TAGS = {"loss": "train/loss", "lr": "train/lr", "seconds": "train/seconds", "val_auc": "val_auc",
        "val_loss": "val_loss"}


def config():
    # A linear probe: real trainer steps that cost almost nothing, with validation every other step.
    return probe_config(optim={"lr": 0.1, "warmup_steps": 2, "max_steps": 6, "weight_decay": 0.0},
                        run={"scans_per_step": 4, "checkpoint_every": 3, "log_every": 1, "val_every": 2})


def task(tmp_path):
    return ClassifyTask(config(), dataset(range(10, 18)), dataset(range(20, 24)), cache_dir=tmp_path / "emb")


def events(folder) -> dict:
    """``{tag: [(step, value), ...]}`` as TensorBoard reads it (orphaned events of a restart purged)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_as_csv(scalars: dict, rows: list) -> None:
    assert set(scalars) == set(TAGS.values())
    for column, tag in TAGS.items():
        expected = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in expected], tag  # every step once, in order
        for (_, value), (_, want) in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-6, abs=1e-12), tag  # events store float32


def test_event_files_hold_the_metrics_csv_values(tmp_path):
    out = tmp_path / "run"
    train(task(tmp_path), out, device="cpu")
    rows = metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["val_auc"]] == ["2", "4", "6"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert_same_as_csv(events(out / "tensorboard"), rows)


def test_a_resumed_run_leaves_each_step_once(tmp_path):
    out = tmp_path / "run"

    def crash_at_step_5(fraction, message):
        # Steps 1-4 are logged, the checkpoint is at step 3: the resumed run logs step 4 again. TensorBoard only
        # drops an old step 4 on its own when a smaller step follows it, so this needs the writer's purge_step.
        if message.startswith("step 5 "):
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(task(tmp_path), out, device="cpu", progress=crash_at_step_5)
    assert [int(r["step"]) for r in metrics(out / "metrics.csv")] == [1, 2, 3, 4]
    assert [s for s, _ in events(out / "tensorboard")["train/loss"]] == [1, 2, 3, 4]

    summary = train(task(tmp_path), out, resume=True, device="cpu")
    assert summary["steps"] == 6 and not summary["stopped"]
    rows = metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_same_as_csv(events(out / "tensorboard"), rows)
