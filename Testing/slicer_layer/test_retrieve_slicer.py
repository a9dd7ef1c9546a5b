"""The CT-FM Retrieve module's logic on a real MRML scene (slicer-core), with real child processes.

- Results table: hits with LPS centres become rows with RAS locations (x and y negated, by hand).
- Add: scene-only volumes are written into the index folder (voxels and geometry equal to the
  nodes'), added by ``ctfm index add`` in a child process, remembered (a second add skips them).
- Find similar from the crosshair (world RAS) and from a markups ROI: the child's hits equal
  ``ctfm index query`` run directly on the same file with the LPS point/box written here by hand.
- Show a result: the case is read into a node whose IJK-to-RAS is the file's geometry (from
  SimpleITK), the crosshair, the centred slice views and a locked point sit on the match (RAS).
- Errors: folders that are not indexes, other weights, cancel.
"""

import json
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import GEOMETRIES, body_phantom, head_phantom  # noqa: E402
from ctfm_testing.plugin import run_ctfm  # noqa: E402
from CTFMLib.image import read_image, write_image  # noqa: E402
from CTFMRetrieveLib import cases, results  # noqa: E402
from CTFMRetrieveLib.jobs import QueryHit, parse_add_output, query_arguments  # noqa: E402
from CTFMRetrieveLib.logic import RESULT_COLUMNS, CTFMRetrieveLogic  # noqa: E402
from CTFMSlicer.nodes import image_from_volume_node, rows_from_table_node, volume_node_from_image  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def no_thumbnail_folders_left():
    """The logic keeps a search's thumbnails until the next search or the module's cleanup; tests clean up too."""
    import tempfile

    from CTFMSlicer.process import remove_work_folder

    before = set(Path(tempfile.gettempdir()).glob("ctfm-retrieve-thumbnails-*"))
    yield
    for folder in set(Path(tempfile.gettempdir()).glob("ctfm-retrieve-thumbnails-*")) - before:
        remove_work_folder(folder)


def wait(runner, done, timeout=300):
    result = runner.wait(timeout=timeout)
    assert len(done) == 1, result.describe()
    return result, done[0]


def add(logic, index, weights, volumes=(), folders=()):
    done = []
    runner = logic.startAdd(index, volumes, folders, weights=str(weights), device="cpu",
                            on_done=lambda outcome, message: done.append((outcome, message)))
    return wait(runner, done)[1]


def query(logic, index, volume, mode="crosshair", roi=None, k=10, exclude=True, thumbnails=True):
    done = []
    runner = logic.startQuery(index, volume, mode, roi, k, exclude, thumbnails, "cpu",
                              on_done=lambda hits, message: done.append((hits, message)))
    return wait(runner, done)[1]


def set_crosshair(scene, ras):
    node = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") or scene.AddNode(slicer.vtkMRMLCrosshairNode())
    node.SetCrosshairRAS(*ras)
    return node


def test_results_table_holds_ras_locations(mrml_scene):
    hits = [QueryHit(2, 0.25, 7, "/data/b.nii.gz", None, np.array([10.0, -20.0, 30.0]), "patch", "/t/2.png"),
            QueryHit(1, 0.75, 3, "/data/dicom", "1.2.3.4", np.array([-1.5, 2.0, -3.0]), "patch")]
    node = CTFMRetrieveLogic().resultsTableNode(hits)
    assert [node.GetColumnName(c) for c in range(node.GetNumberOfColumns())] == list(RESULT_COLUMNS)
    rows = rows_from_table_node(node)
    assert [r["rank"] for r in rows] == [1, 2] and [r["scan_id"] for r in rows] == [3, 7]
    assert [(r["R"], r["A"], r["S"]) for r in rows] == [(1.5, -2.0, -3.0), (-10.0, 20.0, 30.0)]
    assert [r["case"] for r in rows] == ["dicom (1.2.3.4)", "b"]
    second = CTFMRetrieveLogic().resultOfRow(node, 1)
    assert second["path"] == "/data/b.nii.gz" and second["series_uid"] is None and second["thumbnail"] == "/t/2.png"
    np.testing.assert_array_equal(second["ras"], [-10.0, 20.0, 30.0])
    assert CTFMRetrieveLogic().resultOfRow(node, 0)["series_uid"] == "1.2.3.4"
    with pytest.raises(ValueError, match="no row 3"):
        CTFMRetrieveLogic().resultOfRow(node, 2)
    # a new search replaces the rows of the same table node
    again = CTFMRetrieveLogic().resultsTableNode(hits[:1], tableNode=node)
    assert again is node and node.GetNumberOfRows() == 1


def test_the_selected_view_row_opens_that_hit(mrml_scene):
    """A table view shows the column names as headers (Slicer's default would show them as the first row, so
    view row 1 would open hit 2 and the last hit none: qMRMLTableModel's tableRowOffset, Slicer 5.6 to main)."""
    hits = [QueryHit(r, s, r, f"/data/case{r}.nii.gz", None, np.zeros(3), "patch") for r, s in ((1, 0.9), (2, 0.8), (3, 0.7))]
    logic = CTFMRetrieveLogic()
    node = logic.resultsTableNode(hits)
    assert node.GetUseColumnTitleAsColumnHeader()
    opened = [logic.resultOfRow(node, logic.resultRowOfViewRow(node, view_row))["case"] for view_row in range(3)]
    assert opened == ["case1", "case2", "case3"]
    assert logic.resultRowOfViewRow(node, 3) is None and logic.resultRowOfViewRow(node, -1) is None
    # a table saved before (column names shown as the view's first row): that row opens nothing
    node.SetUseColumnTitleAsColumnHeader(False)
    assert logic.resultRowOfViewRow(node, 0) is None
    assert [logic.resultRowOfViewRow(node, v) for v in (1, 2, 3, 4)] == [0, 1, 2, None]


def test_find_similar_follows_the_crosshair_and_the_roi(mrml_scene):
    """Moving the crosshair or the ROI (which does not modify the parameter node) reaches the panel, so its
    "outside the query volume" state follows them; after stop() nothing is observed."""
    from CTFMSlicer.nodes import QueryPlaceObserver

    volume = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="query", scene=mrml_scene)
    centre = results.volume_centre_ras(volume)
    far = centre + 1000.0
    crosshair = set_crosshair(mrml_scene, far)
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*centre)
    roi.SetSize(10.0, 10.0, 10.0)
    logic, seen = CTFMRetrieveLogic(), []

    def outside(mode):
        return any("outside the query volume" in p for p in logic.queryProblems(None, volume, mode, roi, mrml_scene))

    observer = QueryPlaceObserver(lambda: seen.append((outside("crosshair"), outside("roi"))))
    observer.observe(mrml_scene, roi)
    assert outside("crosshair") and not outside("roi")
    crosshair.SetCrosshairRAS(*centre)
    assert seen[-1] == (False, False)
    roi.SetCenter(*far)
    assert seen[-1] == (False, True)
    crosshair.SetCrosshairRAS(*far)
    assert seen[-1] == (True, True)
    observer.stop()
    count = len(seen)
    crosshair.SetCrosshairRAS(*centre)
    roi.SetCenter(*centre)
    assert len(seen) == count


def test_query_arguments_parse_with_the_real_cli():
    from CTFMLib.cli import build_parser

    args = query_arguments("/idx", "/q.nrrd", "crosshair", point_lps=[-30.5, 12.0, 5.0], k=3,
                           exclude_paths=["/data/a.nrrd"], thumbnails="/thumbs")
    parsed = build_parser().parse_args(args)
    assert parsed.point == "-30.5,12.0,5.0" and parsed.k == 3 and parsed.json
    assert parsed.exclude_scan == ["/data/a.nrrd"] and parsed.thumbnails == "/thumbs"
    box = build_parser().parse_args(query_arguments("/idx", "/q.nrrd", "roi", box_lps=[-1, -2, -3, 4, 5, 6]))
    assert box.box == "-1.0,-2.0,-3.0,4.0,5.0,6.0" and box.point is None
    assert build_parser().parse_args(query_arguments("/idx", "/q.nrrd", "scan")).point is None
    with pytest.raises(ValueError, match="query mode"):
        query_arguments("/idx", "/q.nrrd", "sphere")


def test_add_output_is_read_back():
    summary = {"index": "/idx", "added": 1, "already_indexed": 3, "not_ct": [], "failed": ["/x/broken.nii.gz"],
               "total": 5}
    outcome = parse_add_output([json.dumps(summary)], ["[1/2] a: added as scan 1 (4 patches)",
                                                        "ctfm: FAILED /x/broken.nii.gz: not a readable image file"])
    assert (outcome.added, outcome.skipped, outcome.total) == (1, 3, 5)
    assert outcome.failed == [("/x/broken.nii.gz", "not a readable image file")]
    assert "1 failed" in outcome.summary() and "broken" in outcome.summary()
    assert parse_add_output(["something else"], []) is None


def test_index_folder_checks(tmp_path):
    logic = CTFMRetrieveLogic()
    assert "Choose an index folder" in logic.indexProblem(Path(), forAdding=True)
    assert logic.indexProblem(tmp_path / "new", forAdding=True) is None  # a new index may be created there
    assert "holds no index" in logic.indexProblem(tmp_path / "new")  # but there is nothing to search yet
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.docx").write_text("mine")
    assert "not empty" in logic.indexProblem(tmp_path / "busy", forAdding=True)
    (tmp_path / "file").write_text("x")
    assert "is a file" in logic.indexProblem(tmp_path / "file", forAdding=True)
    assert logic.indexStatisticsText(tmp_path / "new") == "A new index: add cases to create it."


@pytest.fixture
def scene_cases(mrml_scene):
    """Three scene-only CT volumes in different grids: two bodies (oblique, permuted) and a head."""
    return [
        volume_node_from_image(body_phantom(**GEOMETRIES["oblique20"], seed=1), name="body oblique"),
        volume_node_from_image(body_phantom(**GEOMETRIES["permuted"], seed=2, body_radius_mm=80), name="body/permuted"),
        volume_node_from_image(head_phantom(**GEOMETRIES["lps"], seed=3), name="head"),
    ]


@pytest.mark.slow
def test_add_find_and_show_end_to_end(mrml_scene, scene_cases, tiny_encoder_folder, tmp_path):
    logic = CTFMRetrieveLogic()
    index = tmp_path / "index"
    from CTFMSlicer.overlay import heatmap_volume_node

    reference = image_from_volume_node(scene_cases[2])
    heatmap_volume_node(reference.with_array(np.zeros(reference.shape, np.float32)), scene_cases[2],
                        attributes={"target": "embedding"})
    volume_node_from_image(reference.with_array(np.ones(reference.shape, np.uint8)), name="labels", label=True)
    assert {n.GetName() for n in logic.volumesToAdd()} == {"body oblique", "body/permuted", "head"}
    outcome, message = add(logic, index, tiny_encoder_folder, volumes=logic.volumesToAdd())
    assert outcome is not None and (outcome.added, outcome.failed) == (3, []), message
    files = sorted((index / cases.VOLUMES_FOLDER).iterdir())
    assert [f.name for f in files] == ["body_oblique.nrrd", "body_permuted.nrrd", "head.nrrd"]
    for node in scene_cases:  # what was written is what the scene shows: voxels and world geometry
        path, series = cases.case_of(node)
        written, shown = read_image(path), image_from_volume_node(node)
        np.testing.assert_array_equal(written.array, shown.array)
        np.testing.assert_allclose(written.affine, shown.affine, atol=1e-9)
    assert logic.indexStatisticsText(index).startswith("3 cases")

    outcome, _ = add(logic, index, tiny_encoder_folder, volumes=logic.volumesToAdd())  # nothing new
    assert (outcome.added, outcome.skipped) == (0, 3)
    assert len(list((index / cases.VOLUMES_FOLDER).iterdir())) == 3  # no second copies

    # Find the place under the crosshair; the query volume is a case of the index.
    query_node = scene_cases[0]
    point_ras = np.array([-12.0, 8.0, 6.0])
    set_crosshair(mrml_scene, point_ras)
    hits, message = query(logic, index, query_node, "crosshair", exclude=False)
    assert hits is not None and len(hits) == 3, message
    own = str(cases.case_of(query_node)[0])
    cli = json.loads(run_ctfm("--progress", "none", "index", "query", index, own,
                              f"--point={-point_ras[0]},{-point_ras[1]},{point_ras[2]}", "--json",
                              "--device", "cpu").stdout)["hits"]
    assert [(h.scan_id, h.path) for h in hits] == [(h["scan_id"], h["path"]) for h in cli]
    for mine, theirs in zip(hits, cli):
        np.testing.assert_allclose(mine.centre_lps, theirs["centre_lps"], atol=1e-3)
        assert mine.similarity == pytest.approx(theirs["similarity"], abs=1e-4)
    assert hits[0].path == own and hits[0].similarity == pytest.approx(1.0, abs=1e-3)  # near the same voxels

    table = logic.resultsTableNode(hits)
    row = rows_from_table_node(table)[1]
    assert (row["R"], row["A"], row["S"]) == pytest.approx(tuple(hits[1].centre_lps * FLIP), abs=1e-9)
    assert Path(row["thumbnail"]).read_bytes()[:4] == b"\x89PNG"

    # Without its own case the query volume's file is left out (and the last search's thumbnails go).
    excluded, _ = query(logic, index, query_node, "crosshair", exclude=True)
    assert [h.path for h in excluded] == [h.path for h in hits[1:]]
    assert not Path(row["thumbnail"]).exists() and Path(excluded[0].thumbnail).is_file()

    # Show the second result: a new node on the file's grid, the crosshair and the views on the match.
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    mrml_scene.AddNode(red)
    volumes_before = mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    node, ras = logic.showResult(table, 1)
    np.testing.assert_allclose(ras, hits[1].centre_lps * FLIP, atol=1e-3)
    import SimpleITK as sitk

    itk = sitk.ReadImage(hits[1].path)
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(itk.GetSpacing())
    ijk_to_lps[:3, 3] = itk.GetOrigin()
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)), np.diag([-1, -1, 1, 1]) @ ijk_to_lps,
                               atol=1e-6)
    np.testing.assert_allclose(mrml_scene.GetFirstNodeByClass("vtkMRMLCrosshairNode").GetCrosshairRAS(), ras)
    slice_to_ras = red.GetSliceToRAS()
    np.testing.assert_allclose([slice_to_ras.GetElement(i, 3) for i in range(3)], ras, atol=1e-6)
    markup = mrml_scene.GetFirstNodeByName(results.MATCH_MARKUP_NAME)
    assert markup.GetNumberOfControlPoints() == 1 and markup.GetNthControlPointLocked(0)
    np.testing.assert_allclose(markup.GetNthControlPointPositionWorld(0), ras)
    # The match is inside the shown volume.
    ijk = np.linalg.solve(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)), np.append(ras, 1.0))[:3]
    assert np.all(ijk > -0.5) and np.all(ijk < np.array(node.GetImageData().GetDimensions()) - 0.5)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before  # the case was loaded
    # ... as its scene node: the hit's file is the one written for it, so that node is reused.
    assert node in scene_cases
    again, _ = logic.showResult(table, 1)
    assert again is node and markup.GetNumberOfControlPoints() == 1

    # ROI query: the box reaches the child in LPS.
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "region")
    roi.SetCenter(-10.0, 5.0, 0.0)
    roi.SetSize(40.0, 30.0, 20.0)
    boxed, message = query(logic, index, query_node, "roi", roi=roi, exclude=False, thumbnails=False)
    assert boxed is not None, message
    box_lps = "-10.0,-20.0,-10.0,30.0,10.0,10.0"  # RAS corners (-30,-10,-10), (10,20,10) -> LPS, by hand
    cli = json.loads(run_ctfm("--progress", "none", "index", "query", index, own, f"--box={box_lps}", "--json",
                              "--device", "cpu").stdout)["hits"]
    assert [(h.scan_id, list(np.round(h.centre_lps, 2))) for h in boxed] == [
        (h["scan_id"], list(np.round(h["centre_lps"], 2))) for h in cli]
    assert all(h.thumbnail is None for h in boxed)


def test_loading_a_case_from_a_file_reuses_the_node(mrml_scene, tmp_path):
    path = write_image(body_phantom(**GEOMETRIES["spl"]), tmp_path / "case.nii.gz")
    first = results.load_case(path)
    assert cases.case_of(first) == (path.resolve(), None)
    assert results.load_case(path) is first
    slicer.util.updateVolumeFromArray(first, slicer.util.arrayFromVolume(first) + 1)  # the user edits it
    second = results.load_case(path)
    assert second is not first  # the edited node no longer holds the file's voxels


def test_volume_with_unchanged_file_is_indexed_in_place(mrml_scene, tmp_path):
    path = write_image(body_phantom(**GEOMETRIES["lps"]), tmp_path / "scan.nrrd")
    # Load as Slicer's volume reader does: a storage node reads the file into the node.
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1 and not node.GetModifiedSinceRead()
    assert cases.volume_file_for_index(node, tmp_path / "index") == path.resolve()
    assert not (tmp_path / "index" / cases.VOLUMES_FOLDER).exists()
    slicer.util.updateVolumeFromArray(node, slicer.util.arrayFromVolume(node) + 1)  # edited since it was read
    copy = cases.volume_file_for_index(node, tmp_path / "index")
    assert copy.parent == (tmp_path / "index" / cases.VOLUMES_FOLDER).resolve() and copy != path
    np.testing.assert_array_equal(read_image(copy).array, read_image(path).array + 1)
    # Under a transform the file's geometry is not what the scene shows: a copy in world geometry.
    moved = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moved")
    storage2 = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage2.SetFileName(str(path))
    moved.SetAndObserveStorageNodeID(storage2.GetID())
    storage2.ReadData(moved)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    world = cases.volume_file_for_index(moved, tmp_path / "index")
    assert world != path
    np.testing.assert_allclose(read_image(world).origin, read_image(path).origin + [-25.0, 0, 0])  # RAS +x = LPS -x


@pytest.mark.slow
def test_errors_say_what_is_wrong(mrml_scene, scene_cases, tiny_encoder_folder, tmp_path):
    from ctfm_testing.checkpoints import write_monai_encoder

    logic = CTFMRetrieveLogic()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        logic.startAdd(busy, scene_cases[:1], weights=str(tiny_encoder_folder))
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # nothing written there
    with pytest.raises(ValueError, match="holds no index"):
        logic.startQuery(tmp_path / "none", scene_cases[0], "scan")
    set_crosshair(mrml_scene, (0.0, 0.0, 0.0))
    problems = logic.queryProblems(tmp_path / "none", None, "roi", None)
    assert any("index" in p for p in problems) and any("volume" in p.lower() for p in problems)
    assert any("ROI" in p for p in problems)
    # A crosshair or ROI away from the query volume is refused before any child process starts.
    query_node = scene_cases[0]
    set_crosshair(mrml_scene, (-12.0, 8.0, 6.0))
    assert not any("outside" in p for p in logic.queryProblems(tmp_path, query_node, "crosshair"))
    set_crosshair(mrml_scene, (400.0, 0.0, 0.0))
    assert any("crosshair (400.0, 0.0, 0.0) is outside the query volume" in p
               for p in logic.queryProblems(tmp_path, query_node, "crosshair"))
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    roi.SetCenter(0.0, 0.0, 500.0)
    roi.SetSize(20.0, 20.0, 20.0)
    assert any("ROI is outside" in p for p in logic.queryProblems(tmp_path, query_node, "roi", roi))
    roi.SetCenter(0.0, 0.0, 50.0)  # half in the volume (z extent about +-60 mm): searchable
    roi.SetSize(20.0, 20.0, 40.0)
    assert not any("outside" in p for p in logic.queryProblems(tmp_path, query_node, "roi", roi))
    rgb = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    assert any("scalar" in p for p in logic.queryProblems(tmp_path / "none", rgb, "scan"))
    with pytest.raises(ValueError, match="scalar"):
        logic.startAdd(tmp_path / "new", [rgb], weights=str(tiny_encoder_folder))
    assert rgb not in logic.volumesToAdd() and not (tmp_path / "new").exists()

    index = tmp_path / "index"
    outcome, message = add(logic, index, tiny_encoder_folder, volumes=scene_cases[2:])
    assert outcome.added == 1, message
    other = write_monai_encoder(tmp_path / "other", init_filters=4, blocks_down=(1, 1, 1, 1), seed=5)
    outcome, message = add(logic, index, other, volumes=scene_cases[:1])
    assert outcome is None and "weights" in message, message  # another model's vectors never enter the index
    assert logic.indexStatistics(index)["scans"] == 1

    big = volume_node_from_image(body_phantom(shape=(200, 200, 80), spacing=(1.0, 1.0, 2.0)), name="big")
    done = []
    runner = logic.startQuery(index, big, "scan", device="cpu", on_done=lambda h, m: done.append((h, m)))
    runner.cancel()
    result = runner.wait(timeout=60)
    assert result.cancelled and done == [(None, "Cancelled.")]


def _ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m
