"""Checkpoints in the published CT-FM layout, written by MONAI itself (the reference implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm non-trivial statistics, so outputs are not near zero and all tensors matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def monai_encoder(init_filters=32, blocks_down=(1, 2, 2, 4, 4), seed=0):
    from monai.networks.nets.segresnet_ds import SegResEncoder

    torch.manual_seed(seed)
    model = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=init_filters, blocks_down=tuple(blocks_down))
    return randomize_batchnorm(model, seed).eval()


def monai_segresnet(out_channels=3, init_filters=8, blocks_down=(1, 2, 2, 4, 4), dsdepth=4, seed=0):
    from monai.networks.nets.segresnet_ds import SegResNetDS

    torch.manual_seed(seed)
    model = SegResNetDS(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=init_filters,
                        blocks_down=tuple(blocks_down), dsdepth=dsdepth)
    return randomize_batchnorm(model, seed).eval()


def write_published_layout(model: torch.nn.Module, folder, config: dict) -> Path:
    """``config.json`` + ``model.safetensors`` exactly as huggingface_hub's PyTorchModelHubMixin writes them."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2))
    save_model(model, str(folder / "model.safetensors"))
    return folder


def write_monai_encoder(folder, init_filters=32, blocks_down=(1, 2, 2, 4, 4), seed=0) -> Path:
    model = monai_encoder(init_filters, blocks_down, seed)
    config = {"spatial_dims": 3, "in_channels": 1, "init_filters": init_filters, "blocks_down": list(blocks_down)}
    return write_published_layout(model, folder, config)


def write_hf_cache(cache_dir, repo_id: str, files: dict, revision: str = "main", commit: str = "0" * 40) -> Path:
    """Lay out a Hugging Face hub cache entry (``models--owner--name``) holding ``files`` (name -> source path).

    The layout is the hub's documented cache format, so huggingface_hub finds
    the files offline as if it had downloaded them.
    """
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap
