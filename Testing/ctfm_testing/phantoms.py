"""Synthetic CT phantoms in any voxel geometry, for the test suite.

The anatomy is defined once in PHYSICAL space (LPS mm: x to the patient's
Left, y Posterior, z Superior) and evaluated at the centre of every voxel of
the requested grid. So one and the same patient appears in an LPS, RAS,
oblique, anisotropic or permuted grid: a test can check that code which
reorients, resamples or flips an image keeps the anatomy where it belongs
(left stays left) by comparing positions computed through
:meth:`CTFMLib.image.Image.index_to_physical`, never raw indices.

Sizes are absolute millimetres, scaled by one radius (``body_radius_mm``,
``head_radius_mm``). The defaults describe a small patient that fits the
default grids and every entry of :data:`GEOMETRIES`; pass a realistic radius
(about 170 mm for an adult abdomen) together with a grid that covers it when a
test needs life-size anatomy.

Voxel values are nominal Hounsfield units (:data:`BODY_HU`, :data:`HEAD_HU`)
plus optional seeded Gaussian noise, clipped to the int16 range so the image
always converts to int16 without wrap-around. There is no partial-volume
blur: each voxel takes the tissue at its centre, which keeps label maps and
intensities exactly consistent.

    image = body_phantom(**GEOMETRIES["oblique20"])
    image, labels = body_phantom(return_labels=True)   # labels: uint8 Image, ids in BODY_LABELS
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from CTFMLib.image import Geometry, Image

INT16_MIN, INT16_MAX = -32768, 32767

# Label ids of the body phantom's label map (0 is air, outside the body).
BODY_LABELS = {
    "soft_tissue": 1,
    "fat": 2,
    "liver": 3,
    "spleen": 4,
    "kidney_right": 5,
    "kidney_left": 6,
    "aorta": 7,
    "vertebra": 8,  # cortical rim and trabecular body together
    "left_marker": 9,
}

# Nominal HU of the body phantom's tissues.
BODY_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 30.0,
    "aorta": 200.0,  # contrast-enhanced blood
    "cortical_bone": 1000.0,
    "trabecular_bone": 700.0,
    "left_marker": 2000.0,  # brighter than any tissue: unmistakable
}

# Label ids of the head phantom's label map (0 is air).
HEAD_LABELS = {
    "scalp": 1,
    "skull": 2,
    "brain": 3,
    "csf": 4,
    "lesion": 5,
    "left_marker": 6,
}

HEAD_HU = {
    "air": -1000.0,
    "scalp": 40.0,
    "skull": 1000.0,
    "brain": 35.0,
    "csf": 5.0,
    "lesion": 70.0,  # acute blood: hyperdense to brain
    "left_marker": 2000.0,
}

DEFAULT_BODY_RADIUS_MM = 40.0
DEFAULT_HEAD_RADIUS_MM = 85.0


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    """Right-handed rotation by ``degrees`` about ``axis`` ("x", "y", "z" or a 3-vector)."""
    if isinstance(axis, str):
        names = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}
        if axis.lower() not in names:
            raise ValueError(f"axis must be 'x', 'y', 'z' or a 3-vector, got {axis!r}")
        axis = names[axis.lower()]
    u = np.asarray(axis, dtype=np.float64).reshape(3)
    norm = np.linalg.norm(u)
    if norm == 0:
        raise ValueError("rotation axis must not be the zero vector")
    u = u / norm
    t = np.deg2rad(degrees)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    # Rodrigues' formula.
    return np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(u, u)


def _geometries() -> dict:
    # Small grids (under ~100k voxels, the anisotropic one under 400k) that all
    # cover the default body: about 96 mm across and 100 mm or more along z.
    base = {"shape": (48, 48, 40), "spacing": (2.0, 2.0, 3.0)}
    return {
        "lps": dict(base),
        "ras": {**base, "direction": np.diag([-1.0, -1.0, 1.0])},
        # Rotated about z, then tilted about x: no image axis is parallel to an LPS axis.
        "oblique20": {**base, "direction": rotation_matrix("z", 20) @ rotation_matrix("x", 20)},
        "aniso_0.7x0.7x5": {"shape": (128, 128, 20), "spacing": (0.7, 0.7, 5.0)},
        "odd_sizes": {"shape": (37, 53, 29), "spacing": (2.5, 2.0, 4.0)},
        "int16": {**base, "dtype": np.int16},
        "float32": {**base, "dtype": np.float32},
        # CT-FM's model orientation: i toward Superior, j Posterior, k Left.
        "spl": {
            "shape": (40, 48, 48),
            "spacing": (3.0, 2.0, 2.0),
            "direction": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        },
        # Axes swapped and flipped: i toward Posterior, j Inferior, k Right.
        "permuted": {
            "shape": (48, 40, 48),
            "spacing": (2.0, 3.0, 2.0),
            "direction": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
        },
    }


# name -> keyword arguments of body_phantom (shape, spacing, direction, dtype).
GEOMETRIES = _geometries()


# --- shared machinery -------------------------------------------------------------


def phantom_grid(shape, spacing, direction, origin) -> Geometry:
    """A phantom's checked grid; ``origin=None`` centres it on the LPS origin."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError("direction must be orthonormal (its columns are unit vectors at right angles)")
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    if origin is None:
        # Put the centre of the grid at the LPS origin, where the anatomy is centred.
        half_extent = spacing * (np.asarray(shape) - 1) / 2.0
        origin = -(direction @ half_extent)
    return Geometry(shape, spacing, origin, direction)


def voxel_centres(geometry: Geometry):
    """LPS x, y, z (mm) of every voxel centre, each an array of the grid's shape."""
    ijk = np.indices(geometry.shape, dtype=np.float64).reshape(3, -1).T
    lps = geometry.index_to_physical(ijk)
    return tuple(lps[:, a].reshape(geometry.shape) for a in range(3))


def _inside_ellipsoid(x, y, z, centre, semi_axes):
    """Voxels inside an axis-aligned ellipsoid; an infinite semi-axis makes a cylinder."""
    d = 0.0
    for p, c, s in zip((x, y, z), centre, semi_axes):
        if np.isfinite(s):
            d = d + ((p - c) / s) ** 2
    return d <= 1.0


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.floating) or (np.issubdtype(dtype, np.integer) and np.can_cast(np.int16, dtype))):
        raise ValueError(f"dtype must hold the int16 range (int16, int32, float32, ...), got {dtype}")
    return dtype


def _finish(hu, labels, geometry, dtype, noise_hu, seed, return_labels, label_ids, kind):
    if noise_hu < 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    if noise_hu > 0:
        hu = hu + np.random.default_rng(seed).normal(0.0, noise_hu, size=hu.shape)
    hu = np.clip(hu, INT16_MIN, INT16_MAX)
    if np.issubdtype(dtype, np.integer):
        hu = np.rint(hu)
    image = Image.from_geometry(hu.astype(dtype), geometry, {"modality": "CT", "phantom": kind})
    if not return_labels:
        return image
    label_image = Image.from_geometry(labels, geometry, {"phantom": kind, "labels": dict(label_ids)})
    return image, label_image


# --- body -----------------------------------------------------------------------------


def body_phantom(
    shape=(64, 64, 48),
    spacing=(1.5, 1.5, 3.0),
    direction=None,
    origin=None,
    dtype=np.int16,
    seed: int = 0,
    noise_hu: float = 10.0,
    left_marker: bool = True,
    body_radius_mm: float = DEFAULT_BODY_RADIUS_MM,
    return_labels: bool = False,
):
    """A CT of an abdomen: air, fat, soft tissue, organs and spine at nominal HU.

    The body is an elliptic cylinder along z (half-width ``body_radius_mm``
    in x, 0.72 of it in y) centred on the LPS origin, with a fat layer under
    the skin. Inside: the liver on the patient's right (-x), the spleen on the
    left (+x), two kidneys, the contrast-filled aorta in front of the spine,
    and a vertebral column (trabecular body in a cortical rim) posteriorly.
    ``left_marker`` adds a small 2000 HU sphere in the fat on the left side
    (+x), so a test can tell left from right at a glance.

    ``direction`` defaults to identity (LPS); ``origin`` defaults to the value
    that centres the grid on the LPS origin. Returns a
    :class:`CTFMLib.image.Image`, or ``(image, labels)`` with
    ``return_labels``: a uint8 image on the same grid, ids in
    :data:`BODY_LABELS` (also in ``labels.metadata["labels"]``).
    """
    dtype = _check_dtype(dtype)
    if body_radius_mm <= 0:
        raise ValueError(f"body_radius_mm must be positive, got {body_radius_mm}")
    geometry = phantom_grid(shape, spacing, direction, origin)
    x, y, z = (c / body_radius_mm for c in voxel_centres(geometry))  # in body radii
    hu = np.full(geometry.shape, BODY_HU["air"])
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    ids = BODY_LABELS
    inf = np.inf

    def paint(mask, value, label):
        hu[mask] = value
        labels[mask] = ids[label]

    body = _inside_ellipsoid(x, y, z, (0, 0, 0), (1.0, 0.72, inf))
    interior = _inside_ellipsoid(x, y, z, (0, 0, 0), (0.9, 0.62, inf))  # inside the fat layer
    paint(body, BODY_HU["fat"], "fat")
    paint(interior, BODY_HU["soft_tissue"], "soft_tissue")
    # Organs, clipped to the interior so none pokes through the fat layer.
    # Right is -x and anterior is -y in LPS.
    organs = [
        ("liver", BODY_HU["liver"], (-0.42, -0.1, 0.25), (0.35, 0.3, 0.5)),
        ("spleen", BODY_HU["spleen"], (0.5, 0.15, 0.35), (0.16, 0.14, 0.3)),
        ("kidney_right", BODY_HU["kidney"], (-0.32, 0.3, -0.1), (0.11, 0.1, 0.25)),
        ("kidney_left", BODY_HU["kidney"], (0.32, 0.3, -0.15), (0.11, 0.1, 0.25)),
        ("aorta", BODY_HU["aorta"], (0.06, 0.16, 0.0), (0.07, 0.07, inf)),
    ]
    for name, value, centre, semi in organs:
        paint(interior & _inside_ellipsoid(x, y, z, centre, semi), value, name)
    spine_centre, spine_radius, cortex = (0.0, 0.42, 0.0), 0.15, 0.04
    paint(_inside_ellipsoid(x, y, z, spine_centre, (spine_radius, spine_radius, inf)), BODY_HU["cortical_bone"], "vertebra")
    trabecular = _inside_ellipsoid(x, y, z, spine_centre, (spine_radius - cortex,) * 2 + (inf,))
    paint(trabecular, BODY_HU["trabecular_bone"], "vertebra")
    if left_marker:
        paint(_inside_ellipsoid(x, y, z, (0.88, -0.1, 0.0), (0.1, 0.1, 0.1)), BODY_HU["left_marker"], "left_marker")
    return _finish(hu, labels, geometry, dtype, noise_hu, seed, return_labels, ids, "body")


# --- head -----------------------------------------------------------------------------


def head_phantom(
    shape=(64, 64, 48),
    spacing=(3.0, 3.0, 4.0),
    direction=None,
    origin=None,
    dtype=np.int16,
    seed: int = 0,
    noise_hu: float = 5.0,
    lesion: Optional[dict] = None,
    left_marker: bool = False,
    head_radius_mm: float = DEFAULT_HEAD_RADIUS_MM,
    return_labels: bool = False,
):
    """A non-contrast head CT: scalp, skull, brain, two lateral ventricles.

    The head is an ellipsoid centred on the LPS origin with semi-axes
    (0.75, 0.95, 0.85) x ``head_radius_mm`` in (x, y, z): scalp, then a
    skull (1000 HU) around the brain (35 HU) holding two CSF ventricles (5 HU)
    either side of the midline. ``lesion`` adds a hyperdense sphere, e.g.
    ``{"center_lps": (20, -10, 15), "radius_mm": 10, "hu": 70}``
    (``radius_mm`` defaults to 10, ``hu`` to 70); it is confined to the
    intracranial space so it never alters the skull. ``left_marker`` adds a
    2000 HU sphere on the scalp at +x. The defaults fit a life-size head in
    the default grid; with the small :data:`GEOMETRIES` grids pass
    ``head_radius_mm=45``.

    Other arguments and the return value are as in :func:`body_phantom`
    (label ids in :data:`HEAD_LABELS`).
    """
    dtype = _check_dtype(dtype)
    if head_radius_mm <= 0:
        raise ValueError(f"head_radius_mm must be positive, got {head_radius_mm}")
    geometry = phantom_grid(shape, spacing, direction, origin)
    x_mm, y_mm, z_mm = voxel_centres(geometry)
    x, y, z = (c / head_radius_mm for c in (x_mm, y_mm, z_mm))
    hu = np.full(geometry.shape, HEAD_HU["air"])
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    ids = HEAD_LABELS

    def paint(mask, value, label):
        hu[mask] = value
        labels[mask] = ids[label]

    semi = np.array([0.75, 0.95, 0.85])
    # Nested ellipsoids: the outer surface is scalp, then skull, then brain.
    paint(_inside_ellipsoid(x, y, z, (0, 0, 0), semi), HEAD_HU["scalp"], "scalp")
    paint(_inside_ellipsoid(x, y, z, (0, 0, 0), semi * 0.95), HEAD_HU["skull"], "skull")
    intracranial = _inside_ellipsoid(x, y, z, (0, 0, 0), semi * 0.88)
    paint(intracranial, HEAD_HU["brain"], "brain")
    for side in (-1.0, 1.0):
        paint(_inside_ellipsoid(x, y, z, (side * 0.1, 0.0, 0.1), (0.06, 0.3, 0.12)), HEAD_HU["csf"], "csf")
    if lesion is not None:
        unknown = set(lesion) - {"center_lps", "radius_mm", "hu"}
        if unknown or "center_lps" not in lesion:
            raise ValueError(f"lesion needs 'center_lps' and may have 'radius_mm', 'hu'; got keys {sorted(lesion)}")
        cx, cy, cz = np.asarray(lesion["center_lps"], dtype=np.float64).reshape(3)
        r = float(lesion.get("radius_mm", 10.0))
        sphere = (x_mm - cx) ** 2 + (y_mm - cy) ** 2 + (z_mm - cz) ** 2 <= r * r
        paint(sphere & intracranial, float(lesion.get("hu", HEAD_HU["lesion"])), "lesion")
    if left_marker:
        paint(_inside_ellipsoid(x, y, z, (0.75, 0.0, 0.0), (0.05, 0.05, 0.05)), HEAD_HU["left_marker"], "left_marker")
    return _finish(hu, labels, geometry, dtype, noise_hu, seed, return_labels, ids, "head")


def write_pretraining_scans(folder) -> Path:
    """Two 48 x 48 x 60 phantom CTs at 2 mm in ``folder`` (``ct1.nii.gz``, ``ct2.nii.gz``): they pass CT-FM's
    pretraining filters. Returns ``folder``."""
    from CTFMLib.image import write_image

    folder = Path(folder)
    for seed in (1, 2):
        write_image(body_phantom(shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0), seed=seed), folder / f"ct{seed}.nii.gz")
    return folder
