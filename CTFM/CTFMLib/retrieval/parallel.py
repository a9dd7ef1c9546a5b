"""``ctfm index add`` under ``torchrun``: N processes embed disjoint shares of the scans into one index.

    torchrun --nproc_per_node 4 -m CTFMLib.cli index add /data/index /archive --device cuda

``cmd_add`` in :mod:`CTFMLib.retrieval.commands` comes here when ``WORLD_SIZE`` > 1; one process runs the
plain path, without a process group; both run the add workflow of :mod:`CTFMLib.retrieval.ingest`. The
processes work together like this:

- **Plan, once.** Rank 0 finds the scans, leaves out those already indexed, loads the weights and, for a
  new index, creates it (the vector length from one patch of air through the encoder), so the index is
  created exactly once with the settings of this run. It sends the list of scans still to do to the
  other ranks, which then load the weights (from the cache rank 0 filled: no concurrent downloads). An
  error in this step (other weights, another stride, ...) is printed once, by rank 0; every rank exits 2.
- **Embed, apart.** Rank r of N takes scans r, r + N, r + 2N, ... of that list, on its own device:
  ``cuda:LOCAL_RANK`` when ``--device`` is auto or cuda and CUDA is available, else the ``--device``
  given (:func:`CTFMLib.runtime.rank_device`). On the CPU torchrun gives each process one thread
  (``OMP_NUM_THREADS=1``) unless ``--threads``.
- **Write.** Every rank adds its scans to the index itself, each scan atomically as in the single-process
  add: a folder's SQLite write lock lets one writer in at a time and the others wait (up to
  :data:`LOCK_TIMEOUT`); PostgreSQL takes them all at once (one transaction per scan). A scan another
  process added meanwhile is skipped (the index's unique key and ``AlreadyIndexedError`` make the race
  safe). Resumable the same way: a run started again skips the scans already added, and a killed rank
  leaves no half scan.
- **Report.** Each rank prints its own lines (``rank r: [n/m] scan: added as scan ...`` and
  ``ctfm: rank r: FAILED scan: reason``); only rank 0 reports ``--progress`` (over its own share, about the
  whole when the shares are alike), so ``--progress json`` stays one JSON object a line. At the end the
  counts and the failed inputs are gathered, rank 0 prints the summary line of the single-process add,
  and every rank exits 1 when any input failed anywhere (then torchrun exits 1 too).

The ranks talk over gloo (CPU) whatever device they embed on, with a long timeout (:data:`CTFMLib.ranks.WAIT_TIMEOUT`):
ranks that finish early wait for the others. Several nodes (``torchrun --nnodes N``, ``LOCAL_WORLD_SIZE`` <
``WORLD_SIZE``) need a PostgreSQL index (``INDEX = postgresql://...``, :mod:`CTFMLib.retrieval.backends`),
which every node writes over the network; a folder index (SQLite WAL) must not be written from several
machines (nor live on a network file system), so a multi-node launch with a folder is refused up front.

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        -m CTFMLib.cli index add env:CTFM_INDEX_URL /shared/archive --device cuda
"""

from __future__ import annotations

import os

from ..ranks import join as _join_group
from ..ranks import share
from ..text import EXIT_ERROR

LOCK_TIMEOUT = 24 * 3600.0  # seconds a rank waits for the index's write lock (held by another rank's add)


def multi_node() -> bool:
    """Whether torchrun spread the processes over several machines (``LOCAL_WORLD_SIZE`` < ``WORLD_SIZE``)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is not None and int(local) != int(os.environ.get("WORLD_SIZE", "1") or 1)


def _join(index) -> bool:
    """Join torchrun's process group (gloo); True when this module created it (and must destroy it).

    ``index``: the INDEX given; several nodes are refused for a folder index (before any rank waits)."""
    from . import backends

    if multi_node() and not backends.is_database(backends.resolve(index)):
        raise ValueError("`ctfm index add` on several nodes needs a shared index: a folder index (SQLite) is "
                         "written from one machine only: for several nodes use a PostgreSQL index "
                         "(INDEX = postgresql://...), or run on one node (--nnodes 1)")
    return _join_group()


def cmd_add(args) -> int:
    """``ctfm index add`` in one of several processes (module docstring); the exit code of this process."""
    import torch.distributed as dist

    from ..progress import null_progress
    from ..runtime import Runner, rank_device
    from . import backends, ingest
    from .embedding import embedding_settings

    owns = _join(args.index)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        progress = args.progress_cb if rank == 0 else null_progress
        options = ingest.options_of(args)
        options.device = rank_device(options.device, int(os.environ.get("LOCAL_RANK", rank) or 0))
        runner = digest = None
        box = [None]
        if rank == 0:
            try:
                plan = ingest.plan_add(args)
                if plan.todo:
                    model, model_id, digest = ingest.load_encoder(plan.source, progress)
                    runner = Runner(model, options, progress)
                    config = embedding_settings(**plan.settings)
                    if plan.existing:  # other weights are refused here, once
                        backends.open_index(plan.root, weights_hash=digest).close()
                    else:
                        dim = runner.embed(_air(config["patch_size"])).shape[1]
                        backends.open_or_create(plan.root, model_id, digest, dim, config).close()
                box = [vars(plan)]
            except BaseException:
                dist.broadcast_object_list([{"error": True}], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
        if plan.get("error"):
            return EXIT_ERROR  # rank 0 printed why

        mine = share(plan["todo"], rank, world)
        added, skipped, failed, not_ct = 0, 0, [], []
        if mine:
            if runner is None:
                model, _, digest = ingest.load_encoder(plan["source"], progress)
                runner = Runner(model, options, progress)
            config = embedding_settings(**plan["settings"])
            wait = {} if backends.is_database(plan["root"]) else {"timeout": LOCK_TIMEOUT}  # SQLite: one writer
            index = backends.open_index(plan["root"], weights_hash=digest, **wait)
            added, skipped, failed = ingest.add_scans(mine, runner, digest, config, progress, index,
                                                      label=f"rank {rank}: ",
                                                      allow_non_ct=getattr(args, "allow_non_ct", False),
                                                      not_ct=not_ct, args=args)

        results = [None] * world
        dist.all_gather_object(results, (added, skipped, failed, not_ct))
        failed = list(plan["failed"]) + [f for r in results for f in r[2]]
        not_ct = [d for r in results for d in r[3]]
        if rank == 0:
            ingest.print_summary(sum(r[0] for r in results), plan["skipped"] + sum(r[1] for r in results),
                                 failed, plan["total"], not_ct, args=args, index=plan["root"])
        dist.barrier()  # no rank exits (and has torchrun stop the others) before the summary is out
        return 1 if failed or not_ct else 0
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def _air(patch_size):
    import numpy as np

    return np.zeros((1, *patch_size), dtype=np.float32)
