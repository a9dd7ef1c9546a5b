"""``ctfm index reembed``: when the model changes, the same scans embedded with the new weights in a new index.

The re-embedded index must equal an index built from scratch with the new weights from the same
inputs (vectors within 1e-5, patch centres, CSV columns, the patch stride), leave the old index
untouched, refuse to overwrite it, and resume like ``add``.
"""

import hashlib
import json

import numpy as np
import pytest

from ctfm_testing.checkpoints import write_monai_encoder
from ctfm_testing.hostile import ctfm  # in this process: the subject is the index, not the process
from ctfm_testing.phantoms import GEOMETRIES, body_phantom, head_phantom
from CTFMLib.image import write_image
from CTFMLib.retrieval import VectorIndex

COMMON = ["--progress", "none"]
RUN = ["--device", "cpu"]


def by_path(root):
    with VectorIndex.open(root, readonly=True) as index:
        out = {}
        for scan_id, record in index.scans():
            scan, patches, centres = index.vectors(scan_id)
            out[(record.path, record.series_uid)] = (record, scan, patches, centres)
        return out, index.info()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_reembed_equals_a_fresh_index_with_the_new_weights(tmp_path, tiny_encoder_folder):
    scans = tmp_path / "scans"
    paths = [write_image(body_phantom(**GEOMETRIES["oblique20"], seed=1), scans / "a.nii.gz"),
             write_image(head_phantom(**GEOMETRIES["permuted"], seed=2), scans / "b.nrrd"),
             write_image(body_phantom(**GEOMETRIES["spl"], seed=3), scans / "c.nii.gz")]
    listing = scans / "list.csv"
    listing.write_text("path,diagnosis\na.nii.gz,normal\nb.nrrd,bleed\n")
    old, new, fresh = tmp_path / "old", tmp_path / "new", tmp_path / "fresh"
    out = ctfm(*COMMON, "index", "add", old, listing, paths[2], "--weights", tiny_encoder_folder,
                   "--stride", "12,64,64", *RUN)
    assert out.returncode == 0, out.stderr
    other = write_monai_encoder(tmp_path / "other", init_filters=4, blocks_down=(1, 1, 1, 1), seed=9)
    old_db = digest(old / "index.sqlite")

    out = ctfm(*COMMON, "index", "reembed", old, new, "--weights", other, *RUN)
    assert out.returncode == 0, out.stderr
    assert "added 3, already indexed 0, failed 0 of 3" in out.stdout
    assert digest(old / "index.sqlite") == old_db  # the old index is left as it was

    out = ctfm(*COMMON, "index", "add", fresh, listing, paths[2], "--weights", other, "--stride", "12,64,64", *RUN)
    assert out.returncode == 0, out.stderr
    got, got_info = by_path(new)
    want, want_info = by_path(fresh)
    previous, previous_info = by_path(old)
    assert set(got) == set(want) == set(previous) and len(got) == 3
    assert got_info["weights_hash"] == want_info["weights_hash"] != previous_info["weights_hash"]
    assert got_info["preprocessing"]["stride"] == [12, 64, 64]
    for key, (record, scan, patches, centres) in got.items():
        w_record, w_scan, w_patches, w_centres = want[key]
        assert record.metadata["columns"] == w_record.metadata["columns"]
        np.testing.assert_allclose(scan, w_scan, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(patches, w_patches, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(centres, w_centres)
        assert not np.allclose(scan, previous[key][1], atol=1e-3)  # other weights, other vectors
    assert got[(str(paths[1].resolve()), None)][0].metadata["columns"] == {"diagnosis": "bleed"}

    out = ctfm(*COMMON, "index", "reembed", old, new, "--weights", other, *RUN)  # resumes: nothing left
    assert out.returncode == 0 and "added 0, already indexed 3" in out.stdout, out.stderr


@pytest.mark.slow
def test_reembed_refuses_its_own_folder_and_says_how_to_switch_models(tmp_path, tiny_encoder_folder):
    path = write_image(body_phantom(**GEOMETRIES["lps"]), tmp_path / "a.nii.gz")
    idx = tmp_path / "idx"
    assert ctfm(*COMMON, "index", "add", idx, path, "--weights", tiny_encoder_folder, *RUN).returncode == 0
    other = write_monai_encoder(tmp_path / "other", init_filters=4, blocks_down=(1, 1, 1, 1), seed=9)
    out = ctfm(*COMMON, "index", "reembed", idx, idx, "--weights", other, *RUN)
    assert out.returncode != 0 and "new folder" in out.stderr
    second = write_image(head_phantom(**GEOMETRIES["lps"]), tmp_path / "b.nii.gz")
    out = ctfm(*COMMON, "index", "add", idx, second, "--weights", other, *RUN)
    assert out.returncode != 0 and "ctfm index reembed" in out.stderr  # the refusal names the way out
    info = json.loads(ctfm("index", "info", idx, "--json").stdout)
    assert info["scans"] == 1
    with pytest.raises(SystemExit):  # --weights is required: re-embedding is about other weights
        from CTFMLib.cli import build_parser

        build_parser().parse_args(["index", "reembed", str(idx), str(tmp_path / "n")])
