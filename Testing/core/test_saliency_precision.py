"""``ctfm saliency --precision`` and ``saliency_image(precision=)``: bf16 runs every target's network under bf16
autocast (seen by a forward hook on the network itself) for both methods, gives a map close to fp32's and not the
same one; ``auto`` resolves by the runtime's documented rule; the default stays fp32."""

import json

import numpy as np
import pytest
import torch

from ctfm_testing.hardware import DEVICES, expected_precision
from ctfm_testing.hostile import ctfm, tiny_encoder, tiny_segmenter, tiny_triage
from ctfm_testing.phantoms import GEOMETRIES, body_phantom, head_phantom
from CTFMLib.image import read_image, write_image
from CTFMLib.saliency import saliency_image

SPL = GEOMETRIES["spl"]["direction"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny convolutions are slower on two busy threads (see test_classify)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def small_head():
    """A head CT on a 3 mm grid whose model grid (3 mm, foreground crop) is small, with a lesion to explain."""
    return head_phantom(shape=(24, 24, 20), spacing=(3.0, 3.0, 3.0), head_radius_mm=30,
                        lesion={"center_lps": (6.0, -5.0, 4.0), "radius_mm": 6.0, "hu": 80.0})


def progress_messages(stderr: str) -> list:
    return [json.loads(ln).get("message", "") for ln in stderr.splitlines() if ln.startswith("{")]


def run_saliency(tmp_path, name, *options):
    """``ctfm saliency`` in process, with JSON progress; returns (heat array, printed JSON, progress messages)."""
    out = tmp_path / f"{name}.nii.gz"
    result = ctfm("saliency", tmp_path / "head.nii.gz", "--target", "embedding", "--out", out, "--threads", "1",
                  "--json", *options)
    assert result.returncode == 0, result
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    return read_image(out).array.astype(np.float64), printed, progress_messages(result.stderr)


@pytest.fixture
def head_and_encoder(tmp_path, ctfm_cache):
    write_image(small_head(), tmp_path / "head.nii.gz")
    return tmp_path, tiny_encoder(tmp_path / "enc", seed=1)


@pytest.mark.parametrize("method", ["occlusion", "gradient"])
def test_bf16_map_is_close_to_fp32_and_not_the_same(head_and_encoder, method):
    """bf16 keeps 8 mantissa bits (a relative error up to 2**-9 per rounding, a few of them compounding through
    the layers): the map's values move by a few hundredths of its peak (0.014 and 0.008 measured here), but
    where the heat is stays. A correlation above 0.99 over the head's voxels (0.9999 measured) and no voxel off
    by 0.1 of the peak say it is the same map; an identical map would mean bf16 never ran."""
    tmp_path, weights = head_and_encoder
    common = ("--weights", weights, "--method", method, "--device", "cpu", "--progress", "json")
    fp32, said32, _ = run_saliency(tmp_path, "fp32", *common)  # the default
    bf16, said16, messages = run_saliency(tmp_path, "bf16", *common, "--precision", "bf16")
    assert said32["details"]["precision"] == "fp32" and said16["details"]["precision"] == "bf16"
    assert any("cpu, bf16" in m for m in messages), messages  # the estimate says the precision with the device
    assert bf16.max() == pytest.approx(1.0) and np.isfinite(bf16).all()
    assert not np.array_equal(fp32, bf16)
    head = fp32 > 0
    assert np.corrcoef(fp32[head], bf16[head])[0, 1] > 0.99
    assert np.abs(fp32 - bf16).max() < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_auto_resolves_by_the_runtime_rule_and_the_default_stays_fp32(head_and_encoder, device):
    tmp_path, weights = head_and_encoder
    common = ("--weights", weights, "--method", "gradient", "--steps", "1", "--device", device, "--progress", "json")
    _, default, messages = run_saliency(tmp_path, "default", *common)
    assert default["details"]["precision"] == "fp32"
    assert any(f"{device}, fp32" in m for m in messages), messages
    _, auto, messages = run_saliency(tmp_path, "auto", *common, "--precision", "auto")
    want = expected_precision(device)
    assert auto["details"]["precision"] == want
    assert any(f"{device}, {want}" in m for m in messages), messages


def dtypes_seen(network: torch.nn.Module) -> tuple:
    """Hook the first convolution of ``network`` (it sees the network input); returns (the list the output dtypes
    of the saliency's own passes go to, the hook handle). Left out: the work count on the meta device
    (CTFMLib.costs.flops_per_voxel) and the memory probe on a zero input of budget.PROBE_SHAPE, which stays fp32
    (an estimate on the safe side)."""
    from CTFMLib.saliency.budget import PROBE_SHAPE

    seen = []

    def hook(module, inputs, output):
        if output.device.type != "meta" and tuple(inputs[0].shape[2:]) != PROBE_SHAPE:
            seen.append(output.dtype)

    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    return seen, first.register_forward_hook(hook)


def target_case(target, tmp_path):
    """(image, loaded network, saliency_image keyword arguments) for one target, tiny networks."""
    from CTFMLib.triage import load_triage
    from CTFMLib.weights import load_model

    if target in ("embedding", "point"):
        network = load_model(tiny_encoder(tmp_path / "enc"), expect="SegResEncoder")[0]
        kwargs = {"weights": network}
        if target == "point":
            kwargs.update(point_lps=(6.0, -5.0, 4.0), mask_size=(24, 128, 128))  # one cube: the whole patch
        return small_head(), network, kwargs
    if target == "class":
        network = load_model(tiny_segmenter(tmp_path / "seg"))[0]
        return (body_phantom(shape=(24, 24, 8), spacing=(2.0, 2.0, 6.0)), network,
                {"weights": network, "class_name": "liver", "labels": {1: "liver", 2: "spleen"}})
    network, config, _ = load_triage(tiny_triage(tmp_path / "triage"))
    image = head_phantom(shape=(10, 24, 20), spacing=(5.0, 2.0, 2.0), direction=SPL, head_radius_mm=24.0,
                         dtype=np.float32)
    return image, network, {"triage_model": (network, config), "mask_size": (4, 6, 6)}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["embedding", "point", "class", "triage"])
def test_every_target_and_method_runs_its_network_in_bf16(tmp_path, ctfm_cache, target):
    """The network's own convolutions compute in bf16 when asked (fp32 by default), for occlusion and for
    integrated gradients (whose gradient is of the float32 input); the heat map stays float32 in [0, 1]."""
    image, network, kwargs = target_case(target, tmp_path)
    seen, handle = dtypes_seen(network)
    try:
        for method in ("occlusion", "gradient"):
            for precision, dtype in ((None, torch.float32), ("bf16", torch.bfloat16)):
                seen.clear()
                asked = {} if precision is None else {"precision": precision}
                result = saliency_image(image, target=target, method=method, device="cpu", steps=2, **kwargs,
                                        **asked)
                assert seen and set(seen) == {dtype}, (method, precision, set(seen))
                assert result.details["precision"] == (precision or "fp32")
                heat = result.heatmap.array
                assert heat.dtype == np.float32 and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
                assert np.isfinite(result.model_heat).all()
    finally:
        handle.remove()
