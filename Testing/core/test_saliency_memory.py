"""Saliency's memory budget: refused before the run when it would not fit, and an estimate that covers
what a run really takes (measured in a child process)."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ctfm_testing.phantoms import HEAD_LABELS, head_phantom  # noqa: E402
from CTFMLib.networks import SegResNetDS  # noqa: E402
from CTFMLib.saliency import saliency_image  # noqa: E402
from CTFMLib.saliency.budget import SaliencyMemoryError  # noqa: E402

CTFM_ROOT = Path(__file__).resolve().parents[2] / "CTFM"


@pytest.mark.slow
def test_class_saliency_of_a_whole_head_ct_at_native_spacing_is_refused_before_running():
    """The issue's case: gradient saliency of a class on an ordinary head CT (256x256x108) at native spacing,
    with the whole-body network's size (32 filters, 118 outputs): tens of GB. Refused at once, naming the
    settings that need less, instead of being killed by the kernel."""
    image = head_phantom(shape=(256, 256, 108), spacing=(0.9, 0.9, 1.5))
    torch.manual_seed(0)
    model = SegResNetDS(init_filters=32, out_channels=118).eval()
    labels = {value: name for name, value in HEAD_LABELS.items()}
    started = time.perf_counter()
    with pytest.raises(SaliencyMemoryError) as refused:
        saliency_image(image, weights=model, labels=labels, target="class", class_name="brain", method="gradient",
                       spacing=None, device="cpu", max_memory_gb=8.0)
    message = str(refused.value)
    assert "more than the 8.0 GB allowed" in message and "--max-memory-gb" in message
    assert "--cube" in message and "--spacing 3" in message
    needed = float(message.split("needs about ")[1].split(" GB")[0])
    assert needed > 16, message  # 7 million voxels through a 32-filter network, forward and backward
    assert time.perf_counter() - started < 60  # refused before any pass over the volume (minutes on a CPU)


@pytest.mark.slow
def test_the_estimate_covers_the_peak_a_gradient_run_takes():
    """A class gradient run in a child process: its peak RSS (ru_maxrss) lies under the estimate it printed,
    and the estimate is not so generous that it would refuse runs that fit (at most twice the peak)."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(CTFM_ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        torch.set_num_threads(2)
        from ctfm_testing.phantoms import HEAD_LABELS, head_phantom
        from CTFMLib.networks import SegResNetDS
        from CTFMLib.saliency import saliency_image
        torch.manual_seed(0)
        model = SegResNetDS(init_filters=16, out_channels=118).eval()
        labels = {{value: name for name, value in HEAD_LABELS.items()}}
        image = head_phantom(shape=(112, 112, 64), spacing=(1.8, 1.8, 2.5))
        result = saliency_image(image, weights=model, labels=labels, target="class", class_name="brain",
                                method="gradient", spacing=None, device="cpu", steps=1)
        estimate = [n for n in result.notes if n.startswith("estimated peak memory")][0]
        print(json.dumps({{"estimate_gb": float(estimate.split()[3]),
                          "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["peak_gb"] <= measured["estimate_gb"] <= 2 * measured["peak_gb"], measured


@pytest.mark.slow
def test_ctfm_saliency_past_its_budget_is_one_line_exit_2(tmp_path, tiny_encoder_folder):
    """The command line: --max-memory-gb below what the run needs refuses in one line, writes nothing."""
    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import write_image

    write_image(body_phantom(shape=(48, 48, 40)), tmp_path / "ct.nii.gz")
    done = subprocess.run([sys.executable, "-m", "CTFMLib.cli", "--progress", "none", "saliency", str(tmp_path / "ct.nii.gz"),
                           "--target", "embedding", "--method", "gradient", "--weights", str(tiny_encoder_folder),
                           "--spacing", "native", "--device", "cpu", "--max-memory-gb", "0.1",
                           "--out", str(tmp_path / "heat.nii.gz")],
                          capture_output=True, text=True, timeout=300, cwd=CTFM_ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "more than the 0.1 GB allowed" in lines[0] and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
