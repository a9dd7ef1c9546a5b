"""StreamedFeatures: the slab-by-slab, in-place decoder features equal the module-by-module forward."""

import pytest
import torch
from torch import nn

from CTFMLib.networks import SegResEncoder, SegResNetDS
from CTFMLib.streaming import StreamedFeatures


def trained_looking(seed=0, **config):
    """A SegResNetDS in eval mode whose batch norms have non-trivial statistics and affine parameters
    (fresh ones are the identity, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    net = SegResNetDS(**{"init_filters": 4, "out_channels": 3, "blocks_down": (1, 2, 2), "dsdepth": 2, **config})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def reference_features(net, x):
    """The network's own forward with its last head taken out: the map the head is applied to."""
    head = net.up_layers[-1]["head"]
    net.up_layers[-1]["head"] = nn.Identity()
    try:
        with torch.inference_mode():
            return net(x)
    finally:
        net.up_layers[-1]["head"] = head


@pytest.mark.slow
@pytest.mark.parametrize("slab_bytes", [1, 3000, None, 1 << 30])  # 4-row slabs ... one slab per level
@pytest.mark.parametrize("shape", [(24, 16, 32), (32, 8, 8)])
def test_features_equal_the_module_forward(slab_bytes, shape):
    net = trained_looking()
    x = torch.rand((2, 1) + shape)
    ref = reference_features(net, x)
    with torch.inference_mode():
        ours = StreamedFeatures(net, slab_bytes=slab_bytes)(x)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.slow
def test_deeper_decoder_blocks_and_a_channels_last_net_share_its_weights():
    net = trained_looking(seed=1, blocks_down=(1, 1, 2, 2), blocks_up=(2, 1, 2))
    net = net.to(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 1, 16, 24, 40).contiguous(memory_format=torch.channels_last_3d)
    ref = reference_features(net, x)
    streamed = StreamedFeatures(net, slab_bytes=1)
    with torch.inference_mode():
        ours = streamed(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # float32 weights already channels-last are the network's own tensors, not copies
    assert streamed.up_blocks[0][0].w2.data_ptr() == net.up_layers[0]["blocks"][0].conv2.weight.data_ptr()
    assert streamed.w_down0.data_ptr() == net.encoder.layers[0]["downsample"].weight.data_ptr()


@pytest.mark.slow
def test_repeated_calls_and_a_new_window_size_reuse_or_remake_the_level_buffers():
    net = trained_looking()
    streamed = StreamedFeatures(net, slab_bytes=1)
    a, b = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 8, 24, 16)
    with torch.inference_mode():
        first = streamed(a).clone()
        again = streamed(a)
        assert torch.equal(first, again)
        other = streamed(b)
    torch.testing.assert_close(other, reference_features(net, b), rtol=1e-5, atol=1e-6)
    assert len(streamed._levels) == 3  # one buffer per level, the 16^3 ones dropped


def test_bfloat16_features_are_close_to_float32():
    net = trained_looking()
    x = torch.rand(1, 1, 16, 32, 32)
    ref = reference_features(net, x)
    with torch.inference_mode():
        ours = StreamedFeatures(net, torch.bfloat16)(x)
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - ref).abs().max().item()
    assert 0 < error < 0.03 * ref.abs().max().item()


def test_bad_inputs_are_refused():
    net = trained_looking()
    streamed = StreamedFeatures(net)
    with pytest.raises(ValueError, match="divisible by 4"):
        streamed(torch.rand(1, 1, 10, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        streamed(torch.rand(1, 16, 16, 16))
    with pytest.raises(TypeError, match="SegResNetDS"):
        StreamedFeatures(SegResEncoder(init_filters=4))
