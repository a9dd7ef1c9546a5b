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

import math
import os
import sys
from contextlib import contextmanager
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


def import_sitk():
    """The SimpleITK module, imported on first use (also by :mod:`CTFMLib.dicom`)."""
    import SimpleITK as sitk  # imported lazily: `ctfm info` and the Slicer GUI start without it

    return sitk


def from_sitk(img, metadata: Optional[dict] = None) -> Image:
    """Convert a 3-D scalar SimpleITK image (no copy of voxels beyond SimpleITK's own)."""
    sitk = import_sitk()
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
    sitk = import_sitk()
    array = image.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in image.spacing])
    img.SetOrigin([float(o) for o in image.origin])
    img.SetDirection([float(d) for d in image.direction.reshape(-1)])
    return img


# --- reading --------------------------------------------------------------------

# What a CT grid can be: voxels of 0.05 to 50 mm along every axis (finer is microscopy, coarser
# is no CT; outside it the header is wrong or not in mm), and axes at right angles within about
# 0.06 degrees (ITK accepts sheared NRRD/MetaImage grids that no CT reader can place correctly).
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0
DIRECTION_TOLERANCE = 1e-3
_AXES = ("i", "j", "k")


def read_image(path, series_uid: Optional[str] = None, recursive: bool = False) -> Image:
    """Read NIfTI, NRRD, MHA/MHD, a single DICOM file, or a DICOM series folder.

    A folder is read as one DICOM series (its subfolders too with ``recursive``); when it
    holds several, ``series_uid`` chooses one, and without it an :class:`ImageError` lists them.

    Refused with an :class:`ImageError` (see :func:`check_read_geometry`, :func:`scan_nifti`):
    a truncated file; NaN or infinite voxels in a NIfTI file (SimpleITK reads them as 0);
    a NIfTI voxel size (pixdim) of 0, NaN or inf (SimpleITK reads 1 mm); a MetaImage header
    number that is not a number (read as 0); spacing outside 0.05-50 mm, axes that are not
    at right angles, and a non-finite origin, in every format.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"no such file or folder: {path}")
    if path.is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid, recursive=recursive)
    name = path.name.lower()
    if _is_dicom_file(path):
        from .dicom import read_dicom_file

        return read_dicom_file(path)  # multi-frame files get a series' checks; GDCM alone checks nothing
    nifti = None
    if name.endswith((".nii", ".nii.gz")):
        # ITK reads a cut-off NIfTI without complaint (filling the rest with zeros), NaN voxels as 0
        # and a zero voxel size as 1 mm: the raw file is checked first, in one pass.
        nifti = scan_nifti(path)
        _check_nifti_header(nifti, path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    sitk = import_sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_stderr_captured():  # ITK's own complaints would add lines to the one-line refusal
            img = reader.Execute()
    except RuntimeError as e:
        if nifti is not None and nifti.version == 2:
            raise ImageError(f"cannot read {path.name}: a NIfTI-2 file, which this SimpleITK cannot read; "
                             "save it as NIfTI-1 (.nii.gz), e.g. with nibabel or 3D Slicer") from None
        raise ImageError(_read_failure(path, e)) from None
    metadata = {"source": str(path)}
    if reader.HasMetaDataKey("0008|0060"):
        metadata["modality"] = reader.GetMetaData("0008|0060").strip()
    image = from_sitk(img, metadata)
    check_read_geometry(image, path.name)
    return image


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file with its 128-byte preamble and "DICM" (files without one are left to ITK)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def check_read_geometry(image: Image, name: str) -> None:
    """Refuse a grid no CT scan has: spacing outside ``MIN_SPACING_MM``-``MAX_SPACING_MM`` per axis,
    a non-finite origin, or a direction matrix that is not orthonormal (``|D^T D - I| > 1e-3``).

    Called where images enter from files (:func:`read_image`, :func:`CTFMLib.dicom.read_dicom_series`),
    not for grids built inside the library (resampling, crops).
    """
    for a, s in enumerate(np.asarray(image.spacing, dtype=np.float64)):
        if not (np.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM):
            raise ImageError(
                f"cannot use {name}: its voxel spacing along axis {a} ({_AXES[a]}) is {_number(s)} mm, outside the "
                f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm of a CT scan; the header's spacing is wrong (or not in mm): "
                "fix it, or export the scan again"
            )
    if not np.all(np.isfinite(image.origin)):
        raise ImageError(
            f"cannot use {name}: its origin {_vector_text(image.origin)} is not a finite position; fix the header, "
            "or export the scan again"
        )
    d = np.asarray(image.direction, dtype=np.float64)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(3)).max() > DIRECTION_TOLERANCE:
        raise ImageError(
            f"cannot use {name}: its axis directions are not orthonormal (a sheared or skewed grid, "
            f"angles between axes {_axis_angles(d)} degrees); resample it onto a grid with axes at right angles first"
        )


def _number(x) -> str:
    return f"{float(x):g}"


def _vector_text(v) -> str:
    return "(" + ", ".join(_number(x) for x in np.asarray(v).reshape(-1)) + ")"


def _axis_angles(d: np.ndarray) -> str:
    norms = np.linalg.norm(d, axis=0)
    if not np.all(np.isfinite(d)) or np.any(norms == 0):
        return "undefined"
    u = d / norms
    angles = [np.degrees(np.arccos(np.clip(u[:, a] @ u[:, b], -1, 1))) for a, b in ((0, 1), (0, 2), (1, 2))]
    return "/".join(f"{x:.1f}" for x in angles)


def _read_failure(path: Path, e: Exception) -> str:
    """One line for an ITK read error, in words a user can act on."""
    text = str(e)
    if "Bad direction, determinant is 0" in text:
        return (
            f"cannot read {path.name}: its axis directions are not independent (two axes point the same way, "
            "or one is zero), so the grid cannot be placed in space; fix the header's directions"
        )
    if "Zero-valued spacing" in text:
        return f"cannot read {path.name}: its voxel spacing is zero or not a number along an axis; fix the header's spacing"
    truncated = ("fread got only", "bytes but received", "data not read completely", "File cannot be read")
    if any(t in text for t in truncated):
        # MetaIO ends such an error with a stale "Reason: No such file or directory"; the file is there.
        reason = "" if "File cannot be read" in text else f" ({first_line(e)})"
        return f"cannot read {path.name}: the file is truncated or corrupt{reason}; copy or export it again"
    return f"cannot read {path.name}: not a readable image file or it is corrupt ({first_line(e)})"


# --- NIfTI: one pass over the raw file -------------------------------------------------------------

_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


@dataclass(frozen=True)
class NiftiScan:
    """What one pass over a NIfTI file found: header fields ITK hides, and the voxel bytes it holds."""

    version: int  # 1 or 2
    dim: tuple  # dim[0..7]
    datatype: int
    pixdim: tuple  # pixdim[0..7], as stored
    scl_slope: float
    scl_inter: float
    expected_bytes: int  # vox_offset + voxel bytes the header promises
    held_bytes: int
    nonfinite: Optional[int]  # NaN/inf voxels of a float datatype; None when not counted


def check_nifti_complete(path) -> None:
    """Raise :class:`ImageError` when a .nii/.nii.gz file holds fewer voxel bytes than its header
    promises, or its gzip stream is cut short (decompresses the file once; no voxels are kept)."""
    scan_nifti(path, values=False)


def scan_nifti(path, values: bool = True) -> NiftiScan:
    """Read a .nii/.nii.gz file once (decompressing a .gz once), without keeping its voxels.

    Raises :class:`ImageError` when the header is not NIfTI-1/NIfTI-2, or the file is truncated
    (fewer voxel bytes than the header promises, or a cut-short gzip stream). With ``values``,
    counts NaN and infinite voxels of a float32/float64 file (in the header's byte order) in the
    same pass: SimpleITK's reader turns them into 0. An uncompressed non-float file is not read
    beyond its header.
    """
    import gzip
    import zlib

    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise ImageError(f"cannot read {path.name}: {e.strerror or e}") from None
    with f:
        try:
            head = f.read(540)
        except (EOFError, OSError, zlib.error) as e:
            if gz and not isinstance(e, gzip.BadGzipFile):
                raise _truncated(path, f"its compressed data is cut short or damaged ({first_line(e)})") from None
            raise ImageError(f"cannot read {path.name}: not a readable NIfTI file or it is corrupt ({first_line(e)})") from None
        header = _nifti_header(head, path)
        version, order, dim, datatype, bitpix, pixdim, vox_offset, slope, inter = header
        count = int(np.prod([max(int(n), 1) for n in dim[1 : dim[0] + 1]], dtype=object))
        start = max(vox_offset, 352 if version == 1 else 544)
        expected = vox_offset + count * bitpix // 8
        dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if values and datatype in _NIFTI_FLOATS else None
        nonfinite = None
        if not gz and dtype is None:
            held = path.stat().st_size
        else:
            counter = _NonFiniteCounter(dtype, start, start + count * dtype.itemsize if dtype else start)
            counter.feed(head)
            held = len(head)
            try:
                while chunk := f.read(1 << 22):
                    counter.feed(chunk)
                    held += len(chunk)
            except (EOFError, OSError, zlib.error) as e:
                what = "compressed data is cut short or damaged" if gz else "data cannot be read"
                raise _truncated(path, f"its {what} ({first_line(e)})") from None
            if dtype is not None:
                nonfinite = counter.bad
    if held < expected:
        raise _truncated(path, f"it holds {held} bytes but its header needs {expected}")
    return NiftiScan(version, tuple(dim), datatype, tuple(pixdim), slope, inter, expected, held, nonfinite)


def _truncated(path: Path, problem: str) -> ImageError:
    return ImageError(f"cannot read {path.name}: the file is truncated or corrupt: {problem}; copy or export it again")


def _nifti_header(head: bytes, path: Path) -> tuple:
    """``(version, byte order, dim, datatype, bitpix, pixdim, vox_offset, scl_slope, scl_inter)``."""
    import struct

    def refuse(why: str) -> ImageError:
        return ImageError(f"cannot read {path.name}: not a readable NIfTI file or it is corrupt ({why})")

    if len(head) < 348:
        raise refuse(f"{len(head)} bytes, shorter than a NIfTI header")
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        raise refuse("its first bytes are not a NIfTI header size of 348 or 540")
    if size == 348:
        if head[344:347] not in (b"n+1", b"ni1"):
            raise refuse("no NIfTI-1 magic 'n+1'")
        dim = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "2h", head[70:74])
        pixdim = struct.unpack(order + "8f", head[76:108])
        vox_offset, slope, inter = struct.unpack(order + "3f", head[108:120])
        version = 1
    else:
        if len(head) < 540:
            raise refuse(f"{len(head)} bytes, shorter than a NIfTI-2 header")
        if head[4:7] not in (b"n+2", b"ni2"):
            raise refuse("no NIfTI-2 magic 'n+2'")
        datatype, bitpix = struct.unpack(order + "2h", head[12:16])
        dim = struct.unpack(order + "8q", head[16:80])
        pixdim = struct.unpack(order + "8d", head[104:168])
        (vox_offset,) = struct.unpack(order + "q", head[168:176])
        slope, inter = struct.unpack(order + "2d", head[176:192])
        version = 2
    if not 1 <= dim[0] <= 7 or any(n < 0 for n in dim[1 : dim[0] + 1]):
        raise refuse(f"its dimensions {list(dim[: dim[0] + 1] if 0 < dim[0] <= 7 else dim)} are invalid")
    if bitpix <= 0 or bitpix % 8:
        raise refuse(f"bits per voxel {bitpix}")
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise refuse(f"voxel data offset {vox_offset}")
    return version, order, dim, datatype, bitpix, pixdim, int(vox_offset), float(slope), float(inter)


class _NonFiniteCounter:
    """Counts NaN/inf values of ``dtype`` in the bytes ``[start, end)`` of a stream fed chunk by chunk."""

    def __init__(self, dtype, start: int, end: int):
        self.dtype, self.start, self.end = dtype, start, end
        self.pos = 0  # stream offset of the next byte fed
        self.carry = b""  # the start of a value split between chunks
        self.bad = 0

    def feed(self, chunk: bytes) -> None:
        lo, hi = max(self.start, self.pos), min(self.end, self.pos + len(chunk))
        if self.dtype is not None and hi > lo:
            data = memoryview(chunk)[lo - self.pos : hi - self.pos]
            if self.carry:
                data = memoryview(self.carry + bytes(data))
            whole = len(data) - len(data) % self.dtype.itemsize
            values = np.frombuffer(data[:whole], dtype=self.dtype)
            self.bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            self.carry = bytes(data[whole:])
        self.pos += len(chunk)


def _check_nifti_header(scan: NiftiScan, path: Path) -> None:
    """Refuse what SimpleITK would silently replace: NaN/inf voxels (read as 0), a voxel size of 0,
    NaN or inf (read as 1 mm), and a scaling that cannot give numbers.

    A NaN scl_slope (or 0) is the NIfTI convention for "no scaling" (nibabel writes it; nifti1_io
    and nibabel ignore scl_inter then), so it is accepted; an infinite slope, or a finite slope with a
    non-finite intercept, is refused.
    """
    if scan.nonfinite:
        raise ImageError(
            f"cannot read {path.name}: the image contains {scan.nonfinite} NaN or infinite voxels (a NIfTI reader "
            "would turn them into 0); replace them with a HU value (e.g. -1024 for air) and run again"
        )
    axes = range(1, min(int(scan.dim[0]), 3) + 1)
    bad = [(a, p) for a, p in ((a, scan.pixdim[a]) for a in axes) if p == 0 or not math.isfinite(p)]
    if bad:
        a, p = bad[0]
        raise ImageError(
            f"cannot read {path.name}: its header gives voxel size pixdim[{a}] = {_number(p)} (readers substitute 1 mm); "
            "fix the header's voxel size, or export the scan again"
        )
    slope, inter = scan.scl_slope, scan.scl_inter
    if math.isinf(slope) or (math.isfinite(slope) and slope != 0 and not math.isfinite(inter)):
        raise ImageError(
            f"cannot read {path.name}: its header's value scaling (scl_slope {_number(slope)}, scl_inter "
            f"{_number(inter)}) cannot give voxel values; fix the header, or export the scan again"
        )


# --- MetaImage: the header ITK reads leniently ----------------------------------------------------------

# Bytes per value of the MetaImage element types with a fixed size.
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}  # fmt: skip
_MET_NUMBERS = ("Offset", "Origin", "Position", "ElementSpacing", "TransformMatrix", "Rotation", "Orientation")


def _check_metaimage(path: Path) -> None:
    """Refuse a .mha/.mhd whose header numbers are not numbers (MetaIO reads ``nan`` as 0), whose
    raw data is shorter than the header promises (MetaIO's own error names no cause), or whose
    compressed data is cut or damaged (MetaIO then returns zeros or garbage; it is inflated once
    here, in bounded pieces, without keeping it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # ITK reports it
    fields, data_start = {}, None
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            return
        line = head[pos:end].decode("latin-1").strip()
        pos = end + 1
        if "=" not in line:
            return  # not a MetaImage header: ITK reports it
        key, value = (s.strip() for s in line.split("=", 1))
        fields[key.lower()] = value
        if key.lower() == "elementdatafile":
            data_start = pos
            break
    if data_start is None:
        return
    # MetaIO trusts NDims and DimSize (NDims = -1 crashed the reader): both are checked first.
    try:
        ndims = int(fields.get("ndims", ""))
        dims = [int(v) for v in fields.get("dimsize", "").split()]
    except ValueError:
        ndims, dims = 0, []
    if not 2 <= ndims <= 4 or len(dims) != ndims or min(dims) < 1:
        raise ImageError(
            f"cannot read {path.name}: its header's NDims ({fields.get('ndims', 'missing')}) and DimSize "
            f"({fields.get('dimsize', 'missing')}) do not describe a 2- to 4-D image; the file is corrupt"
        )
    for key in _MET_NUMBERS:
        value = fields.get(key.lower())
        if value is None:
            continue
        try:
            numbers = [float(v) for v in value.split()]
        except ValueError:
            numbers = [math.nan]
        if not all(math.isfinite(v) for v in numbers):
            raise ImageError(
                f"cannot read {path.name}: its header's {key} ({value}) is not a list of numbers "
                "(readers take 0 instead); fix the header, or export the scan again"
            )
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
    except ValueError:
        return
    size = _MET_SIZES.get(fields.get("elementtype", "").upper())
    source = fields.get("elementdatafile", "")
    if not dims or size is None or fields.get("binarydata", "true").lower() == "false":
        return
    if source.upper() == "LOCAL":
        data, offset = path, data_start
    elif source.upper().startswith("LIST") or "%" in source or " " in source:
        return  # several data files
    else:
        data = path.parent / source
        if not data.is_file():
            raise ImageError(f"cannot read {path.name}: its data file {source} is missing; it must lie beside the header")
        try:
            offset = max(int(float(fields.get("headersize", "0") or 0)), 0)
        except ValueError:
            offset = 0
    expected = int(np.prod(dims, dtype=object)) * channels * size
    if fields.get("compresseddata", "false").lower() == "true":
        # MetaIO zero-fills a cut or damaged zlib stream with only "Uncompress failed" on stderr.
        problem = _inflate_problem(data, offset, expected)
        if problem:
            raise _truncated(path, problem)
        return
    held = data.stat().st_size - offset
    if held < expected:
        raise _truncated(path, f"it holds {max(held, 0)} bytes of voxel data but its header needs {expected}")


def _inflate_problem(data: Path, offset: int, expected: int) -> str:
    """Why the zlib (or gzip) stream at ``offset`` of ``data`` does not give ``expected`` bytes, or ""."""
    import zlib

    inflate = zlib.decompressobj(47)  # 32 + 15: a zlib or a gzip header; its check value is verified at the end
    total = 0
    try:
        with open(data, "rb") as f:
            f.seek(offset)
            while not inflate.eof and (chunk := f.read(1 << 20)):
                while chunk and not inflate.eof:
                    total += len(inflate.decompress(chunk, 1 << 22))  # bounded: a small file may inflate hugely
                    chunk = inflate.unconsumed_tail
                    if total > expected:
                        return ""  # more than the voxels: a reader takes what it needs
    except zlib.error as e:
        return f"its compressed voxel data is damaged ({e})"
    except OSError as e:
        return f"its voxel data cannot be read ({e.strerror or e})"
    if total < expected:
        return f"its compressed voxel data gives {total} bytes but its header needs {expected}"
    if not inflate.eof:
        return "its compressed voxel data is cut short before its check value"
    return ""


# Bytes per value of NRRD's type names (teem's spellings).
_NRRD_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip


def _check_nrrd(path: Path) -> None:
    """Refuse a gzip-encoded NRRD whose compressed data is cut or damaged: teem reads a damaged
    stream without noticing (its CRC is not checked) and returns garbage voxels."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # ITK reports it
    if not head.startswith(b"NRRD"):
        return
    end = head.find(b"\n\n")
    if end < 0:
        return
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    encoding = fields.get("encoding", "").lower()
    if encoding in ("ascii", "text", "txt"):
        problem = _ascii_problem(path, end + 2) if "data file" not in fields and "datafile" not in fields else ""
        if problem:
            raise ImageError(f"cannot read {path.name}: its text-encoded voxel data {problem}; the file is corrupt")
        return
    if encoding not in ("gzip", "gz"):
        return
    size = _NRRD_SIZES.get(fields.get("type", "").lower())
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        skip = int(fields.get("byte skip", "0")), int(fields.get("line skip", "0"))
    except ValueError:
        return
    source = fields.get("data file", fields.get("datafile"))
    if size is None or not sizes or skip != (0, 0):
        return
    if source is None:
        data, offset = path, end + 2
    elif source.upper().startswith("LIST") or " " in source or "%" in source:
        return  # several data files
    else:
        data, offset = path.parent / source, 0
        if not data.is_file():
            raise ImageError(f"cannot read {path.name}: its data file {source} is missing; it must lie beside the header")
    problem = _inflate_problem(data, offset, int(np.prod(sizes, dtype=object)) * size)
    if problem:
        raise _truncated(path, problem)


def _ascii_problem(path: Path, offset: int, longest: int = 64) -> str:
    """Why the text voxels of an ASCII NRRD would crash teem's reader (a word over ``longest`` characters
    overflows its buffer), or ""; also refuses bytes that are not text."""
    carry = b""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if max(chunk) > 126:
                return "holds bytes that are not text"
            data = carry + chunk
            words = data.split()
            carry = b"" if data[-1:].isspace() or not words else words.pop()  # a word may go on in the next chunk
            if len(carry) > longest or any(len(w) > longest for w in words):
                return f"holds a word of over {longest} characters"
    return ""


def first_line(e: Exception) -> str:
    """The last non-empty line of an exception's message (ITK's ends with the reason), for one-line refusals."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def write_image(image: Image, path, compress: bool = True, overwrite: bool = True) -> Path:
    """Write NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd), MetaImage (.mha) or a DICOM series folder.

    A file is written through :func:`CTFMLib.files.atomic_output`: in a private temporary folder,
    checked (a NIfTI file must hold every voxel its header promises: SimpleITK's NIfTI writer
    does not report a full disk), then renamed, so a failed or interrupted write never leaves a
    file under the final name, nor a temporary one. ``overwrite=False`` refuses an existing file.

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
    return write_sitk(to_sitk(image), path, compress, overwrite)


def write_sitk(img, path, compress: bool = True, overwrite: bool = True) -> Path:
    """Write a SimpleITK image to a file through :func:`CTFMLib.files.atomic_output` (see :func:`write_image`).

    ITK's writers do not always report a full disk (NIfTI never; NRRD wrote a 0-byte file), so the
    written file is checked as a reader would (:func:`_verify_written`) before it is renamed into
    place; ITK's own complaints on stderr are replaced by one message.
    """
    from .files import WriteError, atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            with native_stderr_captured():
                import_sitk().WriteImage(img, str(tmp), compress)
                _verify_written(tmp)
        except RuntimeError as e:
            raise WriteError(_write_errno(tmp), f"cannot write {path}: {_write_reason(e, path)}") from None
    return path


@contextmanager
def native_stderr_captured():
    """Hold what native code writes to file descriptor 2; replay it unless the block failed."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no real stderr (embedded interpreters)
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read().decode("utf-8", "replace")
                if text:
                    sys.stderr.write(text)


def _verify_written(tmp: Path) -> None:
    """Raise :class:`CTFMLib.files.WriteError` unless ``tmp`` holds a whole image: its header reads,
    a compressed stream inflates to every voxel, an uncompressed file holds every voxel byte."""
    from .files import WriteError

    name = tmp.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            check_nifti_complete(tmp)
            return
        reader = import_sitk().ImageFileReader()
        reader.SetFileName(str(tmp))
        reader.ReadImageInformation()
        if name.endswith(".nrrd"):
            _check_nrrd(tmp)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage(tmp)
        voxels = int(np.prod(reader.GetSize(), dtype=object)) * reader.GetNumberOfComponents()
        if tmp.stat().st_size < 64 or (_raw_encoding(tmp) and tmp.stat().st_size < voxels * _bytes_of(reader)):
            raise ImageError("the file is shorter than its voxels")
    except (ImageError, RuntimeError, OSError):
        final = tmp.parent.parent / tmp.name
        raise WriteError(_write_errno(tmp), f"writing {final} stopped early: {_write_reason(None, final)}") from None


def _raw_encoding(path: Path) -> bool:
    """Whether an NRRD/MetaImage file this module wrote stores its voxels uncompressed in the same file."""
    with open(path, "rb") as f:
        head = f.read(4096).lower()
    return b"encoding: raw" in head or (b"elementdatafile = local" in head and b"compresseddata = true" not in head)


def _bytes_of(reader) -> int:
    sitk = import_sitk()
    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8}
    return sizes.get(reader.GetPixelID(), 1)


def _write_errno(tmp: Path) -> int:
    """ENOSPC when the disk holding ``tmp`` is (nearly) full, else EIO: ITK's errors do not say which."""
    import errno
    import shutil

    try:
        return errno.ENOSPC if shutil.disk_usage(tmp.parent).free < (1 << 20) else errno.EIO
    except OSError:
        return errno.EIO


def _write_reason(e: Optional[Exception], final: Path) -> str:
    import errno

    from .files import describe_os_error

    code = _write_errno(final)
    if code == errno.EIO and e is not None:
        return first_line(e)
    return describe_os_error(OSError(code, "the written file is incomplete"), final)
