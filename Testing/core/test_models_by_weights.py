"""Issue 17, defect 2: a published model is known by its weights, not by how it was referenced.

A whole-body model passed as a folder in the published layout (config.json + model.safetensors, no
labels.json: what Hugging Face serves) gave segments label_1..label_117 tagged as generic tissue, where the
same weights under the catalogue id gave liver, SNOMED codes and colours; ``--structures liver`` failed and
nothing said why. Now a folder, file or import whose weights match a catalogue entry (its published sha256,
or, where none is published, its network and output count) gets that entry's labels, terminology and
spacing, and says which entry it matched; an unmatched 118-output model gets the TotalSegmentator v2 labels
with a note saying so, and any other unlabelled model says its names are unknown and how to add them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from ctfm_testing.hostile import ctfm, small_ct
from ctfm_testing.plugin import ROOT, run_ctfm

TINY = {"in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 1]}


def _segmenter(folder, out_channels: int, init_filters: int = 4, blocks_down=(1, 1, 1), seed: int = 0) -> Path:
    """A SegResNetDS written by MONAI in the published layout, without labels.json."""
    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    model = monai_segresnet(out_channels=out_channels, init_filters=init_filters, blocks_down=blocks_down,
                            dsdepth=1, seed=seed)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "init_filters": init_filters,
              "blocks_down": list(blocks_down), "dsdepth": 1}
    return write_published_layout(model, folder, config)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _notes(record) -> list:
    from CTFMLib.catalog import ModelNote

    return [str(w.message) for w in record if issubclass(w.category, ModelNote)]


@pytest.fixture(scope="module")
def whole_body_folder(tmp_path_factory):
    """The published whole-body network's shape (CT-FM encoder, 118 outputs; random weights), as Hugging Face
    serves it: config.json + model.safetensors, no labels.json."""
    return _segmenter(tmp_path_factory.mktemp("wb") / "whole_body_copy", 118, init_filters=32,
                      blocks_down=(1, 2, 2, 4, 4))


@pytest.mark.slow
def test_a_whole_body_shaped_folder_gets_the_whole_body_labels_spacing_and_says_so(whole_body_folder, ctfm_cache,
                                                                                  tmp_path):
    """The issue's case, as the user ran it: `--structures liver` on the folder failed (label_1..label_117)."""
    ct = small_ct(tmp_path / "ct.nii.gz")
    run = run_ctfm("segment", ct, "--model", whole_body_folder, "--structures", "liver", "--plan", "--json",
                   env={"CTFM_CACHE": str(ctfm_cache)})
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout.splitlines()[-1])
    catalogue = json.loads((ROOT / "Resources" / "Models.json").read_text())
    published = [m for m in catalogue["models"] if m["id"] == "whole_body_segmentation"][0]
    assert plan["working"]["model_spacing_mm"] == published["spacing"]  # the model's spacing, not the input's
    notes = [ln for ln in run.stderr.splitlines() if ln.startswith("ctfm: note:")]
    assert len(notes) == 1 and "whole_body_segmentation" in notes[0] and "no published checksum" in notes[0], run.stderr


def test_the_matched_folder_has_the_catalogue_models_names_codes_and_colours(whole_body_folder):
    from CTFMLib.labels import parse_terminology
    from CTFMLib.segment import load_segmentation_model, select_structures

    catalogue = json.loads((ROOT / "Resources" / "Models.json").read_text())
    published = [m for m in catalogue["models"] if m["id"] == "whole_body_segmentation"][0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, labels = load_segmentation_model(whole_body_folder)
    assert {str(x.value): x.name for x in labels} == {k: v for k, v in published["labels"].items() if k != "0"}
    liver = select_structures(labels, ["liver"])[0]
    assert parse_terminology(liver.terminology)["type"] == ("SCT", "10200004", "Liver")  # SNOMED CT "Liver"
    assert liver.display_name == "Liver" and liver.color != (0.5, 0.5, 0.5)
    assert model.ctfm_spacing == tuple(published["spacing"])
    assert any("whole_body_segmentation" in n for n in _notes(record)), _notes(record)


def _catalogue(tmp_path, entries) -> Path:
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"version": 1, "models": entries}))
    return path


def _entry(model_id, sha256=None, labels=None, network=None, spacing=(2.0, 2.0, 2.0)) -> dict:
    return {"id": model_id, "title": model_id, "task": "segmentation", "repo_id": f"someone/{model_id}",
            "revision": "main", "architecture": "SegResNetDS",
            "files": [{"name": "config.json", "sha256": None, "size": None},
                      {"name": "model.safetensors", "sha256": sha256, "size": None}],
            "labels": labels or {"0": "background", "1": "liver", "2": "spleen"},
            "network": network or TINY, "spacing": list(spacing)}


def test_a_published_checksum_is_preferred_to_the_network(tmp_path, monkeypatch, ctfm_cache):
    """The weights with an entry's published sha256 match it, wherever they lie; other weights of the very same
    network do not match that entry (its checksum says they are other weights), only an entry without one."""
    from CTFMLib.segment import load_segmentation_model
    from CTFMLib.weights import load_model

    mine = _segmenter(tmp_path / "mine", 3, seed=1)
    other = _segmenter(tmp_path / "other", 3, seed=2)
    assert _sha256(mine / "model.safetensors") != _sha256(other / "model.safetensors")
    monkeypatch.setenv("CTFM_CATALOG", str(_catalogue(tmp_path, [
        _entry("hashed", sha256=_sha256(mine / "model.safetensors"), spacing=(2.0, 2.5, 3.0))])))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, info = load_model(mine)
        seg, labels = load_segmentation_model(mine)
    assert info.entry is not None and info.entry.id == "hashed"
    assert info.sha256 == _sha256(mine / "model.safetensors")
    assert [x.name for x in labels] == ["liver", "spleen"] and seg.ctfm_spacing == (2.0, 2.5, 3.0)
    assert any("hashed" in n and "sha256" in n for n in _notes(record)), _notes(record)
    # the same network, other weights: not the hashed entry's (names unknown, and said so)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, info = load_model(other)
        seg, labels = load_segmentation_model(other)
    assert info.entry is None and seg.ctfm_spacing is None
    assert [x.name for x in labels] == ["label_1", "label_2"]
    assert any("unknown" in n and "labels.json" in n for n in _notes(record)), _notes(record)
    # an entry that publishes no checksum is matched by its network and output count
    monkeypatch.setenv("CTFM_CATALOG", str(_catalogue(tmp_path, [_entry("unhashed")])))
    model, info = load_model(other)
    assert info.entry is not None and info.entry.id == "unhashed"
    # ... but not by a network of another output count
    monkeypatch.setenv("CTFM_CATALOG", str(_catalogue(tmp_path, [_entry("unhashed", labels={"0": "bg", "1": "liver"})])))
    assert load_model(other)[1].entry is None


def test_an_import_under_its_own_name_is_known_by_its_weights_and_the_import_says_so(tmp_path, monkeypatch,
                                                                                    ctfm_cache):
    mine = _segmenter(tmp_path / "mine", 3, seed=1)
    monkeypatch.setenv("CTFM_CATALOG", str(_catalogue(tmp_path, [
        _entry("hashed", sha256=_sha256(mine / "model.safetensors"))])))
    result = ctfm("models", "import", mine, "--id", "local-copy")
    assert result.returncode == 0, result
    assert any(ln.startswith("note:") and "hashed" in ln for ln in result.stdout.splitlines()), result
    ct = small_ct(tmp_path / "ct.nii.gz")
    run = ctfm("segment", ct, "--model", "local-copy", "--structures", "spleen", "--plan", "--json")
    assert run.returncode == 0, run
    assert json.loads(run.stdout.splitlines()[-1])["working"]["model_spacing_mm"] == [2.0, 2.0, 2.0]


def test_an_unmatched_118_output_model_gets_the_totalsegmentator_labels_with_a_note(tmp_path, ctfm_cache):
    """118 outputs, not the CT-FM network (so no catalogue match): the whole-body structures, and the note says
    they were assumed and how to name them otherwise."""
    from CTFMLib.labels import whole_body_labels
    from CTFMLib.segment import load_segmentation_model

    folder = _segmenter(tmp_path / "small-wb", 118)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, labels = load_segmentation_model(folder)
    assert labels == whole_body_labels()
    notes = _notes(record)
    assert len(notes) == 1 and "TotalSegmentator" in notes[0] and "labels.json" in notes[0], notes
    assert model.ctfm_spacing is None  # no catalogue match: no spacing is claimed for it


@pytest.mark.slow
def test_other_unlabelled_models_say_their_names_are_unknown_on_the_command_line(tmp_path, ctfm_cache):
    folder = _segmenter(tmp_path / "five", 5)
    ct = small_ct(tmp_path / "ct.nii.gz")
    run = run_ctfm("segment", ct, "--model", folder, "--plan", env={"CTFM_CACHE": str(ctfm_cache)})
    assert run.returncode == 0, run.stderr
    notes = [ln for ln in run.stderr.splitlines() if ln.startswith("ctfm: note:")]
    assert len(notes) == 1 and "unknown" in notes[0] and "labels.json" in notes[0], run.stderr
    assert "label_4" in notes[0]


def test_the_torch_free_constants_agree_with_the_code_that_uses_them():
    from CTFMLib import catalog, labels, networks, segment

    assert catalog.ALIASES == segment.MODEL_ALIASES
    assert catalog.CTFM_NETWORK == {k: networks.CTFM_ENCODER_CONFIG[k] for k in catalog.CTFM_NETWORK}
    assert labels.WHOLE_BODY_OUTPUTS == len(labels.whole_body_labels()) + 1
    entry = catalog.load_catalog(ROOT / "Resources" / "Models.json").find("whole-body")
    assert entry.id == "whole_body_segmentation" and entry.output_count == labels.WHOLE_BODY_OUTPUTS
