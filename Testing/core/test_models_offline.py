"""Issue 17, defect 6: offline without waiting.

The first ``ctfm embed`` on a computer without network waited 25 s on five Hugging Face retries and printed a
multi-line library exception; ``ctfm models download`` offline told the user to run ``ctfm models download``.
Now a command whose model is neither here nor downloadable fails within 2 s in one line that names the
commands that work; the hub is tried once with a short connection (or not at all under ``HF_HUB_OFFLINE``).

The unreachable hub is made so on purpose (``HF_HUB_OFFLINE=1``, or ``HF_ENDPOINT`` at a closed local port),
so these tests mean the same on a computer where huggingface.co is reachable.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from ctfm_testing.hostile import small_ct
from ctfm_testing.plugin import run_ctfm

UNREACHABLE = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # port 9 (discard): nothing listens
OFFLINE_CASES = {"HF_HUB_OFFLINE": {"HF_HUB_OFFLINE": "1"}, "unreachable hub": UNREACHABLE}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _timed(*args, env) -> tuple:
    start = time.monotonic()
    result = run_ctfm(*args, env=env, timeout=120)
    return result, time.monotonic() - start


def _one_line_refusal(result) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stdout == "", result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctfm: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("env", list(OFFLINE_CASES.values()), ids=list(OFFLINE_CASES))
def test_embed_without_its_model_and_without_network_fails_in_under_2_s(ctfm_cache, tmp_path, env):
    ct = small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "e.npy"
    result, seconds = _timed("embed", ct, "--out", out, env={"CTFM_CACHE": str(ctfm_cache), **env})
    line = _one_line_refusal(result)
    assert seconds < 2.0, (seconds, line)
    assert "`ctfm models import FOLDER_OR_ZIP --id ct_fm_feature_extractor" in line
    assert "on a computer with internet, run `ctfm models download ct_fm_feature_extractor`" in line
    assert not out.parent.exists() and not ctfm_cache.exists()  # nothing written, not even the cache folder


@pytest.mark.parametrize("env", list(OFFLINE_CASES.values()), ids=list(OFFLINE_CASES))
def test_models_download_offline_says_it_cannot_and_what_works_here_in_under_2_s(ctfm_cache, env):
    result, seconds = _timed("models", "download", "whole-body", env={"CTFM_CACHE": str(ctfm_cache), **env})
    line = _one_line_refusal(result)
    assert seconds < 2.0, (seconds, line)
    assert line.startswith("ctfm: error: cannot download whole_body_segmentation (")
    # here: an import under the id the command named; elsewhere: the download, then a copy of its cache
    assert "`ctfm models import FOLDER_OR_ZIP --id whole_body_segmentation --force`" in line
    assert "on a computer with internet" in line and "models--project-lighter--whole_body_segmentation" in line
    assert not ctfm_cache.exists()


def test_the_hub_probe_is_a_real_connection_tried_once(monkeypatch):
    """Reachable when something accepts the connection (directly, or through the proxy that is set), else the
    reason; the answer is kept, so a command tries the hub once."""
    from CTFMLib import cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert cache.hub_unreachable() is None
        # a hub that cannot be resolved, through a proxy that answers
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        assert cache.hub_unreachable() is None
        monkeypatch.delenv("HTTPS_PROXY")
    closed = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    start = time.monotonic()
    why = cache.hub_unreachable()
    assert why and f"127.0.0.1:{closed}" in why and time.monotonic() - start < 1.0
    # kept: even a server now listening there is not asked again in this process
    with socket.socket() as server:
        try:
            server.bind(("127.0.0.1", closed))
        except OSError:
            pytest.skip("the port was taken meanwhile")
        server.listen(1)
        assert cache.hub_unreachable() == why
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in cache.hub_unreachable()


def test_the_model_check_loads_no_torch(ctfm_cache, monkeypatch):
    """The availability check runs before PyTorch is imported (which alone takes seconds on a busy machine)."""
    import subprocess

    code = ("import sys\nfrom CTFMLib import cache\ntry:\n    cache.check_available('ct_fm_feature_extractor')\n"
            "except cache.WeightsNotAvailableError as e:\n    print('refused')\nprint('torch' in sys.modules)\n")
    env = {**__import__("os").environ, "CTFM_CACHE": str(ctfm_cache), "HF_HUB_OFFLINE": "1"}
    from ctfm_testing.plugin import ROOT

    env["PYTHONPATH"] = str(ROOT / "CTFM")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["refused", "False"], out
