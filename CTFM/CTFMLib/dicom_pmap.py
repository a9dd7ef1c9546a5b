"""A saliency heat map computed on a DICOM CT series, written as a DICOM Parametric Map through highdicom.

A heat map is a continuous map, so DICOM stores it as a Parametric Map (not a SEG): float32 pixels
that a PACS or viewer shows over the CT it references, without registration. :func:`write_parametric_map`
writes one:

- Frame k is slice k of the source series in position order (as :mod:`CTFMLib.dicom` orders it), so
  each frame lies exactly on its source slice; a map that is not on that grid is refused, never
  resampled (the same check as :func:`CTFMLib.dicom_seg.write_dicom_seg`).
- The pixels are the heat map's float32 values unchanged (Float Pixel Data). One real-world value
  mapping says what they mean: stored value = real-world value (slope 1, intercept 0) on 0..1, unit
  UCUM "1" (no units), quantity DCM 130404 "Saliency" (PS3.16 CID 7180; its sibling 130402 "Class
  activation" names the CAM family of methods, which CT-FM's occlusion and integrated gradients are not).
- The content description and the lookup table's explanation name the target and the method; series
  and instance UIDs are fresh; the write is atomic (:func:`CTFMLib.files.atomic_output`).

highdicom and pydicom are imported only when a map is written, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .image import Image, ImageError

__all__ = ["write_parametric_map", "parametric_map", "QUANTITY", "VALUE_RANGE", "LUT_LABEL", "CONTENT_LABEL"]

QUANTITY = ("DCM", "130404", "Saliency")  # PS3.16 CID 7180 "Abstract Multi-dimensional Image Model Component Semantics"
VALUE_RANGE = (0.0, 1.0)  # a saliency map is normalised so that 1 is its hottest voxel
LUT_LABEL = "CTFM_SALIENCY"  # SH, at most 16 characters
CONTENT_LABEL = "SALIENCY"  # CS: upper case, digits, space and underscore, at most 16 characters
PRODUCT = "DICOM Parametric Map"
SERIES_NUMBER_OFFSET = 2000  # the map's SeriesNumber: the source's plus this, so it sorts after the CT and a SEG


def parametric_map(heat: Image, source_series_folder, *, description: str, target: str, method: str,
                   series_uid: Optional[str] = None):
    """The highdicom ``ParametricMap`` of ``heat`` (values in 0..1 on the grid of the series in
    ``source_series_folder``), built in memory: every refusal happens here, before a file is created."""
    from .dicom_seg import check_on_grid, derived_series_number, import_highdicom, source_series_datasets

    array = np.asarray(heat.array)
    if array.ndim != 3 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ImageError(f"a heat map is a 3-D array of numbers, not {array.ndim}-D {array.dtype}")
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ImageError(f"the heat map holds NaN or infinite values; a {PRODUCT} of them would not be a result")
    low, high = (float(values.min()), float(values.max())) if values.size else VALUE_RANGE
    if low < VALUE_RANGE[0] or high > VALUE_RANGE[1]:
        raise ImageError(f"the heat map's values span {low:g}..{high:g}; a saliency {PRODUCT} holds values in "
                         f"{VALUE_RANGE[0]:g}..{VALUE_RANGE[1]:g} (normalise it first)")
    hd = import_highdicom(PRODUCT)
    sources = source_series_datasets(source_series_folder, series_uid, product=PRODUCT)
    check_on_grid(heat, sources, source_series_folder, what="heat map", product=PRODUCT)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from . import __version__

    what = f"{method} saliency of {target}"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL, lut_explanation=f"{what}, 1 = hottest voxel"[:64], unit=codes.UCUM.NoUnits,
        value_range=VALUE_RANGE, slope=1.0, intercept=0.0,
        quantity_definition=hd.sr.CodedConcept(value=QUANTITY[1], scheme_designator=QUANTITY[0], meaning=QUANTITY[2]))
    window = hd.VOILUTTransformation(window_center=0.5, window_width=1.0, window_explanation="0..1")
    series_number = derived_series_number(sources[0], SERIES_NUMBER_OFFSET)
    frames = np.ascontiguousarray(values.transpose(2, 1, 0))  # [slice k, row j, column i]
    try:
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=frames,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="CT-FM",
            manufacturer_model_name="CT-FM saliency",
            software_versions=str(__version__)[:64],
            device_serial_number="0",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            content_label=CONTENT_LABEL,
            content_description=what[:64],
            series_description=str(description)[:64],
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # highdicom's refusal of a source it cannot use
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImageError(f"highdicom cannot write a {PRODUCT} for {source_series_folder}: {type(e).__name__} {why}") \
            from None
    # General Series Laterality (type 2C) is required without a Frame Laterality: the CT's, else empty (unknown).
    pm.Laterality = str(sources[0].get("Laterality") or "")
    return pm


def write_parametric_map(heat: Image, source_series_folder, out, *, description: str, target: str, method: str,
                         series_uid: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write ``heat`` (a saliency map in 0..1 on the grid of the series in ``source_series_folder``) as a DICOM
    Parametric Map at ``out``; ``description`` becomes the SeriesDescription, ``target`` and ``method`` are named
    in the content description. Returns ``out``. Every refusal is one line (ValueError) and leaves nothing."""
    from .files import atomic_output

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another name or allow overwriting")
    pm = parametric_map(heat, source_series_folder, description=description, target=target, method=method,
                        series_uid=series_uid)
    import pydicom

    def verify(tmp: Path) -> None:
        pydicom.dcmread(str(tmp), stop_before_pixels=True)  # a complete, parseable header

    with atomic_output(out, overwrite=overwrite, verify=verify) as tmp:
        pm.save_as(str(tmp), enforce_file_format=True)
    return out
