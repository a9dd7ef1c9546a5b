"""The modules' Qt-free logic on a real MRML scene (slicer-core): CTFMSlicer.logic and
.dependencies, CTFMSegmentLib (CTFMRetrieveLib: test_retrieve_slicer.py).

Embeddings use a tiny random-weights encoder written to tmp_path in the
published layout, and are compared with CTFMLib's own embedding of the same
Image: the Slicer path must add nothing but the node conversion.
"""

import json
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import GEOMETRIES, body_phantom  # noqa: E402
from CTFMLib.image import ImageError  # noqa: E402
from CTFMSlicer import dependencies  # noqa: E402
from CTFMSlicer.logic import DEFAULT_WEIGHTS, CTFMLogic  # noqa: E402
from CTFMSlicer.nodes import rows_from_table_node, volume_node_from_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-level SegResEncoder with 4 filters (8-value embeddings), random weights, saved as a model folder."""
    torch = pytest.importorskip("torch")
    from CTFMLib.networks import build_encoder
    from CTFMLib.weights import save_pretrained

    torch.manual_seed(0)
    config = {"init_filters": 4, "blocks_down": [1, 1]}
    folder = tmp_path_factory.mktemp("tiny-encoder")
    save_pretrained(build_encoder(config), folder, {"architecture": "SegResEncoder", **config})
    return str(folder)


# --- CTFMSlicer.logic ------------------------------------------------------------------


def test_embed_volume_equals_ctfmlib_on_the_same_image(mrml_scene, tiny_model):
    from CTFMLib.embed import embed_image

    image = body_phantom(**GEOMETRIES["oblique20"])
    node = volume_node_from_image(image, name="ct")
    messages = []
    embedding = CTFMLogic().embedVolume(node, weights=tiny_model, device="cpu", progress=lambda f, m: messages.append(f))
    reference = embed_image(image, weights=tiny_model, device="cpu")
    assert embedding.shape == (8,)
    np.testing.assert_allclose(embedding, reference, rtol=1e-5, atol=1e-6)
    assert messages and messages[-1] == pytest.approx(1.0)


@pytest.mark.slow
def test_point_mode_hands_the_point_to_ctfmlib_in_lps(mrml_scene, tiny_model):
    from CTFMLib.embed import embed_image

    image = body_phantom(**GEOMETRIES["lps"])
    node = volume_node_from_image(image, name="ct")
    point_ras = np.array([-30.0, 12.0, 5.0])  # patient's left, anterior
    embedding = CTFMLogic().embedVolume(node, weights=tiny_model, mode="point", pointRAS=point_ras, device="cpu")
    as_lps = embed_image(image, weights=tiny_model, mode="point", point_lps=[30.0, -12.0, 5.0], device="cpu")
    unflipped = embed_image(image, weights=tiny_model, mode="point", point_lps=point_ras, device="cpu")
    np.testing.assert_allclose(embedding, as_lps, rtol=1e-5, atol=1e-6)
    assert not np.allclose(embedding, unflipped, rtol=1e-3, atol=1e-5)  # the phantom is not left-right symmetric


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "point"}, "point"),
        ({"mode": "slice"}, "mode"),
        ({"device": "tpu"}, "device"),
        ({"weights": ""}, "weights"),
    ],
)
def test_embed_volume_rejects_bad_requests(mrml_scene, kwargs, match):
    node = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="ct")
    with pytest.raises(ValueError, match=match):
        CTFMLogic().embedVolume(node, **{"weights": DEFAULT_WEIGHTS, **kwargs})


def test_embed_volume_refuses_a_vector_volume_before_loading_a_model(mrml_scene):
    rgb = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(ImageError, match="scalar"):
        CTFMLogic().embedVolume(rgb, weights="/nonexistent/model")


def test_embedding_input_problems_follow_the_inputs(mrml_scene):
    logic = CTFMLogic()
    ct = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="ct")
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    assert "input volume" in logic.embeddingInputProblem(None, DEFAULT_WEIGHTS, "volume")
    assert "weights" in logic.embeddingInputProblem(ct, "  ", "volume")
    assert logic.embeddingInputProblem(ct, DEFAULT_WEIGHTS, "volume") is None
    assert "point" in logic.embeddingInputProblem(ct, DEFAULT_WEIGHTS, "point", None)
    assert "point" in logic.embeddingInputProblem(ct, DEFAULT_WEIGHTS, "point", points)  # no control point yet
    points.AddControlPoint([1.0, 2.0, 3.0])
    assert logic.embeddingInputProblem(ct, DEFAULT_WEIGHTS, "point", points) is None


def test_first_point_is_read_in_world_coordinates(mrml_scene):
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    with pytest.raises(ValueError, match="no control points"):
        CTFMLogic.firstPointRAS(points)
    points.AddControlPoint([1.0, 2.0, 3.0])
    points.AddControlPoint([9.0, 9.0, 9.0])
    np.testing.assert_allclose(CTFMLogic.firstPointRAS(points), [1.0, 2.0, 3.0])
    shift = np.eye(4)
    shift[:3, 3] = (10.0, 0.0, -5.0)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    points.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(CTFMLogic.firstPointRAS(points), [11.0, 2.0, -2.0])


def test_embedding_table(mrml_scene):
    values = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    node = CTFMLogic().embeddingTableNode(values, name="emb")
    assert rows_from_table_node(node) == [{"index": 0, "value": 0.5}, {"index": 1, "value": -1.25}, {"index": 2, "value": 3.0}]


def test_catalog_rows_list_the_catalogue_models():
    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))
    rows = CTFMLogic().catalogRows(str(REPO / "Resources" / "Models.json"))
    assert [r["id"] for r in rows] == [m["id"] for m in catalogue["models"]]
    assert all(set(r) == {"id", "title", "task", "repo_id"} for r in rows)
    assert any(r["repo_id"] == DEFAULT_WEIGHTS for r in rows)


# --- CTFMSlicer.dependencies --------------------------------------------------------------


def test_requirements_file_lists_only_what_slicer_lacks():
    names = [r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in dependencies.read_requirements()]
    assert {"safetensors", "huggingface_hub"} <= set(names)
    assert not set(names) & {"simpleitk", "torch", "numpy", "monai", "vtk"}


def test_missing_requirements_reads_installed_metadata(tmp_path):
    installed = importlib_version("numpy")
    assert dependencies.missing_requirements([f"numpy>={installed}"]) == []
    assert dependencies.missing_requirements(["numpy>=999"]) == ["numpy>=999"]
    assert dependencies.missing_requirements(["ctfm-surely-not-a-package-name"]) == ["ctfm-surely-not-a-package-name"]
    assert dependencies.missing_requirements(['numpy>=999; python_version < "3"']) == []  # marker excludes it
    requirements = tmp_path / "req.txt"
    requirements.write_text("# comment\n\nsafetensors>=0.4  # trailing comment\n--index-url https://example.org\n")
    assert dependencies.read_requirements(requirements) == ["safetensors>=0.4"]


def importlib_version(name):
    import importlib.metadata

    return importlib.metadata.version(name)


def test_torch_version_check():
    assert not dependencies.torch_is_sufficient("2.0.1", minimum="2.1")
    assert dependencies.torch_is_sufficient("2.13.0+cpu", minimum="2.1")
    assert dependencies.torch_is_sufficient("2.1.0+cu121", minimum="2.1")
    assert dependencies.installed_torch_version() == importlib_version("torch")


def test_pip_never_installs_what_slicer_or_pytorch_provide():
    with pytest.raises(dependencies.DependencyError, match="SimpleITK"):
        dependencies.ensure_packages(["SimpleITK>=2"], ask_confirmation=False)
    with pytest.raises(dependencies.DependencyError, match="torch"):
        dependencies.ensure_packages(["torch"], ask_confirmation=False)


def test_nothing_to_install_when_all_present():
    # Everything in requirements-slicer.txt is installed in the test environment (pyproject's
    # dependencies), so ensure_packages returns without needing a running Slicer.
    assert dependencies.missing_requirements(dependencies.read_requirements()) == []
    dependencies.ensure_packages(dependencies.read_requirements(), ask_confirmation=False)


# --- CTFMSegmentLib ----------------------------------------------------------------------------


def test_segment_input_checks(mrml_scene, tmp_path):
    from CTFMSegmentLib.logic import CTFMSegmentLogic

    logic = CTFMSegmentLogic()
    ct = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="ct")
    assert logic.inputProblems(ct, "whole-body") == []
    assert any("volume" in p.lower() for p in logic.inputProblems(None, "whole-body"))
    assert any("model" in p.lower() for p in logic.inputProblems(ct, "liver-only"))
    assert any("quality" in p.lower() for p in logic.inputProblems(ct, "whole-body", quality="ultra"))

    # A model folder must exist and hold the published layout.
    assert any("Choose" in p for p in logic.inputProblems(ct, "folder", Path()))  # Path() is an unset parameter
    assert any("does not exist" in p for p in logic.inputProblems(ct, "folder", tmp_path / "missing"))
    problems = logic.inputProblems(ct, "folder", tmp_path)
    assert any("config.json" in p and "model.safetensors" in p for p in problems)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert logic.inputProblems(ct, "folder", tmp_path) == []


def test_segment_refuses_vector_volume(mrml_scene):
    from CTFMSegmentLib.logic import CTFMSegmentLogic

    rgb = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    assert any("scalar" in p for p in CTFMSegmentLogic().inputProblems(rgb, "whole-body"))


# --- embedding in a child process (what the widget uses) ---------------------------------


@pytest.mark.slow
def test_start_embedding_in_a_child_process_equals_in_process(mrml_scene, tiny_model):
    image = body_phantom(**GEOMETRIES["oblique20"])
    node = volume_node_from_image(image, name="ct")
    logic = CTFMLogic()
    reference = logic.embedVolume(node, weights=tiny_model, device="cpu")
    events, done = [], []
    runner = logic.startEmbedding(node, weights=tiny_model, device="cpu",
                                  on_progress=lambda f, m: events.append(f), on_done=lambda v, m: done.append((v, m)))
    result = runner.wait(timeout=120)
    assert result.ok, result.stderr_tail
    assert len(done) == 1 and done[0][0] is not None
    np.testing.assert_allclose(done[0][0], reference, rtol=1e-5, atol=1e-6)
    assert events and events[-1] == pytest.approx(1.0)
    assert not Path(runner.args[runner.args.index("embed") + 1]).parent.exists()  # temporary files removed
    # point mode: the RAS point reaches the child in LPS
    point_ras = np.array([-30.0, 12.0, 5.0])
    done.clear()
    logic.startEmbedding(node, weights=tiny_model, mode="point", pointRAS=point_ras, device="cpu",
                         on_done=lambda v, m: done.append(v)).wait(timeout=120)
    np.testing.assert_allclose(done[0], logic.embedVolume(node, tiny_model, "point", point_ras, "cpu"), rtol=1e-5, atol=1e-6)


def test_start_embedding_reports_failure_and_cancel(mrml_scene, tiny_model, tmp_path):
    node = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="ct")
    done = []
    runner = CTFMLogic().startEmbedding(node, weights=str(tmp_path / "no-such-model"), device="cpu",
                                        on_done=lambda v, m: done.append((v, m)))
    assert not runner.wait(timeout=120).ok
    assert done[0][0] is None and "no file, folder or known model named" in done[0][1]  # (a long path is cut)

    big = volume_node_from_image(body_phantom(shape=(160, 160, 60), spacing=(1.0, 1.0, 2.0)), name="big")
    done.clear()
    runner = CTFMLogic().startEmbedding(big, weights=tiny_model, mode="scan", device="cpu",
                                        on_done=lambda v, m: done.append((v, m)))
    runner.cancel()
    result = runner.wait(timeout=30)
    assert result.cancelled and done == [(None, "Cancelled.")]
    assert not runner.running
