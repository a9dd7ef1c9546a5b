"""CTFMSlicer.nodes on a real MRML scene (slicer-core): volume nodes <-> CTFMLib Images, tables.

Geometry is checked against MRML's own matrices (``GetIJKToRASMatrix``,
``MultiplyPoint``, hardening through the Transforms logic), not against the
conversion code's own formulas.
"""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
import vtk  # noqa: E402  (slicer-core brings VTK)

from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import BODY_LABELS, DEFAULT_BODY_RADIUS_MM, GEOMETRIES, body_phantom  # noqa: E402
from CTFMLib.image import Image, ImageError  # noqa: E402
from CTFMSlicer.nodes import (  # noqa: E402
    image_from_volume_node,
    rows_from_table_node,
    table_node_from_rows,
    volume_node_from_image,
)


def ras_of_voxel(node, ijk) -> np.ndarray:
    """RAS of a voxel centre through MRML's own IJK-to-RAS matrix (parent transforms not included)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0])[:3])


def world_ras_of_voxel(node, ijk) -> np.ndarray:
    """RAS of a voxel centre in world coordinates, through MRML's general transform (any parent)."""
    local = ras_of_voxel(node, ijk)
    parent = node.GetParentTransformNode()
    if parent is None:
        return local
    to_world = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(to_world)
    return np.array(to_world.TransformPoint(local))


def flip_xy(p) -> np.ndarray:
    return np.asarray(p, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


CORNERS_AND_CENTRE = lambda shape: [  # noqa: E731
    (0, 0, 0),
    (shape[0] - 1, 0, 0),
    (0, shape[1] - 1, 0),
    (0, 0, shape[2] - 1),
    (shape[0] - 1, shape[1] - 1, shape[2] - 1),
    (shape[0] // 2, shape[1] // 3, shape[2] // 2),
]


# --- Image -> node -> Image ---------------------------------------------------------


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_round_trip_is_exact(mrml_scene, geometry):
    image = body_phantom(**GEOMETRIES[geometry])
    node = volume_node_from_image(image, name=geometry)
    back = image_from_volume_node(node)

    assert back.array.dtype == image.array.dtype
    assert back.array.shape == image.array.shape
    assert np.array_equal(back.array, image.array)
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, image.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, image.direction, atol=1e-9)


@pytest.mark.parametrize("geometry", ["lps", "ras", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "permuted"])
def test_node_places_voxels_at_the_image_positions(mrml_scene, geometry):
    """Each voxel's RAS position in the node is its LPS position with x and y negated."""
    image = body_phantom(**GEOMETRIES[geometry])
    node = volume_node_from_image(image, name=geometry)
    kji = slicer.util.arrayFromVolume(node)  # Slicer's own view: [k, j, i]
    for ijk in CORNERS_AND_CENTRE(image.shape):
        np.testing.assert_allclose(ras_of_voxel(node, ijk), flip_xy(image.index_to_physical(ijk)), atol=1e-9)
        assert kji[ijk[2], ijk[1], ijk[0]] == image.array[ijk]


@pytest.mark.parametrize("geometry", ["lps", "ras", "oblique20", "permuted"])
def test_patients_left_stays_left(mrml_scene, geometry):
    """The phantom's left-side marker lands at RAS x < 0 (patient left) wherever the grid points."""
    _, labels = body_phantom(**GEOMETRIES[geometry], return_labels=True)
    node = volume_node_from_image(labels, name="labels", label=True)
    kji = np.argwhere(slicer.util.arrayFromVolume(node) == BODY_LABELS["left_marker"])
    assert len(kji) > 0
    ras = np.array([ras_of_voxel(node, (i, j, k)) for k, j, i in kji]).mean(axis=0)
    expected_lps = np.array([0.88, -0.1, 0.0]) * DEFAULT_BODY_RADIUS_MM  # the phantom's marker centre
    assert ras[0] < -0.5 * DEFAULT_BODY_RADIUS_MM  # RAS: left is -x
    np.testing.assert_allclose(flip_xy(ras), expected_lps, atol=4.0)  # within a voxel or so


def test_volume_made_by_slicer_converts_to_lps(mrml_scene):
    """A node built with Slicer's own addVolumeFromArray ([k,j,i], IJK-to-RAS) reads back as [i,j,k] in LPS."""
    rng = np.random.default_rng(3)
    kji = rng.integers(-1024, 3000, size=(7, 11, 13)).astype(np.int16)
    ijk_to_ras = np.array(
        [
            [0.0, -0.8, 0.0, 30.0],
            [-0.7, 0.0, 0.0, -12.5],
            [0.0, 0.0, 2.5, 100.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    node = slicer.util.addVolumeFromArray(kji, ijkToRAS=ijk_to_ras, name="from-slicer")
    image = image_from_volume_node(node)
    assert image.shape == (13, 11, 7)
    assert np.array_equal(image.array, kji.transpose(2, 1, 0))
    np.testing.assert_allclose(image.spacing, [0.7, 0.8, 2.5])
    np.testing.assert_allclose(image.origin, [-30.0, 12.5, 100.0])
    for ijk in CORNERS_AND_CENTRE(image.shape):
        ras = ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(image.index_to_physical(ijk), flip_xy(ras[:3]), atol=1e-9)


@pytest.mark.parametrize("kji_shape", [(4, 5, 6), (1, 1, 6)])  # (1, 1, 6) transposes without a copy
def test_image_is_a_copy_of_the_node_voxels(mrml_scene, kji_shape):
    node = slicer.util.addVolumeFromArray(np.zeros(kji_shape, dtype=np.float32), name="v")
    image = image_from_volume_node(node)
    slicer.util.arrayFromVolume(node)[:] = 7.0
    assert np.all(image.array == 0.0)


# --- voxel types and labelmaps ---------------------------------------------------------


def test_labelmap_node(mrml_scene):
    image, labels = body_phantom(**GEOMETRIES["odd_sizes"], return_labels=True)
    node = volume_node_from_image(labels, name="labels", label=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetDisplayNode() is not None and node.GetDisplayNode().IsA("vtkMRMLLabelMapVolumeDisplayNode")
    back = image_from_volume_node(node)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, labels.array)
    assert back.geometry.same_grid(image.geometry, atol=1e-9)


def test_boolean_mask_becomes_uint8_labelmap(mrml_scene):
    mask = Image(np.arange(60).reshape(3, 4, 5) % 7 == 0, spacing=(1.0, 1.0, 2.0))
    node = volume_node_from_image(mask, name="mask", label=True)
    back = image_from_volume_node(node)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, mask.array.astype(np.uint8))


def test_float_labelmap_is_refused(mrml_scene):
    with pytest.raises(ImageError, match="integer"):
        volume_node_from_image(Image(np.zeros((3, 3, 3), dtype=np.float32)), label=True)


def test_int64_is_narrowed_only_when_lossless(mrml_scene):
    small = Image(np.arange(-30, 30, dtype=np.int64).reshape(3, 4, 5))
    back = image_from_volume_node(volume_node_from_image(small, name="small"))
    assert back.array.dtype == np.int32
    assert np.array_equal(back.array, small.array)
    big = Image(np.full((2, 2, 2), 2**40, dtype=np.int64))
    with pytest.raises(ImageError, match="range"):
        volume_node_from_image(big, name="big")


def test_writing_into_an_existing_node_replaces_voxels_and_geometry(mrml_scene):
    first = body_phantom(**GEOMETRIES["lps"])
    second = body_phantom(**GEOMETRIES["oblique20"], dtype=np.float32)
    node = volume_node_from_image(first, name="reused")
    assert volume_node_from_image(second, node=node) is node
    back = image_from_volume_node(node)
    assert back.array.dtype == np.float32
    assert np.array_equal(back.array, second.array)
    assert back.geometry.same_grid(second.geometry, atol=1e-9)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


# --- parent transforms --------------------------------------------------------------------


def _linear_transform(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


ROTATE_AND_SHIFT = np.array(
    [
        [0.0, -1.0, 0.0, 10.0],
        [1.0, 0.0, 0.0, 20.0],
        [0.0, 0.0, 1.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_linear_parent_transform_is_folded_into_the_geometry(mrml_scene):
    image = body_phantom(**GEOMETRIES["oblique20"])
    node = volume_node_from_image(image, name="moved")
    node.SetAndObserveTransformNodeID(_linear_transform(mrml_scene, ROTATE_AND_SHIFT).GetID())

    moved = image_from_volume_node(node)
    assert np.array_equal(moved.array, image.array)
    for ijk in CORNERS_AND_CENTRE(image.shape):
        np.testing.assert_allclose(moved.index_to_physical(ijk), flip_xy(world_ras_of_voxel(node, ijk)), atol=1e-9)

    # Hardening (the Transforms logic resamples nothing for a linear transform, it rewrites the
    # node's matrix) must give the very same image.
    assert slicer.vtkSlicerTransformLogic.hardenTransform(node)
    assert node.GetParentTransformNode() is None
    hardened = image_from_volume_node(node)
    assert hardened.geometry.same_grid(moved.geometry, atol=1e-9)


def test_writing_under_a_parent_transform_lands_at_the_world_position(mrml_scene):
    image = body_phantom(**GEOMETRIES["ras"])
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "under-transform")
    node.SetAndObserveTransformNodeID(_linear_transform(mrml_scene, ROTATE_AND_SHIFT).GetID())
    volume_node_from_image(image, node=node)
    for ijk in CORNERS_AND_CENTRE(image.shape):
        np.testing.assert_allclose(world_ras_of_voxel(node, ijk), flip_xy(image.index_to_physical(ijk)), atol=1e-9)


def test_non_linear_parent_transform_is_refused(mrml_scene):
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (50, 50, 50)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 3.0 * (p[1] > 0), p[1], p[2])
    warp = vtk.vtkThinPlateSplineTransform()
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    warp.SetBasisToR()
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform.SetAndObserveTransformToParent(warp)
    node = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="warped")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ImageError, match="[Hh]arden"):
        image_from_volume_node(node)


def test_sheared_geometry_is_refused(mrml_scene):
    shear = np.eye(4)
    shear[0, 1] = 0.5
    node = volume_node_from_image(body_phantom(**GEOMETRIES["lps"]), name="sheared")
    node.SetAndObserveTransformNodeID(_linear_transform(mrml_scene, shear).GetID())
    with pytest.raises(ImageError, match="shear"):
        image_from_volume_node(node)


# --- refusals -----------------------------------------------------------------------------


def test_vector_volume_is_refused(mrml_scene):
    rgb = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(ImageError, match="scalar"):
        image_from_volume_node(rgb)
    with pytest.raises(ImageError, match="scalar"):
        volume_node_from_image(Image(np.zeros((4, 5, 6), dtype=np.int16)), node=rgb)


def test_node_without_voxels_or_no_node_is_refused(mrml_scene):
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ImageError, match="no voxels"):
        image_from_volume_node(empty)
    with pytest.raises(ImageError, match="no volume"):
        image_from_volume_node(None)


# --- tables -------------------------------------------------------------------------------


def test_table_from_dict_rows(mrml_scene):
    rows = [
        {"case": "a", "rank": 1, "score": 0.9},
        {"case": "b", "rank": 2},  # no score
        {"case": "c", "rank": 3, "score": 0.25, "note": "late column"},
    ]
    node = table_node_from_rows(rows, name="results")
    table = node.GetTable()
    assert mrml_scene.GetNodeByID(node.GetID()) is node
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == ["case", "rank", "score", "note"]
    assert table.GetColumnByName("case").IsA("vtkStringArray")
    assert table.GetColumnByName("rank").IsA("vtkIntArray")
    assert table.GetColumnByName("score").IsA("vtkDoubleArray")
    back = rows_from_table_node(node)
    assert [r["case"] for r in back] == ["a", "b", "c"]
    assert [r["rank"] for r in back] == [1, 2, 3]
    assert back[0]["score"] == 0.9 and np.isnan(back[1]["score"]) and back[2]["score"] == 0.25
    assert [r["note"] for r in back] == ["", "", "late column"]
    assert node.GetCellText(2, 0) == "c"  # MRML's own accessor agrees


def test_table_from_sequences_and_reuse(mrml_scene):
    node = table_node_from_rows([(1, "x"), (2, "y")], columns=["n", "s"], name="t")
    table_node_from_rows([(5.5,)], columns=["only"], node=node)
    assert node.GetNumberOfColumns() == 1 and node.GetNumberOfRows() == 1
    assert rows_from_table_node(node) == [{"only": 5.5}]


def test_table_rejects_inconsistent_rows(mrml_scene):
    with pytest.raises(ValueError, match="column names"):
        table_node_from_rows([(1, 2)])
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        table_node_from_rows([(1, 2)], columns=["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate"):
        table_node_from_rows([], columns=["a", "a"])
