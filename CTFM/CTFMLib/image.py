"""One image type with full geometry, read and written with SimpleITK (DICOM series: :mod:`CTFMLib.dicom`).

Conventions (the same as ITK and DICOM):

- ``Image.array`` is indexed ``[i, j, k]``: i runs along the first image axis
  (columns in a DICOM slice), k along the slice axis. SimpleITK's numpy view
  is ``[k, j, i]``; the transpose happens only here.
- Physical space is LPS (x to the patient's Left, y Posterior, z Superior), in mm.
- ``direction[:, a]`` is the LPS unit vector along index axis ``a``;
  ``spacing[a]`` is the voxel size along it; ``origin`` is the LPS position of
  the centre of voxel ``[0, 0, 0]``.

So ``LPS = origin + direction @ (spacing * ijk)`` (:meth:`Image.affine`).
Slicer volume nodes store RAS; the Slicer adapters flip the first two rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

# Single-file formats only: a detached header names its data file, which a rename would break.
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


class ImageError(ValueError):
    """An image cannot be used: wrong dimension, bad values, unreadable, ambiguous series."""


@dataclass
class Geometry:
    """The voxel grid of an image without its voxels."""

    shape: tuple
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if np.any(self.spacing <= 0):
            raise ImageError(f"spacing must be positive, got {self.spacing.tolist()}")

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``[i, j, k, 1]`` to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction * self.spacing[None, :]
        a[:3, 3] = self.origin
        return a

    def index_to_physical(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def physical_to_index(self, lps) -> np.ndarray:
        """Continuous index of an LPS point (round it for the nearest voxel)."""
        lps = np.asarray(lps, dtype=np.float64)
        return np.linalg.solve(self.direction, (lps - self.origin).T).T / self.spacing

    def same_grid(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


@dataclass
class Image:
    """A 3-D scalar image: voxels ``[i, j, k]`` and their LPS geometry."""

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ImageError(f"expected a 3-D image, got {self.array.ndim}-D with shape {self.array.shape}")
        g = Geometry(self.array.shape, self.spacing, self.origin, self.direction)
        self.spacing, self.origin, self.direction = g.spacing, g.origin, g.direction

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.array.shape, self.spacing, self.origin, self.direction)

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    def index_to_physical(self, ijk) -> np.ndarray:
        return self.geometry.index_to_physical(ijk)

    def physical_to_index(self, lps) -> np.ndarray:
        return self.geometry.physical_to_index(lps)

    def with_array(self, array: np.ndarray, **metadata) -> "Image":
        """A new image on the same grid holding ``array``."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ImageError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Image(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), {**self.metadata, **metadata})

    @classmethod
    def from_geometry(cls, array: np.ndarray, geometry: Geometry, metadata: Optional[dict] = None) -> "Image":
        if tuple(array.shape) != tuple(geometry.shape):
            raise ImageError(f"array shape {array.shape} does not match the grid {geometry.shape}")
        return cls(array, geometry.spacing.copy(), geometry.origin.copy(), geometry.direction.copy(), dict(metadata or {}))


# --- SimpleITK conversion ----------------------------------------------------------


def _sitk():
    import SimpleITK as sitk  # imported lazily: `ctfm info` and the Slicer GUI start without it

    return sitk


def from_sitk(img, metadata: Optional[dict] = None) -> Image:
    """Convert a 3-D scalar SimpleITK image (no copy of voxels beyond SimpleITK's own)."""
    sitk = _sitk()
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"expected a scalar (grey-level) image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise ImageError(f"expected a 3-D image, got a {dim}-D image of size {tuple(img.GetSize())}")
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    return Image(array, np.asarray(img.GetSpacing()), np.asarray(img.GetOrigin()), direction, dict(metadata or {}))


def to_sitk(image: Image):
    sitk = _sitk()
    array = image.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in image.spacing])
    img.SetOrigin([float(o) for o in image.origin])
    img.SetDirection([float(d) for d in image.direction.reshape(-1)])
    return img


# --- reading --------------------------------------------------------------------


def read_image(path, series_uid: Optional[str] = None, recursive: bool = False) -> Image:
    """Read NIfTI, NRRD, MHA/MHD, a single DICOM file, or a DICOM series folder.

    A folder is read as one DICOM series (its subfolders too with ``recursive``); when it
    holds several, ``series_uid`` chooses one, and without it an :class:`ImageError` lists them.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"no such file or folder: {path}")
    if path.is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid, recursive=recursive)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)  # ITK reads a cut-off NIfTI without complaint, filling the rest with zeros
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ImageError(f"cannot read {path.name}: not a readable image file or it is corrupt ({_first_line(e)})") from None
    metadata = {"source": str(path)}
    if reader.HasMetaDataKey("0008|0060"):
        metadata["modality"] = reader.GetMetaData("0008|0060").strip()
    image = from_sitk(img, metadata)
    return image


def check_nifti_complete(path) -> None:
    """Raise :class:`ImageError` when a .nii/.nii.gz file holds fewer voxel bytes than its header
    promises, or its gzip stream is cut short (decompresses the file once; no voxels are kept)."""
    import gzip
    import zlib

    sitk = _sitk()
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        ndim = int(reader.GetMetaData("dim[0]"))
        count = int(np.prod([int(reader.GetMetaData(f"dim[{a}]")) or 1 for a in range(1, ndim + 1)]))
        expected = int(float(reader.GetMetaData("vox_offset"))) + count * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError) as e:
        why = _first_line(e)
        raise ImageError(f"cannot read {path.name}: not a readable NIfTI file or it is corrupt ({why})") from None
    held, problem = 0, ""
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    held += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            problem = f"its compressed data is cut short or damaged ({_first_line(e)})"
    else:
        held = path.stat().st_size
    if not problem and held < expected:
        problem = f"it holds {held} bytes but its header needs {expected}"
    if problem:
        raise ImageError(
            f"cannot read {path.name}: the file is truncated or corrupt: {problem}; copy or export it again"
        )


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def write_image(image: Image, path, compress: bool = True) -> Path:
    """Write NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd), MetaImage (.mha) or a DICOM series folder.

    A file is written to a temporary name first and renamed, so an interrupted
    write never leaves a truncated file under the final name.

    When ``path`` is an existing folder, or has no suffix (``out/ct``), a DICOM
    series is written into it (the folder is created if needed): one CT file
    per slice, see :func:`CTFMLib.dicom_write.write_dicom_series`, which refuses a
    folder that already holds DICOM files. ``compress`` applies to files only.
    Returns the file or folder written.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        from .dicom_write import write_dicom_series

        write_dicom_series(image, path)
        return path
    name = path.name.lower()
    if not name.endswith(WRITE_SUFFIXES):
        raise ImageError(
            f"cannot write {path.name}: use one of {', '.join(WRITE_SUFFIXES)}, or a folder without a suffix for a DICOM series"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk = _sitk()
    suffix = next(s for s in sorted(WRITE_SUFFIXES, key=len, reverse=True) if name.endswith(s))
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        sitk.WriteImage(to_sitk(image), str(tmp), compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
