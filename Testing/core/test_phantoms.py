"""The synthetic CT phantoms: geometry honoured, anatomy fixed in LPS space, realistic HU.

Every other test that uses a phantom relies on these properties, so positions
here are always computed through ``Image.index_to_physical`` and expected HU
are the nominal values of the phantom specification (issue text), not read
back from the module.
"""

import numpy as np
import pytest

from ctfm_testing.phantoms import (
    BODY_LABELS,
    GEOMETRIES,
    HEAD_LABELS,
    body_phantom,
    head_phantom,
    rotation_matrix,
)

# Nominal HU from the phantom specification.
NOMINAL_BODY_HU = {
    "fat": -100,
    "soft_tissue": 40,
    "liver": 60,
    "spleen": 50,
    "kidney_right": 30,
    "kidney_left": 30,
    "aorta": 200,
    "left_marker": 2000,
}
NOMINAL_HEAD_HU = {"scalp": 40, "skull": 1000, "brain": 35, "csf": 5}
REQUIRED_GEOMETRIES = {"lps", "ras", "oblique20", "aniso_0.7x0.7x5", "odd_sizes", "int16", "float32"}
# Structures that are convex, so their centroid lies deep inside them.
CONVEX = ("liver", "spleen", "kidney_right", "kidney_left", "aorta", "vertebra", "left_marker")


def centroid_lps(labels, label_id):
    ijk = np.argwhere(labels.array == label_id)
    assert len(ijk) > 0, f"label {label_id} is empty"
    return labels.index_to_physical(ijk).mean(axis=0)


def value_at(image, lps):
    """The voxel nearest to an LPS point (which must be on the grid)."""
    ijk = np.rint(image.physical_to_index(lps)).astype(int)
    assert np.all(ijk >= 0) and np.all(ijk < image.shape), f"{lps} is off the grid"
    return image.array[tuple(ijk)]


@pytest.fixture(scope="module")
def phantoms():
    """name -> (noisy image, labels, noiseless image) for every geometry."""
    out = {}
    for name, kwargs in GEOMETRIES.items():
        image, labels = body_phantom(**kwargs, return_labels=True)
        out[name] = (image, labels, body_phantom(**kwargs, noise_hu=0))
    return out


def test_required_geometries_exist_and_are_small():
    assert REQUIRED_GEOMETRIES <= set(GEOMETRIES)
    for name, kwargs in GEOMETRIES.items():
        limit = 400_000 if name.startswith("aniso") else 100_000
        assert np.prod(kwargs.get("shape", (64, 64, 48))) <= limit, name


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_geometry_is_what_was_requested(phantoms, name):
    kwargs = GEOMETRIES[name]
    image, labels, _ = phantoms[name]
    assert image.shape == tuple(kwargs["shape"]) == labels.shape
    assert image.array.dtype == np.dtype(kwargs.get("dtype", np.int16))
    assert labels.array.dtype == np.uint8
    np.testing.assert_allclose(image.spacing, kwargs["spacing"])
    np.testing.assert_allclose(image.direction, kwargs.get("direction", np.eye(3)), atol=1e-12)
    assert labels.geometry.same_grid(image.geometry)
    d = image.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
    assert abs(abs(np.linalg.det(d)) - 1) < 1e-9
    # Without an origin, the grid is centred on the LPS origin.
    np.testing.assert_allclose(image.index_to_physical((np.array(image.shape) - 1) / 2), 0, atol=1e-9)
    assert image.metadata["modality"] == "CT"


def test_oblique_geometry_has_no_axis_along_an_lps_axis():
    d = np.asarray(GEOMETRIES["oblique20"]["direction"])
    assert np.all(np.abs(d).max(axis=0) < 0.99)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_left_stays_left(phantoms, name):
    _, labels, _ = phantoms[name]
    liver = centroid_lps(labels, BODY_LABELS["liver"])
    spleen = centroid_lps(labels, BODY_LABELS["spleen"])
    marker = centroid_lps(labels, BODY_LABELS["left_marker"])
    assert liver[0] < -5, f"liver should be on the patient's right (-x), centroid {liver}"
    assert spleen[0] > 5, f"spleen should be on the patient's left (+x), centroid {spleen}"
    assert marker[0] > 20, f"marker should be on the patient's left (+x), centroid {marker}"
    assert centroid_lps(labels, BODY_LABELS["kidney_right"])[0] < 0 < centroid_lps(labels, BODY_LABELS["kidney_left"])[0]
    # Spine posterior (+y), aorta in front of it.
    spine = centroid_lps(labels, BODY_LABELS["vertebra"])
    aorta = centroid_lps(labels, BODY_LABELS["aorta"])
    assert spine[1] > aorta[1] > 0


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_same_patient_in_every_geometry(phantoms, name):
    """A point inside a structure in the LPS phantom holds that structure, at the same HU, in any grid."""
    ref_labels, ref_clean = phantoms["odd_sizes"][1], phantoms["odd_sizes"][2]
    _, labels, clean = phantoms[name]
    for structure in CONVEX:
        point = centroid_lps(ref_labels, BODY_LABELS[structure])
        assert value_at(labels, point) == BODY_LABELS[structure], f"{structure} at {point}"
        assert value_at(clean, point) == value_at(ref_clean, point)
    # The large organs overlap almost entirely once resampled onto the reference grid.
    ijk = np.argwhere(np.ones(ref_labels.shape, dtype=bool))
    other = np.rint(labels.physical_to_index(ref_labels.index_to_physical(ijk))).astype(int)
    on_grid = np.all((other >= 0) & (other < labels.shape), axis=1)
    a = ref_labels.array[tuple(ijk[on_grid].T)]
    b = labels.array[tuple(other[on_grid].T)]
    for structure in ("liver", "vertebra", "soft_tissue"):
        i = BODY_LABELS[structure]
        dice = 2 * np.sum((a == i) & (b == i)) / (np.sum(a == i) + np.sum(b == i))
        assert dice > 0.85, f"{structure} dice {dice:.2f}"


def test_axis_aligned_geometries_are_flips_and_transposes_of_lps(phantoms):
    # These grids share their voxel centres with the LPS grid, so the arrays
    # must match exactly once the axes are put back in LPS order.
    lps = phantoms["lps"][2].array
    np.testing.assert_array_equal(phantoms["ras"][2].array, lps[::-1, ::-1, :])
    # SPL: i -> S, j -> P, k -> L.
    np.testing.assert_array_equal(phantoms["spl"][2].array, lps.transpose(2, 1, 0))
    # permuted: i -> P, j -> I, k -> R, so permuted[a, b, c] = lps[-c, a, -b].
    np.testing.assert_array_equal(phantoms["permuted"][2].array, lps[::-1, :, ::-1].transpose(1, 2, 0))


def test_tissue_hu_match_nominal_values(phantoms):
    image, labels, clean = phantoms["lps"]
    noise = 10.0  # body_phantom's default noise_hu
    for structure, hu in NOMINAL_BODY_HU.items():
        values = image.array[labels.array == BODY_LABELS[structure]].astype(float)
        tolerance = 4 * noise / np.sqrt(len(values)) + 0.5
        assert abs(values.mean() - hu) < tolerance, f"{structure}: mean {values.mean():.1f}, nominal {hu}"
        assert np.all(clean.array[labels.array == BODY_LABELS[structure]] == hu), structure
    air = image.array[labels.array == 0].astype(float)
    # Tight enough to notice truncation instead of rounding to int16 (a 0.5 HU bias).
    assert abs(air.mean() + 1000) < 0.2
    assert 9 < air.std() < 11
    # Vertebra: trabecular body ~700 inside a cortical rim ~1000.
    bone = clean.array[labels.array == BODY_LABELS["vertebra"]]
    assert set(np.unique(bone).tolist()) == {700, 1000}
    assert np.sum(bone == 700) > np.sum(bone == 1000) / 4


def test_noise_is_seeded_and_optional():
    kwargs = GEOMETRIES["odd_sizes"]
    a, b, c = (body_phantom(**kwargs, seed=s).array for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    clean = body_phantom(**kwargs, noise_hu=0).array
    assert set(np.unique(clean).tolist()) <= {-1000, -100, 30, 40, 50, 60, 200, 700, 1000, 2000}


def test_values_are_clipped_to_int16_range_not_wrapped():
    for dtype in (np.int16, np.float32):
        a = body_phantom(**GEOMETRIES["odd_sizes"], dtype=dtype, noise_hu=1e5).array
        assert a.dtype == dtype
        assert a.min() == -32768 and a.max() == 32767


def test_left_marker_can_be_left_out():
    image, labels = body_phantom(**GEOMETRIES["lps"], left_marker=False, return_labels=True, noise_hu=0)
    assert not np.any(labels.array == BODY_LABELS["left_marker"])
    assert image.array.max() == 1000


def test_anatomy_is_fixed_in_physical_space_not_in_the_grid():
    kwargs = GEOMETRIES["lps"]
    _, centred = body_phantom(**kwargs, return_labels=True)
    origin = centred.origin + np.array([10.0, -4.0, 6.0])
    _, shifted = body_phantom(**kwargs, origin=origin, return_labels=True)
    np.testing.assert_allclose(shifted.origin, origin)
    liver = BODY_LABELS["liver"]
    np.testing.assert_allclose(centroid_lps(shifted, liver), centroid_lps(centred, liver), atol=0.5)
    index_shift = np.argwhere(shifted.array == liver).mean(0) - np.argwhere(centred.array == liver).mean(0)
    np.testing.assert_allclose(index_shift, [-5, 2, -2], atol=0.25)


def test_body_radius_scales_the_anatomy():
    kwargs = GEOMETRIES["aniso_0.7x0.7x5"]
    _, big = body_phantom(**kwargs, return_labels=True)
    _, small = body_phantom(**kwargs, body_radius_mm=20.0, return_labels=True)
    for structure in ("liver", "spleen"):
        i = BODY_LABELS[structure]
        np.testing.assert_allclose(centroid_lps(small, i)[:2], centroid_lps(big, i)[:2] / 2, atol=1.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="orthonormal"):
        body_phantom(shape=(8, 8, 8), direction=np.diag([1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="dtype"):
        body_phantom(shape=(8, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="lesion"):
        head_phantom(shape=(8, 8, 8), lesion={"centre": (0, 0, 0)})


def test_rotation_matrix():
    np.testing.assert_allclose(rotation_matrix("z", 90) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(rotation_matrix("x", 90) @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    # 120 degrees about the diagonal cycles the axes x -> y -> z.
    np.testing.assert_allclose(rotation_matrix((1, 1, 1), 120), [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-12)
    r = rotation_matrix((0.3, -1.0, 2.0), 20)
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1)
    np.testing.assert_allclose(r @ [0.3, -1.0, 2.0], [0.3, -1.0, 2.0], atol=1e-12)
    with pytest.raises(ValueError):
        rotation_matrix("w", 10)


# --- head -----------------------------------------------------------------------------


def test_head_tissues_and_symmetry():
    image, labels = head_phantom(return_labels=True, left_marker=True)
    for structure, hu in NOMINAL_HEAD_HU.items():
        values = image.array[labels.array == HEAD_LABELS[structure]].astype(float)
        assert abs(values.mean() - hu) < 4 * 5 / np.sqrt(len(values)) + 0.5, structure
    assert not np.any(labels.array == HEAD_LABELS["lesion"])
    assert centroid_lps(labels, HEAD_LABELS["left_marker"])[0] > 40
    # Ventricles on both sides of the midline.
    csf = labels.index_to_physical(np.argwhere(labels.array == HEAD_LABELS["csf"]))
    assert np.sum(csf[:, 0] < 0) > 20 and np.sum(csf[:, 0] > 0) > 20
    # The brain is enclosed by skull: walking right (-x) from the centre (the
    # marker sits on the left scalp), brain, then skull, then scalp, then air.
    profile = [value_at(labels, [-x, 0.0, 0.0]) for x in np.arange(0, 90, 1.0)]
    firsts = [profile.index(HEAD_LABELS[s]) for s in ("brain", "skull", "scalp")]
    assert firsts == sorted(firsts) and profile[-1] == 0


@pytest.mark.parametrize("name", ["lps", "ras", "oblique20"])
def test_head_lesion_is_hyperdense_and_where_requested(name):
    kwargs = {k: v for k, v in GEOMETRIES[name].items() if k != "dtype"}
    lesion = {"center_lps": (-12.0, 8.0, 10.0), "radius_mm": 8.0, "hu": 70}
    image, labels = head_phantom(**kwargs, head_radius_mm=45.0, lesion=lesion, return_labels=True)
    inside = labels.array == HEAD_LABELS["lesion"]
    np.testing.assert_allclose(centroid_lps(labels, HEAD_LABELS["lesion"]), lesion["center_lps"], atol=1.0)
    volume = inside.sum() * np.prod(image.spacing)
    assert abs(volume - 4 / 3 * np.pi * 8.0**3) < 0.2 * 4 / 3 * np.pi * 8.0**3
    lesion_hu = image.array[inside].mean()
    brain_hu = image.array[labels.array == HEAD_LABELS["brain"]].mean()
    assert abs(lesion_hu - 70) < 2 and abs(brain_hu - 35) < 2
    assert value_at(labels, lesion["center_lps"]) == HEAD_LABELS["lesion"]


def test_head_lesion_never_alters_the_skull():
    kwargs = GEOMETRIES["odd_sizes"]
    plain, plain_labels = head_phantom(**kwargs, head_radius_mm=45.0, noise_hu=0, return_labels=True)
    # Centre a lesion on the skull where it crosses the +x axis (found from the labels).
    skull = plain_labels.index_to_physical(np.argwhere(plain_labels.array == HEAD_LABELS["skull"]))
    near_axis = skull[np.hypot(skull[:, 1], skull[:, 2]) < 4]
    centre = near_axis[np.argmax(near_axis[:, 0])]
    lesion = {"center_lps": tuple(centre), "radius_mm": 10.0, "hu": 90}
    image, labels = head_phantom(**kwargs, head_radius_mm=45.0, noise_hu=0, lesion=lesion, return_labels=True)
    assert labels.array[tuple(np.rint(labels.physical_to_index(centre)).astype(int))] == HEAD_LABELS["skull"]
    changed = image.array != plain.array
    assert changed.any()
    assert np.all(labels.array[changed] == HEAD_LABELS["lesion"])
    assert np.all(np.isin(plain_labels.array[changed], [HEAD_LABELS["brain"], HEAD_LABELS["csf"]]))
    assert np.all(image.array[changed] == 90)
