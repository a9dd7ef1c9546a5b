"""Segment labels: names, colours and DICOM/SNOMED CT terminology, and Slicer's ``.seg.nrrd`` file.

A label map stores integers; what each value *means* travels separately as a
list of :class:`LabelInfo`. The 117 structures of the whole-body model (the
TotalSegmentator v2 "total" classes, in output-channel order) are described in
``Resources/Terminology/totalsegmentator_v2.json``; a model folder carries its
own ``labels.json``, whose known names get the same colours and codes.

Terminology entry string
------------------------
``LabelInfo.terminology`` is the string Slicer stores in a segment's
``TerminologyEntry`` tag (``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``)::

    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier

seven ``~``-separated parts; each of the five codes is ``scheme^value^meaning``
(``^^`` when absent). For example the left kidney::

    Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure
    ~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^

(one line). Codes come from Slicer's DICOM master list where it holds the
concept; the rest are defined in ``CTFM-TotalSegmentator.term.json`` (context
:data:`CTFM_CONTEXT`), which the Slicer module loads into the Terminologies
module so that Slicer can browse them.
"""

from __future__ import annotations

import colorsys
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .image import Image, ImageError

TERMINOLOGY_DIR = "Terminology"
WHOLE_BODY_FILE = "totalsegmentator_v2.json"
TERM_JSON_FILE = "CTFM-TotalSegmentator.term.json"
LABELS_FILE = "labels.json"
WHOLE_BODY_OUTPUTS = 118  # outputs of the whole-body model: background + the 117 TotalSegmentator v2 structures

DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
CTFM_CONTEXT = "Segmentation category and type - CT-FM TotalSegmentator"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

Code = tuple  # (CodingSchemeDesignator, CodeValue, CodeMeaning)

# Generic codes for labels that are not TotalSegmentator structures (tumour models, user models).
# All but LESION are in Slicer's DICOM master list (SegmentationCategoryTypeModifier-DICOM-Master.json);
# LESION is DICOM CID 7159 "Lesion" and is defined in our .term.json for Slicer.
TISSUE = ("SCT", "85756007", "Tissue")
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
NEOPLASM = ("SCT", "108369006", "Neoplasm")
LESION = ("SCT", "52988006", "Lesion")
MASS = ("SCT", "4147007", "Mass")
CYST = ("SCT", "367643001", "Cyst")
NODULE = ("SCT", "27925004", "Nodule")
BLOOD_VESSEL = ("SCT", "59820001", "Blood Vessel")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")

# Words in a label name -> the abnormality it names. The first rule that matches wins, so
# "kidney_tumor_cyst" is a neoplasm. A generic code says no more than the name does.
_ALTERED_WORDS = (
    ({"tumor", "tumors", "tumour", "tumours", "neoplasm", "cancer", "carcinoma", "metastasis", "metastases"},
     NEOPLASM, DICOM_CONTEXT),
    ({"lesion", "lesions"}, LESION, CTFM_CONTEXT),
    ({"mass", "masses"}, MASS, DICOM_CONTEXT),
    ({"cyst", "cysts"}, CYST, DICOM_CONTEXT),
    ({"nodule", "nodules"}, NODULE, DICOM_CONTEXT),
)
_VESSEL_WORDS = {"vessel", "vessels", "vasculature", "vascular"}
# Organ words -> SNOMED CT code, as in Slicer's AnatomicRegionAndModifier-DICOM-Master.json
# (also types under "Anatomical Structure" in the DICOM master list).
_ORGANS = {
    "liver": ("SCT", "10200004", "Liver"), "hepatic": ("SCT", "10200004", "Liver"),
    "kidney": ("SCT", "64033007", "Kidney"), "renal": ("SCT", "64033007", "Kidney"),
    "pancreas": ("SCT", "15776009", "Pancreas"), "pancreatic": ("SCT", "15776009", "Pancreas"),
    "lung": ("SCT", "39607008", "Lung"), "pulmonary": ("SCT", "39607008", "Lung"),
    "spleen": ("SCT", "78961009", "Spleen"), "splenic": ("SCT", "78961009", "Spleen"),
    "adrenal": ("SCT", "23451007", "Adrenal gland"),
}
# Fixed colours: Slicer's DICOM master list (Mass, Cyst), our .term.json (Lesion).
_GENERIC_COLORS = {code: tuple(round(c / 255.0, 6) for c in rgb)
                   for code, rgb in {MASS: (144, 238, 144), CYST: (205, 205, 100), LESION: (255, 200, 50)}.items()}


@dataclass(frozen=True)
class LabelInfo:
    """One label value of a label map: what it is called, how it is shown, what it means."""

    value: int
    name: str
    color: tuple  # (r, g, b) in 0..1
    terminology: str  # Slicer terminology entry string (see module docstring)
    display_name: str


# --- terminology strings ----------------------------------------------------------


def _code_text(code: Optional[Code]) -> str:
    return "^".join(code) if code else "^^"


def terminology_entry(category: Code, type_: Code, type_modifier: Optional[Code] = None,
                      region: Optional[Code] = None, region_modifier: Optional[Code] = None,
                      context: str = DICOM_CONTEXT, anatomic_context: str = ANATOMIC_CONTEXT) -> str:
    """Serialise a terminology entry exactly as Slicer does (seven ``~``-separated parts)."""
    for code in (category, type_, type_modifier, region, region_modifier):
        if code and any(ch in part for part in code for ch in "~^|\n"):
            raise ValueError(f"a terminology code may not contain ~ ^ | or a line break: {code}")
    parts = [context, _code_text(category), _code_text(type_), _code_text(type_modifier),
             anatomic_context, _code_text(region), _code_text(region_modifier)]
    return "~".join(parts)


def parse_terminology(entry: str) -> dict:
    """Split a terminology entry string into its parts; codes become ``(scheme, value, meaning)`` or None.

    Raises ``ValueError`` for a string Slicer's ``DeserializeTerminologyEntry`` would reject.
    """
    parts = entry.split("~")
    if len(parts) != 7:
        raise ValueError(f"a terminology entry has 7 parts separated by '~', this one has {len(parts)}: {entry!r}")
    codes = []
    for part in (parts[1], parts[2], parts[3], parts[5], parts[6]):
        fields = part.split("^")
        if len(fields) != 3:
            raise ValueError(f"a terminology code is scheme^value^meaning, not {part!r}")
        codes.append(tuple(fields) if any(fields) else None)
    if codes[0] is None or codes[1] is None:
        raise ValueError(f"a terminology entry needs a category and a type: {entry!r}")
    keys = ("category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier")
    return {"context": parts[0], "anatomic_context": parts[4], **dict(zip(keys, codes))}


# --- the whole-body structures ------------------------------------------------------


def terminology_dir() -> Path:
    """The folder with the mapping file and the ``.term.json`` (installed copy first, then the source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "resources" / TERMINOLOGY_DIR, here.parents[1] / "Resources" / TERMINOLOGY_DIR):
        if (candidate / WHOLE_BODY_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{TERMINOLOGY_DIR}/{WHOLE_BODY_FILE} not found next to CTFMLib")


def terminology_file() -> Path:
    """The Slicer terminology context (``.term.json``) with the codes Slicer's own lists lack."""
    return terminology_dir() / TERM_JSON_FILE


def _code(obj: Optional[dict]) -> Optional[Code]:
    return (obj["CodingSchemeDesignator"], obj["CodeValue"], obj["CodeMeaning"]) if obj else None


def _from_mapping(s: dict) -> LabelInfo:
    entry = terminology_entry(_code(s["category"]), _code(s["type"]), _code(s.get("type_modifier")),
                              _code(s.get("anatomic_region")), _code(s.get("anatomic_region_modifier")),
                              s["context"], s.get("anatomic_context") or ANATOMIC_CONTEXT)
    color = tuple(round(c / 255.0, 6) for c in s["color"])
    return LabelInfo(int(s["value"]), s["name"], color, entry, s["display_name"])


@functools.lru_cache(maxsize=1)
def _whole_body() -> tuple:
    data = json.loads((terminology_dir() / WHOLE_BODY_FILE).read_text(encoding="utf-8"))
    return tuple(_from_mapping(s) for s in data["structures"])


def whole_body_labels() -> list:
    """The 117 whole-body structures, values 1..117 in the model's output-channel order."""
    return list(_whole_body())


def known_label(name: str) -> Optional[LabelInfo]:
    """The whole-body structure called ``name`` (a TotalSegmentator v2 name), or None."""
    for info in _whole_body():
        if info.name == name:
            return info
    return None


# --- labels of any model --------------------------------------------------------------


def distinct_color(index: int) -> tuple:
    """The ``index``-th of a sequence of well-separated colours (golden-angle hues), in 0..1."""
    hue = (0.11 + index * 0.618033988749895) % 1.0
    saturation = 0.55 + 0.3 * ((index // 7) % 2)
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 0.9)
    return (round(r, 6), round(g, 6), round(b, 6))


def _words(name: str) -> list:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def generic_terminology(name: str) -> tuple:
    """``(terminology entry, fixed colour in 0..1 or None)`` for a label name that is not a TotalSegmentator structure.

    Tumours, lesions, cysts ... are "Morphologically Altered Structure" with the organ named in
    the label (``liver_tumor`` -> region Liver) as anatomic region, vessels "Blood Vessel", a bare
    organ name that organ; anything else is Slicer's default "Tissue" (category and type), which
    claims nothing the name does not.
    """
    words = _words(name)
    side = LEFT if "left" in words else RIGHT if "right" in words else None
    organ = next((_ORGANS[w] for w in words if w in _ORGANS), None)
    for keys, type_, context in _ALTERED_WORDS:
        if keys & set(words):
            entry = terminology_entry(ALTERED_STRUCTURE, type_, None, organ, side if organ else None, context)
            return entry, _GENERIC_COLORS.get(type_)
    if _VESSEL_WORDS & set(words):
        return terminology_entry(ANATOMICAL_STRUCTURE, BLOOD_VESSEL), None
    if organ and {w for w in words if w not in ("left", "right")} <= set(_ORGANS):
        # The organ's colour where a whole-body structure has the same code (KiTS "kidney").
        same = next((x for x in _whole_body() if parse_terminology(x.terminology)["type"] == organ), None)
        return terminology_entry(ANATOMICAL_STRUCTURE, organ, side), (same.color if same else None)
    return terminology_entry(TISSUE, TISSUE), None


def _display(name: str) -> str:
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _color01(color) -> tuple:
    values = [float(c) for c in color]
    if len(values) != 3 or any(c < 0 for c in values):
        raise ValueError(f"a colour is three non-negative numbers, not {color!r}")
    if any(c > 1 for c in values):  # 0..255, as in Slicer's terminology files
        if any(c > 255 for c in values):
            raise ValueError(f"colour values go up to 255: {color!r}")
        values = [c / 255.0 for c in values]
    return tuple(round(c, 6) for c in values)


MAX_NAME_LENGTH = 128  # longer than any anatomical name; a segment name and ID in Slicer


def _shown(text) -> str:
    text = repr(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_name(name, what: str = "a label name", display: bool = False) -> str:
    """``name`` stripped, when it is fit to be a segment's name and ID in ``.labels.json`` and ``.seg.nrrd`` alike.

    Refused: non-text, empty, longer than :data:`MAX_NAME_LENGTH`, control characters (NUL cuts an
    NRRD value short, ESC drives terminals, tabs and line breaks end header fields), ``|`` (the
    segment tag separator), and path-like text (``/``, ``\\``, ``.``, ``..``): a structure name never
    names a file. A ``display`` name (shown, never an ID) may hold ``/``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, not {_shown(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is {len(name):,} characters long, more than {MAX_NAME_LENGTH}: {_shown(name)}")
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in "\u2028\u2029" for ch in name):
        raise ValueError(f"{what} may not contain control characters (NUL, tab, escape, line breaks): {_shown(name)}")
    if "|" in name:
        raise ValueError(f"{what} may not contain '|': {_shown(name)}")
    if not display and ("/" in name or "\\" in name or name.strip() in (".", "..")):
        raise ValueError(f"{what} may not look like a path ('/', '\\', '.', '..'): {_shown(name)}")
    return name.strip()


def load_labels(folder_or_dict: Union[str, os.PathLike, dict]) -> list:
    """Labels of a model: from a model folder's ``labels.json`` (or that file, or its parsed dict).

    Accepted forms, keys being label values (value 0, the background, is skipped)::

        {"1": "liver", "2": "liver_tumor"}
        {"1": {"name": "liver_tumor", "color": [0.9, 0.2, 0.2], "terminology": "...", "display_name": "..."}}

    A known TotalSegmentator name gets its colour and terminology; any other name a generic
    terminology (:func:`generic_terminology`) and a colour of its own. Given fields win.
    """
    if isinstance(folder_or_dict, dict):
        return _labels_of(folder_or_dict)
    path = Path(folder_or_dict)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {LABELS_FILE} at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return _labels_of(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _labels_of(data) -> list:
    """:func:`load_labels` of a parsed ``labels.json`` (every value checked: names, display names, colours)."""
    if not isinstance(data, dict):
        raise ValueError("labels must be a JSON object {value: name or {name, color, terminology}}")
    items = []
    for key, spec in data.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"label keys are integer values, not {key!r}") from None
        if not isinstance(spec, dict):
            spec = {"name": spec}
        name = _check_name(spec.get("name"), f"the name of label {_shown(key)}")
        if value == 0:  # background
            continue
        if value < 0 or value > 65535:
            raise ValueError(f"label value {value} ({name}) is outside 1..65535")
        items.append((value, name, spec))
    items.sort(key=lambda item: item[0])
    names = [name for _, name, _ in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label names must be unique; repeated: {', '.join(duplicates)}")
    labels = []
    generated = 0
    for value, name, spec in items:
        known = known_label(name)
        if known is not None:
            terminology, color, display = known.terminology, known.color, known.display_name
        else:
            terminology, fixed = generic_terminology(name)
            if fixed is not None:
                color = fixed
            else:
                color = distinct_color(generated)
                generated += 1
            display = _display(name)
        if spec.get("terminology"):
            terminology = spec["terminology"]
            if not isinstance(terminology, str) or any(ord(ch) < 32 or ch == "|" for ch in terminology):
                raise ValueError(f"the terminology of {name} must be one line of text without '|'")
            parse_terminology(terminology)  # refuse a malformed entry now, not in Slicer
        if spec.get("color") is not None:
            try:
                color = _color01(spec["color"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"the colour of {name}: {e}"[:300]) from None
        if spec.get("display_name") is not None:
            display = _check_name(spec["display_name"], f"the display name of {name}", display=True)
        labels.append(LabelInfo(value, name, color, terminology, display))
    return labels


def labels_for_model(info) -> list:
    """Labels of a loaded model (:class:`CTFMLib.weights.ModelInfo`): its folder's labels.json, else its
    catalogue entry's (by name, or the entry its weights matched), else guessed from its output count.

    Guessing says so (a :class:`~CTFMLib.catalog.ModelNote`, also added to ``info.notes``): a model of
    :data:`WHOLE_BODY_OUTPUTS` outputs gets the TotalSegmentator v2 structures of the whole-body model;
    any other gets ``label_1 ..`` with the note that its names are unknown and how to add a labels.json.
    """
    data = getattr(info, "labels", None)
    entry = getattr(info, "entry", None)
    if not data and entry is not None:
        data = getattr(entry, "labels", None)
    if data:
        return load_labels(data)
    channels = (getattr(info, "config", None) or {}).get("out_channels")
    source = getattr(info, "source", "the model")
    if not channels:
        raise ValueError(f"{source} has no labels.json and no out_channels to name")
    channels = int(channels)
    fix = ('add a labels.json ({"1": "name", ...}, one name for each output but the background 0) to the '
           "model folder (and import it again if it is imported)")
    if channels == WHOLE_BODY_OUTPUTS:
        _note(info, f"{source} has no labels.json and its weights match no catalogue model: its {channels} outputs "
                    "are taken to be the whole-body model's TotalSegmentator v2 structures (background + "
                    f"{channels - 1}); if they are not, {fix}")
        return whole_body_labels()
    _note(info, f"{source} has no labels.json, so the names of its {channels - 1} structures are unknown: they are "
                f"called label_1 .. label_{channels - 1}; to name them, {fix}")
    return load_labels({str(v): f"label_{v}" for v in range(1, channels)})


def _note(info, text: str) -> None:
    import warnings

    from .catalog import ModelNote

    notes = getattr(info, "notes", None)
    if isinstance(notes, list):
        notes.append(text)
    warnings.warn(text, ModelNote, stacklevel=3)


def label_dict(labels: Iterable[LabelInfo]) -> dict:
    """``{value: name}``, e.g. for an ``OUT.labels.json`` sidecar (keys become strings in JSON)."""
    return {int(info.value): info.name for info in labels}


# --- the label map's sidecar: OUT.labels.json -------------------------------------------------------
# One writer (``ctfm segment``, through :func:`sidecar_text`) and one reader (the Segment module, through
# :func:`read_sidecar`) of the same name rule, so neither guesses where the other put it.

LABEL_MAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def label_map_suffix(path) -> str:
    """The label-map suffix of ``path`` (``.seg.nrrd`` before ``.nrrd``); ValueError naming the ones allowed."""
    name = Path(path).name.lower()
    for suffix in LABEL_MAP_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"cannot write labels to {Path(path).name}: use one of {', '.join(LABEL_MAP_SUFFIXES)}")


DICOM_SEG_SUFFIX = ".dcm"  # a DICOM Segmentation (CTFMLib.dicom_seg): names its segments itself, no sidecar


def segmentation_suffix(path) -> str:
    """The suffix of a segmentation output: a label-map suffix or ``.dcm`` (DICOM SEG); ValueError naming them."""
    if Path(path).name.lower().endswith(DICOM_SEG_SUFFIX):
        return DICOM_SEG_SUFFIX
    try:
        return label_map_suffix(path)
    except ValueError:
        raise ValueError(f"cannot write labels to {Path(path).name}: use one of {', '.join(LABEL_MAP_SUFFIXES)} "
                         f"or {DICOM_SEG_SUFFIX} (DICOM SEG)") from None


def segmentation_files(out) -> list:
    """The files a segmentation output name means: ``[OUT]`` for a ``.seg.nrrd`` or ``.dcm`` (they carry their
    names), else ``[OUT, OUT.labels.json]``. The one home of this rule (``ctfm segment``, its batch, its checks)."""
    out = Path(out)
    return [out] if segmentation_suffix(out) in (".seg.nrrd", DICOM_SEG_SUFFIX) else [out, sidecar_path(out)]


def sidecar_path(out) -> Path:
    """``OUT.labels.json`` beside a label map ``OUT.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha`` (``{value: name}``;
    a ``.seg.nrrd`` carries its names itself)."""
    out = Path(out)
    return out.with_name(out.name[: -len(label_map_suffix(out))] + ".labels.json")


def sidecar_text(labels: Iterable[LabelInfo]) -> str:
    """The sidecar's JSON: ``{"1": "liver", ...}``."""
    return json.dumps({str(k): v for k, v in label_dict(labels).items()}, indent=1)


def read_sidecar(out) -> Optional[dict]:
    """``{value: name}`` from the sidecar of the label map ``out``, or None when it has none (or is a .seg.nrrd).
    Accepts either published form of a labels mapping ({"1": "liver"} or {"1": {"name": ...}})."""
    try:
        path = sidecar_path(out)
    except ValueError:
        return None
    if label_map_suffix(out) == ".seg.nrrd" or not path.is_file():
        return None
    names = {}
    for key, entry in json.loads(path.read_text(encoding="utf-8")).items():
        name = entry.get("name") if isinstance(entry, dict) else entry
        if int(key) != 0 and name:
            names[int(key)] = str(name)
    return names


# --- Slicer .seg.nrrd --------------------------------------------------------------------

# Field names of vtkMRMLSegmentationStorageNode (Slicer Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx).
SOURCE_REPRESENTATION = "Binary labelmap"
REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _number(x: float) -> str:
    return repr(float(x))  # shortest text that reads back as the same double


def _segment_extents(array: np.ndarray) -> dict:
    """``{label value: (i0, i1, j0, j1, k0, k1)}`` inclusive bounding boxes of the non-zero labels, in one pass."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.SetBackgroundValue(0)
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.ComputeOrientedBoundingBoxOff()
    stats.Execute(img)
    out = {}
    for value in stats.GetLabels():
        x, y, z, sx, sy, sz = stats.GetBoundingBox(value)
        out[int(value)] = (x, x + sx - 1, y, y + sy - 1, z, z + sz - 1)
    return out


def write_seg_nrrd(labels_image: Image, labels: Iterable[LabelInfo], path, overwrite: bool = True) -> Path:
    """Write a label map as a Slicer segmentation (``.seg.nrrd``): one shared labelmap layer.

    Only the labels present in the image become segments (an absent structure is not a
    segment in Slicer either); each is named by ``LabelInfo.name`` (also its segment ID),
    coloured and tagged with its terminology. A value in the image without a ``LabelInfo``
    is an error, never a silently dropped structure. The geometry is the image's (LPS),
    written as NRRD ``space: left-posterior-superior``; the image grid is also stored as the
    segmentation's reference image geometry, as Slicer does. The file is gzip-compressed
    and written atomically (:func:`CTFMLib.image.write_sitk`); ``overwrite=False`` refuses an existing file.
    """
    from .image import to_sitk, write_sitk

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"a Slicer segmentation file ends in .seg.nrrd, not {path.name}")
    array = np.asarray(labels_image.array)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ImageError(f"a label map holds integers, not {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageError(f"label values must be in 0..65535, found {array.min()}..{array.max()}")
    dtype = np.uint8 if (not array.size or array.max() <= 255) else np.uint16
    by_value = {}
    for info in labels:
        if info.value in by_value:
            raise ValueError(f"label value {info.value} is listed twice ({by_value[info.value].name}, {info.name})")
        by_value[int(info.value)] = info
    names = [info.name for info in by_value.values()]
    if len(set(names)) != len(names):
        raise ValueError("segment names (their IDs) must be unique")
    extents = _segment_extents(array.astype(dtype, copy=False))
    missing = sorted(set(extents) - set(by_value))
    if missing:
        raise ValueError(f"the label map holds values without a label: {missing[:20]}")

    image = labels_image.with_array(array.astype(dtype, copy=False))
    img = to_sitk(image)
    ijk_to_ras = _LPS_TO_RAS @ image.affine
    shape = image.shape
    geometry = ";".join(_number(v) for v in ijk_to_ras.reshape(-1)) + ";" + \
        ";".join(str(v) for a in range(3) for v in (0, shape[a] - 1)) + ";"
    meta = {
        "Segmentation_MasterRepresentation": SOURCE_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": SOURCE_REPRESENTATION + "|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": f"{REFERENCE_GEOMETRY_PARAMETER}|{geometry}|"
                                             "Image geometry of the CT the labels were computed on&",
    }
    for index, value in enumerate(sorted(extents)):
        info = by_value[value]
        _check_name(info.name)
        if info.terminology:
            parse_terminology(info.terminology)
            if any(ch in info.terminology for ch in "|\n"):
                raise ValueError(f"terminology of {info.name} may not contain '|' or a line break")
        key = f"Segment{index}_"
        meta[key + "ID"] = info.name
        meta[key + "Name"] = info.name
        meta[key + "NameAutoGenerated"] = "0"
        meta[key + "Color"] = " ".join(_number(c) for c in _color01(info.color))
        meta[key + "ColorAutoGenerated"] = "0"
        meta[key + "Extent"] = " ".join(str(v) for v in extents[value])
        meta[key + "Layer"] = "0"
        meta[key + "LabelValue"] = str(value)
        meta[key + "Tags"] = f"TerminologyEntry:{info.terminology}|" if info.terminology else ""
    for k, v in meta.items():
        img.SetMetaData(k, v)

    return write_sitk(img, path, True, overwrite)


def read_seg_nrrd(path) -> tuple:
    """Read a single-layer ``.seg.nrrd`` back: ``(label map Image, [LabelInfo, ...])``.

    For files this module writes (and Slicer's own one-layer files); overlapping
    multi-layer segmentations are refused.
    """
    import SimpleITK as sitk

    from .image import from_sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    img = reader.Execute()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{Path(path).name} has overlapping segments in several layers; only one layer is read")
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    offset = [int(v) for v in meta.get("Segmentation_ReferenceImageExtentOffset", "0 0 0").split()]
    image = from_sitk(img, {"source": str(path), "extent_offset": offset})
    labels = []
    index = 0
    while f"Segment{index}_ID" in meta:
        key = f"Segment{index}_"
        tags = dict(t.split(":", 1) for t in meta.get(key + "Tags", "").split("|") if ":" in t)
        name = meta.get(key + "Name") or meta[key + "ID"]
        color = tuple(float(c) for c in meta.get(key + "Color", "0.5 0.5 0.5").split())
        labels.append(LabelInfo(int(meta.get(key + "LabelValue", index + 1)), name, color,
                                tags.get("TerminologyEntry", ""), name))
        index += 1
    return image, labels
