"""Segmentation fine-tuning (CTFMLib.train.segmentation, crops): loss, crops, augmentation, cache, the task,
`ctfm train segment`, and overfitting the real example CT."""

import json

import numpy as np
import pytest
import torch

from ctfm_testing.data import require_shared_data
from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom
from ctfm_testing.plugin import run_ctfm
from CTFMLib.image import read_image, write_image
from CTFMLib.train.config import load_config
from CTFMLib.train.crops import affine_matrix, augment, crop_window, extract, warp
from CTFMLib.train.segmentation import (
    LabelledScan,
    LabelledScanCache,
    SegmentTask,
    deep_supervision_loss,
    dice_scores,
    index_samples,
    resolve_classes,
    sample_crop,
)

NO_AUGMENT = {"affine_p": 0.0, "smooth_p": 0.0, "intensity_scale_p": 0.0, "intensity_shift_p": 0.0, "noise_p": 0.0}


def tiny_config(**segment):
    return load_config(None, "segment", {
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1], "weights": None},
        "run": {"scans_per_step": 2, "device": "cpu", "log_every": 1},
        "optim": {"warmup_steps": 0},
        "segment": {"crop_size": [16, 32, 32], "dsdepth": 2, **segment},
    })


# --- loss and metric -------------------------------------------------------------------------


def test_deep_supervision_dice_ce_equals_monai():
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    reference = DeepSupervisionLoss(DiceCELoss(softmax=True, to_onehot_y=True, include_background=True,
                                               squared_pred=True, smooth_nr=0, smooth_dr=1e-5), weight_mode="exp")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 1, 8, 16, 16), generator=g)
    target[1] = torch.where(target[1] == 3, 0, target[1])  # a class absent from one sample
    outputs = [torch.randn(2, 5, 8 // 2**k, 16 // 2**k, 16 // 2**k, generator=g) for k in range(3)]
    ours = deep_supervision_loss(outputs, target)
    theirs = reference(outputs, target.float())  # MONAI resizes the target itself, which needs floats
    assert abs(float(ours) - float(theirs)) < 1e-5
    single = deep_supervision_loss(outputs[0], target)
    assert abs(float(single) - float(DiceCELoss(softmax=True, to_onehot_y=True, squared_pred=True, smooth_nr=0,
                                                smooth_dr=1e-5)(outputs[0], target.float()))) < 1e-5


def test_dice_scores_count_each_class():
    rng = np.random.default_rng(1)
    prediction = rng.integers(0, 4, (6, 7, 8))
    reference = rng.integers(0, 3, (6, 7, 8))  # class 3 only predicted: Dice 0; class 4 nowhere: nan
    got = dice_scores(prediction, reference, 4)
    for c in (1, 2, 3):
        a, b = prediction == c, reference == c
        assert got[c - 1] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert got[2] == 0.0 and np.isnan(got[3])


# --- crops and augmentation ------------------------------------------------------------------


def test_crops_stay_inside_and_small_volumes_are_centred_in_air():
    volume = np.arange(5 * 40 * 50, dtype=np.float32).reshape(5, 40, 50)
    starts = crop_window(volume.shape, (8, 16, 16), (2, 0, 49))
    assert starts == [-1, 0, 34]  # 3 voxels of air, 1 before (MONAI's symmetric pad); clipped at the edges
    crop = extract(volume, starts, (8, 16, 16), fill=-1.0)
    assert np.array_equal(crop[1:6], volume[:, 0:16, 34:50])
    assert (crop[0] == -1).all() and (crop[6:] == -1).all()


def test_label_balanced_crops_centre_on_each_chosen_structure_equally():
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[:, :30, :] = 1  # large
    labels[10, 35, 35] = 2  # a single voxel
    labels[5, 5, 5] = 3  # not chosen
    scan = LabelledScan(np.zeros(labels.shape, np.float32), labels, index_samples(labels, 0))
    rng = np.random.default_rng(0)
    centres = []
    for _ in range(400):
        _, crop = sample_crop(scan, (4, 8, 8), [1, 2], rng)
        centres.append(int(crop[2, 4, 4]))
    share_tiny = centres.count(2) / len(centres)
    assert 0.4 < share_tiny < 0.6 and centres.count(0) == 0 and centres.count(3) == 0


def test_warp_rotates_in_voxel_space_and_keeps_labels_whole():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.random((1, 1, 6, 9, 9), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, (1, 1, 6, 9, 9)))
    same, same_labels = warp(image, labels, np.eye(3))
    assert torch.allclose(same, image, atol=1e-5) and torch.equal(same_labels, labels)
    # A quarter turn in the (H, W) plane: output (d, h, w) samples input (d, 8 - w, h) about the centre.
    turned, turned_labels = warp(image, labels, affine_matrix((np.pi / 2, 0.0, 0.0), (1.0, 1.0, 1.0)))
    d, h, w = np.meshgrid(np.arange(6), np.arange(9), np.arange(9), indexing="ij")
    expected = image[0, 0].numpy()[d, 8 - w, h]
    assert np.allclose(turned[0, 0].numpy(), expected, atol=1e-5)
    assert np.array_equal(turned_labels[0, 0].numpy(), labels[0, 0].numpy()[d, 8 - w, h])


def test_augmentation_is_a_function_of_its_seed_and_changes_only_what_it_should():
    rng = np.random.default_rng(3)
    image = rng.random((16, 16, 16), dtype=np.float32)
    labels = rng.integers(0, 3, (16, 16, 16))
    everything = {"affine_p": 1.0, "rotate": 0.26, "scale": 0.2, "smooth_p": 1.0, "smooth_sigma": [0.5, 1.0],
                  "intensity_scale_p": 1.0, "intensity_scale": 0.3, "intensity_shift_p": 1.0,
                  "intensity_shift": 0.1, "noise_p": 1.0, "noise_std": 0.1, "flip_p": 0.5}
    a = augment(image, labels, np.random.default_rng(7), everything)
    b = augment(image, labels, np.random.default_rng(7), everything)
    c = augment(image, labels, np.random.default_rng(8), everything)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert set(torch.unique(a[1]).tolist()) <= {0, 1, 2} and a[1].dtype == torch.int64
    x, y = augment(image, labels, np.random.default_rng(7), {**NO_AUGMENT, "intensity_shift_p": 1.0,
                                                                "intensity_shift": 0.1})
    offset = (x[0].numpy() - image)
    assert np.ptp(offset) < 1e-6 and 0 < abs(offset.mean()) <= 0.1 and np.array_equal(y[0].numpy(), labels)


# --- data ------------------------------------------------------------------------------------


def write_pair(folder, name, **geometry):
    image, labels = body_phantom(**geometry, seed=len(name), return_labels=True)
    write_image(image, folder / f"{name}.nii.gz")
    write_image(labels, folder / f"{name}_seg.nii.gz")
    return image, labels


@pytest.mark.parametrize("geometry", ["oblique20", "permuted", "aniso_0.7x0.7x5"])
def test_cache_carries_labels_onto_the_model_grid_with_the_image(tmp_path, geometry):
    write_pair(tmp_path, "a", **GEOMETRIES[geometry])
    (tmp_path / "list.csv").write_text("path,segmentation\na.nii.gz,a_seg.nii.gz\n")  # relative to the CSV
    from CTFMLib.train.data import find_scans

    scans = find_scans([tmp_path / "list.csv"])
    spacing = (6.0, 1.5, 1.5) if geometry.startswith("aniso") else None
    cache = LabelledScanCache(tmp_path / "cache", spacing=spacing)
    usable, skipped = cache.prepare(scans, workers=0)
    assert skipped == [] and len(usable) == 1
    item = cache.get(scans[0])
    assert item.image.shape == item.labels.shape
    # The phantom is defined in physical space: evaluated at the model grid's voxel centres it gives the
    # labels each cached voxel must carry (exactly without resampling; nearest neighbour with it).
    from CTFMLib.preprocess import PreprocessConfig, preprocess

    grid = preprocess(read_image(tmp_path / "a.nii.gz"), PreprocessConfig(spacing=spacing)).geometry
    _, truth = body_phantom(shape=grid.shape, spacing=grid.spacing, direction=grid.direction, origin=grid.origin,
                            return_labels=True)
    if spacing is None:
        assert np.array_equal(item.labels, truth.array)
    else:
        assert (item.labels == truth.array).mean() > 0.95
        # Nearest neighbour from 5 mm slices to 6 mm moves boundaries along S by up to 2.5 mm: the short
        # kidneys lose a slice (Dice ~0.8), the long liver and aorta keep their shape.
        for organ in ("liver", "aorta"):
            a, b = item.labels == BODY_LABELS[organ], truth.array == BODY_LABELS[organ]
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    assert set(item.present) <= set(BODY_LABELS.values()) and BODY_LABELS["liver"] in item.present
    for value in item.present[:3]:
        assert (item.labels.ravel()[item.samples[value]] == value).all()


def test_cache_skips_pairs_it_cannot_use_and_says_why(tmp_path):
    _, labels = write_pair(tmp_path, "good")
    write_pair(tmp_path, "other", shape=(40, 40, 30))
    float_labels = labels.with_array(labels.array.astype(np.float32) + 0.5)
    write_image(float_labels, tmp_path / "fractional_seg.nii.gz")
    from CTFMLib.train.data import ScanRef

    rows = [("good", "good_seg"), ("other", "good_seg")]  # the second: a label map of another grid
    scans = [ScanRef(tmp_path / f"{a}.nii.gz", label={"segmentation": f"{b}.nii.gz"}, base=str(tmp_path))
             for a, b in rows]
    scans.append(ScanRef(tmp_path / "good.nii.gz", label={"segmentation": "fractional_seg.nii.gz"},
                         base=str(tmp_path), key="fractional"))
    usable, skipped = LabelledScanCache(tmp_path / "cache").prepare(scans, workers=0)
    assert [s.path for s in usable] == [str(tmp_path / "good.nii.gz")]
    reasons = dict((s.key, r) for s, r in skipped)
    assert "not on its scan's voxel grid" in reasons[scans[1].key]
    assert "non-integer" in reasons["fractional"]


def test_structures_resolve_by_name_or_value():
    present = [1, 5, 20]
    assert resolve_classes("totalsegmentator", ["liver", "Spleen", 20], present) == [
        (5, "liver"), (1, "spleen"), (20, "colon")]
    assert resolve_classes(None, [], present) == [(1, "label_1"), (5, "label_5"), (20, "label_20")]
    with pytest.raises(ValueError, match="'livr'.*known names"):
        resolve_classes("totalsegmentator", ["livr"], present)
    with pytest.raises(ValueError, match="none of the chosen label values"):
        resolve_classes({"7": "tumor"}, [], present)


# --- the task --------------------------------------------------------------------------------


def phantom_items(n=2):
    items = []
    for i in range(n):
        image, labels = body_phantom(shape=(40, 40, 24), spacing=(2.5, 2.5, 4.0), seed=i, return_labels=True)
        from CTFMLib.preprocess import preprocess

        pre = preprocess(image)
        items.append((pre.array, pre.to_model(labels.array)))
    return items


def test_batches_are_a_function_of_the_step_and_split_over_processes():
    task = SegmentTask(tiny_config(), [(3, "liver"), (4, "spleen")], phantom_items())
    whole = task.batch(5, 0, 1)
    halves = [task.batch(5, r, 2) for r in range(2)]
    assert torch.equal(whole["x"], torch.cat([h["x"] for h in halves]))
    assert torch.equal(whole["y"], torch.cat([h["y"] for h in halves]))
    assert torch.equal(task.batch(5)["x"], whole["x"]) and not torch.equal(task.batch(6)["x"], whole["x"])
    assert whole["x"].shape == (2, 1, 16, 32, 32) and set(torch.unique(whole["y"]).tolist()) <= {0, 1, 2}


def test_task_refuses_crops_the_network_cannot_take():
    with pytest.raises(ValueError, match="divisible by 4"):
        SegmentTask(tiny_config(crop_size=[16, 30, 32]), [(3, "liver")], phantom_items(1))


@pytest.mark.slow
def test_frozen_encoder_keeps_its_weights_and_statistics(tmp_path):
    from CTFMLib.train.trainer import train

    task = SegmentTask(tiny_config(freeze_encoder=True, augment=NO_AUGMENT), [(3, "liver")], phantom_items())
    before = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    train(task, tmp_path / "run", max_steps=3)
    from CTFMLib.weights import load_model

    net, _ = load_model(tmp_path / "run" / "model", expect="SegResNetDS")
    after = net.state_dict()
    encoder_keys = [k for k in before if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("up_layers."))


@pytest.mark.slow
def test_validation_dice_equals_segmenting_the_scan(tmp_path):
    """The loop's sliding-window validation and segment_image on the exported folder agree."""
    from CTFMLib.preprocess import preprocess
    from CTFMLib.segment import segment_image
    from CTFMLib.train.trainer import train

    image, labels = body_phantom(shape=(40, 40, 24), spacing=(2.5, 2.5, 4.0), seed=4, return_labels=True)
    pre = preprocess(image)
    val = (pre.array, pre.to_model(labels.array))
    config = tiny_config(augment=NO_AUGMENT)
    config["run"]["val_every"] = 4
    config["optim"]["lr"] = 3e-3
    task = SegmentTask(config, [(BODY_LABELS["liver"], "liver"), (BODY_LABELS["soft_tissue"], "soft_tissue")],
                       phantom_items(), [val])
    train(task, tmp_path / "run", max_steps=8)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "val_dice" in rows[0]
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    val_dice = exported["_validation"]["dice"]
    assert exported["_training"]["crop_size"] == [16, 32, 32]
    assert json.loads((tmp_path / "run" / "model" / "labels.json").read_text()) == {
        "1": {"name": "liver"}, "2": {"name": "soft_tissue"}}
    # validation slides with segment.val_overlap (the card's 0.625): the full quality
    result = segment_image(image, weights=str(tmp_path / "run" / "model"), device="cpu", precision="fp32",
                           quality="full")
    scores = []
    for channel, value in ((1, BODY_LABELS["liver"]), (2, BODY_LABELS["soft_tissue"])):
        a, b = result.labels.array == channel, labels.array == value
        scores.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.mean(scores) == pytest.approx(val_dice, abs=2e-3)
    assert [x.name for x in result.label_info] == ["liver", "soft_tissue"]


@pytest.mark.slow
def test_ctfm_train_segment_from_a_csv(tmp_path):
    for name in ("a", "b"):
        write_pair(tmp_path, name, shape=(40, 40, 24), spacing=(2.5, 2.5, 4.0))
    (tmp_path / "list.csv").write_text("path,segmentation\na.nii.gz,a_seg.nii.gz\nb.nii.gz,b_seg.nii.gz\n")
    config = tmp_path / "seg.json"
    config.write_text(json.dumps({
        "data": {"source": [str(tmp_path / "list.csv")], "workers": 0, "val_fraction": 0.5},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1], "weights": None},
        "run": {"scans_per_step": 1, "val_every": 2},
        "segment": {"labels": {"3": "liver", "4": "spleen"}, "crop_size": [16, 32, 32], "dsdepth": 2},
    }))
    result = run_ctfm("train", "segment", "--config", config, "--out", tmp_path / "out", "--max-steps", "2",
                      "--device", "cpu", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["scans"] == 2 and summary["steps"] == 2
    from CTFMLib.segment import load_segmentation_model

    net, labels = load_segmentation_model(str(tmp_path / "out" / "model"))
    assert [x.name for x in labels] == ["liver", "spleen"] and net.out_channels == 3
    assert net.ctfm_window == (16, 32, 32)

    missing = tmp_path / "nolabels.csv"
    missing.write_text("path\na.nii.gz\n")
    config.write_text(json.dumps({"data": {"source": [str(missing)]}, "model": {"weights": None}}))
    refused = run_ctfm("train", "segment", "--config", config, "--out", tmp_path / "out2", timeout=120)
    assert refused.returncode != 0 and "'segmentation'" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(tmp_path):
    """`torchrun -m CTFMLib.cli train segment` with 2 CPU processes (gloo) == 1 process, same global batch."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ctfm_testing.processes import child_env, free_port

    for name in ("a", "b"):
        write_pair(tmp_path, name, shape=(40, 40, 24), spacing=(2.5, 2.5, 4.0))
    (tmp_path / "list.csv").write_text("path,segmentation\na.nii.gz,a_seg.nii.gz\nb.nii.gz,b_seg.nii.gz\n")
    config = tmp_path / "seg.json"
    config.write_text(json.dumps({
        "data": {"source": [str(tmp_path / "list.csv")], "workers": 0},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1], "weights": None},
        "run": {"scans_per_step": 2, "deterministic": True}, "optim": {"warmup_steps": 0},
        "segment": {"labels": {"3": "liver"}, "crop_size": [16, 32, 32], "dsdepth": 2}}))
    cli = ["-m", "CTFMLib.cli", "train", "segment", "--config", str(config), "--max-steps", "3", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    runs = (launch + cli + ["--out", str(tmp_path / "two")], [sys.executable] + cli + ["--out", str(tmp_path / "one")])
    for cmd in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) < 1e-5
    assert any(not torch.equal(one[k], SegmentTask(tiny_config(), [(3, "liver")], phantom_items(1)).build_model()
                               .state_dict()[k]) for k in one)  # it did train


# --- the real CT -----------------------------------------------------------------------------


@pytest.mark.slow
def test_finetuning_overfits_the_example_ct(tmp_path):
    """Five largest structures of example_seg, learned from example_ct_sm alone, segmented back: mean Dice >= 0.8.

    Trained on a 6 mm grid (``segment.spacing``), segmented at the model's spacing and scored on the native 3 mm
    grid: the same learning, resampling and export path as at 3 mm, in a third of the time (a small 3D network's
    steps on 2 CPU cores cost about the same from 8 to 32 filters, so the grid is what can shrink)."""
    folder = require_shared_data("totalsegmentator_example")
    from CTFMLib.segment import segment_image
    from CTFMLib.train.run import run

    reference = read_image(folder / "example_seg.nii.gz").array
    counts = np.bincount(reference.ravel())
    counts[0] = 0
    largest = [int(v) for v in np.argsort(counts)[::-1][:5]]
    (tmp_path / "data.csv").write_text(f"path,segmentation\n{folder / 'example_ct_sm.nii.gz'},"
                                       f"{folder / 'example_seg.nii.gz'}\n")
    config = tmp_path / "seg.json"
    config.write_text(json.dumps({
        "data": {"source": [str(tmp_path / "data.csv")], "workers": 0},
        # A small network on crops nearly as large as the scan (15 x 51 x 61 voxels of 6 mm, SPL).
        "model": {"init_filters": 8, "blocks_down": [1, 1, 1], "weights": None},
        "optim": {"lr": 1e-2, "warmup_steps": 5, "max_steps": 80, "grad_clip": 1.0},
        "run": {"scans_per_step": 1, "device": "cpu", "log_every": 10, "checkpoint_every": 1000},
        "segment": {"labels": "totalsegmentator", "structures": largest, "spacing": [6.0, 6.0, 6.0],
                    "crop_size": [16, 48, 64], "dsdepth": 2,
                    "augment": NO_AUGMENT},
    }))
    summary = run("segment", config, tmp_path / "run")
    assert summary["steps"] == 80
    losses = [float(r.split(",")[1]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert losses[-1] < 0.5 * losses[0]

    image = read_image(folder / "example_ct_sm.nii.gz")
    result = segment_image(image, weights=str(tmp_path / "run" / "model"), device="cpu", precision="fp32")
    dice = []
    for channel, value in enumerate(largest, start=1):
        a, b = result.labels.array == channel, reference == value
        dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    print("Dice of the five largest structures:", dict(zip([x.name for x in result.label_info], np.round(dice, 3))))
    assert np.mean(dice) >= 0.8
