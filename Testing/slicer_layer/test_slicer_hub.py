"""The hub module's Models, Triage and Saliency sections without the application (slicer-core).

- Heatmap volumes, peak markups, ROI/cube boxes and the triage table on a real MRML scene
  (CTFMSlicer.overlay, CTFMLogic.showHeatmap): grids compared with Slicer's own IJK-to-RAS
  matrices, voxels with the NIfTI file they came from, RAS/LPS with hand-written points.
- The command lines the sections build, parsed by the real ``ctfm`` argparse parser.
- Models: status, import (folder and zip), remove, against ``ctfm``'s own status function and
  files on disk; download in a child process failing offline with a message saying what to do.
- Triage and saliency run end to end in child processes (tiny random-weights models written
  here) and are compared with CTFMLib called in this process on the same Image.
"""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import GEOMETRIES, head_phantom  # noqa: E402
from CTFMLib.image import Image, ImageError, read_image, write_image  # noqa: E402
from CTFMSlicer import models, nodes, overlay, process, saliency, triage  # noqa: E402
from CTFMSlicer.logic import CTFMLogic  # noqa: E402
from CTFMSlicer.nodes import image_from_volume_node, rows_from_table_node, volume_node_from_image  # noqa: E402
from CTFMSlicer.process import ctfm_cli_command  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HEAD = {"head_radius_mm": 45.0, "lesion": {"center_lps": (15.0, -10.0, 5.0), "radius_mm": 8.0}}


def ijk_to_ras(node) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(_matrix(node))


def _matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def ctfm_parser():
    from CTFMLib.cli import build_parser

    return build_parser()


def parse_child_command(args):
    """Parse what a ProcessRunner would run (``python -m CTFMLib.cli ...``) with the real parser."""
    command = ctfm_cli_command(*args)
    assert command[1:3] == ["-m", "CTFMLib.cli"]
    return ctfm_parser().parse_args(command[3:])


def has_command(name: str) -> bool:
    parser = ctfm_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return name in sub.choices


def require_command(name: str):
    if not has_command(name):
        pytest.skip(f"`ctfm {name}` is not in CTFMLib/cli.py yet (another helper is adding it)")


# --- heatmap volumes -------------------------------------------------------------------


def heat_on(image: Image, seed: int = 0) -> Image:
    """A map in [0, 1] on ``image``'s grid with one clear maximum (1.0) and zeros around it."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 0.6, image.shape).astype(np.float32)
    values[: image.shape[0] // 4] = 0.0
    values[tuple(s // 2 + 3 for s in image.shape)] = 1.0
    return image.with_array(values)


@pytest.mark.parametrize("geometry", ["oblique20", "permuted", "odd_sizes"])
def test_heatmap_node_sits_on_the_input_grid_with_heat_colours(mrml_scene, tmp_path, geometry):
    image = head_phantom(**GEOMETRIES[geometry], **HEAD)
    volume = volume_node_from_image(image, name="head")
    heat_file = write_image(heat_on(image), tmp_path / "heat.nii.gz")
    output = saliency.read_heatmap(heat_file)
    heat, peak = CTFMLogic().showHeatmap(output, volume, "head embedding saliency", threshold=0.3,
                                         attributes={"target": "embedding", "method": "gradient"})

    assert heat.IsA("vtkMRMLScalarVolumeNode") and not heat.IsA("vtkMRMLLabelMapVolumeNode")
    assert heat.GetName() == "head embedding saliency"
    assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))  # exactly the input's matrix, not the file's
    from_file = read_image(heat_file).array  # the NIfTI itself, read independently of the code under test
    assert np.array_equal(slicer.util.arrayFromVolume(heat).transpose(2, 1, 0), from_file)
    assert slicer.util.arrayFromVolume(heat).dtype == np.float32

    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert mrml_scene.GetNodeByID(display.GetColorNodeID()) is not None  # the colour node exists in the scene
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(0.3)
    assert display.GetUpperThreshold() >= 1.0
    assert heat.GetAttribute("CTFM.target") == "embedding" and heat.GetAttribute("CTFM.method") == "gradient"

    # The peak: the map's maximum voxel (no heat.json here), placed where Slicer puts that voxel.
    ijk = np.array([s // 2 + 3 for s in image.shape] + [1], dtype=np.float64)
    expected_ras = (ijk_to_ras(volume) @ ijk)[:3]
    position = np.array(peak.GetNthControlPointPositionWorld(0))
    np.testing.assert_allclose(position, expected_ras, atol=1e-6)
    assert peak.GetName() == "head embedding saliency peak" and peak.GetNumberOfControlPoints() == 1


def test_heatmap_follows_the_input_under_a_parent_transform(mrml_scene):
    image = head_phantom(**GEOMETRIES["lps"], **HEAD)
    volume = volume_node_from_image(image, name="moved")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = image_from_volume_node(volume)  # what the child process receives: world LPS
    node = overlay.heatmap_volume_node(heat_on(world), volume, name="h")
    assert node.GetTransformNodeID() == transform.GetID()
    assert np.array_equal(ijk_to_ras(node), ijk_to_ras(volume))
    assert image_from_volume_node(node).geometry.same_grid(world.geometry, atol=1e-9)


def test_heatmap_on_another_grid_is_refused(mrml_scene):
    image = head_phantom(**GEOMETRIES["lps"], **HEAD)
    volume = volume_node_from_image(image, name="head")
    shifted = Image(heat_on(image).array, image.spacing, image.origin + np.array([0.0, 0.0, 2.5]), image.direction)
    with pytest.raises(ImageError, match="head"):
        overlay.heatmap_volume_node(shifted, volume)
    cropped = Image(heat_on(image).array[1:], image.spacing, image.origin, image.direction)
    with pytest.raises(ImageError, match="grid"):
        overlay.heatmap_volume_node(cropped, volume)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # nothing half-made left behind


def test_threshold_and_slice_view_layers(mrml_scene):
    image = head_phantom(**GEOMETRIES["lps"], **HEAD)
    volume = volume_node_from_image(image, name="head")
    heat = overlay.heatmap_volume_node(heat_on(image), volume)
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(overlay.DEFAULT_THRESHOLD)
    overlay.set_heatmap_threshold(heat, 0.65)
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.65)
    with pytest.raises(ValueError, match="between 0 and 1"):
        overlay.set_heatmap_threshold(heat, 1.5)
    # What the widget hands to setSliceViewerLayers, applied to three slice views.
    views = [mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    slicer.util.setSliceViewerLayers(**overlay.heatmap_layers(heat, volume, 0.4))
    for view in views:
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (volume.GetID(), heat.GetID())
        assert view.GetForegroundOpacity() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="opacity"):
        overlay.heatmap_layers(heat, volume, -0.1)


def test_read_heatmap_takes_the_peak_from_heat_json_and_refuses_bad_maps(tmp_path):
    image = head_phantom(**GEOMETRIES["lps"], **HEAD)
    heat_file = write_image(heat_on(image), tmp_path / "heat.nii.gz")
    (tmp_path / "heat.json").write_text(json.dumps({"target": "point", "method": "occlusion",
                                                    "peak_lps": [30.0, -12.0, 5.0], "seconds": 2.5}))
    output = saliency.read_heatmap(heat_file)
    np.testing.assert_array_equal(output.peak_lps, [30.0, -12.0, 5.0])
    assert output.info["target"] == "point" and output.seconds == 2.5
    write_image(image.with_array(np.full(image.shape, 3.0, np.float32)), tmp_path / "bad.nii.gz")
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        saliency.read_heatmap(tmp_path / "bad.nii.gz")


def test_peak_markup_converts_lps_to_ras(mrml_scene):
    node = overlay.peak_markup_node([30.0, -12.0, 5.0], name="peak")
    # LPS (30, -12, 5): 30 mm to the patient's left, 12 mm anterior -> RAS (-30, 12, 5).
    np.testing.assert_allclose(node.GetNthControlPointPositionWorld(0), [-30.0, 12.0, 5.0])
    assert node.GetNthControlPointLocked(0)
    with pytest.raises(ValueError, match="not a point"):
        overlay.peak_markup_node([np.nan, 0.0, 0.0])


# --- points and regions ------------------------------------------------------------------


def test_roi_box_in_lps(mrml_scene):
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter([10.0, -20.0, 30.0])
    roi.SetSize([4.0, 6.0, 8.0])
    low, high = nodes.roi_lps_box(roi)
    # RAS x 8..12, y -23..-17, z 26..34  ->  LPS x -12..-8, y 17..23, z 26..34
    np.testing.assert_allclose(low, [-12.0, 17.0, 26.0])
    np.testing.assert_allclose(high, [-8.0, 23.0, 34.0])
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty")
    with pytest.raises(ValueError, match="no extent"):
        nodes.roi_lps_box(empty)


def test_saliency_request_from_the_section_values(mrml_scene, tmp_path):
    logic = CTFMLogic()
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    with pytest.raises(ValueError, match="markup point"):
        logic.saliencyRequest(target="point", pointList=points)
    points.AddControlPoint([-30.0, 12.0, 5.0])
    request = logic.saliencyRequest(target="point", method="gradient", weights="enc", pointList=points,
                                    region="cube", cubeMm=32.0, device="cpu")
    np.testing.assert_allclose(request["point_lps"], [30.0, -12.0, 5.0])
    assert request["cube_mm"] == 32.0 and "region_lps" not in request
    # A cube for another target is centred on the point.
    request = logic.saliencyRequest(target="embedding", weights="enc", pointList=points, region="cube", cubeMm=20.0)
    np.testing.assert_allclose(request["center_lps"], [30.0, -12.0, 5.0])
    assert request["cube_mm"] == 20.0 and "point_lps" not in request
    # The crosshair instead of a markup.
    crosshair = mrml_scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    crosshair.SetCrosshairRAS(1.0, 2.0, 3.0)
    request = logic.saliencyRequest(target="point", weights="enc", pointSource="crosshair")
    np.testing.assert_allclose(request["point_lps"], [-1.0, -2.0, 3.0])
    # class and triage targets
    request = logic.saliencyRequest(target="class", segmentationModel="whole-body", className=" liver ")
    assert (request["weights"], request["class_name"]) == ("whole-body", "liver")
    triage_folder = write_triage_model(tmp_path / "triage")
    request = logic.saliencyRequest(target="triage", triageModelFolder=triage_folder, region="roi",
                                    roiNode=_roi(mrml_scene))
    assert request["triage_model"] == str(triage_folder) and "weights" not in request
    # What the panel says when something is missing.
    volume = volume_node_from_image(head_phantom(**GEOMETRIES["lps"], **HEAD), name="head")
    assert "volume" in logic.saliencyInputProblem(None, target="embedding")
    assert "class name" in logic.saliencyInputProblem(volume, target="class", segmentationModel="whole-body")
    assert "triage model folder" in logic.saliencyInputProblem(volume, target="triage", triageModelFolder=Path())
    encoder = write_encoder(tmp_path / "encoder")
    assert "not a triage model" in logic.saliencyInputProblem(volume, target="triage", triageModelFolder=encoder)
    assert "ROI" in logic.saliencyInputProblem(volume, target="embedding", region="roi")
    assert logic.saliencyInputProblem(volume, target="embedding", weights="enc") is None


def _roi(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter([0.0, 0.0, 0.0])
    roi.SetSize([40.0, 40.0, 40.0])
    return roi


# --- command lines, parsed by the real ctfm parser -------------------------------------------


def test_embedding_point_left_of_the_origin_reaches_the_parser(mrml_scene):
    """A point whose LPS x is negative (RAS x > 0) must not look like an option to argparse."""
    volume = volume_node_from_image(head_phantom(**GEOMETRIES["lps"], **HEAD), name="head")
    runner = CTFMLogic().startEmbedding(volume, weights="w", mode="point", pointRAS=[30.0, -12.0, 5.0], device="cpu")
    runner.cancel()
    runner.wait(timeout=30)
    parsed = ctfm_parser().parse_args(runner.args[3:])
    assert (parsed.command, parsed.mode, parsed.point, parsed.ras) == ("embed", "point", "-30.0,12.0,5.0", False)


def test_triage_command_line_parses():
    require_command("triage")
    args = triage.triage_arguments("in.nrrd", "/models/triage", "out.json", "cpu", "heat.nii.gz", "gradient")
    parsed = parse_child_command(args)
    assert (parsed.command, parsed.image, parsed.model, parsed.device) == ("triage", "in.nrrd", "/models/triage", "cpu")
    assert (parsed.json_out, parsed.saliency, parsed.method, parsed.progress) == ("out.json", "heat.nii.gz",
                                                                                 "gradient", "json")
    assert parsed.json is True  # the result on stdout as one JSON object too
    parsed = parse_child_command(triage.triage_arguments("in.nrrd", "m", "out.json"))
    assert parsed.saliency is None and parsed.method is None and parsed.device == "auto"


SALIENCY_CASES = [
    ({"target": "embedding", "weights": "enc"}, {"target": "embedding", "weights": "enc"}),
    ({"target": "point", "weights": "enc", "point_lps": (-30.5, 12.0, -5.0), "cube_mm": 32.0},
     {"target": "point:-30.5,12.0,-5.0", "cube": 32.0}),
    ({"target": "class", "weights": "whole-body", "class_name": "liver",
      "region_lps": ((-40.0, -30.0, -20.0), (10.0, 20.0, 30.0))},
     {"target": "class:liver", "roi": "-40.0,-30.0,-20.0,10.0,20.0,30.0"}),
    ({"target": "triage", "triage_model": "/models/triage", "method": "gradient"},
     {"target": "triage", "model": "/models/triage", "method": "gradient", "weights": None}),
    ({"target": "embedding", "weights": "enc", "cube_mm": 40.0, "center_lps": (-3.0, 4.0, -5.5)},
     {"target": "embedding", "cube": 40.0, "center": "-3.0,4.0,-5.5", "ras": False}),
]


@pytest.mark.parametrize("request_, expected", SALIENCY_CASES)
def test_saliency_command_line_parses(request_, expected):
    require_command("saliency")
    args = saliency.saliency_arguments("in.nrrd", "heat.nii.gz", device="cpu", **{"method": "occlusion", **request_})
    parsed = parse_child_command(args)
    assert (parsed.command, parsed.image, parsed.out, parsed.device) == ("saliency", "in.nrrd", "heat.nii.gz", "cpu")
    for key, value in expected.items():
        got = getattr(parsed, key)
        assert (float(got) if key == "cube" else got) == value, key


def test_saliency_arguments_refuse_what_the_command_cannot_do():
    with pytest.raises(ValueError, match="point"):
        saliency.saliency_arguments("i", "o", target="point", weights="w")
    with pytest.raises(ValueError, match="class name"):
        saliency.saliency_arguments("i", "o", target="class", weights="w")
    with pytest.raises(ValueError, match="triage model"):
        saliency.saliency_arguments("i", "o", target="triage")
    with pytest.raises(ValueError, match="empty"):
        saliency.saliency_arguments("i", "o", weights="w", region_lps=((0, 0, 0), (1, -1, 1)))
    with pytest.raises(ValueError, match="centre"):
        saliency.saliency_arguments("i", "o", weights="w", cube_mm=30.0)
    with pytest.raises(ValueError, match="centre"):
        saliency.saliency_arguments("i", "o", target="point", weights="w", point_lps=(1, 2, 3), cube_mm=30.0,
                                    center_lps=(0, 0, 0))
    with pytest.raises(ValueError, match="method"):
        saliency.saliency_arguments("i", "o", weights="w", method="lime")


def test_last_json_object_skips_progress_and_text():
    lines = ['{"progress": 0.5, "message": "x"}', "wrote heat.nii.gz", '{"target": "embedding"}',
             '{"progress": 1.0, "message": "done"}', "not json {"]
    assert process.last_json_object(lines) == {"target": "embedding"}
    assert process.last_json_object(["plain", '{"progress": 1}']) is None


# --- triage table ----------------------------------------------------------------------------


def test_triage_table_collects_one_row_per_run(mrml_scene):
    first = triage.TriageOutput(0.83, 1.5856, "abnormal", 0.4, "/models/bleed", 1.2)
    second = triage.TriageOutput(0.1, -2.1972, "normal", 0.4, "/models/bleed", 1.0)
    logic = CTFMLogic()
    table = logic.triageTableNode(first, "case 1")
    assert table.GetName() == "CT-FM triage"
    assert logic.triageTableNode(second, "case 2", node=table) is table
    names = [table.GetTable().GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["volume", "model", "probability", "threshold", "decision", "logit"]
    rows = rows_from_table_node(table)
    assert rows == [
        {"volume": "case 1", "model": "/models/bleed", "probability": 0.83, "threshold": 0.4, "decision": "abnormal",
         "logit": 1.5856},
        {"volume": "case 2", "model": "/models/bleed", "probability": 0.1, "threshold": 0.4, "decision": "normal",
         "logit": -2.1972},
    ]


def test_triage_result_parsing():
    parsed = triage.parse_result({"probability": 0.7, "logit": 0.8473, "decision": "abnormal", "threshold": 0.5,
                                  "model": "m", "seconds": 3.0, "saliency": None})
    assert parsed.summary().startswith("abnormal: probability 0.700 >= threshold 0.500")
    for bad, match in (({"probability": 0.7}, "lacks"), ({"probability": 1.7, "logit": 0, "decision": "normal",
                                                         "threshold": 0.5}, "probability"),
                       ({"probability": 0.7, "logit": 0, "decision": "maybe", "threshold": 0.5}, "decision"),
                       (None, "no result")):
        with pytest.raises(ValueError, match=match):
            triage.parse_result(bad)


# --- triage models: folders and the section's checks -----------------------------------------------


def write_encoder(folder, init_filters=4, blocks_down=(1, 1, 1, 1)) -> Path:
    from ctfm_testing.checkpoints import write_monai_encoder

    return write_monai_encoder(folder, init_filters=init_filters, blocks_down=blocks_down)


def write_triage_model(folder, threshold=0.4, size=(16, 32, 32), seed=0) -> Path:
    """A tiny TriageModel folder laid out as `ctfm train classify` exports it (config.json + model.safetensors)."""
    import torch

    from CTFMLib.networks import TriageModel, build_encoder
    from CTFMLib.train.classify import DEFAULT_WINDOWS
    from CTFMLib.weights import save_pretrained

    torch.manual_seed(seed)
    encoder_config = {"architecture": "SegResEncoder", "spatial_dims": 3, "in_channels": 1, "init_filters": 4,
                      "blocks_down": [1, 1, 1]}
    model = TriageModel(build_encoder({k: v for k, v in encoder_config.items() if k != "architecture"}), hidden=0)
    config = {"architecture": "TriageModel", "encoder": encoder_config, "head": [model.encoder.out_channels, 1],
              "mode": "full", "threshold": threshold, "threshold_source": "default",
              "_preprocessing": {"orientation": "SPL", "input": "HU", "size": list(size),
                                 "windows": [list(w) for w in DEFAULT_WINDOWS], "stack_axis": "S"}}
    return save_pretrained(model.eval(), folder, config)


def test_triage_model_checks(tmp_path, ctfm_cache):
    logic = CTFMLogic()
    ct = object()  # any volume: the model checks come first in what the panel reports
    assert "Choose" in logic.triageInputProblem(ct, "folder", Path())
    assert "does not exist" in logic.triageInputProblem(ct, "folder", tmp_path / "missing")
    assert "not a triage model" in logic.triageInputProblem(ct, "folder", write_encoder(tmp_path / "enc"))
    assert logic.triageInputProblem(ct, "folder", write_triage_model(tmp_path / "tri")) is None
    assert "volume" in logic.triageInputProblem(None, "folder", tmp_path / "tri")
    assert triage.triage_model_choices(REPO / "Resources" / "Models.json")[0] == "folder"
    # A catalogue triage model is found where an import puts it (models/<id>).
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps({"models": [{"id": "bleed", "title": "Bleed", "task": "triage", "source": "user",
                                                 "how_to": "Train it with CTFMTrain."}]}))
    assert triage.triage_model_choices(catalogue) == ("folder", "bleed")
    with pytest.raises(ValueError, match="not on this computer"):
        triage.model_folder("bleed", catalog_path=catalogue)
    shutil.copytree(tmp_path / "tri", ctfm_cache / "models" / "bleed")
    assert triage.model_folder("bleed", catalog_path=catalogue) == ctfm_cache / "models" / "bleed"


# --- models ----------------------------------------------------------------------------------


def statuses():
    """id -> status of the catalogue models in the Models table."""
    return {r["id"]: r["status"] for r in models.model_rows() if r["in_catalogue"]}


def test_models_import_status_and_remove(ctfm_cache, tmp_path):
    from ctfm_testing.checkpoints import monai_segresnet, write_hf_cache, write_published_layout

    logic = CTFMLogic()
    before = statuses()
    assert before["ct_fm_feature_extractor"] == "not on this computer"
    assert before["msd_lung_tumor"] == "train with CT-FM Train"

    # Other weights under a published model's id (picked in the dialog by its config.json): refused unless
    # forced, and then shown as not the published weights (the catalogue knows the published config's size).
    from CTFMLib.weights import WeightsError

    encoder = write_encoder(tmp_path / "encoder")
    with pytest.raises(WeightsError, match="--force"):
        logic.importModel(encoder / "config.json", "ct_fm_feature_extractor")
    assert not (ctfm_cache / "models" / "project-lighter--ct_fm_feature_extractor").exists()
    folder = models.import_model(encoder / "config.json", "ct_fm_feature_extractor", force=True)
    assert folder == ctfm_cache / "models" / "project-lighter--ct_fm_feature_extractor"
    assert (folder / "model.safetensors").read_bytes() == (encoder / "model.safetensors").read_bytes()

    # A model you train yourself, imported from a zip under its catalogue id.
    seg = write_published_layout(monai_segresnet(out_channels=2, init_filters=4, blocks_down=(1, 1, 1), dsdepth=2),
                                 tmp_path / "lung", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                                     "init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2})
    archive = tmp_path / "lung.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in seg.iterdir():
            z.write(f, f"lung/{f.name}")
    logic.importModel(archive, "msd_lung_tumor")

    # A published model found in the download cache.
    write_hf_cache(ctfm_cache / "hub", "project-lighter/ct_fm_segresnet",
                   {"config.json": seg / "config.json", "model.safetensors": seg / "model.safetensors"})

    # An imported model the catalogue does not know.
    logic.importModel(write_encoder(tmp_path / "my-encoder", init_filters=8))

    after = statuses()
    assert after["ct_fm_feature_extractor"] == "imported, not the published weights"
    assert after["msd_lung_tumor"] == "imported"
    assert after["ct_fm_segresnet"] == "downloaded"
    assert after["msd_liver_tumor"] == "train with CT-FM Train"
    extra = [r for r in logic.modelRows() if not r["in_catalogue"]]
    assert extra == [{"id": "my-encoder", "title": "my-encoder", "task": "embedding", "repo_id": "",
                      "status": "imported", "in_catalogue": False, "how_to": ""}]
    assert "nothing to download" in models.download_problem(extra[0])

    # Remove: the files go, the status follows.
    removed = logic.removeModel("msd_lung_tumor")
    assert removed == [str(ctfm_cache / "models" / "msd_lung_tumor")] and not Path(removed[0]).exists()
    logic.removeModel("ct_fm_segresnet")
    logic.removeModel("my-encoder")
    final = statuses()
    assert final["msd_lung_tumor"] == "train with CT-FM Train"
    assert final["ct_fm_segresnet"] == "not on this computer"
    assert final["ct_fm_feature_extractor"] == "imported, not the published weights"
    assert not [r for r in logic.modelRows() if not r["in_catalogue"]]


def test_import_refuses_what_is_not_a_model(ctfm_cache, tmp_path):
    from CTFMLib.weights import WeightsError

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        CTFMLogic().importModel(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CTFMLogic().importModel(tmp_path / "nope")
    assert not (ctfm_cache / "models").exists() or not any((ctfm_cache / "models").iterdir())


def test_download_problems_say_what_to_do(ctfm_cache):
    rows = {r["id"]: r for r in models.model_rows()}
    assert models.download_problem(rows["ct_fm_feature_extractor"]) is None
    lung = models.download_problem(rows["msd_lung_tumor"])
    assert "no published weights" in lung and "CT-FM Train module in Slicer" in lung
    assert "Select" in models.download_problem(None)


def test_download_offline_fails_with_what_to_do(ctfm_cache):
    """The hub is unreachable here (HF_HUB_OFFLINE): the child fails and says how to get the model instead."""
    events, done = [], []
    runner = CTFMLogic().startDownload("ct_fm_feature_extractor", on_progress=lambda f, m: events.append(m),
                                       on_done=lambda ok, message: done.append((ok, message)))
    assert "--progress" in runner.args and runner.args[-3:] == ["models", "download", "ct_fm_feature_extractor"]
    result = runner.wait(timeout=120)
    assert not result.ok and not result.cancelled
    (ok, message), = done
    assert not ok
    assert "project-lighter/ct_fm_feature_extractor" in message and "not on this computer" in message
    assert "import" in message  # the way out without internet
    assert not message.startswith("ctfm:")  # the child's prefix is stripped
    assert statuses()["ct_fm_feature_extractor"] == "not on this computer"


# --- triage and saliency in child processes, against CTFMLib in this process ------------------------


@pytest.fixture(scope="module")
def tiny_triage(tmp_path_factory):
    pytest.importorskip("torch")
    return write_triage_model(tmp_path_factory.mktemp("triage-model"), threshold=0.4)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    pytest.importorskip("torch")
    return write_encoder(tmp_path_factory.mktemp("saliency-encoder"))


@pytest.mark.slow
@pytest.mark.parametrize("with_saliency", [False, True], ids=["triage", "triage+saliency"])
def test_triage_in_a_child_process_equals_ctfmlib(mrml_scene, tiny_triage, with_saliency):
    require_command("triage")
    if with_saliency:
        pytest.importorskip("CTFMLib.saliency", reason="CTFMLib.saliency is not there yet (another helper writes it)")
    from CTFMLib.triage import triage_image

    image = head_phantom(**GEOMETRIES["oblique20"], **HEAD)
    volume = volume_node_from_image(image, name="head")
    logic = CTFMLogic()
    done, events = [], []
    runner = logic.startTriage(volume, "folder", tiny_triage, device="cpu", withSaliency=with_saliency,
                               method="gradient", on_progress=lambda f, m: events.append(f),
                               on_done=lambda o, m: done.append((o, m)))
    work = Path(runner.args[runner.args.index("triage") + 1]).parent
    result = runner.wait(timeout=180)
    assert result.ok, result.stderr_tail
    (output, message), = done
    assert output is not None, message
    reference = triage_image(image_from_volume_node(volume), str(tiny_triage), device="cpu")
    assert output.probability == pytest.approx(reference.probability, abs=1e-5)
    assert output.logit == pytest.approx(reference.logit, abs=1e-4)
    assert output.threshold == 0.4
    assert output.decision == ("abnormal" if output.probability >= 0.4 else "normal")
    assert message == output.summary() and events
    assert not work.exists()  # temporary input and outputs removed

    table = logic.triageTableNode(output, volume.GetName())
    row, = rows_from_table_node(table)
    assert row["volume"] == "head" and row["probability"] == pytest.approx(reference.probability, abs=1e-5)
    if not with_saliency:
        assert output.saliency is None
        return

    heat, peak = logic.showHeatmap(output.saliency, volume, "head triage saliency")
    assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
    values = slicer.util.arrayFromVolume(heat)
    assert values.min() >= 0.0 and values.max() == pytest.approx(1.0) and np.count_nonzero(values) > 0
    assert heat.GetDisplayNode().GetColorNodeID() == overlay.HEAT_COLOR_NODE_ID
    assert peak.GetNumberOfControlPoints() == 1


@pytest.mark.slow
def test_triage_failure_names_the_problem(mrml_scene, tmp_path):
    require_command("triage")
    volume = volume_node_from_image(head_phantom(**GEOMETRIES["lps"], **HEAD), name="head")
    folder = write_triage_model(tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    done = []
    CTFMLogic().startTriage(volume, "folder", folder, device="cpu",
                            on_done=lambda o, m: done.append((o, m))).wait(timeout=120)
    (output, message), = done
    assert output is None and "safetensors" in message and not message.startswith("ctfm:")


@pytest.mark.slow
def test_saliency_in_a_child_process_equals_ctfmlib(mrml_scene, tiny_encoder):
    """An embedding map in a cube around a markup, computed by the child, equals CTFMLib's in-process map."""
    require_command("saliency")
    from CTFMLib.saliency import saliency_image

    image = head_phantom(**GEOMETRIES["odd_sizes"], **HEAD)
    volume = volume_node_from_image(image, name="head")
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.AddControlPoint([15.0, 10.0, 5.0])  # RAS x > 0: LPS (-15, -10, 5), which must not read as an option
    logic = CTFMLogic()
    request = logic.saliencyRequest(target="embedding", method="gradient", weights=str(tiny_encoder),
                                    pointList=points, region="cube", cubeMm=48.0, device="cpu")
    done = []
    result = logic.startSaliency(volume, request, on_done=lambda o, m: done.append((o, m))).wait(timeout=180)
    assert result.ok, result.stderr_tail
    (output, message), = done
    assert output is not None, message
    centre = np.array([-15.0, -10.0, 5.0])
    reference = saliency_image(image_from_volume_node(volume), weights=str(tiny_encoder), target="embedding",
                               method="gradient", point_lps=centre, cube_mm=48.0, device="cpu")
    np.testing.assert_allclose(output.heatmap.array, reference.heatmap.array, atol=1e-5)
    np.testing.assert_allclose(output.peak_lps, reference.peak_lps, atol=1e-3)  # heat.json rounds to 1 um
    assert (output.info["target"], output.info["method"]) == ("embedding", "gradient")
    np.testing.assert_allclose(output.info["region"]["min_lps"], centre - 24.0)

    name = f"head {saliency.target_label('embedding')} saliency"
    heat, peak = logic.showHeatmap(output, volume, name)
    assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat).transpose(2, 1, 0), reference.heatmap.array,
                               atol=1e-5)
    peak_lps = np.asarray(reference.peak_lps, dtype=np.float64)
    np.testing.assert_allclose(peak.GetNthControlPointPositionWorld(0), peak_lps * [-1.0, -1.0, 1.0], atol=1e-3)
    # outside the 48 mm cube around the point the map is 0
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1).reshape(-1, 3)
    far = np.abs(image.index_to_physical(ijk) - centre).max(axis=1) > 24.0 + 1e-6
    assert far.any() and np.all(output.heatmap.array.reshape(-1)[far] == 0.0)
    assert output.heatmap.array.max() == pytest.approx(1.0)


@pytest.mark.slow
def test_saliency_cancel_and_failure(mrml_scene, tiny_encoder, tmp_path):
    require_command("saliency")
    volume = volume_node_from_image(head_phantom(**GEOMETRIES["lps"], **HEAD), name="head")
    logic = CTFMLogic()
    done = []
    runner = logic.startSaliency(volume, logic.saliencyRequest(target="embedding", weights=str(tmp_path / "none")),
                                 on_done=lambda o, m: done.append((o, m)))
    assert not runner.wait(timeout=120).ok
    (output, message), = done
    assert output is None and "none" in message

    done.clear()
    runner = logic.startSaliency(volume, logic.saliencyRequest(target="embedding", method="occlusion",
                                                               weights=str(tiny_encoder), device="cpu"),
                                 on_done=lambda o, m: done.append((o, m)))
    work = Path(runner.args[runner.args.index("saliency") + 1]).parent
    runner.cancel()
    assert runner.wait(timeout=30).cancelled
    assert done == [(None, "Cancelled.")] and not work.exists()


def test_a_map_of_zeros_has_no_peak(mrml_scene):
    image = head_phantom(**GEOMETRIES["lps"], **HEAD)
    volume = volume_node_from_image(image, name="head")
    output = saliency.HeatmapOutput(image.with_array(np.zeros(image.shape, np.float32)))
    heat, peak = CTFMLogic().showHeatmap(output, volume, "flat")
    assert peak is None and heat.GetName() == "flat"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0
