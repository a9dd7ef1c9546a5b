"""A label map computed on a DICOM CT series, written as a DICOM Segmentation (SEG) through highdicom.

Hospitals and archives exchange segmentations as DICOM SEG, not NIfTI: the SEG references the CT
series it was computed on (patient, study, frame of reference and every source slice), so a PACS
or viewer shows it over that CT without any registration. :func:`write_dicom_seg` writes one:

- Frame k of the SEG is slice k of the source series in position order (as :mod:`CTFMLib.dicom`
  orders it), so each frame lies exactly on its source slice; a label map that is not on that grid
  (other size, spacing, orientation or any slice position) is refused, never resampled.
- One segment per structure present in the label map, numbered 1..n in ascending label value
  (DICOM wants consecutive segment numbers); its label is the structure's name, its codes and
  recommended display colour those of :mod:`CTFMLib.labels` (SNOMED CT category and type, the
  laterality as type modifier, anatomic region and its modifier). A label without a usable
  terminology gets a type in the private coding scheme :data:`PRIVATE_SCHEME`, declared in the
  object's Coding Scheme Identification Sequence.
- ``seg_type="labelmap"`` (default): one LABELMAP frame per slice (highdicom >= 0.24), pixel value
  = segment number, RLE Lossless (pydicom's own codec: no extra package, and every DICOM toolkit
  decodes it). ``seg_type="binary"``: one 1-bit frame per segment and slice, empty frames omitted,
  Explicit VR Little Endian (DICOM allows no RLE/JPEG-LS for 1-bit SEG), for viewers that predate
  LABELMAP.
- Algorithm identification (name, version, model sha256 as an algorithm parameter), fresh series
  and instance UIDs, and an atomic write (:func:`CTFMLib.files.atomic_output`).

highdicom and pydicom are imported only when a SEG is written, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .image import Image, ImageError
from .labels import LabelInfo, parse_terminology

__all__ = [
    "write_dicom_seg", "source_series_datasets", "check_on_grid", "segment_codes", "import_highdicom", "derived_series_number",
    "SEG_TYPES", "ALGORITHM_NAME", "PRIVATE_SCHEME", "MINIMUM_HIGHDICOM",
]

SEG_TYPES = ("labelmap", "binary")
ALGORITHM_NAME = "CT-FM whole body"
MINIMUM_HIGHDICOM = "0.24"  # LABELMAP segmentations
# Private coding scheme (DICOM PS3.16 8.2: designators starting with "99" are private) for labels without a code.
PRIVATE_SCHEME = "99CTFM"
PRIVATE_SCHEME_NAME = "CT-FM private codes for structures without a standard code"
TISSUE = ("SCT", "85756007", "Tissue")  # the category of a label without terminology (Slicer's default)
# A label map voxel centre may be this fraction of the smallest voxel size off its source voxel centre.
POSITION_TOLERANCE_VOXELS = 0.1
DIRECTION_TOLERANCE = 1e-3  # cosine, about 0.06 degrees, as CTFMLib.dicom.ORIENTATION_TOLERANCE
SERIES_DESCRIPTION = "CT-FM segmentation"
SERIES_NUMBER_OFFSET = 1000  # the SEG's SeriesNumber: the source's plus this, so it sorts after the CT


def import_highdicom(product: str = "DICOM SEG"):
    """highdicom (at least :data:`MINIMUM_HIGHDICOM`, which writes LABELMAP), or a one-line error saying how to
    install it; ``product`` names what is being written (SEG, SR, Parametric Map)."""
    try:
        import highdicom
    except ImportError:
        raise ImageError(f"writing a {product} needs highdicom: pip install 'highdicom>={MINIMUM_HIGHDICOM}'") from None
    found = tuple(int(part) for part in re.findall(r"\d+", highdicom.__version__)[:2])
    wanted = tuple(int(part) for part in MINIMUM_HIGHDICOM.split(".")[:2])
    if found < wanted:
        raise ImageError(
            f"writing a {product} needs highdicom >= {MINIMUM_HIGHDICOM}, found {highdicom.__version__}: "
            f"pip install -U 'highdicom>={MINIMUM_HIGHDICOM}'"
        )
    return highdicom



def derived_series_number(source, offset: int) -> int:
    """The SeriesNumber of an object derived from ``source`` (a data set): the source's plus ``offset``, so it
    sorts after it; ``offset`` alone when the source has none or the sum leaves DICOM's IS range."""
    try:
        number = int(source.get("SeriesNumber")) + offset
    except (TypeError, ValueError):
        return offset
    return number if 0 < number < 2**31 else offset

# --- the source series ------------------------------------------------------------------


def source_series_datasets(folder, series_uid: Optional[str] = None, product: str = "DICOM SEG") -> list:
    """The headers (no pixels) of the series' slices in position order (as :func:`CTFMLib.dicom.list_dicom_series`
    orders them: the order of a label map's k axis), with the UIDs a SEG (or other ``product``) references
    completed in memory."""
    from .dicom import list_dicom_series

    folder = Path(folder)
    found = list_dicom_series(folder)  # refuses a missing folder in one line
    if series_uid is not None:
        found = [s for s in found if s.uid == str(series_uid).strip()]
        if not found:
            raise ImageError(f"no DICOM series with SeriesInstanceUID {series_uid!r} in {folder}")
    if not found:
        raise ImageError(f"no DICOM image files in {folder}; a {product} needs the CT series it was computed on")
    if len(found) > 1:
        raise ImageError(f"{folder} holds {len(found)} DICOM image series ({'; '.join(s.summary() for s in found[:5])}); "
                         "choose one with series_uid (command line: --series UID)")
    files = found[0].files
    import pydicom

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames") or 1) > 1:
        raise ImageError(
            f"{files[0].name} is a multi-frame (enhanced) image; a {product} is written only for a series of "
            "single-frame slices so far: write NIfTI instead"
        )
    _complete_uids(sources, [f.name for f in files], folder, product)
    return sources


def _complete_uids(sources: list, names: list, folder, product: str = "DICOM SEG") -> None:
    """Fill the UIDs a SEG references but anonymised slices leave empty, in memory only (never in the files).

    An empty SOP Class/Instance UID is taken from the file meta header (the same instance's UID by definition);
    a slice without either is refused. An empty Study, Series or Frame of Reference UID is replaced by one
    derived from the slices' SOP Instance UIDs (the same for every SEG of that series), with a warning: an archive will not match the SEG to the CT by it.
    """
    import warnings

    from pydicom.uid import generate_uid

    for ds, name in zip(sources, names):
        meta = getattr(ds, "file_meta", None) or {}
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(keyword) or "").strip():
                value = str(meta.get(meta_keyword) or "").strip()
                if not value:
                    raise ImageError(f"slice {name} in {folder} has no {keyword}, so a {product} cannot reference it")
                setattr(ds, keyword, value)
    instances = sorted(str(ds.SOPInstanceUID) for ds in sources)
    derived = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if any(not str(ds.get(keyword) or "").strip() for ds in sources):
            uid = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in sources:
                if not str(ds.get(keyword) or "").strip():
                    setattr(ds, keyword, uid)
            derived.append(keyword)
    if derived:
        # A warning, not a print: `ctfm` shows it once as a `ctfm: warning:` line, however often the series is read.
        warnings.warn(f"the series in {folder} has no {'/'.join(derived)} (anonymised?); the {product} references "
                      "UIDs derived from its slices' SOPInstanceUIDs, which an archive will not match to the CT",
                      stacklevel=2)


def _floats(ds, keyword: str, n: int) -> Optional[np.ndarray]:
    try:
        v = np.array([float(x) for x in ds.get(keyword) or []], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) and np.all(np.isfinite(v)) else None


def check_on_grid(labels: Image, sources: list, folder, what: str = "label map", product: str = "DICOM SEG") -> None:
    """Refuse, in one line, a label map (or other ``what``) whose voxel centres are not the source slices' pixel
    centres: every slice's size, pixel spacing, orientation and position is compared with the map's plane k."""
    where = f"the DICOM series in {folder}"
    refuse = f"; a {product} must be on its source grid"
    n = len(sources)
    first = sources[0]
    expected_shape = (int(first.Columns), int(first.Rows), n)
    if tuple(labels.shape) != expected_shape:
        raise ImageError(f"the {what} ({'x'.join(map(str, labels.shape))} voxels) is not on the grid of {where} "
                         f"({'x'.join(map(str, expected_shape))}: columns x rows x slices){refuse}")
    planes = labels.index_to_physical(np.column_stack([np.zeros(n), np.zeros(n), np.arange(n)]))
    # Index axis i runs along a row: the first ImageOrientationPatient vector, spaced PixelSpacing[1].
    in_plane = (float(labels.spacing[0]), float(labels.spacing[1]))
    tolerance = POSITION_TOLERANCE_VOXELS * float(np.min(labels.spacing))
    for k, ds in enumerate(sources):
        name = getattr(ds, "filename", None) or f"slice {k}"
        name = Path(name).name
        orientation, position = _floats(ds, "ImageOrientationPatient", 6), _floats(ds, "ImagePositionPatient", 3)
        spacing = _floats(ds, "PixelSpacing", 2)
        if orientation is None or position is None or spacing is None:
            raise ImageError(f"{name} in {folder} lacks a valid ImageOrientationPatient, ImagePositionPatient or "
                             f"PixelSpacing, so a {product} cannot be placed on it")
        if (int(ds.Columns), int(ds.Rows)) != expected_shape[:2]:
            raise ImageError(f"the slices of {where} differ in size ({name}: {ds.Columns}x{ds.Rows}){refuse}")
        if not (np.allclose(labels.direction[:, 0], orientation[:3], atol=DIRECTION_TOLERANCE)
                and np.allclose(labels.direction[:, 1], orientation[3:], atol=DIRECTION_TOLERANCE)):
            raise ImageError(
                f"the {what}'s orientation (rows {np.round(labels.direction[:, 0], 4).tolist()}, columns "
                f"{np.round(labels.direction[:, 1], 4).tolist()}) differs from that of {name} in {where} "
                f"({np.round(orientation, 4).tolist()}){refuse}")
        if not np.allclose(in_plane, (spacing[1], spacing[0]), rtol=0, atol=tolerance / 10):
            raise ImageError(f"the {what}'s pixel spacing {np.round(in_plane, 4).tolist()} mm differs from that of "
                             f"{name} in {where} ({[float(spacing[1]), float(spacing[0])]} mm){refuse}")
        offset = float(np.linalg.norm(planes[k] - position))
        if offset > tolerance:
            raise ImageError(f"the {what}'s slice {k} is {offset:.3g} mm from slice {k} of {where} ({name}){refuse}")


# --- segments -------------------------------------------------------------------------------


def _private_code_value(name: str) -> str:
    """A CodeValue (at most 16 characters) for ``name`` in :data:`PRIVATE_SCHEME`: the name when it fits, else a digest."""
    if len(name) <= 16 and "\\" not in name:
        return name
    return "N" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:15].upper()


def segment_codes(info: LabelInfo) -> dict:
    """``{"category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier"}`` codes
    ``(scheme, value, meaning)`` (or None) of a label, from its terminology entry; a label whose terminology
    is missing or malformed gets category Tissue and a type in :data:`PRIVATE_SCHEME`."""
    try:
        parsed = parse_terminology(info.terminology) if info.terminology else None
    except ValueError:
        parsed = None
    if parsed is None:
        meaning = (info.display_name or info.name)[:64]
        return {"category": TISSUE, "type": (PRIVATE_SCHEME, _private_code_value(info.name), meaning),
                "type_modifier": None, "anatomic_region": None, "anatomic_region_modifier": None}
    return {k: parsed[k] for k in ("category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier")}


def _segment_label(name: str) -> str:
    return name if len(name) <= 64 else name[:61] + "..."  # SegmentLabel is LO (64 characters)


def _description(hd, number: int, info: LabelInfo, algorithm) -> object:
    """highdicom's SegmentDescription of one segment, with the modifiers highdicom has no argument for."""
    def concept(code):
        return hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2][:64])

    codes = segment_codes(info)
    rgb = [min(255, max(0, int(round(c * 255)))) for c in info.color]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_segment_label(info.name),
        segmented_property_category=concept(codes["category"]),
        segmented_property_type=concept(codes["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[concept(codes["anatomic_region"])] if codes["anatomic_region"] else None,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    # Both modifiers are nested in the item they modify (PS3.3 Table 10-25 Segment Description Macro).
    if codes["type_modifier"]:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            concept(codes["type_modifier"])]
    if codes["anatomic_region"] and codes["anatomic_region_modifier"]:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            concept(codes["anatomic_region_modifier"])]
    if info.display_name and info.display_name != info.name:
        description.SegmentDescription = info.display_name[:64]
    return description


def _present_values(array: np.ndarray) -> list:
    """The non-zero values of a label map, ascending, in one counting pass."""
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ImageError(f"a label map holds integers, not {array.dtype}")
    if array.size == 0:
        return []
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ImageError(f"label values must be in 0..65535, found {low}..{high}")
    counts = np.bincount(array.reshape(-1).astype(np.uint16 if high > 255 else np.uint8, copy=False), minlength=high + 1)
    return [int(v) for v in np.flatnonzero(counts) if v != 0]


# --- writing -----------------------------------------------------------------------------------


def write_dicom_seg(labels: Image, label_info: Iterable[LabelInfo], source_series_folder, out, *,
                    algorithm: tuple, seg_type: str = "labelmap", series_uid: Optional[str] = None,
                    overwrite: bool = False) -> Path:
    """Write ``labels`` (a label map on the grid of the series in ``source_series_folder``) as a DICOM SEG at ``out``.

    ``label_info`` names every value in the map (a value without one is refused, as in
    :func:`CTFMLib.labels.write_seg_nrrd`); ``algorithm`` is ``(name, version, model sha256 or None)``,
    e.g. ``(ALGORITHM_NAME, CTFMLib.__version__, info.sha256)``; ``series_uid`` picks the series of a
    folder that holds several. Returns ``out``. Every refusal is a one-line :class:`~CTFMLib.image.ImageError`
    (a ValueError) and leaves nothing behind.
    """
    from .files import atomic_output

    seg_type = str(seg_type).lower()
    if seg_type not in SEG_TYPES:
        raise ValueError(f"unknown DICOM SEG type {seg_type!r}: use one of {', '.join(SEG_TYPES)}")
    name, version, sha256 = algorithm
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another name or allow overwriting")
    hd = import_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    array = np.asarray(labels.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)  # a bool array would index the lookup table as a mask
    present = _present_values(array)
    by_value = {}
    for info in label_info:
        if int(info.value) in by_value:
            raise ValueError(f"label value {info.value} is listed twice ({by_value[int(info.value)].name}, {info.name})")
        by_value[int(info.value)] = info
    unnamed = [v for v in present if v not in by_value]
    if unnamed:
        raise ValueError(f"the label map holds values without a label: {unnamed[:20]}; give every value a name")
    if not present:
        raise ValueError("the label map is empty (no structure found): a DICOM SEG needs at least one segment")

    sources = source_series_datasets(source_series_folder, series_uid)
    check_on_grid(labels, sources, source_series_folder)

    parameters = {"model_sha256": str(sha256)} if sha256 else None
    identification = hd.AlgorithmIdentificationSequence(
        name=str(name)[:64], family=codes.cid7162.ArtificialIntelligence, version=str(version)[:64],
        parameters=parameters)
    descriptions = [_description(hd, number, by_value[value], identification)
                    for number, value in enumerate(present, start=1)]
    private = any(segment_codes(by_value[v])["type"][0] == PRIVATE_SCHEME for v in present)
    coding_schemes = None
    if private:
        from highdicom.coding_schemes import CodingSchemeIdentificationItem

        coding_schemes = [CodingSchemeIdentificationItem(PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                                                         responsible_organization="CT-FM")]

    # Label value -> segment number, and frames [k, row j, column i] in the source slices' order.
    lut = np.zeros(max(present) + 1, dtype=np.uint8 if len(present) <= 255 else np.uint16)
    lut[present] = np.arange(1, len(present) + 1, dtype=lut.dtype)
    frames = np.ascontiguousarray(lut[array].transpose(2, 1, 0))

    series_number = derived_series_number(sources[0], SERIES_NUMBER_OFFSET)
    labelmap = seg_type == "labelmap"
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="CT-FM",
            manufacturer_model_name=str(name)[:64],
            software_versions=str(version)[:64],
            device_serial_number="0",
            content_label="CTFM_SEG",
            content_description=f"{name} {version}"[:64],
            series_description=SERIES_DESCRIPTION,
            transfer_syntax_uid=RLELossless if labelmap else ExplicitVRLittleEndian,
            omit_empty_frames=not labelmap,  # a LABELMAP covers the whole source grid; RLE makes empty frames tiny
            coding_schemes=coding_schemes,
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # highdicom's refusal of a source it cannot use
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImageError(f"highdicom cannot write a DICOM SEG for {source_series_folder}: {type(e).__name__} {why}") from None

    def verify(tmp: Path) -> None:
        pydicom.dcmread(str(tmp), stop_before_pixels=True)  # a complete, parseable header

    with atomic_output(out, overwrite=overwrite, verify=verify) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return out
