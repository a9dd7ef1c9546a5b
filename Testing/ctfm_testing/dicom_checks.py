"""DICOM checks the SEG, SR and Parametric Map tests share: the real series, the awkward synthetic geometries,
a SEG read back onto a grid by its affines alone, and dciodvfy (Debian dicom3tools) where it is installed."""

import shutil
import subprocess

import numpy as np
import pytest

from ctfm_testing.phantoms import rotation_matrix
from CTFMLib.image import Image

REAL_SERIES = ("totalsegmentator_example", "example_ct_dicom")
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

GEOMETRIES = {
    # The column direction (second ImageOrientationPatient vector) is (0, -1, 0): anterior, not posterior.
    "negated_columns": np.diag([1.0, -1.0, -1.0]),
    "oblique": rotation_matrix("z", 20) @ rotation_matrix("x", 20),
}


def seg_on_grid(path, grid: Image, values_by_name: dict) -> np.ndarray:
    """The SEG at ``path`` as label values on ``grid``: highdicom's volume, its segment numbers mapped to label
    values by segment label, placed by the affines (highdicom's index -> LPS, then LPS -> the grid's index)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    volume = seg.get_volume(combine_segments=True)
    numbers = seg.get_segment_numbers()
    lut = np.zeros(max(numbers) + 1, dtype=np.int64)
    for n in numbers:
        lut[n] = values_by_name[seg.get_segment_description(n).SegmentLabel]
    m = np.linalg.inv(grid.affine) @ volume.affine
    p = np.rint(m[:3, :3])
    assert np.allclose(m[:3, :3], p, atol=1e-4), f"the SEG's voxel axes are not the grid's axes:\n{m}"
    assert np.allclose(np.abs(p).sum(axis=0), 1) and np.allclose(np.abs(p).sum(axis=1), 1), m
    t = m[:3, 3]
    assert np.allclose(t, np.rint(t), atol=1e-3), f"the SEG's voxel centres are off the grid's by {t - np.rint(t)}"
    t = np.rint(t).astype(int)
    array = volume.array
    source_axis = [int(np.flatnonzero(p[a])[0]) for a in range(3)]
    signs = [int(p[a, source_axis[a]]) for a in range(3)]
    moved = np.transpose(array, source_axis)
    start = []
    for a in range(3):
        if signs[a] < 0:
            moved = np.flip(moved, axis=a)
            start.append(t[a] - (array.shape[source_axis[a]] - 1))
        else:
            start.append(t[a])
    end = [s + n for s, n in zip(start, moved.shape)]
    assert min(start) >= 0 and all(e <= n for e, n in zip(end, grid.shape)), (start, end, grid.shape)
    out = np.zeros(grid.shape, dtype=np.int64)
    out[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = lut[moved]
    return out


def dciodvfy_errors(path, tmp_path) -> list:
    """The ``Error`` lines of dciodvfy for a SEG. dicom3tools releases before 2024 do not know the Label Map
    Segmentation IOD; a LABELMAP SEG is then checked as a Segmentation, and only the four differences that
    IOD defines (LABELMAP type, the background segment 0, no per-frame segment identification) are ignored."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    import pydicom

    ds = pydicom.dcmread(str(path))
    ignored = ()
    if ds.SOPClassUID == LABEL_MAP_SEG_STORAGE and "Information Object Not found" in run_dciodvfy(exe, path):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
        path = tmp_path / "as_segmentation.dcm"
        ds.save_as(str(path))
        ignored = ("Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
                   "SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 "
                   "(from one) with SegmentNumber of 0",
                   "Value is zero for value 1 of attribute <Segment Number>",
                   "Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> Module=<SegmentationMacro>")
    errors = [line for line in run_dciodvfy(exe, path).splitlines() if line.startswith("Error")]
    return [e for e in errors if not any(i in e for i in ignored)]


def run_dciodvfy(exe, path) -> str:
    """dciodvfy's whole report on one file (it writes to stderr)."""
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def write_bias_free_segmenter(folder, labels: dict):
    """A tiny SegResNetDS (5 outputs) in the published layout whose heads have no bias, so the image, not a bias,
    picks the classes: several structures on a body phantom, so a wrong segment number shows. ``labels``:
    ``{"1": name, ...}`` for its labels.json."""
    import json

    import torch
    from torch import nn

    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    net = monai_segresnet(out_channels=5, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=2, seed=2)
    with torch.no_grad():
        for level in net.up_layers:
            if isinstance(level["head"], nn.Conv3d):
                level["head"].bias.zero_()
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 5, "init_filters": 4,
              "blocks_down": [1, 1, 1, 1], "dsdepth": 2}
    folder = write_published_layout(net, folder, config)
    (folder / "labels.json").write_text(json.dumps({"0": "background", **labels}))
    return folder
