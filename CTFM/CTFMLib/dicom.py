"""Read a DICOM series folder into an :class:`~CTFMLib.image.Image`, refusing broken series.

Headers are read with pydicom (fast, header only, and it tells image slices
from non-image objects such as RTSTRUCT, SR or a DICOMDIR that share the
folder). Voxels are read by SimpleITK's GDCM reader, which decodes compressed
transfer syntaxes and applies Rescale Slope/Intercept (stored values -> HU).

GDCM and ITK stack whatever files they are given: a missing slice, a second
acquisition in the same series or a tilted gantry still yield a volume, just
a wrong one. So before reading, the slices of the chosen series are checked
and every problem becomes an :class:`ImageError` that says what is wrong and
where: several series without a choice, localizer (scout) images mixed in,
a single slice, missing geometry, differing matrix size, pixel spacing or
orientation, two slices at one position, gantry tilt, and uneven spacing
(with a hint when a gap looks like missing slices).

Values GDCM would otherwise replace silently are refused too: a CT series
without PixelSpacing (GDCM assumes 1 mm) or with a spacing that is not a pair
of positive numbers, row and column directions that are not at right angles,
and a RescaleSlope/RescaleIntercept that cannot give numbers. A CT series
without RescaleSlope/RescaleIntercept is read as stored only when the stored
values are clearly Hounsfield units already (some below ``HU_EVIDENCE`` =
-500: air or the padding outside the field of view; stored values of a
scanner that rescales are 0 or more), with a warning line on stderr; else it
is refused, since taking raw stored values for HU shifts every voxel (usually
by +1024). After reading, the grid is checked like every other format
(:func:`CTFMLib.image.check_read_geometry`: 0.05-50 mm spacing, orthonormal
axes, finite origin).

Slices are ordered by their position along the slice normal
``cross(row direction, column direction)``, ascending, as GDCM orders them,
so the result equals ``sitk.ImageSeriesReader`` on
``GetGDCMSeriesFileNames(folder)`` for a valid series.

Writing a series is :mod:`CTFMLib.dicom_write`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from .image import Image, ImageError, check_read_geometry, first_line, from_sitk, import_sitk, native_stderr_captured

# Direction cosines of two slices may differ by this much (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3
# Two slices closer than this along the normal are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
# A gap between neighbouring slices may differ from the median gap by the larger
# of these: positions are often written rounded to 0.01 mm, and 1 % of a slice is
# far below what a model or a reader notices.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.01
# Sideways drift of slice positions per mm along the normal (tan of ~0.06 degrees).
TILT_TOLERANCE = 1e-3
# Row and column directions may be off a right angle by this much (cosine; about 0.06 degrees).
PERPENDICULAR_TOLERANCE = 1e-3
# A CT series without Rescale tags is taken as HU only when some stored value is below this
# (air is -1000 HU; a scanner that rescales stores 0 or more for it).
HU_EVIDENCE = -500.0
# ImageType values that mark a projection image planned on, not a slice of the volume.
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})

# The header tags used here; reading only these keeps a scan of 1000 files fast.
_HEADER_TAGS = [
    "SeriesInstanceUID", "StudyInstanceUID", "SeriesDescription", "Modality", "PatientID", "PatientName",
    "FrameOfReferenceUID",
    "ImageType", "Rows", "Columns", "NumberOfFrames", "PixelSpacing", "SliceThickness",
    "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept",
    "InstanceNumber", "SOPClassUID",
]  # fmt: skip


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM image series found in a folder."""

    uid: str  # SeriesInstanceUID; may be "" in anonymised data
    description: str
    modality: str
    files: tuple  # Paths, ordered along the slice normal (by instance number where geometry is missing)
    study_uid: str = ""
    localizer: bool = False  # every image is a localizer (scout, topogram): nothing to segment

    @property
    def num_files(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """One line naming the series for a message or a list in a GUI."""
        uid = self.uid if self.uid else '"" (empty SeriesInstanceUID)'
        return f"{uid} | {self.modality or '?'} | {self.description or '(no description)'!r} | {self.num_files} file(s)"


@dataclass
class _Slice:
    """The header fields of one DICOM image file that ordering and checking need."""

    path: Path
    series_uid: str
    study_uid: str
    description: str
    modality: str
    patient_id: str
    patient_name: str
    frame_uid: str
    image_type: tuple
    rows: int
    columns: int
    frames: int
    pixel_spacing: Optional[tuple]  # as stored (may be non-positive or NaN); None when absent
    position: Optional[np.ndarray]
    row_dir: Optional[np.ndarray]
    col_dir: Optional[np.ndarray]
    slope: float
    intercept: float
    rescale: Optional[str]  # None: valid tags; "missing ..." (judged on the values read); or what is wrong
    instance: Optional[int]
    thickness: Optional[float]

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.row_dir is not None and self.col_dir is not None

    @property
    def is_localizer(self) -> bool:
        return bool(LOCALIZER_TYPES.intersection(self.image_type))


@dataclass
class FolderScan:
    """The files of a folder as :func:`scan_folder` sorted them."""

    slices: list  # _Slice of every DICOM image file
    non_image: list  # DICOM files without pixels (RTSTRUCT, SR, DICOMDIR, ...)
    not_dicom: list
    unreadable: list  # (path, reason): DICOM files whose header cannot be parsed


class _NotDicom(Exception):
    pass


# --- public API -------------------------------------------------------------------


def list_dicom_series(folder, recursive: bool = False) -> list:
    """The DICOM image series in ``folder`` (and its subfolders if ``recursive``).

    Non-image DICOM objects and non-DICOM files are skipped. Returns
    :class:`SeriesInfo` ordered by modality, description and UID.
    """
    folder = _existing_folder(folder)
    return [_info(group) for group in _group(scan_folder(folder, recursive).slices)]


def list_dicom_tree(folder, progress=None) -> tuple:
    """``(image series, objects without images, unreadable)`` of a folder tree at any depth (a batch over studies).

    Image series are :class:`SeriesInfo` as :func:`list_dicom_series` gives them (those without a
    SeriesInstanceUID one a folder); DICOM files without pixels
    (SR, RTSTRUCT, ...) are grouped into :class:`SeriesInfo` too, so a batch can name each one it skips;
    ``unreadable`` is ``[(path, reason)]``, the files whose header cannot be parsed.
    """
    folder = _existing_folder(folder)
    scan = scan_folder(folder, True, progress)
    objects = {}
    for path in scan.non_image:
        ds = _pydicom().dcmread(str(path), stop_before_pixels=True, force=True,
                                specific_tags=["SeriesInstanceUID", "StudyInstanceUID", "SeriesDescription", "Modality"])
        key = (_text(ds, "SeriesInstanceUID"), _text(ds, "StudyInstanceUID"))
        objects.setdefault(key, (ds, []))[1].append(path)
    non_image = [SeriesInfo(series, _text(ds, "SeriesDescription"), _text(ds, "Modality"), tuple(paths), study)
                 for (series, study), (ds, paths) in sorted(objects.items())]
    # Anonymised series may have lost their SeriesInstanceUID: those are told apart by their folder.
    buckets = {}
    for s in scan.slices:
        buckets.setdefault(s.series_uid or f"folder {s.path.parent}", []).append(s)
    images = [_info(group) for _, slices in sorted(buckets.items()) for group in _group(slices)]
    return images, non_image, scan.unreadable


def read_dicom_series(folder, series_uid: Optional[str] = None, recursive: bool = False, progress=None) -> Image:
    """Read one DICOM series from ``folder`` as a 3-D image in HU (for CT).

    ``series_uid`` chooses a series when the folder holds several; without it
    such a folder is an :class:`ImageError` listing them. ``progress`` is an
    optional ``callback(fraction, message)`` (see :mod:`CTFMLib.progress`).
    """
    folder = _existing_folder(folder)
    scan = scan_folder(folder, recursive, progress)
    if scan.unreadable:
        # Such a file may be a slice of the wanted series; reading around it could drop a slice unnoticed.
        listed = "; ".join(f"{p.name}: {why}" for p, why in scan.unreadable[:5])
        more = f" and {len(scan.unreadable) - 5} more" if len(scan.unreadable) > 5 else ""
        raise ImageError(
            f"{len(scan.unreadable)} DICOM file(s) in {folder} cannot be read (corrupt or truncated?): "
            f"{listed}{more}. Remove or replace them, or copy the series you want into a folder of its own."
        )
    groups = _group(scan.slices)
    if not groups:
        raise ImageError(_no_series_message(folder, scan, recursive))
    slices = _choose(groups, series_uid, folder)
    if progress:
        progress(0.5, "reading voxels")
    if len(slices) == 1 and slices[0].frames > 1:
        image, rescale = _read_multiframe(slices[0])
    else:
        ordered = _checked_order(slices)
        image = _read_voxels(ordered)
        rescale = next((s.rescale for s in ordered if s.rescale), None)
    image = _finish(slices, image, rescale, folder)
    skipped = scan.not_dicom + scan.non_image
    if skipped:
        # Not silent: a caller can show which files were not part of any image series.
        image.metadata["skipped_files"] = [str(p.relative_to(folder)) for p in skipped]
    if progress:
        progress(1.0, "read DICOM series")
    return image


def read_dicom_file(path) -> Image:
    """Read one DICOM image file: a multi-frame file (Enhanced CT) with every check a series gets,
    a single slice with its PixelSpacing and Rescale tags checked (a 2-D image; CT-FM needs a volume)."""
    path = Path(path)
    try:
        s = _read_header(path)
    except _NotDicom:
        raise ImageError(f"cannot read {path.name}: not a DICOM file") from None
    except Exception as e:  # pydicom raises many types on damaged files
        raise ImageError(f"cannot read {path.name}: a corrupt or truncated DICOM file ({first_line(e)})") from None
    if s is None:
        raise ImageError(f"{path.name} is a DICOM file without an image (e.g. RTSTRUCT, SR or DICOMDIR)")
    if s.frames > 1:
        image, rescale = _read_multiframe(s)
    else:
        name = _info([s]).summary()
        _check_pixel_spacing([s], name)
        _check_rescale_tags([s], name)
        image, rescale = _read_voxels([s]), s.rescale
    return _finish([s], image, rescale, path)


def _finish(slices: list, image: Image, rescale: Optional[str], source: Path) -> Image:
    """The checks every DICOM image gets after reading (grid, HU without Rescale tags), and its metadata."""
    name = _info(slices).summary()
    check_read_geometry(image, f"series {name}")
    if rescale and slices[0].modality.upper() in ("CT", ""):
        _check_stored_values_are_hu(image, name, rescale.split()[-1])
    image.metadata = _metadata(slices[0], source, image.shape[2])
    return image


# --- scanning ---------------------------------------------------------------------


def _pydicom():
    import pydicom  # imported lazily: only DICOM folders need it

    return pydicom


def _existing_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"not a folder: {folder}" if folder.exists() else f"no such folder: {folder}")
    return folder


def scan_folder(folder: Path, recursive: bool, progress=None) -> FolderScan:
    """Every file of ``folder`` sorted into image slices, non-image DICOM, not DICOM and unreadable (headers only);
    :mod:`CTFMLib.dicom_write` uses it to refuse a folder that already holds DICOM files."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files (.DS_Store, ._* resource forks) are never slices.
    paths = sorted(p for p in candidates if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    scan = FolderScan([], [], [], [])
    for n, path in enumerate(paths):
        if progress and n % 50 == 0:
            progress(0.5 * n / len(paths), f"reading DICOM headers {n}/{len(paths)}")
        try:
            s = _read_header(path)
        except _NotDicom:
            scan.not_dicom.append(path)
        except Exception as e:  # pydicom raises many types on damaged files
            scan.unreadable.append((path, first_line(e)))
        else:
            if s is None:
                scan.non_image.append(path)
            else:
                scan.slices.append(s)
    return scan


def _read_header(path: Path) -> Optional[_Slice]:
    """The header of an image file, ``None`` for a DICOM file without pixels; raises _NotDicom."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except pydicom.errors.InvalidDicomError:
        # Old files may lack the 128-byte preamble and "DICM"; they then start with a group 0002 or 0008 tag.
        with open(path, "rb") as f:
            start = f.read(2)
        if start not in (b"\x02\x00", b"\x08\x00"):
            raise _NotDicom() from None
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    if "Rows" not in ds or "Columns" not in ds:
        # pydicom returns what it could parse of a truncated file, so a missing Rows
        # means "no pixels" only for an object whose SOP class says so (RTSTRUCT, SR, DICOMDIR).
        meta = getattr(ds, "file_meta", None) or {}
        sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
        if not sop_class or "Image Storage" in pydicom.uid.UID(sop_class).name:
            raise ValueError("an image file without Rows/Columns (truncated or corrupt)")
        return None
    return _Slice(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        frame_uid=_text(ds, "FrameOfReferenceUID"),
        image_type=tuple(v.strip().upper() for v in _values(ds, "ImageType")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(_number(ds, "NumberOfFrames") or 1),
        pixel_spacing=_pixel_spacing(ds),
        position=_vector(ds, "ImagePositionPatient", 3),
        row_dir=None if (iop := _vector(ds, "ImageOrientationPatient", 6)) is None else _unit(iop[:3]),
        col_dir=None if iop is None else _unit(iop[3:]),
        slope=_number(ds, "RescaleSlope") or 1.0,
        intercept=_number(ds, "RescaleIntercept") or 0.0,
        rescale=_rescale_problem(ds),
        instance=None if (i := _number(ds, "InstanceNumber")) is None else int(i),
        thickness=_number(ds, "SliceThickness"),
    )


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _values(ds, keyword: str) -> list:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]  # a multi-valued element


def _number(ds, keyword: str) -> Optional[float]:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _vector(ds, keyword: str, length: int) -> Optional[np.ndarray]:
    try:
        v = np.array([float(x) for x in _values(ds, keyword)], dtype=np.float64)
    except ValueError:
        return None
    return v if v.shape == (length,) and np.all(np.isfinite(v)) else None


def _pixel_spacing(ds) -> Optional[tuple]:
    """PixelSpacing as stored (two numbers, NaN for one that does not parse), or None when absent."""
    values = _values(ds, "PixelSpacing")
    if not values:
        return None
    numbers = []
    for v in values:
        try:
            numbers.append(float(v))
        except ValueError:
            numbers.append(math.nan)
    return tuple(numbers)


def _rescale_problem(ds) -> Optional[str]:
    """None when RescaleSlope and RescaleIntercept are both usable, "missing ..." naming the absent
    tag(s) (GDCM then uses slope 1, intercept 0), or what is wrong with them."""
    present = [k for k in ("RescaleSlope", "RescaleIntercept") if ds.get(k) not in (None, "")]
    if not present:
        return "missing RescaleSlope/RescaleIntercept"
    if len(present) == 1:
        return f"missing {'RescaleIntercept' if present[0] == 'RescaleSlope' else 'RescaleSlope'}"
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is None or intercept is None or not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        return f"RescaleSlope {ds.get('RescaleSlope')} / RescaleIntercept {ds.get('RescaleIntercept')} cannot give values"
    return None


def _unit(v: np.ndarray) -> Optional[np.ndarray]:
    norm = np.linalg.norm(v)
    return v / norm if norm > 1e-6 else None


# --- choosing a series ----------------------------------------------------------------


def _group(slices: list) -> list:
    """Slices grouped by SeriesInstanceUID, each group ordered; groups ordered for stable listings."""
    groups = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    ordered = [_ordered(group) for group in groups.values()]
    return sorted(ordered, key=lambda g: (g[0].modality, g[0].description, g[0].series_uid))


def _normal(s: _Slice) -> np.ndarray:
    return np.cross(s.row_dir, s.col_dir)


def _ordered(slices: list) -> list:
    """Along the first slice's normal when every slice has geometry, else by instance number and name."""
    if all(s.has_geometry for s in slices):
        normal = _normal(slices[0])
        return sorted(slices, key=lambda s: (float(s.position @ normal), s.path.name))
    return sorted(slices, key=lambda s: (s.instance if s.instance is not None else math.inf, s.path.name))


def _info(group: list) -> SeriesInfo:
    first = group[0]
    return SeriesInfo(first.series_uid, first.description, first.modality, tuple(s.path for s in group), first.study_uid,
                      all(s.is_localizer for s in group))


def _choose(groups: list, series_uid: Optional[str], folder: Path) -> list:
    listing = "\n".join(f"  - {_info(g).summary()}" for g in groups)
    if series_uid is None:
        if len(groups) == 1:
            return groups[0]
        raise ImageError(
            f"{folder} holds {len(groups)} DICOM image series; choose one with series_uid "
            f"(command line: --series UID):\n{listing}"
        )
    for g in groups:
        if g[0].series_uid == series_uid.strip():
            return g
    raise ImageError(f"no DICOM series with SeriesInstanceUID {series_uid!r} in {folder}; it holds:\n{listing}")


def _no_series_message(folder: Path, scan: FolderScan, recursive: bool) -> str:
    parts = [f"no DICOM image files in {folder}"]
    if scan.non_image:
        parts.append(f"{len(scan.non_image)} DICOM file(s) without images (e.g. RTSTRUCT, SR, DICOMDIR) were skipped")
    if scan.not_dicom:
        names = ", ".join(p.name for p in scan.not_dicom[:3])
        parts.append(f"{len(scan.not_dicom)} file(s) that are not DICOM were skipped (e.g. {names})")
    if not recursive and any(p.is_dir() for p in folder.iterdir()):
        parts.append("it has subfolders: choose the series folder itself, or read recursively")
    return "; ".join(parts)


# --- checking the chosen series ------------------------------------------------------------


def _checked_order(slices: list) -> list:
    """The slices in position order after every check that guards against a wrong volume."""
    name = _info(slices).summary()
    localizers = [s for s in slices if s.is_localizer]
    if localizers and len(localizers) == len(slices):
        raise ImageError(f"series {name} is a localizer (scout) image, not a volume; choose the axial series")
    if localizers:
        raise ImageError(
            f"series {name} mixes {len(localizers)} localizer (scout) image(s) with its slices: "
            f"{_names(localizers)}; remove them from the folder"
        )
    if len(slices) == 1:
        raise ImageError(f"series {name} has a single slice ({slices[0].path.name}): a 2-D image, but a 3-D volume is needed")
    if any(s.frames > 1 for s in slices):
        raise ImageError(f"series {name} has several files and some are multi-frame; put each multi-frame file in a folder of its own")
    missing = [s for s in slices if not s.has_geometry]
    if missing:
        raise ImageError(
            f"series {name}: {len(missing)} file(s) lack a valid ImagePositionPatient or ImageOrientationPatient "
            f"({_names(missing)}), so the slices cannot be placed in space"
        )
    _check_same(slices, name, lambda s: (s.rows, s.columns), "matrix size (rows, columns)")
    _check_pixel_spacing(slices, name)
    _check_same(slices, name, lambda s: tuple(round(float(v), 4) for v in s.pixel_spacing), "PixelSpacing")
    _check_rescale_tags(slices, name)
    order, _, _ = _check_geometry(
        np.array([s.position for s in slices]),
        np.array([s.row_dir for s in slices]),
        np.array([s.col_dir for s in slices]),
        [s.path.name for s in slices],
        name,
        "slice",
    )
    return [slices[i] for i in order]


def _check_rescale_tags(slices: list, name: str) -> None:
    """Refuse Rescale tags that are present but unusable (missing ones are judged on the values read)."""
    broken = [s for s in slices if s.rescale is not None and not s.rescale.startswith("missing")]
    if broken:
        raise ImageError(
            f"series {name}: {broken[0].path.name} has {broken[0].rescale} ({len(broken)} file(s) like it), so its "
            "stored values cannot be turned into Hounsfield units; fix the tags, or export the series again"
        )


def _check_pixel_spacing(slices: list, name: str, where: str = "") -> None:
    """Refuse slices without PixelSpacing (GDCM would assume 1 mm) or with one that is not two positive sizes."""
    missing = [s for s in slices if s.pixel_spacing is None]
    if missing:
        raise ImageError(
            f"series {name}: {len(missing)} file(s) lack PixelSpacing{where} ({_names(missing)}), so the size of a "
            "voxel is unknown (readers would assume 1 mm); add the tag, or export the series again"
        )
    bad = [s for s in slices if len(s.pixel_spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in s.pixel_spacing)]
    if bad:
        raise ImageError(
            f"series {name}: PixelSpacing{where} {_fmt(np.asarray(bad[0].pixel_spacing))} of {bad[0].path.name} is not "
            f"two positive sizes in mm ({len(bad)} file(s) like it); fix the tag, or export the series again"
        )


def _check_geometry(positions, row_dirs, col_dirs, labels: list, name: str, unit: str):
    """Check a stack of planes; returns (indices in position order, slice normal, median gap in mm).

    ``labels`` name the planes (file names, or "frame 3") in messages; ``unit`` is "slice" or "frame".
    """
    cosine = float(row_dirs[0] @ col_dirs[0])
    if abs(cosine) > PERPENDICULAR_TOLERANCE:
        raise ImageError(
            f"series {name}: the ImageOrientationPatient of {labels[0]} gives row and column directions "
            f"{_fmt(row_dirs[0])} and {_fmt(col_dirs[0])} at {math.degrees(math.acos(max(-1.0, min(1.0, cosine)))):.1f} "
            "degrees, not at right angles (a corrupt header?); fix the tag, or export the series again"
        )
    for k in range(1, len(positions)):
        if max(np.abs(row_dirs[k] - row_dirs[0]).max(), np.abs(col_dirs[k] - col_dirs[0]).max()) > ORIENTATION_TOLERANCE:
            raise ImageError(
                f"series {name}: {unit}s differ in orientation: {labels[0]} has ImageOrientationPatient "
                f"{_fmt(row_dirs[0])} {_fmt(col_dirs[0])} but {labels[k]} has {_fmt(row_dirs[k])} {_fmt(col_dirs[k])} "
                "(several stacks or a localizer in one series?)"
            )
    normal = np.cross(row_dirs[0], col_dirs[0])
    along_unsorted = positions @ normal
    # Ties (duplicates, reported next) keep their label order so messages are stable.
    order = sorted(range(len(positions)), key=lambda i: (along_unsorted[i], labels[i]))
    positions = positions[order]
    labels = [labels[i] for i in order]
    along = along_unsorted[order]
    _check_duplicates(labels, along, name, unit)
    _check_tilt(positions, normal, along, name, unit, labels)
    median = _check_spacing(labels, along, name, unit)
    return order, normal, median


def _names(slices: list, limit: int = 5) -> str:
    names = ", ".join(s.path.name for s in slices[:limit])
    return names + (f" and {len(slices) - limit} more" if len(slices) > limit else "")


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _check_same(slices: list, name: str, key, what: str) -> None:
    counts = {}
    for s in slices:
        counts.setdefault(key(s), []).append(s)
    if len(counts) > 1:
        found = "; ".join(f"{k} in {len(v)} file(s), e.g. {v[0].path.name}" for k, v in counts.items())
        raise ImageError(f"series {name}: slices differ in {what}: {found}")


def _check_duplicates(labels: list, along: np.ndarray, name: str, unit: str) -> None:
    same = np.flatnonzero(np.diff(along) < DUPLICATE_TOLERANCE_MM)
    if same.size:
        k = int(same[0])
        raise ImageError(
            f"series {name}: {same.size} pair(s) of {unit}s share a position, e.g. {labels[k]} and "
            f"{labels[k + 1]} both at {along[k]:.2f} mm along the slice normal (several acquisitions, "
            "phases or echoes in one series?); separate them into series of their own"
        )


def _check_tilt(positions: np.ndarray, normal: np.ndarray, along: np.ndarray, name: str, unit: str, labels: list) -> None:
    offsets = positions - positions[0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    shift = float(sideways.max())
    length = float(along[-1] - along[0])
    if shift > max(SPACING_TOLERANCE_MM, TILT_TOLERANCE * length):
        raise ImageError(
            f"series {name}: {unit} positions do not run along the slice normal: they shift {shift:.2f} mm sideways "
            f"over {length:.2f} mm (gantry tilt of about {math.degrees(math.atan2(shift, length)):.1f} degrees, "
            f"largest at {labels[int(sideways.argmax())]}); stacking them would shear the anatomy. Resample the "
            "series first (3D Slicer's DICOM module can correct gantry tilt)"
        )


def _check_spacing(labels: list, along: np.ndarray, name: str, unit: str) -> float:
    """Raise on uneven gaps between neighbours along the normal; returns the median gap."""
    gaps = np.diff(along)
    # The lower median is an actual gap, so with few slices "expected" is still a real spacing.
    median = float(np.sort(gaps)[(len(gaps) - 1) // 2])
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)
    bad = np.flatnonzero(np.abs(gaps - median) > tolerance)
    n = len(labels)
    if bad.size:
        problems = []
        for k in bad[:3]:
            gap = float(gaps[k])
            ratio = gap / median
            hint = ""
            if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1:
                hint = f" - missing {unit}s? about {round(ratio) - 1} would fit there"
            elif gap < median:
                hint = f" - an extra or misplaced {unit}?"
            problems.append(
                f"between {unit}s {k + 1} and {k + 2} of {n} in position order ({labels[k]}, {labels[k + 1]}) "
                f"the gap is {gap:.2f} mm, expected {median:.2f} mm{hint}"
            )
        more = f" and {bad.size - 3} more uneven gap(s)" if bad.size > 3 else ""
        raise ImageError(f"series {name}: uneven {unit} spacing: " + "; ".join(problems) + more)
    # Each gap may pass yet the positions drift from the even grid the reader assumes (first to last, n - 1 steps).
    grid = along[0] + (along[-1] - along[0]) * np.arange(n) / (n - 1)
    drift = np.abs(along - grid)
    if drift.max() > tolerance:
        k = int(drift.argmax())
        raise ImageError(
            f"series {name}: {unit} positions drift from an even grid by up to {drift.max():.3f} mm "
            f"({unit} {k + 1} of {n} in position order, {labels[k]}); the spacing is uneven"
        )
    return median


# --- reading voxels -------------------------------------------------------------------------


def _check_stored_values_are_hu(image: Image, name: str, missing: str) -> None:
    """For a CT series without RescaleSlope and/or RescaleIntercept (``missing`` names them): accept the
    values read as HU only when some lie below ``HU_EVIDENCE`` (air), saying so on stderr; else refuse
    (they are raw stored units)."""
    lowest = float(image.array.min())
    if lowest >= HU_EVIDENCE:
        raise ImageError(
            f"series {name} has no {missing} and its values ({lowest:g} to "
            f"{float(image.array.max()):g}) do not look like Hounsfield units (air, about -1000 HU, is missing), so "
            "they cannot be turned into HU; add the tags (e.g. RescaleIntercept -1024, RescaleSlope 1), or export "
            "the series again"
        )
    print(
        f"warning: series {name} has no {missing}; its values go down to {lowest:g}, so they are taken as "
        "Hounsfield units unchanged",
        file=sys.stderr,
    )


def _read_voxels(ordered: list) -> Image:
    sitk = import_sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(s.path) for s in ordered])
    if len({(s.slope, s.intercept) for s in ordered}) > 1:
        # The series reader takes its pixel type from the first slice; a slice rescaled
        # with another slope could fall outside it or lose its fractions.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with native_stderr_captured():  # GDCM's complaints would add lines to the one-line refusal
            img = reader.Execute()
    except RuntimeError as e:
        culprit = _first_unreadable(ordered)
        where = f" ({culprit})" if culprit else ""
        raise ImageError(f"cannot read the pixel data of series {_info(ordered).summary()}{where}: {first_line(e)}") from None
    return from_sitk(img)


def _first_unreadable(ordered: list) -> str:
    """Name the first slice GDCM cannot decode (only called after a failure)."""
    sitk = import_sitk()
    for s in ordered:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(s.path))
        try:
            with native_stderr_captured():
                reader.Execute()
        except RuntimeError:
            return f"{s.path.name} is corrupt or truncated"
    return ""


def _read_multiframe(s: _Slice) -> tuple:
    """A single multi-frame file (e.g. Enhanced CT), checked frame by frame like a series.

    GDCM stacks the frames in stored order and takes spacing and direction from
    their positions; so the frames must be stored in position order (either
    way) and evenly spaced, and the result is checked against those positions.
    Returns ``(image, rescale problem or None)``.
    """
    name = _info([s]).summary()
    if s.is_localizer:
        raise ImageError(f"series {name} is a localizer (scout) image, not a volume; choose the axial series")
    positions, row_dirs, col_dirs, spacing, rescale = _frame_planes(s.path, s.frames)
    if positions is None:
        raise ImageError(
            f"multi-frame file {s.path.name} has no position and orientation for each of its {s.frames} frames, "
            "so they cannot be placed in space"
        )
    _check_pixel_spacing([replace(s, pixel_spacing=spacing)], name, " (in PixelMeasuresSequence)")
    _check_rescale_tags([replace(s, rescale=rescale)], name)
    order, normal, median = _check_geometry(positions, row_dirs, col_dirs, [f"frame {k + 1}" for k in range(s.frames)], name, "frame")
    if order != sorted(order) and order != sorted(order, reverse=True):
        raise ImageError(f"multi-frame file {s.path.name}: its frames are not stored in position order, so they cannot be stacked as stored")
    sitk = import_sitk()
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(s.path))
    try:
        with native_stderr_captured():
            image = from_sitk(reader.Execute())
    except RuntimeError as e:
        raise ImageError(f"cannot read multi-frame DICOM file {s.path.name}: {first_line(e)}") from None
    # The frames' own positions say where the volume is; refuse a reader that placed it elsewhere.
    stacking = normal if order[0] == 0 else -normal
    expected = (image.shape[2] == s.frames and np.allclose(image.origin, positions[0], atol=1e-3)
                and np.allclose(image.direction[:, 2], stacking, atol=ORIENTATION_TOLERANCE)
                and abs(image.spacing[2] - median) <= max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median))
    if not expected:
        raise ImageError(
            f"multi-frame file {s.path.name}: GDCM placed the frames at origin {_fmt(image.origin)}, slice direction "
            f"{_fmt(image.direction[:, 2])}, spacing {image.spacing[2]:.3f} mm, but the frame positions say "
            f"{_fmt(positions[0])}, {_fmt(stacking)}, {median:.3f} mm"
        )
    return image, rescale


def _frame_planes(path: Path, frames: int):
    """Per-frame positions and orientations of a multi-frame file (or None, None, None), its pixel
    spacing (as stored, None when absent) and its rescale problem (None when the tags are usable)."""
    ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    first = per_frame[0] if per_frame else None

    def item(sequence: str):
        # The first frame's own functional group wins over the shared one, which wins over the top level.
        for group in (first, shared):
            if group is not None and group.get(sequence):
                return group.get(sequence)[0]
        return ds

    spacing = _pixel_spacing(item("PixelMeasuresSequence"))
    rescale = _rescale_problem(item("PixelValueTransformationSequence"))
    if len(per_frame) != frames:
        return None, None, None, spacing, rescale

    def find(group, sequence: str, keyword: str, length: int):
        # A frame's own functional group wins over the shared one.
        for item in (group, shared):
            if item is not None and item.get(sequence):
                v = _vector(item.get(sequence)[0], keyword, length)
                if v is not None:
                    return v
        return None

    positions = [find(g, "PlanePositionSequence", "ImagePositionPatient", 3) for g in per_frame]
    orientations = [find(g, "PlaneOrientationSequence", "ImageOrientationPatient", 6) for g in per_frame]
    if any(v is None for v in positions + orientations):
        return None, None, None, spacing, rescale
    rows = [_unit(o[:3]) for o in orientations]
    cols = [_unit(o[3:]) for o in orientations]
    if any(v is None for v in rows + cols):
        return None, None, None, spacing, rescale
    return np.array(positions), np.array(rows), np.array(cols), spacing, rescale


def _metadata(first: _Slice, source: Path, num_slices: int) -> dict:
    metadata = {"source": str(source), "modality": first.modality, "num_slices": int(num_slices)}
    for key, value in (
        ("series_uid", first.series_uid),
        ("study_uid", first.study_uid),
        ("patient_id", first.patient_id),
        ("patient_name", first.patient_name),
        ("frame_of_reference_uid", first.frame_uid),
        ("series_description", first.description),
    ):
        if value:
            metadata[key] = value
    if first.thickness is not None:
        metadata["slice_thickness"] = first.thickness
    return metadata
