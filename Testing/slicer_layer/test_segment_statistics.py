"""CT-FM Segment's organ statistics on a real MRML scene (slicer-core): the table node against stats.json.

The end-to-end tests run ``ctfm segment`` in a child process through the logic (as the panel does) and
copy the child's ``stats.json`` and ``stats.csv`` out of its work folder the moment the child has exited,
before the logic reads them and removes the folder: the table node is then compared with those files,
read here with ``json``/``csv`` and mapped to columns by this file's own rules, and with the label map.
"""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import BODY_LABELS, GEOMETRIES, body_phantom  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic  # noqa: E402
from CTFMSlicer.nodes import volume_node_from_image  # noqa: E402

TINY_LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left"}
TEXT_COLUMNS = {"structure", "touches_border", "note"}


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


def table_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLTableNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode"))]


def json_value(stats: dict, structure: str, column: str):
    """The stats.json value a CSV column holds: ``centroid_lps_y`` is ``centroid_lps[1]``, ``bbox_index_max_k``
    is ``bbox_index["max"][2]``, a missing note is empty."""
    entry = stats[structure]
    if column == "structure":
        return structure
    match = re.fullmatch(r"(centroid_lps|bbox_index|bbox_lps)_(?:(min|max)_)?([xyzijk])", column)
    if match:
        field, end, axis = match.groups()
        values = entry[field][end] if end else entry[field]
        return values["xyzijk".index(axis) % 3]
    if column == "note":
        return entry["note"] or ""
    return entry[column]


def assert_table_equals_files(node, stats: dict, csv_text: str):
    """Columns: the CSV header, in order; rows: one per structure of stats.json, numbers in numeric arrays."""
    header, *lines = list(csv.reader(csv_text.splitlines()))
    table = node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == header
    assert node.GetNumberOfRows() == len(stats) == len(lines)
    names = [table.GetColumnByName("structure").GetValue(r) for r in range(node.GetNumberOfRows())]
    assert names == [line[0] for line in lines] and sorted(names) == sorted(stats)
    for column in header:
        array = table.GetColumnByName(column)
        expected = [json_value(stats, name, column) for name in names]
        if column in TEXT_COLUMNS:
            assert [array.GetValue(r) for r in range(len(names))] == [str(v) for v in expected], column
            continue
        values = vtk_to_numpy(array)
        assert values.dtype.kind in "iuf", f"{column} is not a numeric column ({array.GetClassName()})"
        np.testing.assert_allclose(values, np.array(expected, np.float64), rtol=1e-12, atol=0, err_msg=column)
        from_csv = np.array([float(line[header.index(column)]) for line in lines])
        np.testing.assert_allclose(values, from_csv, rtol=1e-12, atol=0, err_msg=column)
    assert node.GetUseColumnTitleAsColumnHeader()  # the names are the view's header, not its first row


def segment_and_capture(logic, volume, model_folder, tmp_path, statistics=True, structures=None):
    """Run the logic's segmentation to the end; returns (output, runner, stats.json dict or None, stats.csv text)."""
    done = []
    runner = logic.startSegmentation(volume, "folder", model_folder, "fast", "cpu", structures, statistics=statistics,
                                     on_done=lambda *args: done.append(args))
    runner.process.wait(timeout=300)  # the child has ended; the logic has not read (nor removed) its files yet
    stats = text = None
    if "--statistics" in runner.args:
        path = Path(runner.args[runner.args.index("--statistics") + 1])
        tmp_path.mkdir(exist_ok=True)
        copy = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        stats = json.loads(shutil.copy(path, copy / "stats.json").read_text())
        text = shutil.copy(path.with_suffix(".csv"), copy / "stats.csv").read_text()
    result = runner.wait(timeout=60)
    assert result.ok and len(done) == 1 and done[0][0] is not None, done and done[0][1]
    return done[0][0], runner, stats, text


def present_names(output) -> list:
    names = {int(i.value): i.name for i in output.label_infos}
    return sorted(names[v] for v in set(np.unique(output.labels.array).tolist()) - {0})


@pytest.mark.slow
def test_the_table_equals_stats_json_and_a_second_run_updates_it(mrml_scene, tiny_segmenter, tmp_path):
    image = body_phantom(**GEOMETRIES["oblique20"])
    volume = volume_node_from_image(image, name="ct")
    logic = CTFMSegmentLogic()
    output, runner, stats, text = segment_and_capture(logic, volume, tiny_segmenter, tmp_path / "files")
    assert stats is not None, "--statistics did not reach the child"
    assert output.statistics == stats
    assert present_names(output) and sorted(stats) == present_names(output)  # one row per structure present
    assert not table_nodes(mrml_scene)  # the run itself adds nothing to the scene
    node = logic.statisticsTableNode(output.statistics, volume)
    assert node.GetName() == "ct CT-FM statistics" and node.GetScene() is mrml_scene
    assert_table_equals_files(node, stats, text)
    for name, entry in stats.items():  # the label map's voxels, times the voxel volume in mm3 and mL
        assert entry["voxels"] == (output.labels.array == entry["label"]).sum()
        assert entry["volume"] == pytest.approx(entry["voxels"] * np.prod(image.geometry.spacing), rel=1e-12)
        assert entry["volume_ml"] == pytest.approx(entry["volume"] / 1000.0, rel=1e-12)

    # the second run (a structure subset: other rows) fills the same node
    node_id = node.GetID()
    node.SetName("my organ volumes")
    output, runner, stats, text = segment_and_capture(logic, volume, tiny_segmenter, tmp_path / "files",
                                                      structures="spleen")
    assert sorted(stats) == present_names(output) == ["spleen"]
    again = logic.statisticsTableNode(output.statistics, volume)
    assert again is node and again.GetID() == node_id and table_nodes(mrml_scene) == [node]
    assert node.GetName() == "my organ volumes"  # the user's name is kept
    assert_table_equals_files(node, stats, text)


@pytest.mark.slow
def test_without_statistics_no_option_no_statistics_no_table(mrml_scene, tiny_segmenter, tmp_path):
    volume = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="ct")
    output, runner, stats, _ = segment_and_capture(CTFMSegmentLogic(), volume, tiny_segmenter, tmp_path,
                                                   statistics=False)
    assert "--statistics" not in runner.args and stats is None
    assert output.statistics is None
    assert not table_nodes(mrml_scene)


def test_each_volume_has_its_own_table_and_a_removed_table_is_made_anew(mrml_scene):
    """Tables follow their volume (a node reference), not their name: phantoms with known organs, real statistics."""
    from CTFMLib.statistics import structure_statistics

    logic = CTFMSegmentLogic()
    image, labels = body_phantom(return_labels=True, **GEOMETRIES["lps"])
    names = {v: k for k, v in BODY_LABELS.items()}
    stats = structure_statistics(image, labels, names)
    first = volume_node_from_image(image, name="ct")
    second = volume_node_from_image(image, name="ct")  # same name, another volume
    table1 = logic.statisticsTableNode(stats, first)
    table2 = logic.statisticsTableNode(stats, second)
    assert table1 is not table2 and table_nodes(mrml_scene) == [table1, table2]
    assert logic.statisticsTableNode(stats, first) is table1
    assert sorted(table1.GetTable().GetColumnByName("structure").GetValue(r) for r in range(table1.GetNumberOfRows())) \
        == sorted(k for k, v in BODY_LABELS.items() if (labels.array == v).any())
    voxels = vtk_to_numpy(table1.GetTable().GetColumnByName("voxels"))
    label_column = vtk_to_numpy(table1.GetTable().GetColumnByName("label"))
    np.testing.assert_array_equal(voxels, [(labels.array == v).sum() for v in label_column])
    mrml_scene.RemoveNode(table1)
    table3 = logic.statisticsTableNode(stats, first)
    assert table3 is not table1 and table3.GetName() == "ct CT-FM statistics"
    assert table_nodes(mrml_scene) == [table2, table3]
