"""The CT-FM networks match MONAI's, tensor for tensor and output for output."""

import json

import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder as MonaiEncoder
from monai.networks.nets.segresnet_ds import SegResNetDS as MonaiSegResNetDS

from ctfm_testing.checkpoints import monai_encoder, monai_segresnet
from CTFMLib.networks import SegResEncoder, SegResNetDS, build_encoder, build_network


def shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_ctfm_encoder_has_published_size_and_monai_keys():
    ours = build_encoder()
    ref = MonaiEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4))
    assert sum(p.numel() for p in ours.parameters()) == 77_760_992
    assert shapes(ours) == shapes(ref)
    assert ours.out_channels == 512


def test_whole_body_segresnet_has_monai_keys():
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
              "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
    ours = build_network(config)
    ref = MonaiSegResNetDS(**{**config, "blocks_down": tuple(config["blocks_down"])})
    assert isinstance(ours, SegResNetDS)
    assert shapes(ours) == shapes(ref)


def test_encoder_outputs_equal_monai_on_odd_sized_input():
    ref = monai_encoder(init_filters=8, blocks_down=(1, 2, 2, 4, 4), seed=1)
    ours = SegResEncoder(init_filters=8, blocks_down=(1, 2, 2, 4, 4)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 19, 33, 26)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert len(a) == len(b) == 5
    for fa, fb in zip(a, b):
        assert fa.shape == fb.shape
        torch.testing.assert_close(fa, fb, rtol=0, atol=1e-6)
    emb = ours.embed(x)
    torch.testing.assert_close(emb, torch.nn.functional.adaptive_avg_pool3d(b[-1], 1).flatten(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_segresnet_outputs_equal_monai(training):
    ref = monai_segresnet(out_channels=5, init_filters=8, dsdepth=3, seed=2)
    ours = SegResNetDS(init_filters=8, out_channels=5, blocks_down=(1, 2, 2, 4, 4), dsdepth=3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.train(training)
    ref.train(training)
    x = torch.randn(1, 1, 32, 48, 16)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    if training:
        assert isinstance(a, list) and len(a) == len(b) == 3
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb, rtol=0, atol=1e-5)
    else:
        assert a.shape == (1, 5, 32, 48, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_segresnet_refuses_indivisible_input():
    model = SegResNetDS(init_filters=4, out_channels=2, blocks_down=(1, 1, 1)).eval()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 8, 8, 6))


def test_config_json_builds_the_right_network():
    enc = build_network(json.loads('{"blocks_down": [1,2,2,4,4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}'))
    assert isinstance(enc, SegResEncoder)
    seg = build_network({"spatial_dims": 3, "in_channels": 1, "out_channels": 7, "init_filters": 8,
                         "blocks_down": [1, 1, 1], "dsdepth": 2})
    assert isinstance(seg, SegResNetDS) and seg.out_channels == 7


@pytest.mark.parametrize("bad", [{"norm": "instance"}, {"act": "prelu"}, {"spatial_dims": 2}, {"resolution": [1, 1, 3]},
                                 {"mystery_option": 1}])
def test_unsupported_options_are_refused_not_ignored(bad):
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 4, "blocks_down": [1, 1], **bad}
    with pytest.raises(ValueError):
        build_network(config)


def test_a_triage_model_is_built_and_checked_like_every_network():
    """networks knows the classifier `ctfm train classify` exports: its config is checked before anything is built
    (encoder settings, head sizes against the encoder's output), and build_network gives the module tree the
    export wrote, so an exported folder's tensors keep their names (encoder.*, head.*)."""
    from CTFMLib.networks import TriageModel, build_network, validate_config

    encoder = {"architecture": "SegResEncoder", "init_filters": 4, "blocks_down": [1, 1, 1], "_note": "ignored"}
    linear = {"architecture": "TriageModel", "encoder": encoder, "head": [16, 1], "threshold": 0.4}
    assert validate_config(linear) == "TriageModel"
    model = build_network(linear)
    assert isinstance(model, TriageModel) and isinstance(model.head, torch.nn.Linear)
    trained = TriageModel(build_network({k: v for k, v in encoder.items() if k != "_note"}), hidden=0)
    assert list(model.state_dict()) == list(trained.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head"}
    hidden = build_network({**linear, "head": [16, 8, 1]})
    assert tuple(hidden.head[0].weight.shape) == (8, 16)
    for bad, words in (({**linear, "head": [32, 1]}, "C = 16"), ({**linear, "head": [16, 0, 1]}, "hidden 1..65536"),
                       ({**linear, "encoder": {**encoder, "init_filters": 0}}, "encoder does not describe"),
                       ({**linear, "encoder": {"init_filters": 4, "blocks_down": [1, 1], "out_channels": 3}}, "not a SegResEncoder"),
                       ({"architecture": "TriageModel"}, "needs an encoder")):
        with pytest.raises(ValueError, match=words):
            validate_config(bad)
