"""The CT-FM Segment panel's plan on a real MRML scene (slicer-core): the same code as ``ctfm segment --plan``.

What the panel shows before the user clicks (working spacing, windows, expected time per
preset, peak memory) is :func:`CTFMLib.segment_plan.plan_segmentation` given what the child
process would be given: the volume in world LPS (``CTFMSlicer.nodes.image_from_volume_node``,
which the child's input file is written from), the model's facts from its ``config.json`` and
the catalogue, and the device as the child resolves it. Each test compares the logic's plan
with ``plan_segmentation`` called here on the volume converted by ``image_from_volume_node``
and on facts read here from the files (the catalogue as JSON). The panel's path must not
import torch: it runs in a child Python where importing torch fails.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import GEOMETRIES, body_phantom  # noqa: E402
from CTFMLib.image import Image  # noqa: E402
from CTFMLib.segment_plan import QUALITIES, ROI, model_facts, plan_segmentation, planned_run  # noqa: E402
from CTFMSegmentLib import plan as segment_plan  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic  # noqa: E402
from CTFMSlicer.nodes import image_from_volume_node, volume_node_from_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def catalogue_entry(model_id="whole_body_segmentation") -> dict:
    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))
    return next(m for m in catalogue["models"] if m["id"] == model_id)


def whole_body_spacing() -> tuple:
    spacing = catalogue_entry()["spacing"]
    assert spacing and len(spacing) == 3  # the catalogue records the whole-body model's training spacing
    return tuple(float(v) for v in spacing)


def reference_plan(volume, quality, spacing="model", model_spacing=None, device="cpu", config=None, **facts):
    """plan_segmentation on the volume as the child receives it, with the facts of an unloaded published model."""
    defaults = model_facts(config, None)  # width, classes, window and parameter estimate from a config
    defaults.update(facts)
    run_device, precision, threads = planned_run(device, "auto", None)
    return plan_segmentation(
        image_from_volume_node(volume), quality=quality, spacing=spacing, model_spacing=model_spacing,
        roi=defaults["roi"], classes=defaults["classes"], filters=defaults["filters"],
        parameters=defaults["parameters"], device=run_device, precision=precision, threads=threads)


def body_volume(geometry="lps", **overrides):
    kwargs = dict(GEOMETRIES[geometry])
    kwargs.update(overrides)
    return volume_node_from_image(body_phantom(**kwargs), name="ct")


# --- the plan is plan_segmentation on the same voxels and geometry ----------------------------------------


@pytest.mark.parametrize("geometry", ["lps", "oblique20", "permuted"])
@pytest.mark.parametrize("spacing", ["model", "native"])
def test_whole_body_plan_equals_plan_segmentation(mrml_scene, ctfm_cache, geometry, spacing):
    volume = body_volume(geometry)
    logic = CTFMSegmentLogic()
    for quality in QUALITIES:
        plan = logic.segmentationPlan(volume, "whole-body", None, quality, spacing, "cpu")
        expected = reference_plan(volume, quality, spacing, model_spacing=whole_body_spacing())
        assert plan.to_dict() == expected.to_dict(), quality
        assert plan.quality == quality and plan.overlap == QUALITIES[quality][0]
    # the panel's default: the spacing the model was trained at
    plan = logic.segmentationPlan(volume, "whole-body", None, "standard", "model", "cpu")
    assert plan.model_spacing == whole_body_spacing()


def test_a_volume_under_a_linear_transform_is_planned_in_world_coordinates(mrml_scene, ctfm_cache):
    """The child gets the volume with its parent transform folded in; so does the plan."""
    volume = body_volume("lps", spacing=(0.8, 0.8, 2.0))
    logic = CTFMSegmentLogic()
    local = logic.segmentationPlan(volume, "whole-body", None, "full", "native", "cpu").to_dict()
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    rotate = np.eye(4)
    rotate[:3, :3] = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]  # 90 degrees about A-P: S and L swap roles
    rotate[:3, 3] = (25.0, -10.0, 4.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(rotate))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    for quality in QUALITIES:
        plan = logic.segmentationPlan(volume, "whole-body", None, quality, "native", "cpu").to_dict()
        assert plan == reference_plan(volume, quality, "native", model_spacing=whole_body_spacing()).to_dict()
    moved = logic.segmentationPlan(volume, "whole-body", None, "full", "native", "cpu").to_dict()
    assert moved["working"]["spacing_mm"] != local["working"]["spacing_mm"]  # 2 mm is now along L, not S
    # a non-linear parent transform is refused, as image_from_volume_node refuses it
    grid = mrml_scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="non-linear"):
        logic.segmentationPlan(volume, "whole-body", None, "full", "native", "cpu")
    assert logic.expectedSeconds(volume, "full", "cpu", "whole-body", None, "native") is None


def test_a_folder_model_plans_with_its_own_config(mrml_scene, ctfm_cache, tmp_path):
    """A model trained by ``ctfm train segment`` records its spacing and window; a folder has no catalogue entry."""
    config = {"architecture": "SegResNetDS", "init_filters": 8, "blocks_down": [1, 2, 2, 4], "out_channels": 4,
              "_training": {"spacing": [2.0, 1.5, 1.5], "crop_size": [64, 96, 96]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # the plan does not read the weights
    volume = body_volume("oblique20")
    logic = CTFMSegmentLogic()
    for quality in QUALITIES:
        plan = logic.segmentationPlan(volume, "folder", tmp_path, quality, "model", "cpu")
        expected = reference_plan(volume, quality, "model", model_spacing=(2.0, 1.5, 1.5), config=config)
        assert plan.to_dict() == expected.to_dict()
    assert plan.roi == (64, 96, 96)
    # the config changes in place (retrained): the next plan reads it again
    config["_training"]["spacing"] = [3.0, 3.0, 3.0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.utime(tmp_path / "config.json", ns=(1, 1))  # a different modification time, whatever the clock's resolution
    plan = logic.segmentationPlan(volume, "folder", tmp_path, "full", "model", "cpu")
    assert plan.model_spacing == (3.0, 3.0, 3.0)


def test_an_imported_whole_body_model_plans_with_its_config_and_the_catalogue_spacing(mrml_scene, ctfm_cache):
    """As CTFMLib.model_store.resolve finds it: the import under the catalogue entry's repo id, then the catalogue's spacing."""
    config = {"architecture": "SegResNetDS", "init_filters": 16, "out_channels": 118}
    folder = ctfm_cache / "models" / catalogue_entry()["repo_id"].replace("/", "--")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    volume = body_volume("lps")
    plan = CTFMSegmentLogic().segmentationPlan(volume, "whole-body", None, "standard", "model", "cpu")
    expected = reference_plan(volume, "standard", "model", model_spacing=whole_body_spacing(), config=config)
    assert plan.to_dict() == expected.to_dict()
    published = reference_plan(volume, "standard", "model", model_spacing=whole_body_spacing())
    assert plan.expected_seconds < published.expected_seconds  # half the width: a quarter of the convolutions


def test_the_volume_view_is_the_childs_image_without_a_copy(mrml_scene):
    volume = body_volume("permuted")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, 6.0, -7.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    view, copy = segment_plan.volume_image_view(volume), image_from_volume_node(volume)
    assert view.geometry.same_grid(copy.geometry, atol=0)
    np.testing.assert_array_equal(view.array, copy.array)
    assert np.shares_memory(view.array, slicer.util.arrayFromVolume(volume))


# --- the cache ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plans_are_cached_until_the_voxels_or_the_inputs_change(mrml_scene, ctfm_cache):
    volume = body_volume("lps", shape=(96, 96, 200), spacing=(1.5, 1.5, 1.5))
    logic = CTFMSegmentLogic()
    first = logic.segmentationPlan(volume, "whole-body", None, "full", "model", "cpu")
    assert logic.segmentationPlan(volume, "whole-body", None, "full", "model", "cpu") is first
    key, plans = logic.cachedPlans(volume, "whole-body", None, "model", "cpu")
    assert plans == {"full": first, "standard": None, "fast": None}  # the other presets: only when asked for
    assert logic.cachedPlans(volume, "whole-body", None, "native", "cpu")[1]["full"] is None
    # other voxels (the upper half of the body becomes air): a new plan, from the new voxels
    voxels = slicer.util.arrayFromVolume(volume)  # [k, j, i]
    voxels[100:] = -1024
    slicer.util.arrayFromVolumeModified(volume)
    assert logic.cachedPlans(volume, "whole-body", None, "model", "cpu")[0] != key
    second = logic.segmentationPlan(volume, "whole-body", None, "full", "model", "cpu")
    assert second is not first
    assert second.to_dict() == reference_plan(volume, "full", "model", model_spacing=whole_body_spacing()).to_dict()
    assert second.working_shape != first.working_shape  # the foreground box shrank
    # the same voxels moved in space: a new plan too
    volume.SetSpacing(1.5, 1.5, 3.0)
    third = logic.segmentationPlan(volume, "whole-body", None, "full", "model", "cpu")
    assert third is not second and third.input_spacing == (1.5, 1.5, 3.0)


def test_an_all_air_volume_has_no_plan_and_says_why(mrml_scene, ctfm_cache):
    air = volume_node_from_image(Image(np.full((32, 32, 16), -1024, dtype=np.int16)), name="air")
    logic = CTFMSegmentLogic()
    with pytest.raises(ValueError, match="all air"):
        logic.segmentationPlan(air, "whole-body", None, "standard", "model", "cpu")
    assert logic.expectedSeconds(air, "standard", "cpu") is None
    assert logic.expectedSeconds(None, "standard", "cpu") is None
    _key, plans = logic.cachedPlans(air, "whole-body", None, "model", "cpu")
    text, _tooltip = segment_plan.plan_summary(plans, "standard")
    assert text.startswith("No plan: ") and "all air" in text


# --- what the panel shows -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_summary_shows_spacing_windows_each_presets_time_and_memory(mrml_scene, ctfm_cache):
    volume = body_volume("lps", shape=(160, 160, 120), spacing=(0.8, 0.8, 1.0))
    logic = CTFMSegmentLogic()
    plans = {q: logic.segmentationPlan(volume, "whole-body", None, q, "model", "cpu") for q in QUALITIES}
    text, tooltip = segment_plan.plan_summary(plans, "standard")
    grid, time_line, memory = text.split("\n")
    standard = plans["standard"]
    assert grid.startswith(f"At {whole_body_spacing()[0]:g} mm (the model's spacing): {standard.windows_run} window")
    assert time_line.startswith(f"Expected time: about {segment_plan.short_duration(standard.expected_seconds)} (")
    for quality, plan in plans.items():
        assert f"{quality} {segment_plan.short_duration(plan.expected_seconds)}" in time_line
    assert time_line.index("full") < time_line.index("standard") < time_line.index("fast")
    assert memory == f"Peak memory about {standard.expected_peak_bytes / 2**30:.1f} GB · CPU, {standard.precision}, " \
                     f"{standard.threads} thread{'s' if standard.threads != 1 else ''}"
    assert "overlap" in tooltip and f"{standard.windows_total}" in tooltip
    # while the other presets are still being computed
    partial, _ = segment_plan.plan_summary({"full": None, "standard": standard, "fast": None}, "standard")
    assert "full ... · standard" in partial and "fast ..." in partial
    assert segment_plan.plan_summary({"full": None, "standard": None, "fast": None}, "standard")[0] == "Planning..."
    native = logic.segmentationPlan(volume, "whole-body", None, "full", "native", "cpu")
    assert segment_plan.plan_summary({"full": native}, "full")[0].startswith("At the input's spacing (0.8x0.8x1 mm)")
    fast = segment_plan.plan_summary({"fast": plans["fast"]}, "fast")[0]
    assert fast.startswith("At 3 mm (fast)")
    assert [segment_plan.short_duration(s) for s in (0.2, 40, 200, 7200)] == ["1 s", "40 s", "3 min", "2.0 h"]


def test_auto_is_planned_for_the_accelerator_this_computer_seems_to_have(mrml_scene, ctfm_cache):
    volume = body_volume("lps")
    logic = CTFMSegmentLogic()
    guess = segment_plan.guess_auto_device()
    assert guess in ("cpu", "cuda", "mps")
    auto = logic.segmentationPlan(volume, "whole-body", None, "standard", "model", "auto")
    assert auto.to_dict() == reference_plan(volume, "standard", "model", whole_body_spacing(), device=guess).to_dict()
    cuda = logic.segmentationPlan(volume, "whole-body", None, "standard", "model", "cuda")
    assert (cuda.device, cuda.precision) == ("cuda", "bf16")


# --- no torch on the panel's path ----------------------------------------------------------------------------

NO_TORCH_SCRIPT = r"""
import importlib.abc, json, sys

attempts = []


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError(f"blocked import of {name}")


sys.meta_path.insert(0, BlockTorch())

from ctfm_testing.mrml import scene_with_logics
from ctfm_testing.phantoms import GEOMETRIES, body_phantom

from CTFMSegmentLib.logic import CTFMSegmentLogic
from CTFMSegmentLib.plan import plan_summary
from CTFMSlicer.nodes import volume_node_from_image

with scene_with_logics():
    volume = volume_node_from_image(body_phantom(**GEOMETRIES["oblique20"]), name="ct")
    logic = CTFMSegmentLogic()
    plans = {}
    for model, folder in (("whole-body", None), ("folder", sys.argv[1])):
        # what the widget does: the cache key, then one missing preset at a time, then the summary
        key, cached = logic.cachedPlans(volume, model, folder, "model", "auto")
        for quality in cached:
            logic.planCache.compute(key, volume, model, folder, quality, "model", "auto")
        _key, cached = logic.cachedPlans(volume, model, folder, "model", "auto")
        text, tooltip = plan_summary(cached, "standard")
        assert text.count("\n") == 2 and "Expected time" in text, text
        plans[model] = {quality: plan.to_dict() for quality, plan in cached.items()}
    # and the logic's own entry points
    plans["cpu"] = logic.segmentationPlan(volume, "whole-body", None, "full", "native", "cpu").to_dict()
    assert logic.expectedSeconds(volume, "fast", "auto") > 0
print(json.dumps({"attempts": attempts, "torch_loaded": "torch" in sys.modules, "plans": plans}))
"""


@pytest.mark.slow
def test_the_panel_plan_imports_no_torch(tmp_path, ctfm_cache):
    config = {"architecture": "SegResNetDS", "init_filters": 8, "out_channels": 3, "_training": {"spacing": 2.0}}
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("CTFM", "CTFMSegment", "Testing"))
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_TORCH_SCRIPT), str(model)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["torch_loaded"] is False
    # and what it computed there is plan_segmentation's answer here
    image = body_phantom(**GEOMETRIES["oblique20"])
    device, precision, _threads = planned_run(segment_plan.guess_auto_device(), "auto", None)
    facts = model_facts(None, None)
    for quality in QUALITIES:
        expected = plan_segmentation(image, quality, "model", whole_body_spacing(), facts["roi"], facts["classes"],
                                     facts["filters"], facts["parameters"], device, precision, 1)
        assert report["plans"]["whole-body"][quality] == expected.to_dict()
        folder_facts = model_facts(config, None)
        expected = plan_segmentation(image, quality, "model", (2.0, 2.0, 2.0), folder_facts["roi"],
                                     folder_facts["classes"], folder_facts["filters"], folder_facts["parameters"],
                                     device, precision, 1)
        assert report["plans"]["folder"][quality] == expected.to_dict()
    assert report["plans"]["cpu"]["device"] == "cpu" and report["plans"]["cpu"]["working"]["resampled"] is False
    assert ROI == tuple(report["plans"]["cpu"]["roi"])
