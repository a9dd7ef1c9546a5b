"""Labels and terminology of the segmentation models, and Slicer's .seg.nrrd written from them.

Expected codes below are taken from the sources, not from our mapping file:
Slicer's terminology lists (Slicer repository, Modules/Loadable/Terminologies/Resources/
SegmentationCategoryTypeModifier-DICOM-Master.json and AnatomicRegionAndModifier-DICOM-Master.json)
and the SlicerTotalSegmentator extension's totalsegmentator_snomed_mapping.csv.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from CTFMLib import labels as L
from CTFMLib.image import Image, read_image

ROOT = Path(__file__).resolve().parents[2]
SCT_LEFT, SCT_RIGHT = "7771000", "24028007"  # laterality, Slicer's DICOM master list ("Left", "Right")


def verhoeff_valid(number: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit (SNOMED CT Technical Implementation Guide)."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p1 = [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]
    p = [list(range(10))]
    for _ in range(7):
        p.append([p1[x] for x in p[-1]])
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def is_sctid(value: str) -> bool:
    # 6-18 digits, partition identifier "00" or "10" (a concept), valid check digit.
    return bool(re.fullmatch(r"[1-9]\d{5,17}", value)) and value[-3:-1] in ("00", "10") and verhoeff_valid(value)


@pytest.fixture
def mrml_scene():
    """A real MRML scene (slicer-core); the tests that need it skip when it is not installed."""
    pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
    from ctfm_testing.mrml import scene_with_logics

    with scene_with_logics() as scene:
        yield scene


def by_name():
    return {info.name: info for info in L.whole_body_labels()}


# --- the mapping file ------------------------------------------------------------------


def test_the_sctid_check_tells_real_codes_from_typos():
    assert is_sctid("10200004") and is_sctid("78961009") and is_sctid("123037004")
    assert not is_sctid("10200005") and not is_sctid("78961090") and not is_sctid("123037")


def test_mapping_lists_the_117_structures_in_the_catalogue_order():
    from CTFMLib.catalog import Catalog

    labels = L.whole_body_labels()
    assert [info.value for info in labels] == list(range(1, 118))
    catalogue = Catalog.load(ROOT / "Resources" / "Models.json").find("whole_body_segmentation").labels
    assert {str(info.value): info.name for info in labels} == {k: v for k, v in catalogue.items() if k != "0"}


def test_mapping_order_is_the_published_total_v2_map():
    from ctfm_testing.data import require_shared_data

    published = json.loads(require_shared_data("totalsegmentator_example", "total_v2_labels.json").read_text())
    assert {int(k): v for k, v in published.items()} == L.label_dict(L.whole_body_labels())


def test_every_structure_has_well_formed_snomed_codes_a_colour_and_laterality():
    names = set()
    for info in L.whole_body_labels():
        entry = L.parse_terminology(info.terminology)
        assert entry["context"] in (L.DICOM_CONTEXT, L.CTFM_CONTEXT), info.name
        assert entry["anatomic_context"] == "Anatomic codes - DICOM master list"
        for part in ("category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier"):
            code = entry[part]
            if code is not None:
                scheme, value, meaning = code
                assert scheme == "SCT" and is_sctid(value) and meaning.strip() == meaning and meaning, (info.name, code)
        assert entry["category"][1] in ("123037004", "49755003"), info.name  # anatomical / morphologically altered
        assert len(info.color) == 3 and all(0 <= c <= 1 for c in info.color) and max(info.color) > 0, info.name
        assert info.display_name and info.display_name[0].isupper()
        sides = {c[1] for c in (entry["type_modifier"], entry["anatomic_region_modifier"]) if c}
        words = info.name.split("_")
        meaning = entry["type"][2].lower().split()  # pre-coordinated: "Middle lobe of right lung"
        if "left" in words:
            assert sides == {SCT_LEFT} or (not sides and "left" in meaning), info.name
        elif "right" in words:
            assert sides == {SCT_RIGHT} or (not sides and "right" in meaning), info.name
        else:
            assert not sides and "left" not in meaning and "right" not in meaning, info.name
        names.add(info.name)
    assert len(names) == 117


@pytest.mark.parametrize("name, category, type_value, modifier, region", [
    # Slicer DICOM master list (SegmentationCategoryTypeModifier-DICOM-Master.json), "Anatomical Structure":
    ("liver", "123037004", "10200004", None, None),            # Liver
    ("spleen", "123037004", "78961009", None, None),           # Spleen
    ("kidney_left", "123037004", "64033007", SCT_LEFT, None),  # Kidney + Left
    ("aorta", "123037004", "15825003", None, None),            # Aorta
    ("heart", "123037004", "80891009", None, None),            # Heart
    ("urinary_bladder", "123037004", "89837001", None, None),  # Bladder
    ("lung_middle_lobe_right", "123037004", "72481006", None, None),  # Middle lobe of right lung
    ("subclavian_artery_right", "123037004", "36765005", SCT_RIGHT, None),  # Subclavian artery (DICOM, not 29700009)
    # ... "Morphologically Altered Structure" / Cyst, anatomic region Kidney (AnatomicRegionAndModifier-DICOM-Master.json):
    ("kidney_cyst_right", "49755003", "367643001", None, ("64033007", SCT_RIGHT)),
    # SlicerTotalSegmentator totalsegmentator_snomed_mapping.csv (not in Slicer's own lists):
    ("vertebrae_L1", "123037004", "66794005", None, None),     # L1 vertebra
    ("rib_left_1", "123037004", "48535007", SCT_LEFT, None),   # First rib + Left
    ("gluteus_minimus_right", "123037004", "75297007", SCT_RIGHT, None),  # Gluteus minimus muscle
    ("portal_vein_and_splenic_vein", "123037004", "110765007", None, None),
])
def test_well_known_codes(name, category, type_value, modifier, region):
    entry = L.parse_terminology(by_name()[name].terminology)
    assert entry["category"][1] == category and entry["type"][1] == type_value
    assert (entry["type_modifier"] or (None, None))[1] == modifier
    if region:
        assert (entry["anatomic_region"][1], entry["anatomic_region_modifier"][1]) == region
    else:
        assert entry["anatomic_region"] is None


def test_terminology_string_is_slicers_serialisation():
    # The tag Slicer's documentation shows for a mass in the right adrenal gland (Docs/developer_guide/modules/segmentations.md).
    expected = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered Structure"
                "~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^23451007^Adrenal gland~SCT^24028007^Right")
    made = L.terminology_entry(("SCT", "49755003", "Morphologically Altered Structure"), ("SCT", "4147007", "Mass"),
                               region=("SCT", "23451007", "Adrenal gland"), region_modifier=("SCT", "24028007", "Right"),
                               context="Segmentation category and type - 3D Slicer General Anatomy list")
    assert made == expected
    assert L.parse_terminology(made)["anatomic_region_modifier"] == ("SCT", "24028007", "Right")
    for bad in ("a~b", "ctx~SCT^1~SCT^2^x~^^~a~^^~^^", "ctx~^^~SCT^2^x~^^~a~^^~^^"):
        with pytest.raises(ValueError):
            L.parse_terminology(bad)


def test_slicer_reads_every_entry_and_finds_our_codes_in_the_term_json():
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = logic.LoadTerminologyFromFile(str(L.terminology_file()))
    assert context == L.CTFM_CONTEXT
    own = 0
    for info in L.whole_body_labels() + L.load_labels({"1": "lesion"}):
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(info.terminology, entry), info.name
        assert logic.SerializeTerminologyEntry(entry) == info.terminology, info.name
        if entry.GetTerminologyContextName() != L.CTFM_CONTEXT:
            continue
        # Slicer looks the codes up in the loaded .term.json: type (and modifier) must be there, with our colour.
        entry.GetTypeObject().SetCodeMeaning("")
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [context], [])
        assert entry.GetTypeObject().GetCodeMeaning(), info.name
        modifier = entry.GetTypeModifierObject()
        shown = modifier if modifier.GetCodeValue() else entry.GetTypeObject()
        assert tuple(shown.GetRecommendedDisplayRGBValue()) == tuple(round(c * 255) for c in info.color), info.name
        own += 1
    assert own > 40  # vertebrae, ribs, muscles ... are ours


# --- labels of any model --------------------------------------------------------------


def test_load_labels_names_only_fills_known_names_and_generic_terms():
    labels = L.load_labels({"0": "background", "2": "liver_tumor", "1": "liver"})
    assert [(x.value, x.name) for x in labels] == [(1, "liver"), (2, "liver_tumor")]
    known = L.known_label("liver")
    assert (labels[0].terminology, labels[0].color, labels[0].display_name) == (known.terminology, known.color, "Liver")
    tumour = L.parse_terminology(labels[1].terminology)
    assert tumour["category"][1] == "49755003" and tumour["type"][1] == "108369006"  # Neoplasm (DICOM master list)
    assert tumour["anatomic_region"][1] == "10200004"  # in the liver
    assert labels[1].display_name == "Liver tumor" and labels[1].color != labels[0].color


@pytest.mark.parametrize("name, type_value, region, side", [
    ("lesion", "52988006", None, None),             # Lesion (DICOM CID 7159; our .term.json)
    ("kidney_cyst", "367643001", "64033007", None),  # not a TotalSegmentator name (those are sided)
    ("left_kidney_tumour", "108369006", "64033007", SCT_LEFT),
    ("hepatic_vessel", "59820001", None, None),      # Blood Vessel
    ("kidney", "64033007", None, None),              # the organ itself
    ("lung_nodule", "27925004", "39607008", None),
    ("something_else", "85756007", None, None),      # Tissue: Slicer's default, claims nothing
])
def test_generic_terms_for_unknown_names(name, type_value, region, side):
    entry = L.parse_terminology(L.load_labels({"1": name})[0].terminology)
    assert entry["type"][1] == type_value
    assert (entry["anatomic_region"] or (None, None))[1] == region
    assert (entry["anatomic_region_modifier"] or entry["type_modifier"] or (None, None))[1] == side


def test_generic_labels_reuse_slicer_colours_where_known():
    kidney, cyst, lesion = L.load_labels({"1": "kidney", "3": "kidney_cyst", "4": "lesion"})
    assert kidney.color == L.known_label("kidney_left").color  # same SNOMED type as the whole-body kidneys
    assert np.allclose(cyst.color, np.array([205, 205, 100]) / 255, atol=1e-6)  # "Cyst", Slicer's DICOM master list
    assert np.allclose(lesion.color, np.array([255, 200, 50]) / 255, atol=1e-6)  # "Lesion" in our .term.json


def test_unknown_names_get_distinct_colours():
    labels = L.load_labels({str(v): f"structure_{v}" for v in range(1, 13)})
    colors = np.array([x.color for x in labels])
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(len(colors))
    assert distances.min() > 0.1


def test_load_labels_rich_dict_and_folder(tmp_path):
    custom = L.terminology_entry(L.ALTERED_STRUCTURE, L.MASS)
    rich = {"1": {"name": "liver", "color": [255, 0, 0]},
            "3": {"name": "blob", "color": [0.1, 0.2, 0.3], "terminology": custom, "display_name": "Blob (mass)"}}
    (tmp_path / "labels.json").write_text(json.dumps(rich))
    for source in (tmp_path, tmp_path / "labels.json", rich):
        liver, blob = L.load_labels(source)
        assert liver.color == (1.0, 0.0, 0.0) and liver.terminology == L.known_label("liver").terminology
        assert blob.value == 3 and blob.color == (0.1, 0.2, 0.3) and blob.terminology == custom
        assert blob.display_name == "Blob (mass)"


@pytest.mark.parametrize("bad", [
    {"1": "liver", "2": "liver"},                          # duplicate name
    {"one": "liver"},                                      # key is not a value
    {"1": ""},                                             # empty name
    {"1": {"name": "x", "terminology": "not~an~entry"}},   # malformed terminology
    {"1": {"name": "x", "color": [300, 0, 0]}},            # colour out of range
    {"-1": "x"},
])
def test_load_labels_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        L.load_labels(bad)


def test_labels_for_model_uses_folder_then_catalogue_then_channels():
    from CTFMLib.catalog import Catalog
    from CTFMLib.weights import ModelInfo

    entry = Catalog.load(ROOT / "Resources" / "Models.json").find("whole_body_segmentation")
    info = ModelInfo("whole_body_segmentation", Path("."), "SegResNetDS", {"out_channels": 118}, entry=entry)
    assert L.labels_for_model(info) == L.whole_body_labels()
    info.labels = {"1": "liver_tumor"}
    assert [x.name for x in L.labels_for_model(info)] == ["liver_tumor"]
    bare = ModelInfo("folder", Path("."), "SegResNetDS", {"out_channels": 3})
    assert L.label_dict(L.labels_for_model(bare)) == {1: "label_1", 2: "label_2"}
    with pytest.raises(ValueError):
        L.labels_for_model(ModelInfo("folder", Path("."), "SegResEncoder", {}))


def test_every_tumour_task_in_the_catalogue_gets_specific_terms():
    from CTFMLib.catalog import Catalog

    tissue = ("SCT", "85756007", "Tissue")
    user = [m for m in Catalog.load(ROOT / "Resources" / "Models.json") if not m.repo_id]
    assert len(user) == 6
    for model in user:
        for info in L.load_labels(model.labels):
            assert L.parse_terminology(info.terminology)["type"] != tissue, (model.id, info.name)


def test_models_list_shows_user_models_as_trainable(ctfm_cache):
    from ctfm_testing.plugin import run_ctfm

    out = run_ctfm("models", "list", env={"CTFM_CACHE": str(ctfm_cache)})
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("kits_kidney_tumor")][0]
    assert line.endswith("train it with ctfm train")  # the command line's words, not a Slicer module's


# --- anatomy check of the label order on the real scan --------------------------------------


def test_label_ids_and_names_agree_anatomically_on_the_reference_segmentation():
    """A mis-ordered map (shifted, or left/right swapped) puts names on the wrong organs; catch it."""
    from ctfm_testing.data import require_shared_data

    folder = require_shared_data("totalsegmentator_example")
    seg = read_image(folder / "example_seg.nii.gz")
    ct = read_image(folder / "example_ct_sm.nii.gz")
    assert ct.geometry.same_grid(seg.geometry)
    names = L.label_dict(L.whole_body_labels())
    present = [int(v) for v in np.unique(seg.array) if v]
    assert len(present) == 41  # the data README's "42 classes" counts the background
    centre, hu = {}, {}
    for value in present:
        mask = seg.array == value
        centre[names[value]] = seg.index_to_physical(np.argwhere(mask).mean(axis=0))  # LPS mm
        hu[names[value]] = float(np.median(ct.array[mask]))
    x, y, z = (lambda n: centre[n][0]), (lambda n: centre[n][1]), (lambda n: centre[n][2])

    assert x("liver") < x("spleen") and x("liver") < 0 < x("spleen")  # liver on the patient's right
    assert x("gallbladder") < x("stomach")
    pairs = [(n, n.replace("left", "right")) for n in centre if "left" in n and n.replace("left", "right") in centre]
    assert len(pairs) >= 9
    for left, right in pairs:
        assert x(left) > x(right), (left, right)  # LPS x grows to the patient's left
    for lobe in ("lung_lower_lobe_left", "lung_lower_lobe_right", "lung_upper_lobe_left"):
        assert z(lobe) > z("liver") and hu[lobe] < -500, lobe
    vertebrae = [n for n in ("vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2") if n in centre]
    assert len(vertebrae) == 4
    assert [z(n) for n in vertebrae] == sorted((z(n) for n in vertebrae), reverse=True)  # T11 above L2
    assert all(hu[n] > 100 for n in vertebrae + [n for n in centre if n.startswith("rib_")])
    assert y("aorta") < y("vertebrae_L1") < y("autochthon_left")  # aorta anterior, back muscles posterior
    assert 0 < hu["liver"] < 150 and 0 < hu["spleen"] < 150


# --- .seg.nrrd --------------------------------------------------------------------------------


def oblique_labels(shape=(14, 11, 9), dtype=np.uint8):
    """A label map on a rotated, anisotropic grid: boxes of a few whole-body labels."""
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    array = np.zeros(shape, dtype=dtype)
    array[1:5, 2:6, 1:3] = 5      # liver
    array[8:13, 1:4, 4:8] = 1     # spleen
    array[6:7, 7:10, 0:9] = 117   # costal_cartilages
    array[2, 9, 8] = 3            # kidney_left, one voxel at the far corner
    return Image(array, spacing=np.array([0.7, 1.3, 2.5]), origin=np.array([-12.5, 40.0, 7.25]), direction=direction)


def test_write_seg_nrrd_header_and_round_trip(tmp_path):
    import SimpleITK as sitk

    image = oblique_labels()
    path = L.write_seg_nrrd(image, L.whole_body_labels(), tmp_path / "out.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]  # no temporary file left
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "space: left-posterior-superior" in header and "encoding: gzip" in header and "type: unsigned char" in header
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    assert meta["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert meta["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    ids = [meta[f"Segment{i}_ID"] for i in range(4)]
    assert ids == ["spleen", "kidney_left", "liver", "costal_cartilages"] and "Segment4_ID" not in meta
    assert meta["Segment2_LabelValue"] == "5" and meta["Segment2_Layer"] == "0"
    assert meta["Segment2_Extent"] == "1 4 2 5 1 2" and meta["Segment1_Extent"] == "2 2 9 9 8 8"
    assert meta["Segment2_Tags"] == f"TerminologyEntry:{L.known_label('liver').terminology}|"

    back, infos = L.read_seg_nrrd(path)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry.same_grid(image.geometry, atol=1e-9)
    wb = {x.value: x for x in L.whole_body_labels()}
    for info in infos:
        assert info.name == wb[info.value].name and info.terminology == wb[info.value].terminology
        assert np.allclose(info.color, wb[info.value].color, atol=1e-9)


def test_write_seg_nrrd_refuses_unlabelled_values_and_keeps_large_values(tmp_path):
    image = oblique_labels(dtype=np.uint16)
    with pytest.raises(ValueError, match="without a label"):
        L.write_seg_nrrd(image, [L.known_label("liver")], tmp_path / "x.seg.nrrd")
    assert not list(tmp_path.iterdir())
    image.array[0, 0, 0] = 300
    labels = L.whole_body_labels() + L.load_labels({"300": "lesion"})
    back, infos = L.read_seg_nrrd(L.write_seg_nrrd(image, labels, tmp_path / "big.seg.nrrd"))
    assert back.array.dtype == np.uint16 and back.array[0, 0, 0] == 300 and infos[-1].name == "lesion"


def ras_affine(image: Image) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine


def read_in_slicer(path):
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), "Slicer could not read the .seg.nrrd"
    return node


def slicer_labelmap(node, segment_id) -> tuple:
    """A segment's internal (shared) labelmap as an [i, j, k] array placed in a full grid, and its IJK-to-RAS."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    oriented = node.GetBinaryLabelmapInternalRepresentation(segment_id)
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = oriented.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    array = vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0)
    return array, extent, ijk_to_ras


def test_slicer_reads_the_seg_nrrd_back_equal(tmp_path, mrml_scene):
    import slicer
    import vtk

    image = oblique_labels()
    wb = {x.value: x for x in L.whole_body_labels()}
    node = read_in_slicer(L.write_seg_nrrd(image, L.whole_body_labels(), tmp_path / "s.seg.nrrd"))
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == ["spleen", "kidney_left", "liver", "costal_cartilages"]
    shared = None
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        info = next(x for x in wb.values() if x.name == segment_id)
        assert segment.GetName() == info.name and segment.GetLabelValue() == info.value
        assert np.allclose(segment.GetColor(), info.color, atol=1e-6)
        tag = vtk.reference("")
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag) and str(tag) == info.terminology
        assert segment.GetTerminology() == info.terminology
        array, extent, ijk_to_ras = slicer_labelmap(node, segment_id)
        np.testing.assert_allclose(ijk_to_ras, ras_affine(image), atol=1e-9)
        full = np.zeros(image.shape, dtype=array.dtype)
        full[extent[0]:extent[1] + 1, extent[2]:extent[3] + 1, extent[4]:extent[5] + 1] = array
        np.testing.assert_array_equal(full == info.value, image.array == info.value)
        oriented = node.GetBinaryLabelmapInternalRepresentation(segment_id)
        shared = shared or oriented
        assert oriented is shared  # one shared labelmap layer, as written
    # The full grid travels as the reference image geometry (used by DICOM SEG export and editing).
    geometry = segmentation.GetConversionParameter("Reference image geometry").split(";")
    matrix = np.array([float(v) for v in geometry[:16]]).reshape(4, 4)
    np.testing.assert_allclose(matrix, ras_affine(image), atol=1e-9)
    assert [int(v) for v in geometry[16:22]] == [0, 13, 0, 10, 0, 8]


def test_slicer_reads_the_real_reference_segmentation(tmp_path, mrml_scene):
    from ctfm_testing.data import require_shared_data

    seg = read_image(require_shared_data("totalsegmentator_example", "example_seg.nii.gz"))
    node = read_in_slicer(L.write_seg_nrrd(seg, L.whole_body_labels(), tmp_path / "ref.seg.nrrd"))
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 41
    liver = segmentation.GetSegment("liver")
    assert liver.GetLabelValue() == 5
    array, extent, ijk_to_ras = slicer_labelmap(node, "liver")
    np.testing.assert_allclose(ijk_to_ras, ras_affine(seg), atol=1e-6)
    assert int((array == 5).sum()) == int((seg.array == 5).sum())


def test_the_sidecar_has_one_name_rule_for_its_writer_and_its_reader(tmp_path):
    """``ctfm segment --out OUT`` writes ``OUT.labels.json`` beside a label map and the Segment module reads that
    file, both through CTFMLib.labels (issue 18: the reader used to guess among three names)."""
    for name, sidecar in (("a.nii.gz", "a.labels.json"), ("b.nii", "b.labels.json"), ("c.nrrd", "c.labels.json"),
                          ("d.mha", "d.labels.json")):
        assert L.sidecar_path(tmp_path / name) == tmp_path / sidecar
    with pytest.raises(ValueError, match=".seg.nrrd"):
        L.sidecar_path(tmp_path / "e.png")
    infos = [L.LabelInfo(1, "liver", (1.0, 0.0, 0.0), "", "Liver"), L.LabelInfo(5, "spleen", (0.0, 1.0, 0.0), "", "Spleen")]
    (tmp_path / "a.labels.json").write_text(L.sidecar_text(infos), encoding="utf-8")
    assert L.read_sidecar(tmp_path / "a.nii.gz") == {1: "liver", 5: "spleen"}
    (tmp_path / "c.labels.json").write_text('{"0": "background", "2": {"name": "kidney_left"}}', encoding="utf-8")
    assert L.read_sidecar(tmp_path / "c.nrrd") == {2: "kidney_left"}  # the other published form, no background
    assert L.read_sidecar(tmp_path / "b.nii") is None  # none written
    (tmp_path / "f.labels.json").write_text(L.sidecar_text(infos), encoding="utf-8")
    assert L.read_sidecar(tmp_path / "f.seg.nrrd") is None  # a .seg.nrrd names its segments itself
