"""The ``ctfm index add`` workflow: find the scans, plan what to add, embed them and add them to an index.

Kept apart from :mod:`CTFMLib.retrieval.commands` (the argparse parser and the ``cmd_*`` functions) because
two callers run it: the single-process ``cmd_add`` there, and each rank under ``torchrun``
(:mod:`CTFMLib.retrieval.parallel`); with the workflow here neither imports the other.

A new index's ``--stride``: up to :data:`STRIDE_WARN_FACTOR` times the default number of patches is accepted
silently, up to :data:`STRIDE_MAX_FACTOR` times with a one-line warning, more is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from ..text import count, print_result, say

DEFAULT_WEIGHTS = "ct_fm_feature_extractor"
STRIDE_WARN_FACTOR = 8  # patches per scan relative to the default stride: beyond this a warning (half overlap = 8)
STRIDE_MAX_FACTOR = 64  # beyond this refused: the index and the embedding time grow as many times


def parse_stride(text):
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or min(values) < 1:
        raise ValueError(f"--stride is one positive whole number or three (S,P,L voxels), not {text!r}")
    return tuple(values * 3 if len(values) == 1 else values)


def check_stride(stride, text) -> None:
    """Refuse a new index's stride that multiplies the patches past :data:`STRIDE_MAX_FACTOR`; warn past
    :data:`STRIDE_WARN_FACTOR` (one line on stderr)."""
    from ..embed import PATCH_SIZE

    factor = float(np.prod(np.asarray(PATCH_SIZE, float) / np.asarray(stride, float)))
    if factor > STRIDE_MAX_FACTOR:
        raise ValueError(f"--stride {text} would store about {factor:,.0f} times as many patches as the default "
                         f"(stride {','.join(map(str, PATCH_SIZE))}, no overlap); at most {STRIDE_MAX_FACTOR} times "
                         "is accepted: use a coarser stride, e.g. --stride 12,64,64 (half overlap, 8 times)")
    if factor > STRIDE_WARN_FACTOR:
        print(f"ctfm: warning: --stride {text} stores about {factor:.0f} times as many patches as the default: "
              "embedding takes and the index needs about as many times more", file=sys.stderr, flush=True)


def model_id_of(source: str) -> str:
    """How an index names its weights: an absolute path for files and folders, else the id as given."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def index_weights(given: Optional[str], model_id: str, index) -> str:
    """The weights to embed with for an existing index: ``--weights`` when given, else where the index says they
    were; refused in one line, naming the fix, when they were in a file or folder that is gone."""
    if given:
        return given
    if Path(model_id).is_absolute() and not Path(model_id).exists():
        raise ValueError(f"the weights {index} was built with were at {model_id}, which no longer exists: give "
                         "where they are now with --weights PATH (the same file: its sha256 is checked)")
    return model_id


def load_encoder(source: str, progress=None):
    """``(model, model_id, sha256 of the weights file)`` for a weights source."""
    from ..model_store import sha256_file, weights_file_of
    from ..weights import load_model

    model, info = load_model(source, expect="SegResEncoder", progress=progress)
    digest = info.sha256 or sha256_file(weights_file_of(Path(info.path)))
    return model, model_id_of(source), digest


def options_of(args):
    """The :class:`~CTFMLib.runtime.RunOptions` of ``ctfm index``'s ``--device``/``--precision``/``--threads``/
    ``--batch-size`` (precision ``auto`` is resolved by the Runner, on its device)."""
    from ..runtime import RunOptions

    return RunOptions(device=args.device, precision=args.precision, threads=args.threads,
                      batch_size=args.batch_size)


def geometry_dict(image) -> dict:
    return {"shape": list(image.shape), "spacing": image.spacing.tolist(), "origin": image.origin.tolist(),
            "direction": image.direction.tolist()}


def _plain_metadata(metadata: dict) -> dict:
    """The scalar entries of an image's metadata (JSON-serialisable), for the scan's record."""
    return {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool)) or v is None}


def settings_of(index) -> dict:
    """``patch_size``, ``spacing`` and ``stride`` keyword arguments from an index's stored settings."""
    pre = index.preprocessing or {}
    return {k: tuple(pre[k]) for k in ("patch_size", "spacing", "stride") if k in pre}


# --- add ---------------------------------------------------------------------------------


def collect_scans(sources) -> tuple:
    """``(scans, failed sources)``: every scan the sources name, once; a missing or empty source is reported."""
    from ..scans import DataError, find_scans

    scans, seen, failed = [], set(), []
    for source in sources:
        try:
            found = find_scans([source])
        except DataError as e:
            failed.append(str(source))
            print(f"ctfm: FAILED {source}: {e}", file=sys.stderr, flush=True)
            continue
        for scan in found:
            if scan.key not in seen:
                seen.add(scan.key)
                scans.append(scan)
    return scans, failed


def plan_add(args) -> SimpleNamespace:
    """What ``add`` has to do: the scans not yet indexed (``todo``), the weights ``source`` and ``settings``.

    Also ``root`` (the folder as a ``Path`` or the database URL, ``env:NAME`` looked up), ``existing`` (the index
    exists), ``failed`` (sources that named no scan, reported here),
    ``skipped`` (scans already indexed) and ``total`` (scans and failed sources).
    """
    from . import backends

    root = backends.resolve(args.index)  # a folder (Path) or a postgresql:// URL (str)
    shown = backends.display(root)
    if isinstance(root, Path) and root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not an index folder: give a folder (a new one is created) or a "
                         "postgresql:// URL")
    stride = parse_stride(args.stride)
    existing = backends.exists(root)  # a folder's empty index.sqlite: a creator died; creating completes it
    if stride is not None and not existing:
        check_stride(stride, args.stride)
    scans, failed = collect_scans(args.scans)
    todo = scans
    if existing:
        with backends.open_index(root, readonly=True) as probe:
            probe.verify_files()  # a damaged index is refused before any weights are loaded
            source = index_weights(args.weights, probe.model_id, shown)
            settings = settings_of(probe)
            todo = [ref for ref in scans if not probe.contains(ref.path, ref.series_uid)]
        if stride is not None and stride != settings.get("stride"):
            raise ValueError(f"{shown} was built with stride {list(settings.get('stride', []))}; "
                             "vectors of another stride do not mix: leave out --stride or use a new index")
    else:
        source = args.weights or DEFAULT_WEIGHTS
        settings = {"stride": stride}
    skipped = len(scans) - len(todo)
    if skipped:
        say(args, f"{skipped} of {count(len(scans), 'scan')} {'is' if skipped == 1 else 'are'} already indexed: "
                  "skipped")
    return SimpleNamespace(root=root, existing=existing, todo=todo, failed=failed, skipped=skipped,
                           total=len(scans) + len(failed), source=source, settings=settings)


def add_scans(todo, runner, digest: str, config: dict, progress, index=None, create=None, label: str = "",
              allow_non_ct: bool = False, not_ct: list | None = None, args=None) -> tuple:
    """Embed each scan of ``todo`` and add it to ``index``: ``(added, skipped, failed descriptions)``.

    ``index``: an open index, or ``None`` and ``create(dim)`` makes it with the first vector (its length is
    the model's). The index is closed at the end. ``label`` starts every line printed (e.g. the rank).
    A scan that cannot be read or embedded is reported and the others go on; a refusal of the index
    itself (other weights, locked) is raised, as it would repeat for every scan. A scan whose values do
    not look like a CT in HU (:func:`CTFMLib.ct_check.not_ct_reason`) is left out with a line on stderr and
    its description appended to ``not_ct``; with ``allow_non_ct`` it is added, after a warning.
    The lines about each scan go to stdout, or to stderr when ``args`` asks for ``--json``.
    """
    from ..ct_check import not_ct_reason
    from ..progress import Cancelled, subrange
    from ..scans import read_scan
    from .embedding import scan_embeddings
    from .index import AlreadyIndexedError, RetrievalIndexError, ScanRecord

    settings = {k: tuple(config[k]) for k in ("patch_size", "spacing", "stride")}
    added, skipped, failed = 0, 0, []
    try:
        for n, ref in enumerate(todo, 1):
            prefix = f"{label}[{n}/{len(todo)}] {ref.describe()}"
            sub = subrange(progress, (n - 1) / len(todo), n / len(todo))
            try:
                if index is not None and index.contains(ref.path, ref.series_uid):
                    skipped += 1  # another process added it meanwhile
                    continue
                image = read_scan(ref)
                reason = not_ct_reason(image)
                if reason and not allow_non_ct:
                    if not_ct is not None:
                        not_ct.append(ref.describe())
                    print(f"ctfm: {label}left out {ref.describe()}: {reason} (--allow-non-ct adds it)",
                          file=sys.stderr, flush=True)
                    continue
                if reason:
                    print(f"ctfm: {label}warning: adding {ref.describe()} although it is {reason} (--allow-non-ct)",
                          file=sys.stderr, flush=True)
                scan_vector, patches, centres = scan_embeddings(
                    image, runner, progress=lambda f, m, sub=sub, p=prefix: sub(f, _prefixed(p, m)), **settings)
                if index is None:
                    index = create(scan_vector.shape[0])
                record = ScanRecord(ref.path, ref.series_uid, text_or_none(image.metadata.get("patient_id")),
                                    text_or_none(image.metadata.get("study_uid")), geometry_dict(image), config,
                                    {**_plain_metadata(image.metadata), "columns": dict(ref.label)})
                try:
                    scan_id = index.add(record, scan_vector, patches, centres, weights_hash=digest)
                except AlreadyIndexedError:
                    skipped += 1
                    say(args, f"{prefix}: already indexed (added by another process meanwhile): skipped")
                    continue
                added += 1
                say(args, f"{prefix}: added as scan {scan_id} ({count(len(patches), 'patch', 'patches')})")
            except (Cancelled, KeyboardInterrupt, RetrievalIndexError):
                raise
            except Exception as e:  # noqa: BLE001 - one unusable scan is reported; the others go on
                failed.append(ref.describe())
                print(f"ctfm: {label}FAILED {ref.describe()}: {e}", file=sys.stderr, flush=True)
    finally:
        if index is not None:
            index.close()
    return added, skipped, failed


def _prefixed(prefix: str, message):
    """A scan's progress message under its ``[n/N] scan`` prefix (an expected time stays one)."""
    from ..progress import Estimate

    if isinstance(message, Estimate):
        return Estimate(message.seconds, f"{prefix}: {message[message.find('(') + 1:-1]}" if "(" in message else prefix)
    return f"{prefix}: {message}"


def print_summary(added: int, skipped: int, failed: list, total: int, not_ct: list = (), args=None,
                  index=None) -> None:
    """``added A, already indexed S, [left out N not CT-like (--allow-non-ct adds them), ]failed F of T``, or
    with ``--json`` (in ``args``) ``{"index", "added", "already_indexed", "not_ct", "failed", "total"}``."""
    left_out = (f"left out {len(not_ct)} not CT-like (--allow-non-ct adds them), " if not_ct else "")
    from .backends import display

    print_result(args, {"index": None if index is None else display(index), "added": added,
                        "already_indexed": skipped, "not_ct": list(not_ct), "failed": list(failed), "total": total},
                 f"added {added}, already indexed {skipped}, {left_out}failed {len(failed)} of {total}"
                 + (f"; failed: {', '.join(failed)}" if failed else "")
                 + (f"; not CT-like: {', '.join(not_ct)}" if not_ct else ""))


def text_or_none(value):
    """``str(value)``, or None for a missing or empty metadata value."""
    return None if value in (None, "") else str(value)
