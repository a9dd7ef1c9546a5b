"""Inference commands under ``torchrun``: several processes, on one machine or several, share one batch.

    torchrun --nnodes 2 --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m CTFMLib.cli segment FOLDER --model ... --out-dir DIR

(the same line on every machine; ``HOST:PORT`` is one of them, reachable from the others; on one machine
``torchrun --nproc_per_node G -m CTFMLib.cli ...`` is enough). What a rank (one process) does:

- **Plan, once.** Rank 0 lists the inputs, leaves out those whose outputs exist and checks the options and
  the model; the list is sent to every rank (:func:`broadcast`). A refusal is printed once, by rank 0.
- **Work, apart.** Rank r of N takes items r, r + N, r + 2N, ... (:func:`share`): the shares are disjoint,
  so each output is written by exactly one rank, on that rank's device (``cuda:LOCAL_RANK`` on a GPU
  machine, :func:`CTFMLib.runtime.rank_device`).
- **Report, once.** What every rank did is gathered (:func:`gather`) and rank 0 prints the summary a
  single process prints; every rank exits with the same status.

Inputs and outputs must lie on a file system every machine sees, at the same path (each rank reads and
writes them itself); so must the model cache, or each machine fills its own (the first process of each
machine loads the model before the others do). The ranks talk over gloo (TCP, whatever device they compute
on; on machines with several network interfaces ``GLOO_SOCKET_IFNAME`` names the one the others reach), with
a long timeout (:data:`WAIT_TIMEOUT`): a rank that finishes early waits for the slowest share. torch is
imported inside the functions, so this module loads without it.
"""

from __future__ import annotations

import os
from datetime import timedelta

__all__ = ["WAIT_TIMEOUT", "requested", "rank", "world", "local_rank", "join", "share", "broadcast", "gather",
           "barrier", "leave"]

WAIT_TIMEOUT = timedelta(days=7)  # how long a rank waits for the others (planning, the slowest share)


def requested() -> bool:
    """Whether the environment describes more than one process (torchrun's ``WORLD_SIZE`` > 1)."""
    return world() > 1


def rank() -> int:
    """This process's place among all processes of all machines (torchrun's ``RANK``; 0 alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def world() -> int:
    """How many processes there are in all (torchrun's ``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """This process's place on its own machine (torchrun's ``LOCAL_RANK``): which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def join() -> bool:
    """Join torchrun's process group over gloo (any number of machines); True when this call created it
    (the caller then :func:`leave` s it). A group the caller set up already is used as it is."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 asks for several processes but this PyTorch build has no "
                         "torch.distributed; run a single process")
    if dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return True


def share(items: list, rank: int, world: int) -> list:
    """The items of ``items`` that process ``rank`` of ``world`` takes: every world-th, from the rank's."""
    return list(items[rank::world])


def broadcast(obj=None):
    """Rank 0's ``obj`` on every rank (any picklable object; the others' ``obj`` is ignored)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, by rank, on every rank."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank is here."""
    import torch.distributed as dist

    dist.barrier()


def leave(owned: bool = True) -> None:
    """Leave the process group :func:`join` created (``owned``); nothing otherwise."""
    import torch.distributed as dist

    if owned and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
