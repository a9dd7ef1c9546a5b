"""The CT-FM tests' pytest plugin: an isolated model store and costs file for the session, the shared fixtures
(private caches, tiny checkpoints, the real CT) and ``run_ctfm``. Testing/conftest.py loads it; test files import
its helpers from here (``from ctfm_testing.plugin import run_ctfm``), never from conftest."""

import contextlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest_plugins = ["ctfm_testing.postgres"]  # postgres_server / postgres_url (skipped where pgserver is missing)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Parallel workers (pytest -n N): each its own temporary folder, for itself and its children, so that a test that
# looks for what it left in the temporary folder never sees another worker's files.
_WORKER_TMP = None
if os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKER_TMP = tempfile.mkdtemp(prefix=f"ctfm-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ["TMPDIR"] = _WORKER_TMP
    tempfile.tempdir = None  # TMPDIR is read again
# Tests never reach the Hugging Face hub: it is unreachable here and must not be needed anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tests never read or write the user's model store: the session gets its own (the `ctfm_cache` fixture gives a
# test a private one). A test that wants the user's published weights looks inside `user_model_store()`.
_USER_CTFM_CACHE = os.environ.get("CTFM_CACHE")
_SESSION_STORE = tempfile.mkdtemp(prefix="ctfm-test-store-")
os.environ["CTFM_CACHE"] = _SESSION_STORE


def _session_costs(path: str) -> None:
    """This computer's speed as the generic figures, for every thread count: commands print estimates without
    first measuring the published encoder (seconds each, in every test with a private cache). Testing/core/test_costs.py
    measures with files of its own."""
    from CTFMLib.costs import GENERIC, Costs

    costs = Costs(path)
    for threads in range(1, (os.cpu_count() or 1) + 1):
        for precision in ("fp32", "bf16"):
            for kind, value in GENERIC.items():
                costs.put(Costs.key("cpu", precision, threads), kind, value * 2 / threads)


_handle, _SESSION_COSTS = tempfile.mkstemp(prefix="ctfm-test-", suffix="-costs.json")
os.close(_handle)
os.environ["CTFM_COSTS_FILE"] = _SESSION_COSTS
_session_costs(_SESSION_COSTS)


@contextmanager
def user_model_store():
    """While active, CTFM_CACHE is what the user had set (or unset): their imported and downloaded models."""
    session = os.environ.get("CTFM_CACHE")
    if _USER_CTFM_CACHE is None:
        os.environ.pop("CTFM_CACHE", None)
    else:
        os.environ["CTFM_CACHE"] = _USER_CTFM_CACHE
    try:
        yield
    finally:
        os.environ["CTFM_CACHE"] = session


TORCH_THREADS = []  # torch's own choice of intra-op threads in this process, read before any test runs


def pytest_sessionstart(session):
    try:
        import torch
    except ImportError:
        return
    TORCH_THREADS.append(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _torch_threads_put_back():
    """``--threads N`` (or ``RunOptions(threads=N)``) in a command run in this process sets torch's thread count
    for the whole process; put it back after the test, so the tests after it run at this machine's speed and not
    on one core."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and TORCH_THREADS and torch.get_num_threads() != TORCH_THREADS[0]:
        torch.set_num_threads(TORCH_THREADS[0])


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_STORE, ignore_errors=True)
    if _WORKER_TMP:
        shutil.rmtree(_WORKER_TMP, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(_SESSION_COSTS)


@pytest.fixture
def ctfm_cache(tmp_path, monkeypatch):
    """An empty, private CTFM cache (imported models and Hugging Face downloads)."""
    root = tmp_path / "ctfm-cache"
    monkeypatch.setenv("CTFM_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture(scope="session")
def example_ct_path():
    from ctfm_testing.data import require_shared_data

    return require_shared_data() / "totalsegmentator_example" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def tiny_encoder_folder(tmp_path_factory):
    """A small SegResEncoder written by MONAI in the published layout (config.json + model.safetensors)."""
    from ctfm_testing.checkpoints import write_monai_encoder

    return write_monai_encoder(tmp_path_factory.mktemp("tiny-encoder"), init_filters=4, blocks_down=(1, 1, 1, 1))


@pytest.fixture(scope="session")
def ctfm_weights_folder(tmp_path_factory):
    """The full-size CT-FM encoder (random weights) written by MONAI in the published layout."""
    from ctfm_testing.checkpoints import write_monai_encoder

    return write_monai_encoder(tmp_path_factory.mktemp("ctfm-encoder"), seed=11)


def run_ctfm(*args, env=None, timeout=600):
    """Run the ``ctfm`` command line in a child process, as a user would."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "CTFMLib.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
