"""Small training configurations the tests share."""

import json
from pathlib import Path


def tiny_pretraining(tmp_path) -> Path:
    """A configuration that pretrains a small encoder for a few steps on two phantom CTs."""
    from ctfm_testing.phantoms import body_phantom
    from CTFMLib.image import write_image

    data = tmp_path / "scans"
    data.mkdir()
    for seed in (1, 2):  # 60 slices of 2 mm: passes the upstream filters (CT, 1-5 mm, > 50 slices)
        write_image(body_phantom(shape=(48, 48, 60), spacing=(2.0, 2.0, 2.0), seed=seed), data / f"ct{seed}.nii.gz")
    config = {
        "data": {"source": [str(data)], "workers": 0},
        "model": {"init_filters": 4, "blocks_down": [1, 1, 1]},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4},
        "run": {"seed": 0, "device": "cpu", "checkpoint_every": 2, "log_every": 1, "scans_per_step": 2},
        "pretrain": {"crops_per_scan": 3, "crop_size": [8, 16, 16], "projection": [16, 16, 8]},
    }
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(config))
    return path
