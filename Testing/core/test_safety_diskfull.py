"""A full disk: every writer fails with one line, leaving no final file and no temporary file (report A5, A19, A20).

Each test mounts a small tmpfs (root only; skipped with the reason otherwise), fills it so that a few
tens of kB stay free, and runs the writer in process, as a user would run ``ctfm``.
"""

import zipfile

import pytest

from ctfm_testing.hostile import ctfm, fill, small_ct, small_tmpfs, tiny_encoder, tiny_segmenter, tiny_triage


class SmallDisk:
    def __init__(self, root):
        self.root = root
        self.filler = root / "filler"

    def fill(self, leave_kb: int = 48) -> None:
        """Leave about ``leave_kb`` kB free (less than any output below needs)."""
        fill(self.root, leave_kb * 1024)

    def entries(self) -> list:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p != self.filler)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", "8m") as mount:
        yield SmallDisk(mount)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("material")
    return {"enc": tiny_encoder(root / "enc"), "seg": tiny_segmenter(root / "seg"), "tri": tiny_triage(root / "tri"),
            "ct": small_ct(root / "ct.nii.gz", shape=(96, 96, 48), spacing=(2.0, 2.0, 3.0)), "root": root}


def assert_disk_full(result, disk: SmallDisk, expect_entries=()):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result
    lines = result.lines
    assert len(lines) == 1 and "no space left" in lines[0], result
    assert disk.entries() == sorted(expect_entries), disk.entries()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd", "labels.mha", "labels.seg.nrrd"])
def test_a5_segment_on_a_full_disk_fails_and_leaves_nothing(small_disk, material, name):
    small_disk.fill(leave_kb=0)
    r = ctfm("segment", material["ct"], "--model", material["seg"], "--out", small_disk.root / name)
    assert_disk_full(r, small_disk)


@pytest.mark.slow
def test_a5_saliency_embed_and_triage_on_a_full_disk_fail_and_leave_nothing(small_disk, material):
    small_disk.fill(leave_kb=8)
    r = ctfm("saliency", material["ct"], "--weights", material["enc"], "--target", "embedding", "--method",
             "gradient", "--out", small_disk.root / "heat.nii.gz")
    assert_disk_full(r, small_disk)
    small_disk.fill(leave_kb=0)
    assert_disk_full(ctfm("embed", material["ct"], "--weights", material["enc"], "--out", small_disk.root / "e.npy"),
                     small_disk)
    assert_disk_full(ctfm("triage", material["ct"], "--model", material["tri"], "--json-out",
                          small_disk.root / "t.json"), small_disk)


def test_a5_a_dicom_series_on_a_full_disk_leaves_nothing(small_disk, material):
    from CTFMLib.files import WriteError
    from CTFMLib.image import read_image, write_image

    small_disk.fill(leave_kb=64)
    with pytest.raises(WriteError, match="no space left"):
        write_image(read_image(material["ct"]), small_disk.root / "series")
    assert small_disk.entries() == []


def test_a20_model_import_on_a_full_disk_leaves_nothing(small_disk, material, monkeypatch):
    cache = small_disk.root / "cache"
    monkeypatch.setenv("CTFM_CACHE", str(cache))
    big = tiny_encoder(material["root"] / "bigger", init_filters=16, blocks_down=(1, 2, 2))
    archive = material["root"] / "bigger.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in big.iterdir():
            z.write(f, f"bigger/{f.name}")
    monkeypatch.setenv("TMPDIR", str(small_disk.root))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    small_disk.fill(leave_kb=256)
    for source in (big, archive):
        r = ctfm("models", "import", source, "--id", "site/bigger")
        assert r.returncode == 2 and len(r.lines) == 1 and "Traceback" not in r.stderr, r
        assert "no space left" in r.lines[0], r
        assert [e for e in small_disk.entries() if e not in ("cache", "cache/models")] == [], small_disk.entries()


@pytest.mark.slow
def test_a19_index_add_on_a_full_disk_fails_in_one_line_and_the_index_stays_consistent(small_disk, material):
    from CTFMLib.retrieval.index import VectorIndex

    index = small_disk.root / "index"
    first = ctfm("index", "add", index, material["ct"], "--weights", material["enc"])
    assert first.returncode == 0, first
    other = small_ct(material["root"] / "other.nii.gz", shape=(96, 96, 48), spacing=(2.0, 2.0, 3.0), seed=5)
    small_disk.fill(leave_kb=0)
    r = ctfm("index", "add", index, other, "--weights", material["enc"])
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r
    assert "no space left" in r.stderr.lower() or "disk full" in r.stderr.lower(), r
    assert "cannot rollback" not in r.stderr, r
    small_disk.filler.unlink()
    with VectorIndex.open(index) as ix:
        assert ix.check(deep=True) == [] and len(ix) == 1
    assert not [e for e in small_disk.entries() if ".ctfm-tmp-" in e]


def test_a20_training_on_a_full_disk_stops_in_one_line_without_temporary_files(small_disk, material, tmp_path):
    import json

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        small_ct(scans / f"s{i}.nii.gz", shape=(64, 64, 40), spacing=(3.0, 3.0, 3.0), seed=i)
    config = tmp_path / "pre.json"
    config.write_text(json.dumps({
        "data": {"source": [str(scans)], "workers": 0, "cache_dir": str(tmp_path / "cache")},
        "model": {"init_filters": 4, "blocks_down": [1, 1]},
        "pretrain": {"crop_size": [16, 16, 16], "crops_per_scan": 2, "spacing": [3.0, 3.0, 3.0],
                     "projection": [8, 8, 4]},
        "optim": {"max_steps": 3, "warmup_steps": 0},
        "run": {"checkpoint_every": 1, "device": "cpu"},
    }))
    small_disk.fill(leave_kb=0)
    r = ctfm("train", "pretrain", "--config", config, "--out", small_disk.root / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert "no space left" in r.stderr, r
    assert not [e for e in small_disk.entries() if ".ctfm-tmp-" in e or ".tmp" in e], small_disk.entries()
