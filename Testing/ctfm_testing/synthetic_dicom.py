"""Write small CT DICOM series with pydicom, and edit their tags, for tests.

:func:`write_ct_series` writes an :class:`~CTFMLib.image.Image` in HU with the
library's own slice writer (:func:`CTFMLib.dicom_write.ct_slice_datasets`), adding
what only tests need: shuffled file names (so that name order is not position
order), unsigned 16-bit stored values with any Rescale Slope/Intercept, and
several series in one folder. Broken series (missing or duplicated slices,
tilt, mixed orientations) are made by deleting files or changing tags
afterwards with :func:`edit_dicom`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from CTFMLib.dicom_write import Rescale, ct_dataset, ct_slice_datasets, save_dicom_files
from CTFMLib.dicom_write import decimal_string as _ds


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
    Unlike :func:`CTFMLib.dicom_write.write_dicom_series` it writes into a folder
    that already holds DICOM files (but never over a file).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.rint((np.asarray(image.array, dtype=np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"HU range {image.array.min()}..{image.array.max()} does not fit uint16 with slope {slope}, intercept {intercept}")
    rescale = Rescale(stored.astype(np.uint16), slope, intercept, exact=True)
    series_uid = generate_uid() if series_uid is None else series_uid
    n = image.shape[2]
    order = np.random.default_rng(len(series_uid) + n).permutation(n) if shuffle_names else np.arange(n)
    tags = {"PatientID": "SYNTHETIC", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], **tags}
    datasets = ct_slice_datasets(image, rescale, series_uid, study_uid, description, **tags)
    return save_dicom_files(datasets, [folder / f"{name_prefix}{int(order[k]):04d}.dcm" for k in range(n)])


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
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = list(range(image.shape[2])) if frame_order is None else [int(k) for k in frame_order]
    stored = np.rint(np.asarray(image.array, dtype=np.float64) - intercept)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("HU range does not fit uint16")
    stored = stored.astype(np.uint16)
    ds = ct_dataset(ENHANCED_CT_IMAGE_STORAGE, rows=image.shape[1], columns=image.shape[0], stored_dtype=np.uint16)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesDescription = "synthetic enhanced CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
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
