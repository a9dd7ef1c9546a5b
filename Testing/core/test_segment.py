"""Segmentation: MONAI's sliding-window labels in bounded memory, on the input grid, with the card's options."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ctfm_testing.checkpoints import monai_segresnet, write_published_layout
from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom
from ctfm_testing.plugin import ROOT
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.preprocess import preprocess
from CTFMLib.progress import Cancelled
from CTFMLib.runtime import resolve_precision
from CTFMLib.segment import (
    ROI,
    MemoryBudgetError,
    estimate_seconds,
    keep_largest_components,
    segment_image,
)
from CTFMLib.sliding_window import gaussian_importance, plan_windows, stitch

SIX = ["ras", "lps", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "int16", "float32", "permuted", "spl"]
NAMES = {1: "fat", 2: "soft_tissue", 3: "dense", 4: "marker"}


# --- references and test models ----------------------------------------------------------------


def tiny_segresnet(out_channels=5, seed=2, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=2):
    """A small SegResNetDS built by MONAI. Its random head biases would give one class everywhere; small
    ones (a sixth of the logits' spread) let image content pick the class while the bias still counts."""
    model = monai_segresnet(out_channels=out_channels, init_filters=init_filters, blocks_down=blocks_down,
                            dsdepth=dsdepth, seed=seed)
    with torch.no_grad():
        for level in model.up_layers:
            if isinstance(level["head"], nn.Conv3d):
                level["head"].bias.copy_(0.005 * torch.linspace(-1, 1, out_channels))
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "init_filters": init_filters,
              "blocks_down": list(blocks_down), "dsdepth": dsdepth}
    return model, config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(MONAI model, its published-layout folder)``."""
    model, config = tiny_segresnet()
    return model, write_published_layout(model, tmp_path_factory.mktemp("tiny-seg"), config)


def model_card_labels(path, monai_model, roi=ROI):
    """The model card's pipeline with MONAI: preprocessing, SlidingWindowInferer, argmax, back to the input grid."""
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange

    card = Compose([LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
                    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground()])
    x = card(str(path))
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=2, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        labels = inferer(x[None], monai_model)[0].argmax(0).numpy().astype(np.uint8)
    pre = preprocess(read_image(path))
    assert pre.array.shape == labels.shape  # same crop as MONAI's, so the inverse below is the card's Invert
    return pre.to_input(labels)  # issue 2 checked to_input against MONAI's inverse transforms


def assert_meaningful(labels, classes=3, share=0.02):
    """The comparison says something only when several classes each cover a fair share of voxels."""
    counts = np.bincount(labels.ravel()) / labels.size
    assert (counts >= share).sum() >= classes, counts


THRESHOLDS_HU = (-500.5, -30.5, 120.5, 1500.5)  # air | fat | soft tissue | dense (contrast, bone) | marker


class HUThresholds(nn.Module):
    """A voxel-wise 'network': logit k is how far inside HU interval k the voxel lies; no weights, no neighbours."""

    out_channels = len(THRESHOLDS_HU) + 1

    def forward(self, x):
        hu = x * 3072.0 - 1024.0
        edges = (-np.inf,) + THRESHOLDS_HU + (np.inf,)
        return torch.cat([torch.minimum(hu - lo, hi - hu) for lo, hi in zip(edges[:-1], edges[1:])], dim=1)


def threshold_labels(hu: np.ndarray) -> np.ndarray:
    return np.digitize(hu, THRESHOLDS_HU).astype(np.uint8)


# --- stitching -------------------------------------------------------------------------------------------


class PositionalField(nn.Module):
    """Logits that depend on where a voxel sits in its window, so blending matters: x * a_c + field_c."""

    def __init__(self, channels, roi, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.field = torch.randn((1, channels) + tuple(roi), generator=g)
        self.scale = torch.randn((1, channels, 1, 1, 1), generator=g)

    def forward(self, x):
        return x * self.scale + self.field


class ChannelsLastBf16Field(PositionalField):
    """The same logits returned as a bf16 autocast, channels_last_3d network returns them."""

    def forward(self, x):
        return super().forward(x).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("d", [5, 8, 19])
@pytest.mark.parametrize("h", [7, 12, 30])
@pytest.mark.parametrize("w", [4, 10, 23])
def test_streaming_blend_equals_monai_bit_for_bit(d, h, w):
    """Volumes smaller than, equal to and larger than the window along each axis."""
    from monai.inferers import sliding_window_inference

    roi, channels = (8, 12, 10), 4
    model = PositionalField(channels, roi)
    volume = np.random.default_rng(d * 100 + h * 10 + w).random((d, h, w), dtype=np.float32)
    rows = []

    def keep_rows(values):  # (n, H, W, C)
        rows.append(values.clone())
        return values.argmax(-1).numpy().astype(np.uint8)

    ours = stitch(volume, model, channels, roi, overlap=0.625, batch_size=3, reduce=keep_rows)
    ref = sliding_window_inference(torch.from_numpy(volume)[None, None], roi, 1, model, overlap=0.625,
                                   mode="gaussian")[0]
    np.testing.assert_array_equal(ours, ref.argmax(0).numpy())
    blended = torch.cat(rows)[plan_windows(volume.shape, roi, 0.625).crop()]
    assert torch.equal(blended, ref.permute(1, 2, 3, 0))  # the blended values themselves, not only their argmax


@pytest.mark.parametrize("shape", [(5, 30, 23), (19, 12, 4), (8, 7, 10)])
def test_streaming_blend_of_bf16_channels_last_outputs_equals_monai(shape):
    from monai.inferers import sliding_window_inference

    roi, channels = (8, 12, 10), 3
    model = ChannelsLastBf16Field(channels, roi, seed=1)
    volume = np.random.default_rng(7).random(shape, dtype=np.float32)
    rows = []
    stitch(volume, model, channels, roi, batch_size=2, reduce=lambda v: rows.append(v.clone()) or np.zeros(v.shape[:3]))
    ref = sliding_window_inference(torch.from_numpy(volume)[None, None], roi, 1, lambda x: model(x).float(),
                                   overlap=0.625, mode="gaussian")[0]
    blended = torch.cat(rows)[plan_windows(shape, roi, 0.625).crop()]
    assert torch.equal(blended, ref.permute(1, 2, 3, 0))


def test_window_layout_and_weights_are_monais():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for shape in [(224, 202, 244), (112, 101, 122), (96, 160, 160), (400, 512, 512), (30, 77, 161)]:
        plan = plan_windows(shape, ROI, 0.625)
        padded = tuple(max(s, r) for s, r in zip(shape, ROI))
        slices = dense_patch_slices(padded, ROI, _get_scan_interval(padded, ROI, 3, (0.625,) * 3))
        ours = [(z, y, x) for z, group in plan.z_groups() for y, x in group]
        assert ours == [tuple(s.start for s in sl) for sl in slices]
    assert torch.equal(gaussian_importance(ROI), compute_importance_map(ROI, mode="gaussian", sigma_scale=0.125))


@pytest.mark.slow
def test_blending_memory_is_one_window_deep():
    """C x D x H x W would be 500 MB here; the ring of one window's depth is 17 MB."""
    code = f"""
import resource, sys
import numpy as np, torch
sys.path.insert(0, {str(ROOT / 'CTFM')!r})
from CTFMLib.sliding_window import stitch
torch.set_num_threads(1)
volume = np.random.default_rng(0).random((480, 64, 64), dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = stitch(volume, lambda x: x.expand(-1, 64, -1, -1, -1) * torch.linspace(0, 1, 64)[None, :, None, None, None],
                64, (16, 32, 32))
assert labels.shape == volume.shape and labels.max() == 63
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 150, f"peak memory grew by {grown_mb:.0f} MB"


# --- the model card's labels ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_ct_labels_equal_model_card(example_ct_path, tiny):
    """Default window (96x160x160) on the native 3 mm CT: 2 windows along axis 0, padding in the others."""
    monai_model, folder = tiny
    ref = model_card_labels(example_ct_path, monai_model)
    assert_meaningful(ref)
    image = read_image(example_ct_path)
    result = segment_image(image, weights=folder, labels=NAMES, device="cpu", precision="fp32", quality="full",
                           spacing="native")
    assert result.labels.geometry.same_grid(image.geometry, atol=0)
    assert result.labels.array.dtype == np.uint8
    assert (result.labels.array == ref).mean() >= 0.999
    bf16 = segment_image(image, weights=folder, labels=NAMES, device="cpu", precision="bf16", quality="full",
                         spacing="native")
    assert (bf16.labels.array == ref).mean() >= 0.99


@pytest.mark.slow
def test_real_ct_resampled_to_1p5mm_equals_model_card(example_ct_path, tiny, tmp_path):
    """A 40-slice slab of the CT resampled to 1.5 mm: 80 x 202 x 244 voxels, 6 windows (whole volume: the benchmark)."""
    import SimpleITK as sitk

    monai_model, folder = tiny
    ct = sitk.ReadImage(str(example_ct_path))[:, :, 36:76]
    size = [int(round(n * s / 1.5)) for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    fine = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), (1.5, 1.5, 1.5),
                         ct.GetDirection(), -1024, ct.GetPixelID())
    path = tmp_path / "ct_1p5mm.nii.gz"
    sitk.WriteImage(fine, str(path))
    ref = model_card_labels(path, monai_model)
    assert_meaningful(ref)
    result = segment_image(read_image(path), weights=folder, labels=NAMES, device="cpu", precision="fp32",
                           quality="full", spacing="native")
    assert (result.labels.array == ref).mean() >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("out_channels", [5, 3])  # 5 > 4 features: features are blended; 3: logits are
def test_phantom_labels_equal_model_card_with_many_windows(tmp_path, out_channels):
    monai_model, config = tiny_segresnet(out_channels=out_channels)
    folder = write_published_layout(monai_model, tmp_path / "model", config)
    path = write_image(body_phantom(shape=(60, 56, 40), spacing=(2.0, 2.0, 3.0)), tmp_path / "phantom.nii.gz")
    roi = (32, 40, 40)
    ref = model_card_labels(path, monai_model, roi=roi)
    assert_meaningful(ref, classes=2)
    result = segment_image(read_image(path), weights=folder, labels={1: "a"}, roi=roi, device="cpu", precision="fp32",
                           quality="full", spacing="native")
    assert "windows of 32x40x40" in result.notes[0] and not result.notes[0].startswith("1 window ")
    assert (result.labels.array == ref).mean() >= 0.999
    assert [x.name for x in result.label_info] == ["a", "label_2", "label_3", "label_4"][: out_channels - 1]


# --- geometry ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("geometry", SIX)
def test_voxelwise_model_gives_its_labels_exactly_on_the_input_grid(geometry):
    image = body_phantom(**GEOMETRIES[geometry])
    expected = threshold_labels(image.array)
    for roi in [(16, 24, 24), ROI]:
        result = segment_image(image, model=HUThresholds(), labels=NAMES, roi=roi, device="cpu", precision="fp32")
        assert result.labels.geometry.same_grid(image.geometry, atol=0)
        np.testing.assert_array_equal(result.labels.array, expected)
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4}


def test_fast_mode_returns_labels_on_the_input_grid_in_place():
    image, truth = body_phantom(shape=(96, 96, 40), spacing=(1.0, 1.0, 2.5), noise_hu=0, return_labels=True)
    seen = []
    result = segment_image(image, model=HUThresholds(), labels=NAMES, fast=True, roi=(16, 24, 24), device="cpu",
                           precision="fp32", progress=lambda f, m: seen.append(m))
    assert result.labels.geometry.same_grid(image.geometry, atol=0)
    assert any("3 mm" in m for m in seen) and "resampled to 3 mm" in result.notes[0]
    expected = threshold_labels(image.array)
    assert 0.85 < (result.labels.array == expected).mean() < 1.0  # coarser, not a different image
    marker = image.index_to_physical(np.argwhere(truth.array == BODY_LABELS["left_marker"])).mean(0)
    found = image.index_to_physical(np.argwhere(result.labels.array == 4)).mean(0)
    assert np.linalg.norm(found - marker) < 3.0


# --- options ------------------------------------------------------------------------------------------------


def test_structures_keep_only_the_named_labels():
    image = body_phantom(**GEOMETRIES["oblique20"])
    expected = threshold_labels(image.array)
    result = segment_image(image, model=HUThresholds(), labels=NAMES, structures=["dense", "Marker"], device="cpu")
    np.testing.assert_array_equal(result.labels.array, np.where(np.isin(expected, [3, 4]), expected, 0))
    assert [(x.value, x.name) for x in result.label_info] == [(3, "dense"), (4, "marker")]
    with pytest.raises(ValueError, match="unknown structure.*'liver'.*fat, soft_tissue, dense, marker"):
        segment_image(image, model=HUThresholds(), labels=NAMES, structures=["liver"], device="cpu")
    # a misspelt name gets the structure it most likely meant
    with pytest.raises(ValueError, match=r"unknown structures 'soft tisue' \(did you mean soft_tissue\?\), 'liver';"):
        segment_image(image, model=HUThresholds(), labels=NAMES, structures=["soft tisue", "liver"], device="cpu")


def test_largest_component_per_structure():
    hu = np.full((40, 40, 40), -1000, np.int16)
    hu[5:15, 5:15, 5:15] = 60  # soft tissue: big cube ...
    hu[25:28, 25:28, 25:28] = 60  # ... and a small one
    hu[20:30, 2:6, 2:6] = 1000  # dense: a bar ...
    hu[30, 6, 6] = 1000  # ... touching only diagonally (26-connected): kept
    hu[35:37, 35:37, 35:37] = 1000  # ... and a separate small blob: removed
    image = Image(hu, spacing=(1.0, 1.0, 1.0))
    plain = segment_image(image, model=HUThresholds(), labels=NAMES, device="cpu").labels.array
    np.testing.assert_array_equal(plain, threshold_labels(hu))
    cleaned = segment_image(image, model=HUThresholds(), labels=NAMES, largest_component=True, device="cpu")
    cleaned = cleaned.labels.array
    expected = threshold_labels(hu)
    expected[25:28, 25:28, 25:28] = 0
    expected[35:37, 35:37, 35:37] = 0
    np.testing.assert_array_equal(cleaned, expected)
    assert cleaned[30, 6, 6] == 3
    # and directly, on a label map with a structure absent
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:3, 0:3, 0:3], labels[6:8, 6:8, 6:8], labels[5, 0, 0] = 2, 2, 7
    out = keep_largest_components(labels.copy(), [1, 2, 7])
    assert (out == 2).sum() == 27 and (out == 7).sum() == 1


def test_cancel_stops_between_windows():
    image = body_phantom(**GEOMETRIES["lps"])
    messages = []

    def cancel_at_second_window(fraction, message):
        messages.append(message)
        if message.startswith("window 2 "):
            raise Cancelled()

    with pytest.raises(Cancelled):
        segment_image(image, model=HUThresholds(), labels=NAMES, roi=(16, 24, 24), progress=cancel_at_second_window)
    windows = [m for m in messages if m.startswith("window")]
    assert windows[0].startswith("window 1 of ") and len(windows) == 2


def test_memory_budget_refuses_before_allocating(tiny):
    _, folder = tiny
    image = body_phantom(**GEOMETRIES["lps"])
    with pytest.raises(MemoryBudgetError, match=r"needs about \d+\.\d GB.*0\.0 GB allowed.*--fast"):
        segment_image(image, weights=folder, max_memory_gb=0.001, device="cpu")


def test_bad_inputs_are_refused_clearly():
    image = body_phantom(**GEOMETRIES["lps"])
    with pytest.raises(ImageError, match="Hounsfield"):
        segment_image(image.with_array(np.clip(image.array, 0, 1).astype(np.float32)), model=HUThresholds())
    with pytest.raises(ImageError, match="modality is MR"):
        segment_image(Image(image.array, metadata={"modality": "MR"}), model=HUThresholds())
    with pytest.raises(ValueError, match="weights"):
        segment_image(image)


def test_expected_time_follows_the_window_count():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    def monai_windows(shape):
        padded = tuple(max(s, r) for s, r in zip(shape, ROI))
        return len(dense_patch_slices(padded, ROI, _get_scan_interval(padded, ROI, 3, (0.625,) * 3)))

    # LPS images of increasing height: the model grid (SPL) is (k, j, i)
    shapes = [(160, 160, 96), (160, 160, 200), (512, 512, 400)]
    times = [estimate_seconds(Image(np.zeros(s, np.int16)), device="cpu", precision="fp32") for s in shapes]
    counts = [monai_windows(s[::-1]) for s in shapes]
    assert counts[0] < counts[1] < counts[2] and times[0] < times[1] < times[2]
    per_window = [(t2 - t1) for t1, t2 in zip(times, times[1:])]
    assert per_window[1] / per_window[0] == pytest.approx((counts[2] - counts[1]) / (counts[1] - counts[0]), rel=0.1)
    big = Image(np.zeros((512, 512, 400), np.int16), spacing=(0.8, 0.8, 1.5))
    assert estimate_seconds(big, fast=True, device="cpu") < estimate_seconds(big, device="cpu") / 20
    assert estimate_seconds(big, device="cpu", precision="bf16") < estimate_seconds(big, device="cpu", precision="fp32")


def test_default_precision_follows_the_cpu():
    with open("/proc/cpuinfo") as f:
        flags = set(next(ln for ln in f if ln.startswith("flags")).split())
    expected = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_cuda_request_without_a_gpu_runs_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback cannot be observed")
    image = body_phantom(**GEOMETRIES["lps"])
    with pytest.warns(RuntimeWarning, match="no CUDA GPU"):
        result = segment_image(image, model=HUThresholds(), labels=NAMES, device="cuda")
    assert any("device cpu" in n for n in result.notes)
    np.testing.assert_array_equal(result.labels.array, threshold_labels(image.array))
