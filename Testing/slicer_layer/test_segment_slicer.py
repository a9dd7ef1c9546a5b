"""CT-FM Segment's Slicer side on a real MRML scene (slicer-core): segmentation nodes from label maps,
and ``ctfm segment`` run in a child process.

Segment voxels are checked through Slicer's own export
(``vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode``) onto the
input volume's grid, not through the code under test; label descriptions are
hand-made objects with ``.value .name .color .terminology``, the protocol of
``CTFMLib.labels.LabelInfo``.
"""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom  # noqa: E402
from CTFMLib.image import Image, ImageError, write_image  # noqa: E402
from CTFMSegmentLib import models as segment_models  # noqa: E402
from CTFMSegmentLib import output as segment_output  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic  # noqa: E402
from CTFMSegmentLib.segmentation import load_terminology, loaded_terminology_names  # noqa: E402
from CTFMSlicer.nodes import image_from_volume_node, volume_node_from_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LIVER_TERM = (
    "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver"
    "~^^~Anatomic codes - DICOM master list~^^~^^"
)
TISSUE_TERM = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue"
    "~^^~Anatomic codes - DICOM master list~^^~^^"
)
TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName() in Slicer's source


def hand_made_infos(skip=("spleen",), extra=((42, "absent_structure"),)):
    """Descriptions of the body phantom's labels (minus ``skip``, plus values that are not in the image)."""
    infos = [
        SimpleNamespace(value=v, name=name, color=(v / 10.0, 1.0 - v / 10.0, 0.25),
                        terminology=LIVER_TERM if name == "liver" else TISSUE_TERM)
        for name, v in BODY_LABELS.items() if name not in skip
    ]
    infos += [SimpleNamespace(value=v, name=n, color=(0.5, 0.5, 0.5), terminology=TISSUE_TERM) for v, n in extra]
    return infos


def phantom_volume(geometry="lps"):
    image, labels = body_phantom(return_labels=True, **GEOMETRIES[geometry])
    return volume_node_from_image(image, name="ct"), labels


def segments(node) -> dict:
    """{label value: vtkSegment} of a segmentation node."""
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegment(i)
            for i in range(segmentation.GetNumberOfSegments())}


def exported_mask(node, segment_name, volume) -> Image:
    """One segment resampled by Slicer onto the volume's grid, as an Image (voxels 0/1)."""
    scene = node.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(node.GetSegmentation().GetSegmentIdBySegmentName(segment_name))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        return image_from_volume_node(labelmap)
    finally:
        if labelmap.GetDisplayNode() is not None:
            scene.RemoveNode(labelmap.GetDisplayNode().GetColorNode())
        scene.RemoveNode(labelmap)


def tag_of(segment) -> str:
    value = vtk.reference("")
    assert segment.GetTag(TAG, value)
    return str(value)


# --- segmentationNodeFromLabels ------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["lps", "oblique20", "permuted"])
def test_segments_are_the_labels_present_named_coloured_and_tagged(mrml_scene, geometry):
    volume, labels = phantom_volume(geometry)
    infos = hand_made_infos()
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, infos, volume, "body", show3D=False)
    present = sorted(set(np.unique(labels.array).tolist()) - {0})
    found = segments(node)
    assert sorted(found) == present  # the absent structure (42) has no segment
    by_value = {i.value: i for i in infos}
    for value, segment in found.items():
        if value == BODY_LABELS["spleen"]:  # present but undescribed: kept, with a generic name
            assert segment.GetName() == "label 4"
            continue
        info = by_value[value]
        assert segment.GetName() == info.name
        assert segment.GetColor() == pytest.approx(info.color, abs=1e-6)
        assert tag_of(segment) == info.terminology
    assert node.GetName() == "body" and node.GetScene() is mrml_scene
    assert node.GetDisplayNode() is not None


@pytest.mark.parametrize("geometry", ["lps", "oblique20", "permuted", "odd_sizes"])
def test_segment_voxels_equal_the_labels_on_the_volume_grid(mrml_scene, geometry):
    volume, labels = phantom_volume(geometry)
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, hand_made_infos(skip=()), volume, show3D=False)
    for name, value in BODY_LABELS.items():
        mask = exported_mask(node, name, volume)
        assert mask.geometry.same_grid(labels.geometry, atol=1e-6)
        np.testing.assert_array_equal(mask.array > 0, labels.array == value, err_msg=name)


def test_reference_geometry_is_the_input_volume(mrml_scene):
    volume, labels = phantom_volume("oblique20")
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, hand_made_infos(), volume, show3D=False)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    text = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    numbers = [float(x) for x in text.strip(";").split(";")]
    matrix, extent = np.array(numbers[:16]).reshape(4, 4), numbers[16:]
    expected = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(expected)
    np.testing.assert_allclose(matrix, [[expected.GetElement(r, c) for c in range(4)] for r in range(4)], atol=1e-9)
    dims = volume.GetImageData().GetDimensions()
    assert extent == [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]


def test_volume_under_a_linear_transform(mrml_scene):
    """Labels arrive in world coordinates (as ctfm segment computes them); the segmentation follows the volume."""
    volume, labels = phantom_volume("oblique20")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (25.0, -10.0, 4.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = image_from_volume_node(volume).geometry
    assert not world.same_grid(labels.geometry)  # the transform moved it
    world_labels = Image.from_geometry(labels.array, world)
    node = CTFMSegmentLogic().segmentationNodeFromLabels(world_labels, hand_made_infos(skip=()), volume, show3D=False)
    assert node.GetTransformNodeID() == transform.GetID()
    liver = exported_mask(node, "liver", volume)
    np.testing.assert_array_equal(liver.array > 0, labels.array == BODY_LABELS["liver"])


def test_labels_off_the_volume_grid_are_refused_and_leave_the_scene_unchanged(mrml_scene):
    volume, labels = phantom_volume("lps")
    before = mrml_scene.GetNumberOfNodes()
    moved = Image(labels.array, labels.spacing, labels.origin + np.array([0.0, 0.0, 3.0]), labels.direction)
    with pytest.raises(ImageError, match="grid"):
        CTFMSegmentLogic().segmentationNodeFromLabels(moved, hand_made_infos(), volume)
    with pytest.raises(ImageError, match="integer"):
        CTFMSegmentLogic().segmentationNodeFromLabels(labels.with_array(labels.array.astype(np.float32)), [], volume)
    twice = hand_made_infos() + [SimpleNamespace(value=3, name="liver_again", color=None, terminology="")]
    with pytest.raises(ValueError, match="twice"):
        CTFMSegmentLogic().segmentationNodeFromLabels(labels, twice, volume)
    assert mrml_scene.GetNumberOfNodes() == before


def test_an_output_node_gets_its_segments_replaced(mrml_scene):
    volume, labels = phantom_volume("lps")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    output.GetSegmentation().AddEmptySegment("old", "old")
    before = mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, hand_made_infos(skip=()), volume, node=output, show3D=False)
    assert node is output and node.GetName() == "mine"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert sorted(s.GetName() for s in segments(node).values()) == sorted(BODY_LABELS)
    np.testing.assert_array_equal(exported_mask(node, "aorta", volume).array > 0, labels.array == BODY_LABELS["aorta"])


def test_seg_nrrd_written_by_slicer_reads_back_equal(mrml_scene, tmp_path):
    volume, labels = phantom_volume("oblique20")
    infos = hand_made_infos()
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, infos, volume, show3D=False)
    path = tmp_path / "body.seg.nrrd"
    writer = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(str(path))
    assert writer.WriteData(node)
    back = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "back")
    reader = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(back)
    original, read = segments(node), segments(back)
    assert sorted(read) == sorted(original)
    for value, segment in original.items():
        assert read[value].GetName() == segment.GetName()
        assert read[value].GetColor() == pytest.approx(segment.GetColor(), abs=1e-5)  # the file keeps 6 digits
        assert tag_of(read[value]) == tag_of(segment)
        np.testing.assert_array_equal(exported_mask(back, segment.GetName(), volume).array > 0, labels.array == value)


def test_the_segmentation_joins_the_volume_study(mrml_scene):
    volume, labels = phantom_volume("lps")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    # In Slicer a plugin gives each new node an item; slicer-core has no plugins, so make the volume's here.
    hierarchy.CreateItem(study, volume)
    node = CTFMSegmentLogic().segmentationNodeFromLabels(labels, hand_made_infos(), volume, show3D=False)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    # A volume without an item (scripts, slicer-core): the segmentation is made all the same.
    loose, loose_labels = phantom_volume("lps")
    other = CTFMSegmentLogic().segmentationNodeFromLabels(loose_labels, hand_made_infos(), loose, show3D=False)
    assert other.GetSegmentation().GetNumberOfSegments() == len(BODY_LABELS)


def test_show_3d_builds_closed_surfaces(mrml_scene):
    volume, labels = phantom_volume("lps")
    logic = CTFMSegmentLogic()
    shown = logic.segmentationNodeFromLabels(labels, hand_made_infos(), volume, show3D=True)
    flat = logic.segmentationNodeFromLabels(labels, hand_made_infos(), volume, show3D=False)
    assert shown.GetSegmentation().ContainsRepresentation("Closed surface")
    assert not flat.GetSegmentation().ContainsRepresentation("Closed surface")
    liver = shown.GetSegmentation().GetSegment(shown.GetSegmentation().GetSegmentIdBySegmentName("liver"))
    assert liver.GetRepresentation("Closed surface").GetNumberOfPoints() > 0


def test_whole_body_labels_and_the_ctfm_terminology_context(mrml_scene):
    labels_module = pytest.importorskip("CTFMLib.labels", reason="CTFMLib.labels is not written yet")
    whole_body = labels_module.whole_body_labels()
    volume, phantom_labels = phantom_volume("lps")
    values = np.zeros_like(phantom_labels.array)
    values[phantom_labels.array == BODY_LABELS["liver"]] = 5
    values[phantom_labels.array == BODY_LABELS["spleen"]] = 1
    values[phantom_labels.array == BODY_LABELS["vertebra"]] = 117
    node = CTFMSegmentLogic().segmentationNodeFromLabels(phantom_labels.with_array(values), whole_body, volume, show3D=False)
    by_value = {i.value: i for i in whole_body}
    found = segments(node)
    assert sorted(found) == [1, 5, 117]
    for value, segment in found.items():
        assert segment.GetName() == by_value[value].name
        assert tag_of(segment) == by_value[value].terminology
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    assert load_terminology(terminologies) == labels_module.CTFM_CONTEXT
    assert terminologies.IsTerminologyContextLoaded(labels_module.CTFM_CONTEXT)
    assert load_terminology(terminologies) == labels_module.CTFM_CONTEXT  # a second load is a no-op


class TerminologiesLogicOfSlicer58(slicer.vtkSlicerTerminologiesModuleLogic):
    """Slicer 5.6 and 5.8's Terminologies logic: IsTerminologyContextLoaded came in 5.10 (commit 65409219f7)."""

    def __getattribute__(self, name):
        if name == "IsTerminologyContextLoaded":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_the_ctfm_terminology_loads_on_slicer_5_6_and_5_8():
    labels_module = pytest.importorskip("CTFMLib.labels")
    terminologies = TerminologiesLogicOfSlicer58()
    with pytest.raises(AttributeError):
        terminologies.IsTerminologyContextLoaded(labels_module.CTFM_CONTEXT)
    assert load_terminology(terminologies) == labels_module.CTFM_CONTEXT
    assert labels_module.CTFM_CONTEXT in loaded_terminology_names(terminologies)
    count = len(loaded_terminology_names(terminologies))
    assert load_terminology(terminologies) == labels_module.CTFM_CONTEXT
    assert len(loaded_terminology_names(terminologies)) == count  # not loaded twice


# --- model choices, structures, the child's output ----------------------------------------------


def test_model_choices_come_from_the_catalogue():
    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))
    tumour = [m["id"] for m in catalogue["models"] if m["task"] == "segmentation" and m["id"] != "whole_body_segmentation"]
    assert segment_models.MODELS == ("whole-body", *tumour, "folder")
    assert segment_models.model_argument("whole-body") == "whole-body"
    segment = pytest.importorskip("CTFMLib.segment")
    assert segment.model_source("whole-body") == segment_models.WHOLE_BODY_ID  # the model whose labels we check against
    assert segment_models.model_argument("folder", Path("/models/liver")) == str(Path("/models/liver"))


def test_structure_subset_is_checked_against_the_model_labels(tmp_path):
    assert segment_models.parse_structures(" liver, spleen,,liver ") == ["liver", "spleen"]
    assert segment_models.structures_problem("liver, kidney_left", "whole-body") is None
    # compared as ctfm segment compares them: case, spaces and dashes do not matter
    assert segment_models.structures_problem("Liver, kidney left, Kidney-Right", "whole-body") is None
    problem = segment_models.structures_problem("liver, livr, brainz", "whole-body")
    assert "livr (did you mean liver?)" in problem and "brainz" in problem and "liver," not in problem
    # a folder model: its own labels.json, in either published form
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": {"name": "liver_tumor"}, "2": "liver"}))
    assert segment_models.model_label_names("folder", tmp_path) == {1: "liver_tumor", 2: "liver"}
    assert segment_models.structures_problem("liver_tumor", "folder", tmp_path) is None
    assert "spleen" in segment_models.structures_problem("spleen", "folder", tmp_path)
    # a folder without labels: nothing to check against here
    assert segment_models.structures_problem("anything", "folder", tmp_path / "nowhere") is None


def test_input_problems_cover_device_and_structures(mrml_scene):
    volume, _ = phantom_volume("lps")
    logic = CTFMSegmentLogic()
    assert logic.inputProblems(volume, "whole-body", device="cuda", structures="liver") == []
    assert any("device" in p for p in logic.inputProblems(volume, "whole-body", device="tpu"))
    assert any("livr" in p for p in logic.inputProblems(volume, "whole-body", structures="livr"))
    with pytest.raises(ValueError, match="livr"):  # refused before anything is written or started
        logic.startSegmentation(volume, "whole-body", structures="livr")


# The sidecar's one name is CTFMLib.labels.sidecar_path's (what ctfm segment writes); no other name is guessed.
@pytest.mark.parametrize("suffix, sidecar", [(".nrrd", "labels.labels.json"), (".nii.gz", "labels.labels.json")])
def test_read_output_puts_labels_exactly_on_the_input_grid(tmp_path, suffix, sidecar):
    image, labels = body_phantom(return_labels=True, **GEOMETRIES["oblique20"])
    out = write_image(labels, tmp_path / f"labels{suffix}")
    (tmp_path / sidecar).write_text(json.dumps({str(v): n for n, v in BODY_LABELS.items() if n != "aorta"}))
    output = segment_output.read_output(out, image.geometry, "whole-body")
    np.testing.assert_array_equal(output.labels.array, labels.array)
    assert np.issubdtype(output.labels.array.dtype, np.integer)
    # exactly the input's geometry, not the file's (NIfTI rounds it to float32)
    np.testing.assert_array_equal(output.labels.affine, image.affine)
    names = {int(i.value): i.name for i in output.label_infos}
    assert names[BODY_LABELS["liver"]] == "liver"
    assert names[BODY_LABELS["aorta"]] == f"label {BODY_LABELS['aorta']}"  # present, but not in the sidecar


def test_read_output_refuses_labels_on_another_grid(tmp_path):
    image, labels = body_phantom(return_labels=True, **GEOMETRIES["lps"])
    moved = Image(labels.array, labels.spacing * 1.01, labels.origin, labels.direction)
    out = write_image(moved, tmp_path / "labels.nrrd")
    with pytest.raises(ImageError, match="grid"):
        segment_output.read_output(out, image.geometry)


def test_failure_messages_and_out_of_memory():
    from CTFMSlicer.process import ProcessResult

    failed = ProcessResult(returncode=2, cancelled=False, stderr_tail="", seconds=1.0)
    lines = ["loading model", "ctfm: error: config.json of /m is not valid JSON", ""]
    message = segment_output.failure_message(failed, lines)
    assert message.startswith("Segmentation failed (exit code 2): ctfm: error: config.json")
    assert "loading model" in message
    assert segment_output.failure_message(ProcessResult(None, True, "", 0.5), lines) == "Cancelled."
    assert segment_output.is_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert segment_output.is_out_of_memory("ctfm: error: segmenting this 512x512x900 image needs about 31.5 GB of memory, more")
    assert not segment_output.is_out_of_memory("ctfm: error: no such file")
    assert [segment_output.format_duration(s) for s in (0.2, 40, 200, 7200)] == ["about 1 s", "about 40 s", "about 3 min", "about 2.0 h"]


def test_expected_time_is_a_positive_number_or_absent(mrml_scene, ctfm_cache):
    """The plan's estimate (no torch needed: see test_segment_plan_slicer.py); the presets are ordered by cost."""
    volume, _ = phantom_volume("lps")
    logic = CTFMSegmentLogic()
    full, standard, fast = (logic.expectedSeconds(volume, q, "cpu") for q in ("full", "standard", "fast"))
    assert full > 0 and standard > 0 and fast > 0 and fast <= standard <= full
    assert logic.expectedSeconds(None, "full", "cpu") is None


def test_quality_and_spacing_choices_are_the_clis(mrml_scene):
    """The panel offers exactly what `ctfm segment --quality/--spacing` accept, with the core's default quality."""
    from CTFMLib.cli import build_parser
    from CTFMLib.segment_plan import DEFAULT_QUALITY, QUALITIES

    segment = next(a for a in build_parser()._actions if a.dest == "command").choices["segment"]
    quality = next(a for a in segment._actions if a.dest == "quality")
    assert segment_models.QUALITIES == tuple(quality.choices) == tuple(QUALITIES)
    assert segment_models.DEFAULT_QUALITY == DEFAULT_QUALITY
    assert segment_models.SPACINGS == ("model", "native")
    for spacing in segment_models.SPACINGS:
        assert segment.parse_args(["ct.nii.gz", "--plan", "--spacing", spacing]).spacing == spacing
    volume, _ = phantom_volume("lps")
    logic = CTFMSegmentLogic()
    assert logic.inputProblems(volume, "whole-body", quality="standard", spacing="native") == []
    assert any("quality" in p for p in logic.inputProblems(volume, "whole-body", quality="medium"))
    assert any("spacing" in p for p in logic.inputProblems(volume, "whole-body", spacing="1.5"))


# --- ctfm segment in a child process ----------------------------------------------------------------


def segment_cli_available() -> bool:
    from CTFMLib.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return "segment" in subparsers.choices


needs_cli = pytest.mark.skipif(not segment_cli_available(), reason="`ctfm segment` is not in CTFMLib.cli yet (issue 3, item 4)")
TINY_LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left"}


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    """A small random-weights SegResNetDS with three labels, in the published layout."""
    torch = pytest.importorskip("torch")
    from CTFMLib.networks import build_network
    from CTFMLib.weights import save_pretrained

    torch.manual_seed(0)
    config = {"architecture": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1], "out_channels": 1 + len(TINY_LABELS)}
    folder = tmp_path_factory.mktemp("tiny-segmenter")
    save_pretrained(build_network(config), folder, config, labels=dict(TINY_LABELS))
    return folder


def run_to_end(runner, done, timeout=300):
    result = runner.wait(timeout=timeout)
    assert len(done) == 1
    return result


@pytest.mark.slow
@needs_cli
def test_start_segmentation_end_to_end(mrml_scene, tiny_segmenter):
    from CTFMLib.segment import segment_image

    image = body_phantom(**GEOMETRIES["oblique20"])
    volume = volume_node_from_image(image, name="ct")
    logic = CTFMSegmentLogic()
    before = mrml_scene.GetNumberOfNodes()
    events, lines, done = [], [], []
    runner = logic.startSegmentation(volume, "folder", tiny_segmenter, "full", "cpu", None,
                                     on_progress=lambda f, m: events.append(f), on_line=lambda s, t: lines.append(t),
                                     on_done=lambda *args: done.append(args))
    result = run_to_end(runner, done)
    output, message, log = done[0]
    assert result.ok and output is not None, message
    assert runner.args[runner.args.index("--quality") + 1] == "full" and "--fast" not in runner.args
    assert runner.args[runner.args.index("--spacing") + 1] == "model"
    assert mrml_scene.GetNumberOfNodes() == before  # the run itself adds nothing to the scene
    assert not Path(runner.args[runner.args.index("segment") + 1]).parent.exists()  # temporary files removed
    assert events and events[-1] == pytest.approx(1.0)
    reference = segment_image(image, weights=str(tiny_segmenter), device="cpu", quality="full")
    np.testing.assert_array_equal(output.labels.array, reference.labels.array)
    assert output.labels.geometry.same_grid(image.geometry, atol=1e-9)
    node = logic.segmentationNodeFromLabels(output.labels, output.label_infos, volume, show3D=False)
    present = set(np.unique(reference.labels.array).tolist()) - {0}
    assert present and {s.GetName() for s in segments(node).values()} == {TINY_LABELS[str(v)] for v in present}

    # fast quality with a structure subset reaches the child as --quality fast --structures
    done.clear()
    runner = logic.startSegmentation(volume, "folder", tiny_segmenter, "fast", "cpu", "Spleen",
                                     on_done=lambda *args: done.append(args))
    assert runner.args[runner.args.index("--quality") + 1] == "fast" and "--fast" not in runner.args
    assert run_to_end(runner, done).ok, done[0][1]
    subset = segment_image(image, weights=str(tiny_segmenter), device="cpu", quality="fast", structures=["spleen"])
    np.testing.assert_array_equal(done[0][0].labels.array, subset.labels.array)
    assert set(np.unique(done[0][0].labels.array).tolist()) <= {0, 2}
    assert {int(i.value): i.name for i in done[0][0].label_infos}.get(2) == "spleen"


@pytest.mark.slow
@needs_cli
def test_an_error_in_the_child_reaches_on_done_with_its_log(mrml_scene, tmp_path):
    volume, _ = phantom_volume("lps")
    corrupt = tmp_path / "corrupt-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{ this is not json")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    before = mrml_scene.GetNumberOfNodes()
    done = []
    runner = CTFMSegmentLogic().startSegmentation(volume, "folder", corrupt, device="cpu", on_done=lambda *args: done.append(args))
    result = run_to_end(runner, done, timeout=120)
    output, message, log = done[0]
    assert not result.ok and output is None
    assert message.startswith("Segmentation failed")
    error_lines = [line for line in log.splitlines() if "error" in line.lower()]
    assert error_lines and error_lines[-1].strip() in message  # the child's own words reach the user
    assert mrml_scene.GetNumberOfNodes() == before


@pytest.mark.slow
@needs_cli
def test_cancel_stops_the_child_quickly_and_leaves_the_scene_unchanged(mrml_scene, tiny_segmenter):
    big = volume_node_from_image(body_phantom(shape=(256, 256, 160), spacing=(1.0, 1.0, 1.0)), name="big")
    before = mrml_scene.GetNumberOfNodes()
    done, events = [], []
    runner = CTFMSegmentLogic().startSegmentation(big, "folder", tiny_segmenter, device="cpu", spacing="native",
                                                  on_progress=lambda f, m: events.append(f), on_done=lambda *args: done.append(args))
    # the panel's default quality, and the spacing chosen
    assert runner.args[runner.args.index("--quality") + 1] == segment_models.DEFAULT_QUALITY
    assert runner.args[runner.args.index("--spacing") + 1] == "native"
    deadline = time.monotonic() + 60
    while not events and time.monotonic() < deadline and runner.poll():  # wait until the child is at work
        time.sleep(0.05)
    assert runner.running, "the segmentation ended before it could be cancelled"
    started = time.monotonic()
    runner.cancel()
    result = runner.wait(timeout=10)
    assert time.monotonic() - started < 2.0
    assert result.cancelled and not runner.running
    assert done[0][0] is None and done[0][1] == "Cancelled."
    assert mrml_scene.GetNumberOfNodes() == before
    assert not Path(runner.args[runner.args.index("segment") + 1]).parent.exists()


def test_tumour_models_need_a_model_trained_and_imported(mrml_scene, ctfm_cache):
    volume, _ = phantom_volume("lps")
    logic = CTFMSegmentLogic()
    tumour = [m for m in segment_models.MODELS if m not in ("whole-body", "folder")]
    if not tumour:
        pytest.skip("the catalogue lists no tumour models")
    problems = logic.inputProblems(volume, tumour[0])
    assert any("CT-FM Train" in p and f"--id {tumour[0]}" in p for p in problems), problems
    imported = ctfm_cache / "models" / tumour[0]
    imported.mkdir(parents=True)
    (imported / "config.json").write_text("{}")
    (imported / "model.safetensors").write_bytes(b"")
    assert logic.inputProblems(volume, tumour[0]) == []
    assert logic.inputProblems(volume, "whole-body") == []  # published: downloaded when needed


def test_a_one_line_failure_is_not_repeated():
    from CTFMSlicer.process import ProcessResult

    failed = ProcessResult(returncode=2, cancelled=False, stderr_tail="", seconds=1.0)
    message = segment_output.failure_message(failed, ["ctfm: error: no such model"])
    assert message == "Segmentation failed (exit code 2): ctfm: error: no such model"
    assert segment_output.failure_message(failed, []) == "Segmentation failed (exit code 2)"
