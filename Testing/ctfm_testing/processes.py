"""Child processes in tests: their environment and a free local port for torchrun's rendezvous."""

import os
import socket


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctfm_pythonpath() -> str:
    """PYTHONPATH for a child that runs ``-m CTFMLib.cli`` from this checkout."""
    from .plugin import ROOT

    return os.pathsep.join([str(ROOT / "CTFM"), os.environ.get("PYTHONPATH", "")])


def two_node_launch(*args, nodes: int = 2, env=None) -> list:
    """Start ``nodes`` torchrun launchers on this machine, each one "node" of one process, that meet through a
    c10d rendezvous on 127.0.0.1 (as ``torchrun --nnodes N --rdzv-backend c10d`` does across real machines) and
    run ``python -m CTFMLib.cli *args``; returns the ``subprocess.Popen`` of each launcher (stdout/stderr piped,
    text). The caller waits for them (``communicate``) or kills one (:func:`kill_node`)."""
    import subprocess
    import sys
    import uuid

    env = {**child_env(), "PYTHONPATH": ctfm_pythonpath(), **(env or {})}
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex[:12]
    launchers = []
    for _ in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
               "--max-restarts", "0", "-m", "CTFMLib.cli", *map(str, args)]
        launchers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          start_new_session=True))
    return launchers


def kill_node(launcher) -> None:
    """SIGKILL a torchrun launcher and its workers, as a machine that loses power (torchrun starts each worker in
    a session of its own, so killing the launcher's group alone leaves them running); waits for the launcher."""
    import signal

    import psutil

    try:
        family = [launcher.pid] + [c.pid for c in psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [launcher.pid]
    for pid in family:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    launcher.communicate(timeout=60)
