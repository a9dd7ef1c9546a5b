"""Material for the safety tests (``../shared/reviews/adversarial.md``): tiny models, small CTs, sandboxes.

Every test builds its own: the tiny models are written by ``CTFMLib.weights.save_pretrained``
(as the report's were), the CT is a body phantom of about 60 kB, and :class:`Sandbox` hashes
everything around a test's working folder so a test can assert that nothing outside it changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

TINY_LABELS = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right"}


def tiny_encoder(folder, init_filters: int = 4, blocks_down=(1, 1, 1), seed: int = 0) -> Path:
    """A SegResEncoder in the published layout (embedding length ``init_filters * 2 ** (len(blocks_down) - 1)``)."""
    import torch

    from CTFMLib.networks import build_network
    from CTFMLib.weights import save_pretrained

    config = {"spatial_dims": 3, "in_channels": 1, "init_filters": init_filters, "blocks_down": list(blocks_down)}
    torch.manual_seed(seed)
    model = build_network(config)
    _nontrivial_batchnorm(model, seed)
    return save_pretrained(model, folder, config)


def tiny_segmenter(folder, labels=None, init_filters: int = 4, blocks_down=(1, 1, 1), seed: int = 0) -> Path:
    """A SegResNetDS with background + 4 structures (liver, spleen, kidneys) and its labels.json."""
    import torch

    from CTFMLib.networks import build_network
    from CTFMLib.weights import save_pretrained

    labels = dict(labels or TINY_LABELS)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": len(labels) + 1, "init_filters": init_filters,
              "blocks_down": list(blocks_down), "dsdepth": 2}
    torch.manual_seed(seed)
    model = build_network(config)
    _nontrivial_batchnorm(model, seed)
    return save_pretrained(model, folder, config, {"0": "background", **labels})


def tiny_triage(folder) -> Path:
    """An untrained exported triage model (tiny encoder)."""
    from CTFMLib.train.classify import ClassifyTask
    from CTFMLib.train.config import load_config

    config = load_config(None, "classify", {"model": {"init_filters": 4, "blocks_down": [1, 1]},
                                            "classify": {"size": [8, 24, 20], "hidden": 4,
                                                         "spacing": [8.0, 4.0, 4.0]}})
    task = ClassifyTask(config, [(np.zeros((4, 4, 4), np.float32), 0)])
    folder = Path(folder)
    task.export(task.build_model(), folder)
    return folder


def _nontrivial_batchnorm(model, seed: int) -> None:
    from ctfm_testing.checkpoints import randomize_batchnorm

    randomize_batchnorm(model, seed)


def small_ct(path=None, shape=(40, 36, 12), spacing=(6.0, 6.0, 6.0), dtype=np.int16, seed: int = 0):
    """A small abdomen phantom in HU (written to ``path`` when given); returns the Image or the path."""
    from ctfm_testing.phantoms import body_phantom

    image = body_phantom(shape=shape, spacing=spacing, dtype=dtype, seed=seed)
    if path is None:
        return image
    from CTFMLib.image import write_image

    return write_image(image, path)


# --- running the CLI in process ----------------------------------------------------------------


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.returncode, self.stdout, self.stderr = code, out, err

    @property
    def lines(self) -> list:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    def __repr__(self) -> str:
        return f"Result(rc={self.returncode}, stdout={self.stdout[-400:]!r}, stderr={self.stderr[-800:]!r})"


def ctfm(*args, cwd=None) -> Result:
    """Run ``ctfm ARGS`` in this process (stdout/stderr captured); exits become return codes."""
    from CTFMLib.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(["--progress", "none", *map(str, args)])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        os.chdir(old)
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def assert_refused(result: Result, *words: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, and ``words`` (case-insensitive) in that line."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result
    for w in words:
        assert w.lower() in lines[0].lower(), (w, result)
    return lines[0]


# --- sandboxes ------------------------------------------------------------------------------------


def tree_digest(root) -> dict:
    """{relative path: sha256 (files), 'link -> target' (symlinks), 'dir' (folders)} of everything under root."""
    root = Path(root)
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError as e:
                    out[rel] = f"unreadable {e.errno}"
    return out


def leftovers(root) -> list:
    """Temporary files or folders CT-FM might leave under ``root``."""
    root = Path(root)
    markers = (".ctfm-tmp-", ".tmp", ".partial", "ctfm-import-")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if any(m in p.name for m in markers))


@contextmanager
def small_tmpfs(where, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (root only: the test is skipped otherwise, with the reason);
    always unmounted afterwards, also when the test left it read-only."""
    import pytest

    where = Path(where)
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs (full disk, read-only media) needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        import gc

        gc.collect()  # memory maps (index vectors) still referenced by the test's frames
        subprocess.run(["mount", "-o", "remount,rw", str(where)], capture_output=True)
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # detach now, freed when let go


def fill(folder, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free, with one file ``filler``."""
    folder = Path(folder)
    filler = folder / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(folder).free - leave
    with open(filler, "wb") as f:
        try:
            block = b"\0" * (1 << 20)
            while free > 0:
                f.write(block[: min(free, len(block))])
                free -= len(block)
            f.flush()
        except OSError:
            pass
    while shutil.disk_usage(folder).free > leave + 4096:  # tmpfs rounds to pages: top up
        with open(filler, "ab") as f:
            try:
                f.write(b"\0" * 4096)
            except OSError:
                break
    return filler


def python() -> str:
    return sys.executable


def write_json(path, obj) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj))
    return path
