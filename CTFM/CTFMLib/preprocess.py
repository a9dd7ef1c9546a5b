"""CT-FM preprocessing with an exact way back to the input grid.

The published model cards preprocess with MONAI::

    LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
    CropForeground()

:func:`preprocess` does the same steps in the same order (plus optional
resampling to a target spacing, which pretraining used at 3 x 1 x 1 mm in SPL)
and records each geometric step. :meth:`Preprocessed.to_input` maps any model
output on the preprocessed grid (label map, heatmap, several channels) back
onto the input voxel grid: same shape, spacing, origin and direction.

Axis codes follow MONAI/nibabel: each letter names the direction in which the
index along that axis increases, so "SPL" puts axis 0 towards Superior,
axis 1 towards Posterior, axis 2 towards Left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .image import Geometry, Image, ImageError, check_read_geometry

HU_MIN, HU_MAX = -1024.0, 2048.0

# LPS unit vector of each axis code letter.
_CODE_VECTORS = {
    "L": (1, 0, 0), "R": (-1, 0, 0),
    "P": (0, 1, 0), "A": (0, -1, 0),
    "S": (0, 0, 1), "I": (0, 0, -1),
}


# --- orientation ---------------------------------------------------------------------


def axis_codes(direction: np.ndarray) -> str:
    """Closest axis codes of a direction matrix, e.g. ``"LPS"`` for the identity."""
    return "".join(_code_of(direction[:, a]) for a in range(3))


def _code_of(vector) -> str:
    w = int(np.argmax(np.abs(vector)))
    return "LPS"[w] if vector[w] > 0 else "RAI"[w]


def orientation_transform(direction: np.ndarray, target: str) -> tuple:
    """``(perm, flip)`` so that ``flip(transpose(array, perm))`` is in ``target`` orientation.

    Output axis ``a`` is input axis ``perm[a]``, reversed where ``flip[a]``.
    Matches nibabel's ``io_orientation`` (used by MONAI's ``Orientation``):
    input axes are taken in order, each assigned the world axis it is most
    aligned with among those still free, so oblique images reorient the same way.
    """
    target = target.upper()
    if sorted(_axis_of(c) for c in target) != [0, 1, 2]:
        raise ValueError(f"invalid axis codes {target!r}")
    d = np.array(direction, dtype=np.float64)
    world_of_input, sign_of_input = [0, 0, 0], [1, 1, 1]
    free = d.copy()
    for b in range(3):
        w = int(np.argmax(np.abs(free[:, b])))
        world_of_input[b] = w
        sign_of_input[b] = 1 if d[w, b] > 0 else -1
        free[w, :] = 0
    perm, flip = [], []
    for code in target:
        w = _axis_of(code)
        b = world_of_input.index(w)
        perm.append(b)
        flip.append(sign_of_input[b] != _CODE_VECTORS[code][w])
    return tuple(perm), tuple(flip)


def _axis_of(code: str) -> int:
    if code not in _CODE_VECTORS:
        raise ValueError(f"invalid axis code {code!r}")
    return int(np.argmax(np.abs(_CODE_VECTORS[code])))


def apply_orientation(array: np.ndarray, perm, flip) -> np.ndarray:
    """``array`` (leading axes, then i, j, k) reoriented by :func:`orientation_transform`'s ``(perm, flip)``; a view."""
    lead = array.ndim - 3
    out = np.transpose(array, list(range(lead)) + [lead + p for p in perm])
    slices = tuple([slice(None)] * lead + [slice(None, None, -1) if f else slice(None) for f in flip])
    return out[slices]


def undo_orientation(array: np.ndarray, perm, flip) -> np.ndarray:
    """The inverse of :func:`apply_orientation`: a reoriented array back on the input's axes; a view."""
    lead = array.ndim - 3
    slices = tuple([slice(None)] * lead + [slice(None, None, -1) if f else slice(None) for f in flip])
    array = array[slices]
    inverse = np.argsort(perm)
    return np.transpose(array, list(range(lead)) + [lead + int(p) for p in inverse])


def oriented_geometry(g: Geometry, perm, flip) -> Geometry:
    """The grid of :func:`apply_orientation`'s result: the same voxels in the same place, axes permuted and flipped."""
    shape = tuple(g.shape[p] for p in perm)
    spacing = g.spacing[list(perm)]
    direction = g.direction[:, list(perm)] * np.where(flip, -1.0, 1.0)[None, :]
    corner = np.array([(g.shape[p] - 1) if f else 0 for p, f in zip(perm, flip)], dtype=np.float64)
    first = np.zeros(3)
    first[list(perm)] = corner
    return Geometry(shape, spacing, g.index_to_physical(first), direction)


# --- resampling ------------------------------------------------------------------------


def _interp_axis(array: np.ndarray, axis: int, coords: np.ndarray, mode: str) -> np.ndarray:
    """Sample ``array`` along ``axis`` at continuous indices ``coords`` (clamped to the edge)."""
    n = array.shape[axis]
    coords = np.clip(coords, 0, n - 1)
    if mode == "nearest":
        return np.take(array, np.floor(coords + 0.5).astype(np.intp).clip(0, n - 1), axis=axis)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    a = np.take(array, lo, axis=axis).astype(np.float32, copy=False)
    b = np.take(array, hi, axis=axis).astype(np.float32, copy=False)
    return a + (b - a) * w


def physical_memory_bytes() -> int:
    """This computer's physical memory (16 GiB where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 16 << 30


def check_grid_fits(shape, what: str, bytes_per_voxel: int = 4) -> None:
    """Refuse, before allocating, a float grid that would need more than half of this computer's memory.

    A voxel size typed in the wrong unit (0.05 mm for 5 mm) asks for a grid of 10^11 voxels; numpy would
    fail with an allocation error after the work started, or the system would start swapping.
    """
    voxels = float(np.prod([float(n) for n in shape]))
    needed = voxels * bytes_per_voxel
    if needed > physical_memory_bytes() / 2:
        dims = "x".join(str(int(n)) for n in shape)
        raise ImageError(f"{what} would make a grid of {dims} voxels ({needed / 2**30:.1f} GB), more than this "
                         "computer can hold: choose a coarser voxel size or a smaller region")


def resample_axes(array: np.ndarray, scale: Sequence[float], out_shape: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Separable (tri)linear or nearest resampling of the last three axes.

    Output index ``j`` samples input index ``j * scale`` on each axis, so index 0
    stays at the same physical point (the origin does not move).
    """
    lead = array.ndim - 3
    check_grid_fits(tuple(array.shape[:lead]) + tuple(int(n) for n in out_shape), "resampling")
    for a in range(3):
        if out_shape[a] == array.shape[lead + a] and scale[a] == 1:
            continue
        coords = np.arange(out_shape[a], dtype=np.float64) * scale[a]
        array = _interp_axis(array, lead + a, coords, mode)
    return array


# --- the pipeline ----------------------------------------------------------------------


@dataclass
class PreprocessConfig:
    """The CT-FM model-card preprocessing; ``spacing`` adds resampling (pretraining: ``(3, 1, 1)`` in SPL)."""

    orientation: str = "SPL"
    spacing: Optional[tuple] = None
    hu_min: float = HU_MIN
    hu_max: float = HU_MAX
    crop_foreground: bool = True
    # How many voxels a resampled axis gets: "extent" round(n * s / t) (CT-FM's pretraining grid), or
    # "monai" round((n - 1) * s / t + 1), MONAI Spacing's (the segmentation model card's reference).
    grid: str = "extent"


@dataclass
class Preprocessed:
    """A preprocessed volume and the record that maps model space back to the input grid."""

    array: np.ndarray  # float32 in [0, 1], model space
    geometry: Geometry  # model-space grid (LPS), for points and patches
    input_geometry: Geometry
    perm: tuple
    flip: tuple
    oriented_shape: tuple
    resampled_shape: tuple
    crop_start: tuple
    crop_end: tuple
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_input(self, output: np.ndarray, mode: str = "nearest", fill=0) -> np.ndarray:
        """Map an output on the model grid (``(..., D, H, W)``) onto the input voxel grid.

        ``mode``: "nearest" for labels, "linear" for continuous maps (only matters
        when resampling was used). Voxels cropped away as background get ``fill``.
        """
        output = np.asarray(output)
        if tuple(output.shape[-3:]) != tuple(self.array.shape):
            raise ValueError(f"output grid {output.shape[-3:]} is not the model grid {self.array.shape}")
        lead = output.shape[:-3]
        full = np.full(lead + tuple(self.resampled_shape), fill, dtype=output.dtype)
        box = tuple(slice(s, e) for s, e in zip(self.crop_start, self.crop_end))
        full[(Ellipsis,) + box] = output
        if self.config.spacing is not None:
            oriented_spacing = self.input_geometry.spacing[list(self.perm)]
            scale = oriented_spacing / self.geometry.spacing
            full = resample_axes(full, scale, self.oriented_shape, mode)
            if mode == "nearest":
                full = full.astype(output.dtype, copy=False)
        return np.ascontiguousarray(undo_orientation(full, self.perm, self.flip))

    def to_model(self, array: np.ndarray, mode: str = "nearest") -> np.ndarray:
        """Carry an array on the input voxel grid (e.g. a label map) onto the model grid: the same
        orientation, resampling (``mode`` "nearest" for labels, "linear" for intensities) and crop
        the image went through. The inverse of :meth:`to_input` inside the foreground box."""
        array = np.asarray(array)
        if tuple(array.shape[-3:]) != tuple(self.input_geometry.shape):
            raise ValueError(f"array grid {array.shape[-3:]} is not the input grid {tuple(self.input_geometry.shape)}")
        out = apply_orientation(array, self.perm, self.flip)
        if self.config.spacing is not None:
            oriented_spacing = self.input_geometry.spacing[list(self.perm)]
            out = resample_axes(out, self.geometry.spacing / oriented_spacing, self.resampled_shape, mode)
            if mode == "nearest":
                out = out.astype(array.dtype, copy=False)
        box = tuple(slice(s, e) for s, e in zip(self.crop_start, self.crop_end))
        return np.ascontiguousarray(out[(Ellipsis,) + box])

    def to_input_image(self, output: np.ndarray, mode: str = "nearest", fill=0, **metadata) -> Image:
        return Image.from_geometry(self.to_input(output, mode, fill), self.input_geometry, metadata)

    def physical_to_model_index(self, lps) -> np.ndarray:
        return self.geometry.physical_to_index(lps)


def validate_ct(image: Image) -> None:
    """Refuse inputs CT-FM cannot give meaningful results for, naming the problem.

    Files are checked when read (:func:`CTFMLib.image.read_image`); this repeats the grid check
    (spacing 0.05-50 mm, orthonormal axes, finite origin) for images that come from elsewhere
    (a Slicer volume node), and checks values: NaN/inf voxels, and a range that is not HU.
    """
    modality = str(image.metadata.get("modality", "CT")).upper()
    if modality not in ("CT", ""):
        raise ImageError(f"CT-FM needs a CT scan; this image's modality is {modality}")
    if min(image.shape) < 2:
        raise ImageError(f"CT-FM needs a 3-D volume; this image has shape {image.shape} (a single slice?)")
    check_read_geometry(image, "the image")
    arr = image.array
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError(
            f"the image contains {int((~np.isfinite(arr)).sum())} NaN or infinite voxels; replace them with a HU "
            "value (e.g. -1024 for air) and run again"
        )
    if arr.dtype.kind not in "iuf":
        raise ImageError(f"unsupported voxel type {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 50 or (lo >= 0 and hi <= 1.5):
        raise ImageError(
            f"voxel values span [{lo:g}, {hi:g}], which does not look like Hounsfield units; "
            "CT-FM expects a CT in HU (air about -1000)"
        )


def preprocess(image: Image, config: Optional[PreprocessConfig] = None, validate: bool = True) -> Preprocessed:
    """Orientation, optional resampling, HU scaling and foreground crop, as the model card does."""
    config = config or PreprocessConfig()
    if validate:
        validate_ct(image)
    g_in = image.geometry
    perm, flip = orientation_transform(g_in.direction, config.orientation)
    oriented = apply_orientation(image.array, perm, flip)
    g = oriented_geometry(g_in, perm, flip)
    oriented_shape = tuple(oriented.shape)
    if config.spacing is not None:
        target = np.asarray(config.spacing, dtype=np.float64)
        if config.grid == "monai":
            out_shape = tuple(max(1, int(np.round((n - 1) * s / t + 1.0))) for n, s, t in
                              zip(oriented_shape, g.spacing, target))
        else:
            out_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(oriented_shape, g.spacing, target))
        data = resample_axes(oriented, target / g.spacing, out_shape, "linear")
        g = Geometry(out_shape, target, g.origin, g.direction)
    else:
        data = oriented.astype(np.float32)
    data = _scale_hu(data, config.hu_min, config.hu_max)
    resampled_shape = tuple(data.shape)
    start, end = (0, 0, 0), resampled_shape
    if config.crop_foreground:
        start, end = foreground_box(data)
        data = data[tuple(slice(s, e) for s, e in zip(start, end))]
        g = Geometry(tuple(data.shape), g.spacing, g.index_to_physical(np.asarray(start, dtype=np.float64)), g.direction)
    return Preprocessed(
        np.ascontiguousarray(data, dtype=np.float32), g, g_in, perm, flip, oriented_shape, resampled_shape,
        tuple(int(s) for s in start), tuple(int(e) for e in end), config,
    )


def _scale_hu(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Same arithmetic order as MONAI's ScaleIntensityRange: (x - a_min) / (a_max - a_min), then clip.
    data = np.asarray(data, dtype=np.float32)
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def foreground_box(data: np.ndarray) -> tuple:
    """Bounding box of voxels > 0 (MONAI CropForeground's default), as ``(start, end)``."""
    mask = data > 0
    if not mask.any():
        raise ImageError("the image has no voxel above -1024 HU (all air or empty): nothing to process")
    return mask_box(mask)


def mask_box(mask: np.ndarray) -> tuple:
    """``(start, end)`` of the smallest box holding every true voxel of a non-empty 3-d mask."""
    start, end = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        start.append(int(idx[0]))
        end.append(int(idx[-1]) + 1)
    return tuple(start), tuple(end)
