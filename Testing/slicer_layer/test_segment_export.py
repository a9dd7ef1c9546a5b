"""CT-FM Segment's "Export DICOM SEG" logic on a real MRML scene (slicer-core): the source slices found through the
volume's ``DICOM.instanceUIDs``, staged, ``ctfm export-seg`` run in a real child process on real files, the SEG read
back with highdicom equal to the segmentation's label map.

slicer-core has no ``slicer.dicomDatabase`` (no application, no CTK DICOM): the one stand-in here is a database
that answers ``fileForInstance(uid)`` from the synthetic series just written, as Slicer's database would.
"""

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")
pytest.importorskip("highdicom", reason="highdicom (a dependency of ctfm-slicer) is not installed")
import pydicom  # noqa: E402

from ctfm_testing.dicom_checks import GEOMETRIES, seg_on_grid  # noqa: E402
from ctfm_testing.mrml import mrml_scene_fixture  # noqa: E402,F401  (registers the mrml_scene fixture)
from ctfm_testing.phantoms import BODY_LABELS, body_phantom  # noqa: E402
from ctfm_testing.synthetic_dicom import write_ct_series  # noqa: E402
from CTFMLib.dicom import read_dicom_series  # noqa: E402
from CTFMLib.image import Image  # noqa: E402
from CTFMLib.labels import load_labels  # noqa: E402
from CTFMSegmentLib.dicom_export import NOT_FROM_DICOM  # noqa: E402
from CTFMSegmentLib.logic import CTFMSegmentLogic  # noqa: E402
from CTFMSlicer.nodes import volume_node_from_image  # noqa: E402


class StandInDatabase:
    """What the export asks of ``slicer.dicomDatabase``: the file of an instance UID ("" when unknown)."""

    def __init__(self, files):
        self.files = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: str(f) for f in files}
        self.isOpen = True

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


def dicom_volume(folder, direction=None):
    """A phantom CT series on disk, loaded as Slicer's DICOM plugin would: the volume node with DICOM.instanceUIDs
    (in slice order), the stand-in database, the CT read from the files and the organs' label map on its grid."""
    image, labels = body_phantom(shape=(30, 26, 9), spacing=(5.0, 5.0, 6.0), noise_hu=0, seed=4, return_labels=True,
                                 **({} if direction is None else {"direction": direction}))
    files = write_ct_series(folder, image)
    ct = read_dicom_series(folder)
    volume = volume_node_from_image(ct, name="ct")
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files]
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    labels = Image(np.asarray(labels.array).astype(np.uint8), ct.spacing, ct.origin, ct.direction)
    return volume, StandInDatabase(files), ct, labels


@pytest.mark.slow
@pytest.mark.parametrize("geometry", [None, "oblique"])
def test_the_export_writes_a_seg_that_reads_back_equal_to_the_segmentation(mrml_scene, tmp_path, geometry):
    volume, database, ct, labels = dicom_volume(tmp_path / "series", GEOMETRIES.get(geometry))
    present = set(np.unique(labels.array).tolist()) - {0}
    names = {name: v for name, v in BODY_LABELS.items() if v in present}
    logic = CTFMSegmentLogic()
    segmentation = logic.segmentationNodeFromLabels(labels, load_labels({v: n for n, v in names.items()}), volume,
                                                    show3D=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "series").iterdir()}
    out = tmp_path / "export" / "seg.dcm"
    out.parent.mkdir()
    done = []
    runner = logic.startDicomSegExport(segmentation, volume, out, database=database,
                                       on_done=lambda *args: done.append(args))
    args = runner.args
    assert args[args.index("--progress") + 2] == "export-seg" and args[args.index("--out") + 1] == str(out)
    staged = Path(args[args.index("--reference") + 1])
    assert sorted(staged.iterdir()) and len(list(staged.iterdir())) == len(before)
    for f in staged.iterdir():  # the volume's own slices, linked or copied: same bytes
        uid = pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID
        assert Path(database.fileForInstance(uid)).read_bytes() == f.read_bytes()
    result = runner.wait(timeout=120)
    assert result.ok and len(done) == 1 and done[0][0] is not None, done and done[0][1:]
    assert done[0][0].path == out and not done[0][0].in_database
    np.testing.assert_array_equal(seg_on_grid(out, ct, names), labels.array)
    assert not staged.parent.exists()  # the work folder is gone
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "series").iterdir()} == before  # sources untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]


def test_a_volume_not_from_dicom_gets_one_clear_message(mrml_scene, tmp_path):
    volume, database, ct, labels = dicom_volume(tmp_path / "series")
    logic = CTFMSegmentLogic()
    segmentation = logic.segmentationNodeFromLabels(labels, load_labels({3: "liver"}) + load_labels({1: "a", 2: "b",
                                                    4: "c", 5: "d", 6: "e", 7: "f", 8: "g"}), volume, show3D=False)
    assert logic.exportProblem(segmentation, volume) == ""
    assert logic.exportProblem(segmentation, None) and logic.exportProblem(None, volume)
    out = tmp_path / "seg.dcm"
    volume.RemoveAttribute("DICOM.instanceUIDs")
    with pytest.raises(ValueError, match=NOT_FROM_DICOM) as refused:
        logic.startDicomSegExport(segmentation, volume, out, database=database)
    assert "\n" not in str(refused.value)
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")  # a slice the database does not hold
    with pytest.raises(ValueError, match=NOT_FROM_DICOM):
        logic.startDicomSegExport(segmentation, volume, out, database=database)
    assert not out.exists()
