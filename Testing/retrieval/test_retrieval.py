"""Retrieval: metrics by hand, the patch grid's geometry, query patches, `ctfm index`, and the real-CT Done-when test.

Encoders used here (the published CT-FM weights are not available offline):

- ``Thumbnail``: a fixed, hand-set encoder. The patch average-pooled to 8 x 8 x 8 cells (9 x 16 x 16 mm),
  centred and scaled to unit length, so cosine similarity is the correlation of two coarse copies
  of the patches. It retrieves by appearance, which is what the geometry test needs: a patch of the
  same anatomy, resampled and shifted, is the most similar one, and a wrong centre (a bug in the
  orientation, resampling, crop or origin bookkeeping) puts the best match far from the truth.
  It says nothing about CT-FM's semantic quality; that test skips without the real weights.
- ``MarkerLocator``: per patch, where the 2000 HU phantom marker is relative to the patch centre.
- the CT-FM architecture with random weights (MONAI's, tiny): only for identical-content checks.
"""

import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctfm_testing.checkpoints import monai_encoder
from ctfm_testing.hostile import ctfm  # in this process: these tests are about the index, not the process
from ctfm_testing.phantoms import BODY_LABELS, body_phantom, head_phantom, rotation_matrix
from ctfm_testing.plugin import user_model_store
from CTFMLib.embed import PATCH_SIZE, embed_image, patch_grid, patch_starts
from CTFMLib.image import Image, ImageError, read_image, write_image
from CTFMLib.preprocess import PreprocessConfig, preprocess
from CTFMLib.retrieval import metrics
from CTFMLib.retrieval.embedding import (
    embedding_settings,
    point_patch_start,
    query_vector,
    scan_embeddings,
)
from CTFMLib.runtime import Runner, RunOptions

MARKER = (1500 + 1024) / 3072  # 1500 HU on the model's [0, 1] scale: only the 2000 HU marker is brighter


class Thumbnail(torch.nn.Module):
    """A hand-set encoder: 8 x 8 x 8 cell averages of the patch, centred and unit length (512 values)."""

    def forward(self, x):
        t = F.adaptive_avg_pool3d(x, (8, 8, 8)).flatten(1)
        t = t - t.mean(1, keepdim=True)
        t = t / (t.norm(dim=1, keepdim=True) + 1e-6)
        return [t[:, :, None, None, None]]  # Runner.embed averages the last map's D, H, W: here 1 x 1 x 1


class MarkerLocator(torch.nn.Module):
    """Per patch: (marker voxels, and their centroid minus the patch centre in voxels along S, P, L)."""

    def forward(self, x):
        mask = (x[:, 0] > MARKER).float()
        count = mask.sum(dim=(1, 2, 3))
        out = [count]
        for axis in range(3):
            n = x.shape[2 + axis]
            pos = torch.arange(n, dtype=torch.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            out.append((mask * pos).sum(dim=(1, 2, 3)) / count.clamp(min=1) - (n - 1) / 2)
        return [torch.stack(out, 1)[:, :, None, None, None]]


# --- metrics, by hand ------------------------------------------------------------------------

# Three queries, five ranked results each (1 = same label as the query).
RANKED = [
    [1, 0, 1, 0, 1],  # query A: hits at ranks 1, 3, 5
    [0, 0, 1, 1, 0],  # query B: hits at ranks 3, 4
    [0, 0, 0, 0, 0],  # query C: no hit
]


def test_hit_rate_and_precision_at_k_by_hand():
    # HR@1: only A hits at rank 1 -> 1/3. HR@3: A and B have a hit in their top 3 -> 2/3.
    assert metrics.hit_rate_at_k(RANKED, 1) == pytest.approx(1 / 3)
    assert metrics.hit_rate_at_k(RANKED, 3) == pytest.approx(2 / 3)
    assert metrics.hit_rate_at_k(RANKED, 5) == pytest.approx(2 / 3)
    # P@3: A 2/3, B 1/3, C 0 -> mean 1/3. P@5: A 3/5, B 2/5, C 0 -> mean 1/3. P@1: A 1 -> 1/3.
    assert metrics.precision_at_k(RANKED, 1) == pytest.approx(1 / 3)
    assert metrics.precision_at_k(RANKED, 3) == pytest.approx(1 / 3)
    assert metrics.precision_at_k(RANKED, 5) == pytest.approx(1 / 3)
    # Fewer results than k: P@10 of [1, 0, 1, 0] is 2 hits of the 4 results there are.
    assert metrics.precision_at_k([[1, 0, 1, 0]], 10) == pytest.approx(0.5)


def test_average_precision_and_map_by_hand():
    # AP@3: A: hits at 1 and 3, precisions 1 and 2/3 -> 5/6; B: hit at 3, precision 1/3 -> 1/3; C: 0.
    assert metrics.average_precision_at_k(RANKED, 3) == pytest.approx((5 / 6 + 1 / 3 + 0) / 3)  # 7/18
    # mAP over the whole ranking: A: (1 + 2/3 + 3/5) / 3 = 34/45; B: (1/3 + 2/4) / 2 = 5/12; C: 0.
    assert metrics.mean_average_precision(RANKED) == pytest.approx((34 / 45 + 5 / 12) / 3)  # 211/540
    assert metrics.mean_average_precision(RANKED, k=3) == pytest.approx(7 / 18)
    # AP@1 is HR@1 here: A 1, B 0, C 0.
    assert metrics.average_precision_at_k(RANKED, 1) == pytest.approx(1 / 3)
    # The example in CT-FM's ap_k docstring: ['a'] vs ['a', 'a', 'n', 'a', 'j'] at k=5 is 0.92:
    # hits at 1, 2, 4 -> (1 + 1 + 3/4) / 3 = 0.9167.
    assert metrics.average_precision_at_k([1, 1, 0, 1, 0], 5) == pytest.approx(11 / 12)


def test_relevance_from_labels_and_semantic_distance():
    rel = metrics.relevance(["liver", "spleen"], [["liver", "kidney", "liver"], ["liver", "spleen"]])
    assert rel == [[1, 0, 1], [0, 1]]
    # 3-4-5 and 0-0-12 offsets: distances 5 and 12 mm, mean 8.5 mm.
    assert metrics.semantic_distance([[0, 0, 0], [10, 0, 0]], [[3, 4, 0], [10, 0, 12]]) == pytest.approx(8.5)
    assert metrics.semantic_distance([1, 2, 3], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        metrics.hit_rate_at_k(RANKED, 0)
    with pytest.raises(ValueError, match="0/1"):
        metrics.precision_at_k([[2, 0]], 1)
    with pytest.raises(ValueError, match="2 best matches but 1"):
        metrics.semantic_distance(np.zeros((2, 3)), np.zeros(3))


# --- the patch grid -------------------------------------------------------------------------


def test_grid_starts_by_hand():
    # 300 voxels, patch 128, stride 64: 0, 64, 128 (ends at 256 < 300) then the flush start 300 - 128 = 172.
    assert patch_starts(300, 128, 64) == [0, 64, 128, 172]
    assert patch_starts(300, 128, 128) == [0, 128, 172]  # embed.py's tiling
    assert patch_starts(256, 128, 128) == [0, 128]  # already flush
    assert patch_starts(50, 128, 8) == [0]  # shorter than a patch: one, padded
    starts = patch_grid((40, 300, 256), PATCH_SIZE, stride=(8, 64, 128))
    # S: 0, 8, 16 (16 + 24 = 40 is flush); P: 4 starts as above; L: 0, 128 -> 3 * 4 * 2 patches.
    assert starts.shape == (24, 3) and starts[0].tolist() == [0, 0, 0] and starts[-1].tolist() == [16, 172, 128]
    with pytest.raises(ValueError, match="stride"):
        patch_grid((40, 40, 40), PATCH_SIZE, stride=(0, 8, 8))


@pytest.fixture(scope="module")
def tiny():
    return monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=1)


def test_scan_vector_is_embed_scan_mode_with_the_default_grid(tiny):
    image = body_phantom(shape=(80, 70, 24), spacing=(2.0, 2.0, 5.0))
    scan, patches, centres = scan_embeddings(image, Runner(tiny, RunOptions(device="cpu")))
    pre = preprocess(image, PreprocessConfig(spacing=(3.0, 1.0, 1.0)))
    assert len(patches) == len(patch_grid(pre.array.shape)) > 1 and centres.shape == (len(patches), 3)
    np.testing.assert_allclose(scan, embed_image(image, model=tiny, mode="scan", device="cpu"), atol=1e-6)


@pytest.mark.parametrize("direction", ["oblique", "permuted"])
def test_patch_centres_locate_the_marker_in_lps(direction):
    """Every patch holding the whole marker sees it at (its reported centre + the offset) = the true marker."""
    # Grids wide enough that a patch centred on the marker (70 mm left of the centre) fits inside.
    grids = {"oblique": dict(shape=(150, 100, 40), spacing=(2.0, 2.0, 3.0),
                             direction=rotation_matrix("z", 20) @ rotation_matrix("x", 20)),
             # i toward Posterior, j Inferior, k Right
             "permuted": dict(shape=(80, 40, 140), spacing=(2.0, 3.0, 2.0),
                              direction=np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))}
    image, labels = body_phantom(**grids[direction], body_radius_mm=80, return_labels=True)
    marker = image.index_to_physical(np.argwhere(labels.array == BODY_LABELS["left_marker"])).mean(0)
    runner = Runner(MarkerLocator(), RunOptions(device="cpu", batch_size=8))
    # Air at -1024 HU, so the foreground crop cuts the grid down to the body: its offset must be accounted for.
    cropped = image.with_array(np.where(labels.array == 0, -1024, image.array).astype(image.array.dtype))
    _, found, centres = scan_embeddings(cropped, runner, stride=(8, 32, 32))
    whole = found[:, 0] >= found[:, 0].max() - 0.5
    assert whole.sum() >= 2 and found[:, 0].max() > 100  # several patches hold the entire marker
    # An offset in model voxels is a vector along the model grid's axes (S, P, L at 3, 1, 1 mm; oblique
    # like the image when it is oblique).
    pre = preprocess(cropped, PreprocessConfig(spacing=(3.0, 1.0, 1.0)))
    g = pre.geometry
    assert pre.crop_start != (0, 0, 0)
    if direction == "permuted":  # axis-aligned: (s, p, l) voxels is (+l, +p, +3 s) mm in LPS
        np.testing.assert_allclose(g.direction * g.spacing, [[0, 0, 1], [0, 1, 0], [3, 0, 0]], atol=1e-9)
    seen = centres[whole] + found[whole][:, 1:] @ (g.direction * g.spacing).T
    assert np.abs(seen - marker).max() < 1.5, (seen, marker)
    # A point query centres its patch on the point (within half a model voxel: 1.5 mm S, 0.5 mm P, L), where
    # the patch fits in the scan (here, with air at -1000 HU, the whole grid).
    s, p, l_ = query_vector(image, runner, point_lps=marker)[1:]
    assert abs(s) * 3 <= 2.0 and abs(p) <= 1.0 and abs(l_) <= 1.0


def test_queries_cut_the_index_patches_of_the_same_place(tiny):
    """A point at a grid patch's centre gives that patch's vector; a box over the whole scan gives the scan vector."""
    image = body_phantom(shape=(60, 50, 30), spacing=(4.0, 4.0, 4.0), body_radius_mm=100)
    runner = Runner(tiny, RunOptions(device="cpu", batch_size=4))
    scan, patches, centres = scan_embeddings(image, runner)
    assert len(patches) >= 8
    for i in (0, len(patches) // 2, len(patches) - 1):  # the last one is flush with the far corner
        np.testing.assert_allclose(query_vector(image, runner, point_lps=centres[i]), patches[i], atol=1e-6)
    g = image.geometry
    corners = g.index_to_physical(np.array([[-1, -1, -1], g.shape]))  # a box around the whole scan
    np.testing.assert_allclose(query_vector(image, runner, box_lps=corners), scan, atol=1e-6)
    np.testing.assert_allclose(query_vector(image, runner), scan, atol=1e-6)
    with pytest.raises(ImageError, match="outside the image"):
        query_vector(image, runner, point_lps=[500.0, 0, 0])
    with pytest.raises(ImageError, match="outside the image"):
        query_vector(image, runner, box_lps=[[500.0, 500, 500], [600, 600, 600]])
    with pytest.raises(ValueError, match="not both"):
        query_vector(image, runner, point_lps=centres[0], box_lps=corners)


def test_point_query_near_the_edge_stays_inside_the_scan():
    image = body_phantom(shape=(60, 50, 30), spacing=(4.0, 4.0, 4.0), body_radius_mm=100)
    pre = preprocess(image, PreprocessConfig(spacing=(3.0, 1.0, 1.0)))
    corner = image.index_to_physical([0, 0, 0])
    start = point_patch_start(pre, corner)
    assert np.all(start >= 0) and np.all(start + np.asarray(PATCH_SIZE) <= np.asarray(pre.array.shape))


# --- `ctfm index` --------------------------------------------------------------------------


def _vectors_index(tmp_path, patients=None):
    """Four scans with 2-d scan vectors at 0, 10, 25 and 90 degrees, labelled A, A, B, B."""
    from CTFMLib.retrieval import ScanRecord, VectorIndex

    index = VectorIndex.create(tmp_path / "idx", "hand-made", "0" * 64, 2, embedding_settings())
    names, angles = ["a1", "a2", "b1", "b2"], [0, 10, 25, 90]
    patients = patients or {}
    for name, deg in zip(names, angles):
        v = np.array([np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))], np.float32)
        record = ScanRecord(str((tmp_path / f"{name}.nii.gz").resolve()), patient_id=patients.get(name))
        index.add(record, v, v[None], np.zeros((1, 3)))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[f"{n}.nii.gz", n[0].upper()] for n in names] + [["absent.nii.gz", "A"]])
    return index


def test_eval_leave_one_out_by_hand(tmp_path):
    from CTFMLib.retrieval.metrics import evaluate, read_labels

    with _vectors_index(tmp_path) as index:
        result = evaluate(index, read_labels(tmp_path / "labels.csv"), ks=(1, 3))
    # Cosine ranks by angle. a1 (0): a2 10, b1 25, b2 90 -> [1, 0, 0]. a2 (10): a1 10, b1 15, b2 80 -> [1, 0, 0].
    # b1 (25): a2 15, a1 25, b2 65 -> [0, 0, 1]. b2 (90): b1 65, a2 80, a1 90 -> [1, 0, 0].
    assert result["queries"] == 4 and result["not_indexed"] == [str((tmp_path / "absent.nii.gz").resolve())]
    assert result["HR@1"] == pytest.approx(3 / 4) and result["P@1"] == pytest.approx(3 / 4)
    assert result["HR@3"] == 1.0 and result["P@3"] == pytest.approx(1 / 3)  # one relevant among three, each
    assert result["AP@3"] == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)  # b1's only hit is at rank 3
    assert result["mAP"] == pytest.approx(10 / 12)


def test_eval_with_a_split_and_patient_exclusion(tmp_path):
    from CTFMLib.retrieval.metrics import evaluate, read_labels

    with _vectors_index(tmp_path, patients={"a1": "P1", "a2": "P1"}) as index:
        labels = read_labels(tmp_path / "labels.csv")
        # Queries b1 and a1 only; the database is the other two.
        split = [(p, s, lab, "query" if p.endswith(("b1.nii.gz", "a1.nii.gz")) else "database")
                 for p, s, lab, _ in labels]
        result = evaluate(index, split, ks=(1,))
        # b1 (25) -> a2 15, b2 65 -> [0, 1]: AP 1/2. a1 (0) -> a2 10, b2 90 -> [1, 0]: AP 1.
        assert result["queries"] == 2 and result["mAP"] == pytest.approx(0.75) and result["HR@1"] == 0.5
        # Leaving out the query's patient: a1's database loses a2 (patient P1 too), its only relevant scan:
        # a1 -> b2 -> [0]: AP 0. b1 has no patient id, so nothing is left out for it: AP 1/2 as before.
        result = evaluate(index, split, ks=(1,), exclude_patient=True)
        assert result["mAP"] == pytest.approx((0 + 0.5) / 2)


def _ok_json(out):
    """The JSON a successful ``ctfm`` run printed (its stderr in the failure message otherwise)."""
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_cli_add_query_info_eval_remove_compact(tmp_path, tiny_encoder_folder):
    scans = tmp_path / "scans"
    for i in range(2):
        write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0), seed=i, body_radius_mm=90 + 10 * i),
                    scans / f"body{i}.nii.gz")
        write_image(head_phantom(shape=(40, 40, 12), spacing=(5.0, 5.0, 8.0), seed=i), scans / f"head{i}.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    idx = tmp_path / "idx"
    common = ["--device", "cpu", "--batch-size", "4"]
    out = ctfm("--progress", "none", "index", "add", idx, scans, tmp_path / "missing", "--weights",
                   tiny_encoder_folder, *common)
    assert out.returncode == 1, out.stderr  # two inputs failed; the other four were added
    assert "added 4, already indexed 0, failed 2 of 6" in out.stdout
    assert "FAILED" in out.stderr and "broken.nii.gz" in out.stderr and "missing" in out.stderr
    out = ctfm("--progress", "none", "index", "add", idx, scans / "body0.nii.gz", scans / "head1.nii.gz", *common)
    assert out.returncode == 0 and "added 0, already indexed 2" in out.stdout, out.stderr  # nothing re-embedded

    info = _ok_json(ctfm("index", "info", idx, "--check", "--json"))
    assert info["scans"] == 4 and info["problems"] == [] and info["dim"] == 32

    query = scans / "body1.nii.gz"
    hits = _ok_json(ctfm("--progress", "none", "index", "query", idx, query, "-k", "2", "--json", *common))["hits"]
    assert hits[0]["path"] == str(query.resolve())
    assert hits[0]["similarity"] == pytest.approx(1.0)
    image = read_image(query)
    centre_lps = image.index_to_physical((np.asarray(image.shape) - 1) / 2)
    ras = centre_lps * [-1, -1, 1]
    point = "--point=" + ",".join(map(str, ras))
    hits = _ok_json(ctfm("--progress", "none", "index", "query", idx, query, point, "--ras", "--json",
                             *common))["hits"]
    assert len(hits) == 4  # one place in each of the four scans (--per-scan 1)
    assert all(np.allclose(h["centre_ras"], np.asarray(h["centre_lps"]) * [-1, -1, 1]) for h in hits)
    box = "--box=" + ",".join(map(str, np.concatenate([ras - 20, ras + 20])))
    out = ctfm("--progress", "none", "index", "query", idx, query, box, "--ras", "-k", "1", *common)
    assert out.returncode == 0 and "matching point (RAS mm)" in out.stdout, out.stderr
    assert len(out.stdout.strip().splitlines()) == 2  # the header and one result

    (scans / "labels.csv").write_text("path,label\n" + "".join(f"{n}{i}.nii.gz,{n}\n" for n in ("body", "head")
                                                              for i in range(2)))
    result = _ok_json(ctfm("index", "eval", idx, "--labels", scans / "labels.csv", "-k", "1", "--json"))
    # Even a random encoder's average feature tells a head CT (skull, brain) from an abdomen.
    assert result["queries"] == 4 and result["HR@1"] == 1.0

    assert ctfm("index", "remove", idx, scans / "head0.nii.gz").returncode == 0
    assert ctfm("index", "remove", idx, "99").returncode == 1  # nothing to remove is said, not hidden
    assert _ok_json(ctfm("index", "compact", idx, "--json"))["scan_rows_dropped"] == 1
    assert _ok_json(ctfm("index", "info", idx, "--json"))["scans"] == 3


@pytest.mark.slow
def test_cli_refuses_other_weights_and_bad_arguments(tmp_path, tiny_encoder_folder):
    from ctfm_testing.checkpoints import write_monai_encoder

    scan = tmp_path / "body.nii.gz"
    write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0)), scan)
    idx = tmp_path / "idx"
    assert ctfm("--progress", "none", "index", "add", idx, scan, "--weights", tiny_encoder_folder,
                    "--device", "cpu").returncode == 0
    other = write_monai_encoder(tmp_path / "other", init_filters=4, blocks_down=(1, 1, 1, 1), seed=5)
    scan2 = tmp_path / "body2.nii.gz"
    write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0), seed=2), scan2)
    out = ctfm("--progress", "none", "index", "add", idx, scan2, "--weights", other, "--device", "cpu")
    assert out.returncode == 2 and "error" in out.stderr and "weights" in out.stderr, out.stderr
    out = ctfm("index", "add", idx, scan, "--stride", "12,64,64")
    assert out.returncode == 2 and "stride" in out.stderr
    out = ctfm("index", "query", idx, scan, "--point", "1,2")
    assert out.returncode == 2 and "three numbers" in out.stderr
    out = ctfm("index", "query", tmp_path / "nowhere", scan)
    assert out.returncode == 2 and "not a retrieval index" in out.stderr


@pytest.mark.slow
def test_moved_weights_are_refused_naming_the_weights_option(tmp_path, tiny_encoder_folder):
    """An index remembers where its weights were; when that folder moved, query and add say so and name
    --weights (the same file, checked by its sha256), which then works."""
    import shutil

    scan = tmp_path / "body.nii.gz"
    write_image(body_phantom(shape=(40, 36, 12), spacing=(5.0, 5.0, 8.0)), scan)
    weights = shutil.copytree(tiny_encoder_folder, tmp_path / "weights")
    idx = tmp_path / "idx"
    assert ctfm("--progress", "none", "index", "add", idx, scan, "--weights", weights,
                    "--device", "cpu").returncode == 0
    moved = weights.rename(tmp_path / "moved-weights")
    for command in (["query", idx, scan], ["add", idx, scan]):
        out = ctfm("--progress", "none", "index", *command, "--device", "cpu")
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert str(weights) in out.stderr and "no longer exists" in out.stderr and "--weights PATH" in out.stderr
    out = ctfm("--progress", "none", "index", "query", idx, scan, "--weights", moved, "--device", "cpu")
    assert out.returncode == 0, out.stderr


# --- the real CT: the Done-when test --------------------------------------------------------

STRUCTURES = ("liver", "spleen", "kidney_left", "aorta")
SHIFT = np.array([23.7, -31.2, 48.9])  # mm, moves the copy's whole grid in LPS
# The copy's grid corners (LPS mm, before SHIFT). example_ct spans x -185.0 .. 178.0, y -311.3 .. -11.3,
# z 94.3 .. 427.3: the copy reaches 40 mm beyond it in x and 30 mm anteriorly, and drops z < 300 and y < -302.
COPY_FROM, COPY_TO = (-225.3, -302.2, 300.7), (218.0, 18.5, 427.0)


@pytest.fixture(scope="module")
def real_ct():
    """example_ct and the LPS centres of four structures from example_seg (a 30-slice crop of its grid)."""
    from ctfm_testing.data import require_shared_data

    base = require_shared_data("totalsegmentator_example")
    ct = read_image(base / "example_ct.nii.gz")
    small, seg = read_image(base / "example_ct_sm.nii.gz"), read_image(base / "example_seg.nii.gz")
    # The crop's header repeats example_ct's origin; its voxels are slices k0 .. k0 + 29 of example_ct.
    k0 = next(k for k in range(ct.shape[2] - small.shape[2] + 1)
              if np.array_equal(ct.array[:, :, k:k + small.shape[2]], small.array))
    names = {v: int(k) for k, v in json.loads((base / "total_v2_labels.json").read_text()).items()}
    centres = {s: ct.index_to_physical(np.argwhere(seg.array == names[s]).mean(0) + [0, 0, k0]) for s in STRUCTURES}
    return ct, centres, base


def _resample(image, spacing, lo, hi, direction=np.eye(3)):
    """``image`` resampled (linear, SimpleITK) onto a grid from LPS ``lo`` to ``hi`` with ``direction``."""
    import SimpleITK as sitk

    from CTFMLib.image import from_sitk, to_sitk

    size = [int(np.floor((h - lo_) / s)) + 1 for lo_, h, s in zip(lo, hi, spacing)]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(v) for v in lo])
    f.SetSize(size)
    f.SetOutputDirection([float(v) for v in np.asarray(direction).ravel()])
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(-1024)
    out = from_sitk(f.Execute(sitk.Cast(to_sitk(image), sitk.sitkFloat32)))
    return Image(np.round(out.array).astype(np.int16), out.spacing, out.origin, out.direction)


def _distractors(ct, base):
    mirrored = Image(ct.array[::-1, :, 62:].copy(), ct.spacing, ct.index_to_physical([0, 0, 62]), ct.direction)
    return {
        "mirrored": mirrored,  # the upper abdomen flipped left-right: the liver where the spleen was
        "pelvis": Image(ct.array[:, :, :30].copy(), ct.spacing, ct.origin, ct.direction),  # none of the four
        "other_patient": read_image(base / "example_ct_dicom"),  # a real 20-slice CT of someone else
        "phantom": body_phantom(shape=(180, 130, 30), spacing=(2.0, 2.0, 4.0), body_radius_mm=170),
    }


def _index_of(tmp_path, scans: dict, runner, stride, model_id):
    from CTFMLib.retrieval import ScanRecord, VectorIndex

    index = None
    for name, image in scans.items():
        scan, patches, centres = scan_embeddings(image, runner, stride=stride)
        if index is None:
            index = VectorIndex.create(tmp_path / "idx", model_id, "0" * 64, scan.shape[0], embedding_settings(
                stride=stride))
        index.add(ScanRecord(name), scan, patches, centres)
    return index


@pytest.mark.slow
def test_real_ct_structures_are_found_in_a_resampled_shifted_cropped_copy(real_ct, tmp_path):
    """Done when: each structure's best match in the index lies within 15 mm of its true place in the copy.

    The copy is example_ct resampled to 1.5 mm on an LPS-ordered grid (the original is stored RAS) whose
    voxels are offset from the original's by a fraction of a voxel, cropped (pelvis and posterior air
    removed), padded with -1024 HU beyond the original's field of view left, right and anterior (so the
    foreground crop has work to do: the original's field of view is all foreground) and shifted by
    SHIFT, written to NIfTI and read back. The true place of a point p is p + SHIFT. Stride (2, 12, 12)
    puts grid centres at most (3, 6, 6) mm from any point.
    """
    ct, centres, base = real_ct
    copy = _resample(ct, (1.5, 1.5, 1.5), COPY_FROM, COPY_TO)
    write_image(Image(copy.array, copy.spacing, copy.origin + SHIFT, copy.direction), tmp_path / "copy.nii.gz")
    copy = read_image(tmp_path / "copy.nii.gz")
    runner = Runner(Thumbnail(), RunOptions(device="cpu", batch_size=16))
    stride = (2, 12, 12)
    scans = {"copy": copy, **_distractors(ct, base)}
    distances, best, truth = {}, [], []
    with _index_of(tmp_path, scans, runner, stride, "thumbnail-8x8x8") as index:
        for name, p in centres.items():
            hit = index.search(query_vector(ct, runner, point_lps=p, stride=stride), k=1, level="patch")[0]
            assert hit.path == "copy", (name, hit.path, hit.similarity)
            best.append(hit.centre_lps)
            truth.append(p + SHIFT)
            distances[name] = round(float(np.linalg.norm(best[-1] - truth[-1])), 1)
    print(f"best-match distance (mm): {distances}, mean {metrics.semantic_distance(best, truth):.1f}")
    assert max(distances.values()) <= 15.0, distances


@pytest.mark.slow
def test_real_ct_identical_voxels_give_identical_embeddings_at_the_reported_centres(real_ct, tiny, tmp_path):
    """With the CT-FM architecture (random weights): a copy only shifted, cropped by whole voxels and stored
    in another axis order has the original's voxels, so the patch the index reports near each structure
    must be reproduced exactly by a query of the original at (its reported centre - SHIFT)."""
    ct, centres, base = real_ct
    # Trimmed by whole voxels on the left, posterior and the pelvis. (The other ends stay: SPL resampling
    # starts at the left, posterior and inferior ends, and the far end of a trimmed axis is interpolated
    # towards voxels the copy no longer has.)
    crop = ct.array[:114, :97, 30:]
    origin = ct.index_to_physical([0, 0, 30]) + SHIFT
    # Stored k, j, i (slices first) with the direction's columns permuted alike: the same physical voxels.
    copy = Image(np.ascontiguousarray(crop.transpose(2, 1, 0)), ct.spacing[[2, 1, 0]], origin,
                 ct.direction[:, [2, 1, 0]])
    runner = Runner(tiny, RunOptions(device="cpu", batch_size=4))
    with _index_of(tmp_path, {"copy": copy}, runner, None, "tiny-random") as index:
        _, _, copy_centres = index.vectors(1)
        for name, p in centres.items():
            near = copy_centres[np.argmin(np.linalg.norm(copy_centres - (p + SHIFT), axis=1))]
            hit = index.search(query_vector(ct, runner, point_lps=near - SHIFT), k=1, level="patch")[0]
            assert hit.path == "copy" and hit.similarity > 0.99999, (name, hit.similarity)
            np.testing.assert_allclose(hit.centre_lps, near, atol=1e-6)


def _real_weights():
    source = os.environ.get("CTFM_WEIGHTS")
    if source:
        return source
    from CTFMLib.catalog import load_catalog
    from CTFMLib.model_store import model_status

    entry = load_catalog().find("ct_fm_feature_extractor")
    with user_model_store():
        if entry is not None and model_status(entry) in ("imported", "downloaded"):
            from CTFMLib.model_store import resolve

            return str(resolve(entry.id)[0])  # the folder, usable outside the user's store setting
    pytest.skip("the CT-FM weights are not on this computer: set CTFM_WEIGHTS to them, or "
                "`ctfm models download ct_fm_feature_extractor` (a GPU is advised: thousands of patches)")


def test_real_ct_structures_found_with_ctfm_weights(real_ct, tmp_path):
    """The same Done-when check with the published CT-FM encoder instead of the hand-set one."""
    from CTFMLib.weights import load_model

    source = _real_weights()
    ct, centres, base = real_ct
    model = load_model(source, expect="SegResEncoder")[0]
    runner = Runner(model, RunOptions(device="auto", batch_size=8))
    copy = _resample(ct, (1.5, 1.5, 1.5), COPY_FROM, COPY_TO)
    copy = Image(copy.array, copy.spacing, copy.origin + SHIFT, copy.direction)
    stride = (2, 16, 16)
    with _index_of(tmp_path, {"copy": copy, **_distractors(ct, base)}, runner, stride, str(source)) as index:
        for name, p in centres.items():
            hit = index.search(query_vector(ct, runner, point_lps=p, stride=stride), k=1, level="patch")[0]
            distance = float(np.linalg.norm(hit.centre_lps - (p + SHIFT)))
            assert hit.path == "copy" and distance <= 15.0, (name, hit.path, distance)
