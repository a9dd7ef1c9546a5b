"""Weights: strict loading, refusal of unsafe or wrong files, hub cache, import and checksums."""

import json
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctfm_testing.checkpoints import monai_encoder, monai_segresnet, write_hf_cache, write_published_layout
from CTFMLib import model_store
from CTFMLib import weights as W
from CTFMLib.cache import WeightsNotAvailableError
from CTFMLib.catalog import Catalog, ModelEntry
from CTFMLib.networks import SegResEncoder

TINY = {"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 1, 1]}


def tiny_model():
    return SegResEncoder(init_filters=4, blocks_down=(1, 1, 1, 1))


def outputs_equal(a, b):
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x)[-1], b.eval()(x)[-1])


def test_published_layout_written_by_monai_loads_strictly(tiny_encoder_folder):
    model, info = W.load_model(tiny_encoder_folder)
    assert info.architecture == "SegResEncoder"
    ref = monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1))
    assert outputs_equal(model, ref)


def test_single_safetensors_file_loads_with_inferred_config(tiny_encoder_folder):
    model, info = W.load_model(tiny_encoder_folder / "model.safetensors")
    assert info.config["init_filters"] == 4 and info.config["blocks_down"] == [1, 1, 1, 1]
    assert outputs_equal(model, monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1)))


def test_encoder_taken_from_segmentation_weights(tmp_path):
    seg = monai_segresnet(out_channels=3, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=2)
    folder = write_published_layout(seg, tmp_path / "seg", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                            "init_filters": 4, "blocks_down": [1, 1, 1, 1], "dsdepth": 2})
    full, info = W.load_model(folder)
    assert info.architecture == "SegResNetDS"
    enc, info = W.load_model(folder, expect="SegResEncoder")
    assert isinstance(enc, SegResEncoder)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc(x)[-1], seg.encoder(x)[-1])


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    del state["layers.1.blocks.0.conv1.weight"]
    state["layers.0.extra_head.weight"] = torch.zeros(3)
    state["conv_init.weight"] = torch.zeros(5, 1, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(W.WeightsMismatchError) as e:
        W.load_state_dict_strict(tiny_model(), load_file(str(path)), str(path))
    msg = str(e.value)
    assert "layers.1.blocks.0.conv1.weight" in msg and "layers.0.extra_head.weight" in msg
    assert "conv_init.weight" in msg and "(4, 1, 3, 3, 3)" in msg and "(5, 1, 3, 3, 3)" in msg
    assert e.value.missing == ["layers.1.blocks.0.conv1.weight"]


def test_weights_of_another_network_are_refused_not_half_loaded(tmp_path):
    # A checkpoint that matches nothing: a lenient loader would return a random network.
    other = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Linear(2, 2))
    save_file(other.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(W.WeightsMismatchError, match="missing"):
        W.load_model(tmp_path)


def test_nan_weights_are_refused(tmp_path):
    state = tiny_model().state_dict()
    state["conv_init.weight"][0, 0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(W.WeightsError, match="NaN"):
        W.load_model(tmp_path)


class _Exploit:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(str(marker))}, f)
    with pytest.raises(W.WeightsError, match="refused"):
        W.read_state_dict(path)
    assert not marker.exists()
    # torch.save'd archive with the same payload
    path2 = tmp_path / "evil2.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(str(marker))}, str(path2))
    with pytest.raises(W.WeightsError, match="refused"):
        W.load_model(path2)
    assert not marker.exists()


def test_lightning_pretraining_checkpoint_is_remapped(tmp_path):
    ref = monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=3)
    state = {f"model.backbone.{k}": v for k, v in ref.state_dict().items()}
    state["model.head.0.weight"] = torch.zeros(8, 32)  # projection head: not part of the encoder
    ckpt = {"state_dict": state, "epoch": 3, "global_step": 100}
    torch.save(ckpt, str(tmp_path / "last.ckpt"))
    model, info = W.load_model(tmp_path / "last.ckpt")
    assert any("model.backbone." in n for n in info.notes)
    assert outputs_equal(model, ref)


def _catalog(repo_id, sha=None, revision="main"):
    return Catalog([ModelEntry(id="tiny", title="tiny", task="embedding", repo_id=repo_id, revision=revision,
                               files=[{"name": "config.json"}, {"name": "model.safetensors", "sha256": sha}])])


def test_offline_empty_cache_says_how_to_get_weights(ctfm_cache):
    with pytest.raises(WeightsNotAvailableError) as e:
        W.load_model("project-lighter/ct_fm_feature_extractor")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "ctfm models download" in msg and "ctfm models import" in msg


def test_hub_cache_is_used_offline(ctfm_cache, tiny_encoder_folder):
    write_hf_cache(ctfm_cache / "hub", "someone/tiny-ctfm",
                   {n: tiny_encoder_folder / n for n in ("config.json", "model.safetensors")})
    model, info = W.load_model("someone/tiny-ctfm", catalog=_catalog("someone/tiny-ctfm"))
    assert info.path.parent.parent.name == "models--someone--tiny-ctfm"
    assert outputs_equal(model, monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1)))
    # the catalogue id finds the same model
    W.load_model("tiny", catalog=_catalog("someone/tiny-ctfm"))


def test_checksum_is_checked_when_the_catalogue_knows_it(ctfm_cache, tiny_encoder_folder):
    write_hf_cache(ctfm_cache / "hub", "someone/tiny-ctfm",
                   {n: tiny_encoder_folder / n for n in ("config.json", "model.safetensors")})
    good = model_store.sha256_file(tiny_encoder_folder / "model.safetensors")
    _, info = W.load_model("tiny", catalog=_catalog("someone/tiny-ctfm", sha=good))
    assert info.sha256 == good
    with pytest.raises(W.WeightsError, match="checksum mismatch"):
        W.load_model("tiny", catalog=_catalog("someone/tiny-ctfm", sha="0" * 64))


def test_import_folder_and_zip_then_remove(ctfm_cache, tiny_encoder_folder, tmp_path):
    # The catalogue publishes this model's checksum: an import under its id must be those weights.
    cat = _catalog("someone/tiny-ctfm", sha=model_store.sha256_file(tiny_encoder_folder / "model.safetensors"))
    dest = W.import_model(tiny_encoder_folder, repo_id="someone/tiny-ctfm", catalog=cat)
    assert (dest / "model.safetensors").is_file() and dest.parent == ctfm_cache / "models"
    model, info = W.load_model("tiny", catalog=cat)  # found offline without any hub cache
    assert info.path == dest
    assert model_store.remove_model("tiny", catalog=cat) == [str(dest)]
    with pytest.raises(WeightsNotAvailableError):
        W.load_model("tiny", catalog=cat)

    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for n in ("config.json", "model.safetensors"):
            z.write(tiny_encoder_folder / n, f"tiny-ctfm/{n}")
    dest = W.import_model(archive, repo_id="someone/tiny-ctfm", catalog=cat)
    assert W.load_model("tiny", catalog=cat)[1].path == dest


def test_import_refuses_a_corrupt_model_and_keeps_the_previous_one(ctfm_cache, tiny_encoder_folder, tmp_path):
    cat = _catalog("someone/tiny-ctfm", sha=model_store.sha256_file(tiny_encoder_folder / "model.safetensors"))
    dest = W.import_model(tiny_encoder_folder, repo_id="someone/tiny-ctfm", catalog=cat)
    before = (dest / "model.safetensors").read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(TINY))
    (broken / "model.safetensors").write_bytes(before[: len(before) // 2])  # truncated download
    with pytest.raises(W.WeightsError, match="not a valid safetensors"):
        W.import_model(broken, repo_id="someone/tiny-ctfm", catalog=cat)
    assert (dest / "model.safetensors").read_bytes() == before


def test_save_pretrained_round_trip(tmp_path):
    ref = monai_encoder(init_filters=4, blocks_down=(1, 1, 1, 1), seed=5)
    folder = W.save_pretrained(ref, tmp_path / "out", TINY, labels={"0": "background"})
    assert sorted(os.listdir(folder)) == ["config.json", "labels.json", "model.safetensors"]
    model, info = W.load_model(folder)
    assert info.labels == {"0": "background"}
    assert outputs_equal(model, ref)


def test_user_model_without_published_weights_says_how_to_get_one(ctfm_cache, tmp_path):
    seg = monai_segresnet(out_channels=3, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=1)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 4, "blocks_down": [1, 1, 1, 1]}
    folder = write_published_layout(seg, tmp_path / "trained", config)
    cat = Catalog([ModelEntry(id="kits_kidney_tumor", title="KiTS", task="segmentation", source="user",
                              how_to="Train it with CTFMTrain, then import it.")])
    with pytest.raises(WeightsNotAvailableError, match="has no published weights. Train it with CTFMTrain"):
        W.load_model("kits_kidney_tumor", catalog=cat)
    dest = W.import_model(folder, repo_id="kits_kidney_tumor", catalog=cat)
    model, info = W.load_model("kits_kidney_tumor", catalog=cat)
    assert info.path == dest and info.architecture == "SegResNetDS"
    assert model_store.remove_model("kits_kidney_tumor", catalog=cat) == [str(dest)]
