"""Embeddings: the model card's result with the published architecture, scan and point modes, run options."""

import numpy as np
import pytest
import torch

from ctfm_testing.checkpoints import monai_encoder, write_monai_encoder
from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom
from CTFMLib.embed import PATCH_SIZE, embed_image, patch_starts
from CTFMLib.image import ImageError, read_image
from CTFMLib.preprocess import PreprocessConfig, preprocess
from CTFMLib.progress import Cancelled
from CTFMLib.runtime import Runner, RunOptions, select_device


@pytest.mark.slow
def test_full_ctfm_embedding_equals_model_card_pipeline(example_ct_path, tmp_path):
    """Published layout written by MONAI + safetensors; reference = model card with MONAI's encoder."""
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange

    from CTFMLib.weights import load_model

    folder = write_monai_encoder(tmp_path / "ctfm", seed=7)
    ours, info = load_model(folder)  # strict
    assert sum(p.numel() for p in ours.parameters()) == 77_760_992
    ref_model = monai_encoder(seed=7)
    card = Compose([LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
                    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground()])
    x = card(str(example_ct_path))
    with torch.no_grad():
        ref = torch.nn.functional.adaptive_avg_pool3d(ref_model(torch.as_tensor(x)[None])[-1], 1).squeeze().numpy()
    vec = embed_image(read_image(example_ct_path), model=ours)
    assert vec.shape == (512,) and vec.dtype == np.float32
    assert np.abs(ref).max() > 1e-2  # a meaningful comparison, not two near-zero vectors
    np.testing.assert_allclose(vec, ref, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=1)


def test_patch_starts_cover_every_voxel():
    for size, patch in [(300, 128), (128, 128), (50, 128), (129, 128), (24 * 5, 24)]:
        starts = patch_starts(size, patch)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + patch] = True
        assert covered.all() and starts[-1] + min(patch, size) == max(size, min(patch, size))
        assert all(0 <= s <= max(size - patch, 0) for s in starts)


def test_scan_mode_aggregates_patch_embeddings(tiny):
    image = body_phantom(shape=(80, 70, 24), spacing=(2.0, 2.0, 5.0))
    pre = preprocess(image, PreprocessConfig(spacing=(3.0, 1.0, 1.0)))
    n_patches = np.prod([len(patch_starts(n, p)) for n, p in zip(pre.array.shape, PATCH_SIZE)])
    assert n_patches > 1
    seen = []
    vec_mean = embed_image(image, model=tiny, mode="scan", progress=lambda f, m: seen.append((f, m)))
    vec_max = embed_image(image, model=tiny, mode="scan", aggregate="max")
    vec_min = embed_image(image, model=tiny, mode="scan", aggregate="min")
    assert vec_mean.shape == (tiny.init_filters * 8,)
    assert np.all(vec_max >= vec_mean - 1e-6) and np.all(vec_mean >= vec_min - 1e-6)
    assert np.any(vec_max > vec_min)
    assert f"of {n_patches}" in seen[-1][1] and seen[-1][0] == 1.0
    assert [f for f, _ in seen if f is not None] == sorted(f for f, _ in seen if f is not None)


def test_point_mode_centres_the_patch_on_the_point(tiny):
    image, labels = body_phantom(**GEOMETRIES["oblique20"], return_labels=True)
    marker = image.index_to_physical(np.argwhere(labels.array == BODY_LABELS["left_marker"])).mean(0)
    from CTFMLib.embed import patch_at_point

    pre = preprocess(image, PreprocessConfig(spacing=(3.0, 1.0, 1.0), crop_foreground=False))
    patch = patch_at_point(pre, marker)
    centre = tuple(np.asarray(PATCH_SIZE) // 2)
    assert patch.shape == PATCH_SIZE
    assert patch[centre] > (1500 + 1024) / 3072  # the 2000 HU marker sits at the centre
    a = embed_image(image, model=tiny, mode="point", point_lps=marker)
    b = embed_image(image, model=tiny, mode="point", point_lps=-marker)
    assert a.shape == b.shape and not np.allclose(a, b)
    with pytest.raises(ImageError, match="outside"):
        embed_image(image, model=tiny, mode="point", point_lps=[500.0, 0.0, 0.0])


def test_channels_last_and_bf16_agree_with_fp32(tiny):
    image = body_phantom(**GEOMETRIES["lps"])
    ref = embed_image(image, model=tiny)
    cl = embed_image(image, model=tiny, channels_last=True)
    np.testing.assert_allclose(cl, ref, rtol=1e-4, atol=1e-5)
    bf = embed_image(image, model=tiny, precision="bf16")
    assert np.corrcoef(bf, ref)[0, 1] > 0.99


def test_unavailable_accelerator_falls_back_to_cpu_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback cannot be observed")
    messages = []
    with pytest.warns(RuntimeWarning, match="no CUDA GPU"):
        device = select_device("cuda", report=lambda f, m: messages.append(m))
    assert device.type == "cpu" and "using the CPU" in messages[0]
    assert select_device("auto").type in ("cpu", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_cancel_stops_a_scan_embedding(tiny):
    image = body_phantom(shape=(80, 70, 24), spacing=(2.0, 2.0, 5.0))
    calls = []

    def cancel_after_first_patch(fraction, message):
        calls.append(message)
        if message.startswith("patch"):
            raise Cancelled()

    with pytest.raises(Cancelled):
        embed_image(image, model=tiny, mode="scan", batch_size=1, progress=cancel_after_first_patch)
    assert sum(m.startswith("patch") for m in calls) == 1


def test_runner_threads_option_is_applied(tiny):
    before = torch.get_num_threads()
    try:
        Runner(tiny, RunOptions(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
