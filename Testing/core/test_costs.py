"""This computer's speed (CTFMLib.costs) and the expected times the commands print from it (issue 17, defect 5).

Before: printed estimates were figures measured on other CPUs (1.6-3.8x off), embed, index add and
saliency printed none, and occlusion over a whole head ran ~22 min without a word about gradients.
"""

import io
import json
import time

import pytest
import torch

from ctfm_testing.hostile import ctfm, small_ct, tiny_encoder
from CTFMLib import costs
from CTFMLib.costs import Costs, flops_per_voxel, rate
from CTFMLib.progress import ConsoleBar, Estimate, JsonLines, subrange


@pytest.fixture
def costs_file(tmp_path, monkeypatch):
    path = tmp_path / "costs.json"
    monkeypatch.setenv(Costs.ENVIRONMENT, str(path))
    return path


def _key(kind="cpu", precision="fp32"):
    return Costs.key(kind, precision, torch.get_num_threads())


def test_kept_figures_come_back_until_they_are_stale(tmp_path):
    store = Costs(tmp_path / "costs.json")
    now = time.time()
    store.put("k", "forward", 1.25, now=now)
    assert store.get("k", "forward", now=now + 86400) == 1.25
    assert store.get("k", "forward", now=now + (costs.STALE_DAYS + 1) * 86400) is None  # a month old: measure again
    assert store.get("k", "train", now=now) is None
    assert store.get("other", "forward", now=now) is None
    (tmp_path / "costs.json").write_text("{not json", encoding="utf-8")
    assert store.get("k", "forward") is None  # unreadable = not measured, never an error


def test_the_key_names_processor_device_precision_threads_and_torch():
    key = Costs.key("cuda:1", "bf16", 3)
    parts = key.split("|")
    assert parts[1:4] == ["cuda", "bf16", "3"]
    assert parts[4] == f"torch {torch.__version__}"


def test_a_missing_figure_is_measured_once_and_kept(costs_file, monkeypatch):
    monkeypatch.setattr(costs, "PROBE_SHAPE", (16, 32, 32))  # the measurement's size; the same code runs
    said = []
    first = rate("forward", "cpu", announce=said.append)
    assert first.measured and first.seconds_per_mvoxel > 0
    assert len(said) == 1 and "measuring" in said[0]
    kept = json.loads(costs_file.read_text(encoding="utf-8"))[_key()]["forward"]
    assert kept["s_per_mvoxel"] == pytest.approx(first.seconds_per_mvoxel, rel=1e-3)
    again = rate("forward", "cpu", announce=said.append)
    assert again.seconds_per_mvoxel == kept["s_per_mvoxel"] and len(said) == 1  # not measured again


def test_a_stale_figure_is_measured_again(costs_file, monkeypatch):
    monkeypatch.setattr(costs, "PROBE_SHAPE", (16, 32, 32))
    Costs(costs_file).put(_key(), "forward", 999.0, now=time.time() - (costs.STALE_DAYS + 2) * 86400)
    fresh = rate("forward", "cpu")
    assert fresh.measured and fresh.seconds_per_mvoxel != 999.0
    assert Costs(costs_file).get(_key(), "forward") == pytest.approx(fresh.seconds_per_mvoxel, rel=1e-3)


def test_a_caller_that_must_not_wait_gets_the_generic_figure(costs_file):
    figure = rate("train", "cpu", measure_now=False)
    assert not figure.measured and figure.seconds_per_mvoxel > 0
    assert not costs_file.exists()


def test_convolution_work_is_counted_per_input_voxel():
    conv = torch.nn.Conv3d(2, 8, 3, padding=1)
    assert flops_per_voxel(conv, 2, (8, 8, 8)) == 2 * 27 * 8  # every output voxel: 2 x 27 inputs x 8 filters
    down = torch.nn.Conv3d(1, 4, 2, stride=2)
    assert flops_per_voxel(down, 1, (8, 8, 8)) == pytest.approx(8 * 4 / 8)  # an eighth of the outputs, 8 inputs x 4 filters each
    from CTFMLib.networks import SegResNetDS, build_encoder

    wide, narrow = build_encoder(), build_encoder({"init_filters": 16})
    ratio = flops_per_voxel(narrow) / flops_per_voxel(wide)
    assert 0.2 < ratio < 0.3  # convolutions cost filters^2 (the first convolution, 1 input channel, less)
    seg = SegResNetDS(init_filters=32, blocks_down=(1, 2, 2, 4, 4), out_channels=118, dsdepth=4)
    assert flops_per_voxel(seg) > flops_per_voxel(wide)  # a decoder on top of the same encoder
    assert next(seg.parameters()).device.type == "cpu"  # counted on a copy: the network is untouched


def test_an_estimate_keeps_its_seconds_through_subranges_and_renderers():
    seen = []
    subrange(lambda f, m: seen.append((f, m)), 0.2, 0.4)(None, Estimate(42.0, "9 patches, cpu"))
    (fraction, message), = seen
    assert fraction is None and isinstance(message, Estimate) and message.seconds == 42.0
    assert str(message) == "expected time: about 42 s (9 patches, cpu)"
    stream = io.StringIO()
    JsonLines(stream)(None, message)
    assert json.loads(stream.getvalue()) == {"progress": None, "message": str(message), "expected_seconds": 42.0}
    bar = io.StringIO()
    ConsoleBar(bar)(0.5, "patch 1 of 2")
    ConsoleBar(bar)(None, Estimate(300, "x"))
    assert bar.getvalue().splitlines()[-1] == "expected time: about 5 min (x)"  # a line of its own, no bar


# --- the commands -----------------------------------------------------------------------------------


def _expected_lines(result) -> list:
    """The estimate lines, on stderr with the progress (``--progress bar``; ``none`` says nothing)."""
    assert "expected time" not in result.stdout  # stdout keeps the results
    return [ln for ln in result.stderr.splitlines() if ln.startswith("expected time: about")]


def bar(*args):
    return ctfm("--progress", "bar", *args)


def test_embed_and_index_add_print_the_expected_time(tmp_path):
    weights = tiny_encoder(tmp_path / "enc")
    ct = small_ct(tmp_path / "ct.nii.gz")
    result = bar("embed", ct, "--weights", weights, "--mode", "scan", "--out", tmp_path / "e.npy")
    assert result.returncode == 0, result
    (line,) = _expected_lines(result)
    assert "patch" in line
    result = bar("index", "add", tmp_path / "index", ct, "--weights", weights)
    assert result.returncode == 0, result
    assert len(_expected_lines(result)) == 1, result


@pytest.mark.slow
def test_saliency_prints_its_expected_time_and_names_gradients_before_a_long_occlusion(tmp_path, costs_file):
    weights = tiny_encoder(tmp_path / "enc")
    ct = small_ct(tmp_path / "ct.nii.gz")
    key = _key()
    # This "computer" is very slow: a forward pass of the published encoder costs 5000 s per million voxels.
    Costs(costs_file).put(key, "forward", 5000.0)
    Costs(costs_file).put(key, "input_gradient", 15000.0)
    result = bar("saliency", ct, "--weights", weights, "--target", "embedding", "--method", "gradient",
                  "--out", tmp_path / "g.nii.gz")
    assert result.returncode == 0, result
    (line,) = _expected_lines(result)
    assert "gradient step" in line and "--method gradient" not in line
    result = bar("saliency", ct, "--weights", weights, "--target", "embedding", "--method", "occlusion",
                  "--out", tmp_path / "o.nii.gz", "--json")
    assert result.returncode == 0, result
    (line,) = _expected_lines(result)
    assert "occluded cube" in line and "--method gradient takes about" in line
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["details"]["expected_seconds"] > 120


def test_a_quick_occlusion_says_nothing_about_gradients(tmp_path, costs_file):
    weights = tiny_encoder(tmp_path / "enc")
    ct = small_ct(tmp_path / "ct.nii.gz", shape=(20, 18, 8))
    Costs(costs_file).put(_key(), "forward", 0.001)
    result = bar("saliency", ct, "--weights", weights, "--target", "embedding", "--method", "occlusion",
                  "--out", tmp_path / "o.nii.gz")
    assert result.returncode == 0, result
    (line,) = _expected_lines(result)
    assert "--method gradient" not in line


def test_a_segmentation_plan_uses_this_computers_encoder_figure_before_any_segmentation(tmp_path, costs_file):
    from CTFMLib.segment_plan import Timings, plan_segmentation

    image = small_ct(shape=(60, 50, 40), spacing=(1.5, 1.5, 1.5))
    timings = Timings(tmp_path / "timings.json")  # no segmentation has run here

    def plan():
        return plan_segmentation(image, quality="full", spacing="native", device="cpu", precision="fp32",
                                 threads=torch.get_num_threads(), foreground=False, timings=timings)

    generic = plan()
    assert not generic.calibrated
    Costs(costs_file).put(_key(), "forward", 1.0)
    slow = plan()
    Costs(costs_file).put(_key(), "forward", 3.0)
    slower = plan()
    assert slow.calibrated and slower.calibrated
    network = [p.expected_seconds - p.per_voxel_seconds for p in (slow, slower)]
    assert network[1] == pytest.approx(3 * network[0])  # proportional to this computer's own figure
    timings.record("cpu", "fp32", torch.get_num_threads(), 2.0)  # a segmentation ran: its figure rules
    learnt = plan()
    assert learnt.expected_seconds - learnt.per_voxel_seconds == pytest.approx(2.0 * learnt.windows_run)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
