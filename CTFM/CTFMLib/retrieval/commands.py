"""``ctfm index``: build, search, inspect and evaluate a retrieval index from the command line.

    ctfm index add INDEX SCANS... [--weights SRC] [--stride S[,P,L]] [--allow-non-ct]   (files, folders, CSV, DICOM)
    ctfm index query INDEX IMAGE [--point X,Y,Z [--ras] | --box X0,Y0,Z0,X1,Y1,Z1] [-k K] [--exclude-patient]
    ctfm index info INDEX [--check]
    ctfm index check INDEX [--repair]   (verify every vector; --repair drops damaged scans)
    ctfm index remove INDEX ID_OR_PATH [--series UID]
    ctfm index compact INDEX [--hnsw]   (--hnsw: PostgreSQL's approximate-search indexes)
    ctfm index reembed INDEX NEW_INDEX --weights SRC   (the same scans, embedded with other weights)
    ctfm index eval INDEX --labels CSV [-k 1,3,5,10] [--metric cosine|l2]

INDEX is a folder (the embedded index, one machine) or a ``postgresql://user@host/db?schema=NAME`` URL (a shared
index for many workstations and cluster nodes), or ``env:NAME`` for the URL in an environment variable
(:mod:`CTFMLib.retrieval.backends`); every command opens it through that module, and whatever it prints or
writes names a URL without its password.

Each prints sentences (or a table), and with ``--json`` one JSON object, the last line of stdout (the
lines a person reads then go to stderr: :func:`CTFMLib.text.say`).

``add`` is resumable: scans already in the index are skipped (also those another ``add`` running at the
same time added meanwhile), so an interrupted run is simply started again; a scan that cannot be read
or embedded is reported and the others go on. A scan whose values do not look like a CT in Hounsfield
units (:mod:`CTFMLib.ct_check`: an MR volume, a CT without its rescale) is left out and listed, unless
``--allow-non-ct`` (then it is added with a warning); the exit status is 1 when any scan was left out or
failed. ``query`` warns about such a query image. A damaged index (a truncated or missing vector file, a
checksum mismatch) is refused with one line naming ``ctfm index check INDEX --repair``.

``--stride`` of a new index: up to :data:`~CTFMLib.retrieval.ingest.STRIDE_WARN_FACTOR` times the default
number of patches is accepted silently, up to :data:`~CTFMLib.retrieval.ingest.STRIDE_MAX_FACTOR` times with a
one-line warning (time and disk grow with it), more is refused (``--stride 1`` would store ~400,000 times as
many patches). The add workflow itself is :mod:`CTFMLib.retrieval.ingest`; this module is the parser and the
``cmd_*`` functions.

``add`` runs under ``torchrun`` as well: the processes (one per GPU, or several on the CPU) share
the scans and write to the one index (:mod:`CTFMLib.retrieval.parallel`); several nodes need a PostgreSQL index::

    torchrun --nproc_per_node 4 -m CTFMLib.cli index add /data/index /archive --device cuda

Points and boxes are LPS mm, or RAS (as Slicer shows them) with ``--ras``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..arguments import non_negative_int, parse_numbers, positive_int
from ..text import EXIT_ERROR, count, print_result
from .ingest import (
    DEFAULT_WEIGHTS,
    STRIDE_MAX_FACTOR,
    STRIDE_WARN_FACTOR,
    add_scans,
    index_weights,
    load_encoder,
    options_of,
    plan_add,
    print_summary,
    settings_of,
    text_or_none,
)

RAS = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
WHERE = "folder or postgresql:// URL (or env:NAME)"  # what INDEX may be (CTFMLib.retrieval.backends)
MADE = f"the index ({WHERE}) made by `ctfm index add`"


def shown(target) -> str:
    """The index as messages and JSON name it: a folder as given, a URL (also one from ``env:NAME``) without its
    password."""
    from . import backends

    text = os.fspath(target)
    return backends.display(backends.resolve(text) if text.startswith(backends.ENV_PREFIX) else text)


def add_index_parser(sub, add_run_options, add_json_flag) -> None:
    """Register ``ctfm index ...`` on the main parser's subcommands (``add_json_flag``: the CLI's ``--json``)."""
    p = sub.add_parser("index", help="similar-case retrieval: build, search and evaluate an index of CT scans")
    actions = p.add_subparsers(dest="index_action", required=True)

    add = actions.add_parser(
        "add", help="embed scans and add them (skips scans already indexed; runs under torchrun as well)",
        description="Embed scans and add them to the index; scans already indexed are skipped, so an interrupted "
                    "run is simply started again. Under torchrun (torchrun --nproc_per_node N -m CTFMLib.cli "
                    "index add ...) the N processes share the scans, each on its own GPU (cuda:LOCAL_RANK with "
                    "--device auto or cuda), and add them to the one index; rank 0 prints the summary. Several "
                    "nodes (torchrun --nnodes N) need a PostgreSQL index (INDEX = postgresql://...).")
    add.add_argument("index", help=f"the index: {WHERE} (created when it does not exist)")
    add.add_argument("scans", nargs="+", help="image files, folders, DICOM trees or CSV lists (column 'path')")
    add.add_argument("--weights", help=f"the encoder: model id, folder or file (default: the index's, or "
                                       f"{DEFAULT_WEIGHTS} for a new index)")
    add.add_argument("--stride", help="a new index's patch stride in voxels of the 3x1x1 mm grid: S or S,P,L "
                                      "(default: the patch size 24,128,128, no overlap; a warning past "
                                      f"{STRIDE_WARN_FACTOR} times the default number of patches, refused past "
                                      f"{STRIDE_MAX_FACTOR} times, e.g. 6,32,32 is the finest accepted)")
    add.add_argument("--allow-non-ct", action="store_true",
                     help="also add scans whose values do not look like a CT in Hounsfield units (no air or fat, "
                          "e.g. MR); without it they are left out and listed")
    add_run_options(add)
    add_json_flag(add, "the counts and the scans left out or failed")

    q = actions.add_parser("query", help="the scans (or places in them) most similar to an image, a point or a box")
    q.add_argument("index", help=MADE)
    q.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--point", help="X,Y,Z in mm: search for the patch around this point "
                                       "(write --point=-X,Y,Z when it starts with a minus)")
    where.add_argument("--box", help="X0,Y0,Z0,X1,Y1,Z1 in mm (two opposite corners): search for this region "
                                     "(--box=-X0,... when it starts with a minus)")
    q.add_argument("--ras", action="store_true", help="--point/--box are RAS (as Slicer shows them), not LPS; "
                                                      "matches are printed in RAS too")
    q.add_argument("-k", type=positive_int, default=10, help="how many results (default: %(default)s)")
    q.add_argument("--per-scan", type=non_negative_int, default=1,
                   help="point/box: at most this many places per scan (default 1: the best place in each of the "
                        "k most similar scans; 0: no limit)")
    q.add_argument("--metric", choices=("cosine", "l2"), default="cosine",
                   help="similarity: cosine (default) or Euclidean distance (l2)")
    q.add_argument("--exclude-patient", action="store_true",
                   help="leave out scans of the query's patient (its DICOM PatientID)")
    q.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    q.add_argument("--exclude-scan", action="append", default=[], metavar="PATH",
                   help="leave out the indexed scan(s) of this file or folder (e.g. the query's own case); repeatable")
    q.add_argument("--thumbnails", metavar="DIR",
                   help="write an axial PNG of each hit through the matched place (the scan's centre for "
                        "whole-scan hits) into DIR; the JSON names each hit's file. Existing <rank>.png files "
                        "in DIR are refused unless --overwrite")
    q.add_argument("--overwrite", action="store_true", help="--thumbnails: replace 1.png, 2.png, ... left in DIR")
    q.add_argument("--weights", help="where the index's weights are now, if they moved (default: where they were "
                                     "when it was built; they must be the same file)")
    q.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="only scans whose stored metadata has KEY equal to the text VALUE (e.g. modality=CT; a "
                        "CSV column of `index add` as columns.NAME=VALUE); KEY:=VALUE compares a JSON value "
                        "(num_slices:=120); repeatable: all must hold")
    add_json_flag(q, "the hits instead of a table")
    add_run_options(q)

    info = actions.add_parser("info", help="what the index holds: model, settings, scans, size")
    info.add_argument("index", help=MADE)
    info.add_argument("--check", action="store_true",
                      help="also verify files, rows and every vector (as `ctfm index check` does)")
    add_json_flag(info, "the information")

    ck = actions.add_parser(
        "check", help="verify every scan's vectors against their checksums; --repair drops the damaged ones",
        description="Verify the index: its files, rows and every committed vector (against the checksum written "
                    "when the scan was added; scans added before checksums are checked for NaN and all-zero "
                    "vectors). Exit 0 when consistent, 1 when damaged. --repair drops the damaged scans (vectors "
                    "past a file's end or lost with it, checksum mismatch), says which by id and path, and leaves a "
                    "consistent, writable index: add the dropped scans again.")
    ck.add_argument("index", help=MADE)
    ck.add_argument("--repair", action="store_true", help="drop the damaged scans (a new generation of the files)")
    add_json_flag(ck, "the report")

    rm = actions.add_parser("remove", help="remove a scan by id or path (run compact to reclaim space)")
    rm.add_argument("index", help=MADE)
    rm.add_argument("target", help="a scan id (see info/query) or the scan's path")
    rm.add_argument("--series", help="only this DICOM series of the path")
    add_json_flag(rm)

    co = actions.add_parser("compact", help="rewrite the vector files without removed scans (PostgreSQL: VACUUM)")
    co.add_argument("index", help=MADE)
    co.add_argument("--hnsw", action="store_true",
                    help="PostgreSQL: also build the HNSW indexes for fast approximate search of large indexes "
                         "(a folder index uses FAISS automatically)")
    add_json_flag(co)

    re_ = actions.add_parser(
        "reembed", help="embed every scan of an index again with other weights, into a new index",
        description="When the model changes: the scans of INDEX (paths, DICOM series, CSV columns, patch stride) "
                    "are embedded with --weights into OUTPUT; INDEX is left as it is (vectors of different "
                    "weights never share an index). Resumable like add, and runs under torchrun like add.")
    re_.add_argument("index", help=f"the index whose scans are re-embedded (not changed): {WHERE}")
    re_.add_argument("output", help=f"the new index: {WHERE} (created; started again, it continues)")
    re_.add_argument("--weights", required=True, help="the new encoder: model id, folder or file")
    re_.add_argument("--allow-non-ct", action="store_true",
                     help="also re-embed scans whose values do not look like a CT in Hounsfield units (added "
                          "to INDEX with --allow-non-ct); without it they are left out and listed")
    add_run_options(re_)
    add_json_flag(re_, "the counts and the scans left out or failed")

    ev = actions.add_parser("eval", help="leave-one-out retrieval scores of the labelled scans: HR@k, P@k, AP@k, mAP")
    ev.add_argument("index", help=MADE)
    ev.add_argument("--labels", required=True,
                    help="CSV with columns path,label (optional series_uid; optional split = query|database, "
                         "else every labelled scan queries all the others)")
    ev.add_argument("-k", default="1,3,5,10", help="cut-offs, comma-separated (default: %(default)s)")
    ev.add_argument("--metric", choices=("cosine", "l2"), default="cosine",
                    help="similarity: cosine (default) or Euclidean distance (l2)")
    ev.add_argument("--exclude-patient", action="store_true", help="leave out scans of the query's patient")
    add_json_flag(ev, "the scores instead of a table")
    p.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    from .index import RetrievalIndexError

    try:
        return {"add": cmd_add, "query": cmd_query, "info": cmd_info, "check": cmd_check, "remove": cmd_remove,
                "compact": cmd_compact, "eval": cmd_eval, "reembed": cmd_reembed}[args.index_action](args)
    except RetrievalIndexError as e:
        print(f"ctfm: error: {e}", file=sys.stderr)
        return EXIT_ERROR


# --- add (the workflow: CTFMLib.retrieval.ingest) -------------------------------------------


def cmd_add(args) -> int:
    from ..ranks import requested
    from . import parallel

    if requested():  # under torchrun: ranks share the work (CTFMLib.retrieval.parallel)
        return parallel.cmd_add(args)
    from ..runtime import Runner
    from . import backends
    from .embedding import embedding_settings

    plan = plan_add(args)
    added, skipped, failed, not_ct = 0, plan.skipped, list(plan.failed), []
    if plan.todo:  # the weights are loaded (and hashed) only when there is work
        model, model_id, digest = load_encoder(plan.source, args.progress_cb)
        runner = Runner(model, options_of(args), args.progress_cb)
        config = embedding_settings(**plan.settings)
        index = backends.open_index(plan.root, weights_hash=digest) if plan.existing else None

        def create(dim):  # atomic: an index another add created meanwhile is opened (same weights and settings)
            return backends.open_or_create(plan.root, model_id, digest, dim, config)

        done, late, bad = add_scans(plan.todo, runner, digest, config, args.progress_cb, index, create,
                                    allow_non_ct=getattr(args, "allow_non_ct", False), not_ct=not_ct, args=args)
        added, skipped, failed = done, skipped + late, failed + bad
    print_summary(added, skipped, failed, plan.total, not_ct, args, plan.root)
    return 1 if failed or not_ct else 0


# --- query -------------------------------------------------------------------------------


def cmd_query(args) -> int:
    from ..image import read_image
    from ..runtime import Runner
    from . import backends
    from .embedding import query_vector

    if args.k < 1:
        raise ValueError("-k must be at least 1")
    point = parse_numbers(args.point, 3, "a point is three numbers X,Y,Z in mm") if args.point is not None else None
    box = (parse_numbers(args.box, 6, "a box is six numbers X0,Y0,Z0,X1,Y1,Z1 in mm (two opposite corners)")
           .reshape(2, 3) if args.box is not None else None)
    if args.ras and point is None and box is None:
        raise ValueError("--ras applies to --point or --box; give one of them")
    if args.ras:
        point = point * RAS if point is not None else None
        box = box * RAS if box is not None else None
    metadata = parse_metadata(args.metadata)
    if args.thumbnails:
        check_thumbnail_folder(Path(args.thumbnails), args.k, args.overwrite)
    with backends.open_index(args.index, readonly=True) as index:
        source = index_weights(args.weights, index.model_id, shown(args.index))
        model, _, digest = load_encoder(source, args.progress_cb)
        if digest != index.weights_hash:
            raise ValueError(f"the weights {source} are not those the index was built with (sha256 {digest[:16]}... "
                             f"!= {index.weights_hash[:16]}...); give those weights, or rebuild the index")
        image = read_image(args.image, series_uid=args.series)
        from ..ct_check import warning_for

        warning = warning_for(image, args.image)
        if warning:
            print(f"ctfm: warning: {warning}", file=sys.stderr, flush=True)
        exclude = None
        if args.exclude_patient:
            exclude = text_or_none(image.metadata.get("patient_id"))
            if exclude is None:
                raise ValueError("--exclude-patient needs the query's PatientID, and this image has none "
                                 "(only DICOM series carry one); leave out --exclude-patient")
        runner = Runner(model, options_of(args), args.progress_cb)
        vector = query_vector(image, runner, point_lps=point, box_lps=box, progress=args.progress_cb,
                              **settings_of(index))
        level = "scan" if point is None and box is None else "patch"
        per_scan = args.per_scan if level == "patch" and args.per_scan > 0 else None
        excluded = {str(Path(p).expanduser().resolve()) for p in args.exclude_scan}
        hits = index.search(vector, k=args.k, level=level, metric=args.metric, exclude_patient=exclude,
                            max_per_scan=per_scan, weights_hash=digest, metadata=metadata,
                            where=(lambda r: r.path not in excluded) if excluded else None)
    rows = [_hit_json(rank, h, args.ras) for rank, h in enumerate(hits, 1)]
    if args.thumbnails:
        _write_thumbnails(rows, hits, Path(args.thumbnails), args.progress_cb, args.overwrite)
    if args.json:
        query = {"image": str(args.image), "level": level, "metric": args.metric,
                 "point_lps": None if point is None else point.tolist(),
                 "box_lps": None if box is None else box.tolist()}
        if metadata:
            query["metadata"] = metadata
        print(json.dumps({"index": shown(args.index), "query": query, "hits": rows}), flush=True)
        return 0
    if not rows:
        print("no results: the index holds no (other) scans", flush=True)
        return 0
    space = "RAS" if args.ras else "LPS"
    print(f"{'rank':>4}  {'similarity':>10}  {'scan':>5}  " + (f"{'matching point (' + space + ' mm)':<28}  "
                                                              if level == "patch" else "") + "path")
    for r in rows:
        where = ""
        if level == "patch":
            c = r["centre_ras"] if args.ras else r["centre_lps"]
            where = f"{', '.join(f'{v:.1f}' for v in c):<28}  "
        series = f" (series {r['series_uid']})" if r["series_uid"] else ""
        print(f"{r['rank']:>4}  {r['similarity']:>10.4f}  {r['scan_id']:>5}  {where}{r['path']}{series}")
    return 0


def parse_metadata(items) -> dict | None:
    """``--metadata`` as the nested dict ``search(metadata=...)`` keeps scans by: ``a.b=V`` is ``{"a": {"b": "V"}}``
    (``V`` as text; ``a.b:=V`` parses ``V`` as JSON); None when none is given. Refused in one line when malformed."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if key.endswith(":"):
            key = key[:-1]
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"--metadata {item}: after := comes a JSON value (a number, true, false, null or "
                                 "a quoted text); write KEY=VALUE to compare text") from None
        names = key.split(".")
        if not sep or not all(n.strip() for n in names):
            raise ValueError(f"--metadata {item!r} is not KEY=VALUE (e.g. --metadata modality=CT or "
                             "--metadata columns.site=A)")
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"--metadata {item}: {key} contradicts an earlier --metadata; give each key once")
        if names[-1] in node and node[names[-1]] != value:
            raise ValueError(f"--metadata {item}: {key} is given twice with different values; a scan holds one")
        node[names[-1]] = value
    return out


def _hit_json(rank: int, hit, ras: bool) -> dict:
    """A hit for ``--json``: ``centre_lps`` is the matched patch's centre, or for a whole-scan hit the scan's centre."""
    out = {"rank": rank, "scan_id": hit.scan_id, "path": hit.path, "series_uid": hit.record.series_uid,
           "similarity": round(float(hit.similarity), 6), "patient_id": hit.patient_id, "study_uid": hit.study_uid}
    centre = hit.centre_lps if hit.centre_lps is not None else _scan_centre(hit.record.geometry)
    if centre is not None:
        out["centre_lps"] = [round(float(v), 3) for v in centre]
        if ras:
            out["centre_ras"] = [round(float(v), 3) for v in np.asarray(centre) * RAS]
    return out


def _scan_centre(geometry: dict):
    """The LPS centre of a scan's voxel grid from its stored geometry (None when it was not stored)."""
    from ..image import Geometry, ImageError

    try:
        grid = Geometry(tuple(geometry["shape"]), geometry["spacing"], geometry["origin"], geometry["direction"])
    except (KeyError, TypeError, ValueError, ImageError):
        return None
    return grid.index_to_physical((np.asarray(grid.shape, dtype=np.float64) - 1) / 2.0)


def check_thumbnail_folder(folder: Path, k: int, overwrite: bool) -> None:
    """Refuse a ``--thumbnails`` folder that is a file, or that holds ``<rank>.png`` files (without ``--overwrite``)."""
    from ..files import FileSafetyError, OutputExistsError

    if folder.exists() and not folder.is_dir():
        raise FileSafetyError(f"--thumbnails {folder} is a file: give a folder")
    if overwrite or not folder.is_dir():
        return
    taken = sorted(int(p.stem) for p in folder.iterdir()
                   if p.suffix.lower() == ".png" and p.stem.isascii() and p.stem.isdigit() and 1 <= int(p.stem) <= k)
    if taken:
        names = ", ".join(f"{n}.png" for n in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise OutputExistsError(f"{folder} already holds {names} (from an earlier query?): choose another folder "
                                "for --thumbnails, or add --overwrite to replace them")


def _write_thumbnails(rows: list, hits: list, folder: Path, progress=None, overwrite: bool = False) -> None:
    """One PNG per hit (``<rank>.png``) through its ``centre_lps``; each scan is read once and then let go.

    Each file is written atomically (:mod:`CTFMLib.files`) and, without ``overwrite``, never replaces a file.
    """
    from ..image import read_image
    from .thumbnails import write_thumbnail

    folder.mkdir(parents=True, exist_ok=True)
    by_scan = {}
    for row, hit in zip(rows, hits):
        row["thumbnail"] = None
        by_scan.setdefault((hit.path, hit.record.series_uid), []).append(row)
    for n, ((path, series), scan_rows) in enumerate(by_scan.items(), 1):
        if progress:
            progress(n / (len(by_scan) + 1), f"thumbnails: scan {n}/{len(by_scan)}")
        try:
            image = read_image(path, series, recursive=True)  # a DICOM tree too
            for row in scan_rows:
                row["thumbnail"] = str(write_thumbnail(image, folder / f"{row['rank']}.png", row.get("centre_lps"),
                                                       overwrite=overwrite))
        except Exception as e:  # noqa: BLE001 - a moved or unreadable scan costs its picture, not the results
            print(f"ctfm: no thumbnail for {path}: {e}", file=sys.stderr, flush=True)


# --- info, remove, compact -----------------------------------------------------------------


def cmd_info(args) -> int:
    from . import backends

    with backends.open_index(args.index, readonly=True) as index:
        info = index.info()
        if args.check:
            report = index.check_report(deep=True)
            info["problems"], info["notes"] = report.problems, report.notes
    if args.json:
        print(json.dumps(info, default=str), flush=True)
    else:
        for key in ("path", "model_id", "weights_hash", "dim", "scans", "patches", "removed_rows", "bytes"):
            print(f"{key:<14} {info.get(key)}")
        print(f"{'settings':<14} {json.dumps(info.get('preprocessing'))} (sizes and spacings S, P, L)")
        if args.check:
            print("consistent" if not info["problems"] else "PROBLEMS:\n  " + "\n  ".join(info["problems"]))
            for note in info["notes"]:
                print(f"note: {note}")
            if info["problems"]:
                print(f"`ctfm index check {shown(args.index)} --repair` drops the damaged scans")
    return 1 if args.check and info["problems"] else 0


def cmd_check(args) -> int:
    """``index check``: verify every vector (exit 1 when damaged); ``--repair`` drops the damaged scans."""
    from . import backends

    if args.repair:
        with backends.open_index(args.index) as index:
            result = index.repair()
        if args.json:
            print(json.dumps(result), flush=True)
            return 0
        if not result["repaired"]:
            print(f"consistent: {result['kept']} scans; nothing to repair", flush=True)
            return 0
        for d in result["dropped"]:
            series = f", series {d['series_uid']}" if d["series_uid"] else ""
            print(f"dropped scan {d['scan_id']} ({d['path']}{series}): {d['reason']}", flush=True)
        print(f"repaired: dropped {len(result['dropped'])} damaged scan(s), kept {result['kept']}; the index is "
              f"consistent again (add the dropped scans again: `ctfm index add {shown(args.index)} ...`)", flush=True)
        return 0
    with backends.open_index(args.index, readonly=True) as index:
        report = index.check_report(deep=True)
    if args.json:
        print(json.dumps(report.as_dict()), flush=True)
    else:
        if report.problems:
            print("PROBLEMS:\n  " + "\n  ".join(report.problems))
            hint = ("rebuild the index: its SQLite file is damaged" if report.fatal else
                    f"`ctfm index check {shown(args.index)} --repair` drops the {len(report.damaged)} damaged scan(s) "
                    "and keeps the others")
            print(hint)
        else:
            print(f"consistent: {report.scans} scans, every vector verified")
        for note in report.notes:
            print(f"note: {note}")
    return 1 if report.problems else 0


def cmd_remove(args) -> int:
    from . import backends

    target = args.target
    if target.isdigit() and not Path(target).exists():
        if args.series:
            raise ValueError("--series selects a series of a path; a scan id names one scan already")
        target = int(target)
    else:
        target = str(Path(target).expanduser().resolve())  # the index stores absolute paths
    with backends.open_index(args.index) as index:
        removed = index.remove(target, series_uid=args.series)
    name = shown(args.index)
    if not removed:
        print(f"ctfm: nothing removed: no scan {args.target!r} in {name} (see `ctfm index info`)", file=sys.stderr)
    print_result(args, {"index": name, "target": args.target, "removed": removed},
                 *([f"removed {count(removed, 'scan')}; `ctfm index compact {name}` reclaims their space"]
                   if removed else []))
    return 0 if removed else 1


def cmd_compact(args) -> int:
    """``index compact``: a folder's vector files rewritten without removed rows, a database VACUUMed; with
    ``--hnsw`` (PostgreSQL only) its HNSW indexes built as well (``result["hnsw"]``)."""
    from . import backends

    target = backends.resolve(args.index)
    if args.hnsw and not backends.is_database(target):
        raise ValueError(f"--hnsw builds PostgreSQL's HNSW indexes; {shown(args.index)} is a folder index, which "
                         "uses FAISS automatically for large searches: leave out --hnsw")
    with backends.open_index(target) as index:
        result = index.compact()
        if args.hnsw:
            result["hnsw"] = index.build_hnsw()
    print_result(args, result, compact_sentence(shown(args.index), result)
                 + ("; HNSW indexes built" if args.hnsw else ""))
    return 0


def compact_sentence(index, result: dict) -> str:
    """``compact``'s result in words: the rows it dropped and the files' new generation (a database: VACUUMed)."""
    if result.get("vacuumed"):
        return f"compacted {index}: VACUUM (ANALYZE) done"
    return (f"compacted {index}: dropped {count(int(result.get('scan_rows_dropped', 0)), 'scan row')} and "
            f"{count(int(result.get('patch_rows_dropped', 0)), 'patch row')} (file generation "
            f"{result.get('generation')})")


def _same_key(target):
    """A resolved index target in a form two names of one index share: a folder's absolute path, a URL as given."""
    return target if isinstance(target, str) else target.resolve()


def cmd_reembed(args) -> int:
    """``index reembed``: ``add`` into the new index from a CSV listing the old index's scans."""
    import argparse
    import tempfile

    from .. import files
    from . import backends

    source, output = (_same_key(backends.resolve(t)) for t in (args.index, args.output))
    if output == source:
        raise ValueError("the re-embedded index must be a new folder or schema: an index holds the vectors of one "
                         "model only")
    with backends.open_index(source, readonly=True) as old:
        records = [record for _, record in old.scans()]
        stride = settings_of(old).get("stride")
    if not records:
        raise ValueError(f"{backends.display(source)} holds no scans to re-embed")
    groups = {}  # one CSV per set of columns: a scan without a column must not get an empty one
    for r in records:
        labels = {k: v for k, v in (r.metadata.get("columns") or {}).items() if k not in ("path", "series_uid")}
        groups.setdefault(tuple(sorted(labels)), []).append((r, labels))
    folder = Path(tempfile.mkdtemp(prefix="ctfm-reembed-"))  # private (0700); removed on any exit or SIGTERM
    try:
        listings = []
        for n, (columns, rows) in enumerate(groups.items()):
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(["path", "series_uid", *columns])
            for r, labels in rows:
                writer.writerow([r.path, r.series_uid or "", *[labels[c] for c in columns]])
            listings.append(files.atomic_write_text(folder / f"scans{n}.csv", text.getvalue(), overwrite=False))
        add_args = argparse.Namespace(**{**vars(args), "index": str(output), "scans": [str(p) for p in listings],
                                         "stride": None if stride is None else ",".join(map(str, stride))})
        return cmd_add(add_args)
    finally:
        files.remove_tree(folder, folder.parent, "temporary folder")


# --- eval --------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from . import backends
    from .metrics import evaluate, read_labels

    try:
        ks = sorted({int(v) for v in str(args.k).split(",")})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ValueError(f"-k is a list of positive whole numbers like 1,3,5,10, not {args.k!r}")
    labels = read_labels(args.labels)
    with backends.open_index(args.index, readonly=True) as index:
        result = evaluate(index, labels, ks, args.metric, args.exclude_patient)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    print(f"{result['queries']} queries against {result['database']} labelled scans ({args.metric})")
    print(f"{'k':>4}  {'HR@k':>6}  {'P@k':>6}  {'AP@k':>6}")
    for k in ks:
        print(f"{k:>4}  {result[f'HR@{k}']:>6.3f}  {result[f'P@{k}']:>6.3f}  {result[f'AP@{k}']:>6.3f}")
    print(f"mAP (whole ranking): {result['mAP']:.3f}")
    if result["not_indexed"]:
        print(f"not in the index (left out): {'; '.join(result['not_indexed'])}", file=sys.stderr)
    return 0
