"""Write small CT DICOM series with pydicom, and edit their tags, for tests.

:func:`write_ct_series` turns an :class:`~CTFMLib.image.Image` in HU into one
uncompressed CT Image Storage file per slice, with the geometry of the image
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) and Rescale
Slope/Intercept, so a correct reader gives the image back. File names are
shuffled so that name order is not position order. Broken series (missing or
duplicated slices, tilt, mixed orientations) are made by deleting files or
changing tags afterwards with :func:`edit_dicom`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _ds(x: float):
    """A decimal string value that always fits DICOM's 16 characters."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(x), auto_format=True)


def write_ct_series(
    folder,
    image,
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    description: str = "synthetic CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle_names: bool = True,
    name_prefix: str = "IM",
    **tags,
) -> list:
    """Write ``image`` (HU, indexed [i, j, k]) as one file per slice k; returns the paths in k order.

    Stored values are ``round((HU - intercept) / slope)`` as unsigned 16 bit.
    Extra keyword arguments become tags of every slice (e.g. ``PatientID="X"``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.rint((np.asarray(image.array, dtype=np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"HU range {image.array.min()}..{image.array.max()} does not fit uint16 with slope {slope}, intercept {intercept}")
    stored = stored.astype(np.uint16)
    series_uid = generate_uid() if series_uid is None else series_uid
    study_uid = generate_uid() if study_uid is None else study_uid
    frame_uid = generate_uid()
    n = image.shape[2]
    order = np.random.default_rng(len(series_uid) + n).permutation(n) if shuffle_names else np.arange(n)
    row_dir, col_dir, slice_dir = (image.direction[:, a] for a in range(3))
    paths = []
    for k in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.PatientID = "SYNTHETIC"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in image.origin + k * image.spacing[2] * slice_dir]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        # PixelSpacing is (between rows, between columns): rows run along j, columns along i.
        ds.PixelSpacing = [_ds(image.spacing[1]), _ds(image.spacing[0])]
        ds.SliceThickness = _ds(image.spacing[2])
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleType = "HU"
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        # A slice's pixel rows are j and its columns i, so the [i, j] plane is transposed.
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"{name_prefix}{int(order[k]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def edit_dicom(path, **tags) -> None:
    """Change tags of one DICOM file in place (``None`` deletes a tag); numbers for DS tags are formatted to fit."""
    import pydicom
    from pydicom.datadict import dictionary_VR

    ds = pydicom.dcmread(str(path))
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
            continue
        if dictionary_VR(keyword) == "DS":
            value = [_ds(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else _ds(value)
        setattr(ds, keyword, value)
    ds.save_as(str(path))


def read_tag(path, keyword: str):
    """One tag of a DICOM file (header only)."""
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=True).get(keyword)


ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def write_enhanced_ct(path, image, frame_order=None, intercept: float = -1024.0) -> Path:
    """Write ``image`` (HU, [i, j, k]) as one multi-frame Enhanced CT file.

    Frame f holds slice ``frame_order[f]`` (default: k order) with that slice's
    position in its per-frame PlanePositionSequence; orientation, pixel spacing
    and rescale sit in the shared functional groups.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = list(range(image.shape[2])) if frame_order is None else [int(k) for k in frame_order]
    stored = np.rint(np.asarray(image.array, dtype=np.float64) - intercept)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("HU range does not fit uint16")
    stored = stored.astype(np.uint16)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.SeriesDescription = "synthetic enhanced CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns = image.shape[1], image.shape[0]
    ds.NumberOfFrames = len(order)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    measures = Dataset()
    measures.PixelSpacing = [_ds(image.spacing[1]), _ds(image.spacing[0])]
    measures.SliceThickness = _ds(image.spacing[2])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in (*image.direction[:, 0], *image.direction[:, 1])]
    rescale = Dataset()
    rescale.RescaleIntercept = _ds(intercept)
    rescale.RescaleSlope = _ds(1.0)
    rescale.RescaleType = "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        plane = Dataset()
        plane.ImagePositionPatient = [_ds(v) for v in image.origin + k * image.spacing[2] * image.direction[:, 2]]
        frame = Dataset()
        frame.PlanePositionSequence = Sequence([plane])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in order])).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
