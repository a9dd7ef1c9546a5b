"""Write an :class:`~CTFMLib.image.Image` as a DICOM CT series.

One uncompressed CT Image Storage file per slice, which :mod:`CTFMLib.dicom`
(and GDCM) read back to the same voxels and geometry; see
:func:`write_dicom_series` for how values are stored. Existing DICOM files are
never overwritten or mixed with a new series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .dicom import scan_folder
from .files import OutputExistsError, WriteError, atomic_output, describe_os_error
from .image import Image, ImageError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# DICOM cannot store a sheared grid (this reader refuses one as gantry tilt), so the
# direction columns must be unit vectors at right angles, to about 0.006 degrees.
ORTHONORMAL_TOLERANCE = 1e-4
INT16_MIN, INT16_MAX = -32768, 32767


@dataclass(frozen=True)
class Rescale:
    """Stored pixel values and the Rescale Slope/Intercept that map them back: ``value = stored * slope + intercept``."""

    stored: np.ndarray  # int16 (PixelRepresentation 1) or uint16 (0), indexed [i, j, k]
    slope: float
    intercept: float
    exact: bool  # every voxel value comes back unchanged

    @property
    def max_error(self) -> float:
        """The largest difference between a voxel value and what a reader gives back."""
        return 0.0 if self.exact else self.slope / 2


def decimal_string(x: float):
    """A DICOM decimal string (DS) value of ``x`` that fits DICOM's 16 characters."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(x), auto_format=True)


def rescale_for_dicom(array) -> Rescale:
    """Int16 stored values and Rescale Slope/Intercept that hold ``array``.

    - Whole numbers (integer dtypes, bool, or floats that are all whole) spanning
      at most 65536 values are exact: slope 1, intercept 0 when they fit int16
      (CT in HU), else intercept ``min + 32768`` so they fit after the shift.
    - Anything else (fractions, or whole numbers spanning more) is quantised:
      ``min .. max`` is mapped linearly onto all 65536 int16 steps, so a value
      comes back within ``slope / 2 = (max - min) / 131070`` (about 7.6e-6 of
      the range; 0.03 HU for a CT range of -1024 .. 3071).

    NaN or infinite values cannot be stored and are an :class:`ImageError`.
    """
    values = np.asarray(array)
    if values.size == 0:
        raise ImageError("an empty image cannot be written as DICOM")
    if values.dtype == np.bool_:
        values = values.astype(np.int16)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ImageError(f"cannot write {values.dtype} voxels as DICOM; a real-valued image is needed")
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise ImageError("the image holds NaN or infinite values, which DICOM cannot store; replace them first")
    lo, hi = values.min(), values.max()
    whole = np.issubdtype(values.dtype, np.integer) or bool(np.array_equal(values, np.rint(values)))
    if whole and float(hi) - float(lo) <= INT16_MAX - INT16_MIN:
        lo, hi = int(lo), int(hi)
        intercept = 0 if INT16_MIN <= lo and hi <= INT16_MAX else lo - INT16_MIN
        stored = (values.astype(np.int64) - intercept) if intercept else values
        return Rescale(stored.astype(np.int16), 1.0, float(intercept), exact=True)
    lo, hi = float(lo), float(hi)
    if hi == lo:  # one fractional value everywhere: stored 0, the value in the intercept
        slope = 1.0
        intercept = float(decimal_string(lo))
        return Rescale(np.zeros(values.shape, np.int16), slope, intercept, exact=intercept == lo)
    # Quantise with the slope and intercept as written (16-character decimals), so the
    # reader's stored * slope + intercept is the nearest step to each value.
    slope = float(decimal_string((hi - lo) / (INT16_MAX - INT16_MIN)))
    intercept = float(decimal_string(lo - INT16_MIN * slope))
    stored = np.clip(np.rint((values.astype(np.float64) - intercept) / slope), INT16_MIN, INT16_MAX)
    return Rescale(stored.astype(np.int16), slope, intercept, exact=False)


def ct_dataset(sop_class_uid: str, rows: int, columns: int, stored_dtype):
    """A new pydicom Dataset with file meta, SOP identity, CT modality and an uncompressed 16-bit pixel module."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored_dtype = np.dtype(stored_dtype)
    if stored_dtype not in (np.dtype(np.int16), np.dtype(np.uint16)):
        raise ImageError(f"stored DICOM values must be int16 or uint16, got {stored_dtype}")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for names given as tags
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if stored_dtype == np.int16 else 0
    return ds


def ct_slice_datasets(
    image: Image,
    rescale: Rescale,
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    description: str = "CT-FM",
    reference: Optional[Image] = None,
    **tags,
) -> Iterator:
    """One CT Image Storage dataset per slice k of ``image`` (made lazily: one slice in memory at a time).

    ``rescale`` holds the stored values (see :func:`rescale_for_dicom`). Patient
    ID and name, StudyInstanceUID and FrameOfReferenceUID come from
    ``reference.metadata``, else ``image.metadata`` (as :func:`read_dicom_series`
    names them), else the study and frame are new; ``study_uid`` wins over
    both. ``tags`` (DICOM keywords) are set last, on every slice.
    """
    from pydicom.datadict import tag_for_keyword
    from pydicom.uid import generate_uid

    if tuple(rescale.stored.shape) != image.shape:
        raise ImageError(f"stored values of shape {rescale.stored.shape} do not match the image {image.shape}")
    unknown = [k for k in tags if tag_for_keyword(k) is None]
    if unknown:
        raise ImageError(f"not DICOM keywords: {', '.join(unknown)}")
    direction = image.direction
    if np.abs(direction.T @ direction - np.eye(3)).max() > ORTHONORMAL_TOLERANCE:
        raise ImageError(
            "the image's direction matrix is not orthonormal (a sheared or skewed grid), which a DICOM series "
            "cannot describe; resample it onto an orthonormal grid first"
        )
    known = {}
    for source in (image, reference):  # the reference's values win
        for key in ("patient_id", "patient_name", "study_uid", "frame_of_reference_uid"):
            if source is not None and source.metadata.get(key):
                known[key] = str(source.metadata[key])
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or known.get("study_uid") or generate_uid()
    frame_uid = known.get("frame_of_reference_uid") or generate_uid()
    return _slice_datasets(image, rescale, series_uid, study_uid, frame_uid, description, known, tags)


def _slice_datasets(image, rescale, series_uid, study_uid, frame_uid, description, known, tags) -> Iterator:
    from datetime import datetime

    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    row_dir, col_dir, slice_dir = (image.direction[:, a] for a in range(3))
    normal = np.cross(row_dir, col_dir)
    little_endian = rescale.stored.dtype.newbyteorder("<")
    for k in range(image.shape[2]):
        # A slice's pixel rows run along j and its columns along i.
        ds = ct_dataset(CT_IMAGE_STORAGE, rows=image.shape[1], columns=image.shape[0], stored_dtype=rescale.stored.dtype)
        # Type 2 attributes of the CT IOD: present, empty where nothing is known.
        ds.PatientName = known.get("patient_name", "")
        ds.PatientID = known.get("patient_id", "")
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = ds.StudyTime = ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = None
        ds.SeriesDescription = description
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.Manufacturer = ""
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.KVP = None
        ds.AcquisitionNumber = None
        ds.InstanceNumber = k + 1
        position = image.origin + k * image.spacing[2] * slice_dir
        ds.ImagePositionPatient = [decimal_string(v) for v in position]
        ds.ImageOrientationPatient = [decimal_string(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = decimal_string(position @ normal)
        # PixelSpacing is (between rows, between columns): rows are j apart, columns i apart.
        ds.PixelSpacing = [decimal_string(image.spacing[1]), decimal_string(image.spacing[0])]
        ds.SliceThickness = decimal_string(image.spacing[2])
        ds.SpacingBetweenSlices = decimal_string(image.spacing[2])
        ds.RescaleSlope = decimal_string(rescale.slope)
        ds.RescaleIntercept = decimal_string(rescale.intercept)
        ds.RescaleType = "HU"
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(rescale.stored[:, :, k].T, dtype=little_endian).tobytes()
        yield ds


def save_dicom_files(datasets: Iterable, paths: Iterable, progress=None) -> list:
    """Save ``datasets`` to ``paths`` in pairs; returns the paths.

    Never overwrites: an existing path is an :class:`ImageError` before
    anything is written (and a file that appears meanwhile is never replaced).
    Each file is written through :func:`CTFMLib.files.atomic_output` (a private
    temporary folder, fsync, rename), so no truncated file carries a final name
    and a full disk is a :class:`~CTFMLib.files.WriteError`; on any failure
    (or a cancelling ``progress`` callback, or SIGTERM) the files written so far
    are removed.
    """
    paths = [Path(p) for p in paths]
    existing = [p for p in paths if p.exists()]
    if existing:
        raise ImageError(f"{len(existing)} file(s) already exist, e.g. {existing[0]}; existing files are never overwritten")
    written = []
    try:
        for n, ds in enumerate(datasets):
            if n >= len(paths):
                raise ValueError(f"more datasets than the {len(paths)} paths given")
            path = paths[n]
            if progress and n % 10 == 0:
                progress(n / len(paths), f"writing DICOM file {n + 1}/{len(paths)}")
            try:
                with atomic_output(path, overwrite=False) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
            except OutputExistsError:  # appeared while writing: someone else's file
                raise ImageError(f"{path} appeared while writing; existing files are never overwritten") from None
            written.append(path)
        if len(written) != len(paths):
            raise ValueError(f"{len(written)} datasets for {len(paths)} paths")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if progress:
        progress(1.0, f"wrote {len(written)} DICOM files")
    return written


def write_dicom_series(
    image: Image,
    folder,
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    description: str = "CT-FM",
    reference: Optional[Image] = None,
    progress=None,
    **tags,
) -> list:
    """Write ``image`` into ``folder`` as a new DICOM series, one CT Image Storage file per slice k.

    Returns the file paths in k order (``CT0001.dcm``, ...). The files are
    uncompressed explicit-VR little endian with the image's geometry
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness and SpacingBetweenSlices = ``spacing[2]``) and int16 stored
    values with Rescale Slope/Intercept: integer CT in HU is stored exactly with
    slope 1 and intercept 0; other values as :func:`rescale_for_dicom` says
    (fractions are quantised to within ``(max - min) / 131070``).
    :func:`read_dicom_series` gives back the same voxels and geometry; an image
    whose slice axis points against ``cross(row, column)`` (a left-handed grid)
    comes back with k reversed, the same voxels at the same points.

    A new SeriesInstanceUID is made unless ``series_uid`` is given; patient and
    study identity is copied from ``reference`` or ``image`` metadata (see
    :func:`ct_slice_datasets`); ``tags`` are DICOM keywords set on every slice
    (e.g. ``SeriesNumber=901``, ``RescaleType="US"`` for values that are not HU).

    ``folder`` is created if needed, and removed again when the write fails
    (only the files written here are removed; the folder only while empty). A
    folder that already holds DICOM files is refused with an :class:`ImageError`
    and left untouched (other files may stay beside the series). ``progress`` is
    an optional ``callback(fraction, message)``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ImageError(f"cannot write a DICOM series into {folder}: it is a file, not a folder")
    if folder.is_dir():
        scan = scan_folder(folder, recursive=False)
        dicom = [s.path for s in scan.slices] + scan.non_image + [p for p, _ in scan.unreadable]
        if dicom:
            raise ImageError(
                f"{folder} already holds {len(dicom)} DICOM file(s) (e.g. {dicom[0].name}); write the series into "
                "an empty or new folder (existing DICOM files are never overwritten or mixed with a new series)"
            )
    # Everything that can refuse the image does so before a folder or file is made.
    rescale = rescale_for_dicom(image.array)
    datasets = ct_slice_datasets(image, rescale, series_uid, study_uid, description, reference, **tags)
    width = max(4, len(str(image.shape[2])))
    paths = [folder / f"CT{k + 1:0{width}d}.dcm" for k in range(image.shape[2])]
    created = _make_folders(folder)
    try:
        return save_dicom_files(datasets, paths, progress)
    except BaseException:
        for made in created:  # innermost first; a folder someone else put files into stays
            try:
                made.rmdir()
            except OSError:
                break
        raise


def _make_folders(folder: Path) -> list:
    """Create ``folder`` and missing parents; returns the folders created, innermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(e.errno, f"cannot create {folder}: {describe_os_error(e, folder / 'x')}") from None
    return missing
