"""The ``ctfm`` command line.

    ctfm info
    ctfm models list | download ID | import FOLDER_OR_ZIP [--id NAME] | remove ID
    ctfm embed IMAGE --weights SRC --out FILE.npy [--mode volume|scan|point --point X,Y,Z]
    ctfm segment IMAGE --model whole-body|FOLDER|HF_ID --out OUT.nii.gz|OUT.seg.nrrd [--fast] [--structures a,b]
    ctfm segment FOLDER_OR_CSV --model ... --out-dir DIR   (batch: failed inputs are reported and skipped)
    ctfm segment TREE --dicom-tree --out-dir DIR [--out-format dcm] [--sr report.dcm] [--statistics stats.json]
                  (every CT series of a tree of DICOM studies into DIR/<study UID>/<series UID>/, DIR/summary.csv)
    ctfm stats IMAGE LABELS [--out STATS.json] [--csv STATS.csv]   (organ statistics; segment --statistics too)
    ctfm export-seg LABELS --reference SERIES_FOLDER --out SEG.dcm [--seg-type labelmap|binary]   (a DICOM SEG of a result)
    ctfm triage IMAGE --model FOLDER [--json-out OUT.json] [--saliency HEAT.nii.gz [--method occlusion|gradient]]
    ctfm saliency IMAGE --target embedding|point:X,Y,Z|class:NAME|triage [--weights SRC | --model FOLDER]
                  [--method occlusion|gradient] [--roi X0,Y0,Z0,X1,Y1,Z1 | --cube MM] --out HEAT.nii.gz|HEAT.dcm
    ctfm index add|query|info|remove|compact|eval INDEX ...   (similar-case retrieval: CTFMLib.retrieval.commands)

A model is named by a folder or file, a catalogue id (or ``whole-body``), a Hugging Face repo id, or the
name it was imported under; a command whose model is neither here nor downloadable now stops at once,
before PyTorch loads, naming the commands that work offline. What CT-FM says about a model (the catalogue
model its weights matched, labels it had to guess) is printed as ``ctfm: note:`` lines on stderr.

Points are LPS millimetres (DICOM/ITK), or RAS (Slicer) with ``--ras``.
``--progress json`` prints machine-readable progress for the Slicer modules.

Every command prints its result as sentences; with ``--json`` (a flag everywhere) as ONE JSON object, the
last line of stdout, while the other lines a person reads go to stderr (:func:`say`); where a file is meant
the option is ``--json-out FILE`` (``ctfm triage``). Sizes name their axis order: an image's as ITK and
Slicer show it, ``(x, y, z)``; a model's working grid ``(S, P, L)`` (:mod:`CTFMLib.text`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__, cache, model_store
from .arguments import Parser, fraction, memory_gb, parse_point, positive_float, positive_int
from .catalog import load_catalog
from .costs import duration
from .labels import DICOM_SEG_SUFFIX, segmentation_files, segmentation_suffix, sidecar_text
from .model_store import model_status
from .progress import Cancelled, Estimate, Terminated, make_renderer, subrange, terminate_on_sigterm
from .scans import IMAGE_SUFFIXES as SCAN_SUFFIXES
from .text import EXIT_ERROR, count, print_result, say, size

JSON_HELP = "print the result as one JSON object, the last line of stdout (other lines go to stderr)"


def add_json_flag(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: a flag on every command that prints a result (``--json-out FILE`` where a file is meant)."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP.replace("the result", what, 1))


def _versions() -> dict:
    out = {"ctfm": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "SimpleITK", "safetensors", "huggingface_hub"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None) or getattr(module, "Version", lambda: "?")()
        except ImportError:
            out[name] = None
    return out


def cmd_info(args) -> int:
    import torch

    from .runtime import select_device

    info = {
        "versions": _versions(),
        "device": {
            "auto": str(select_device("auto")),
            "cuda": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "threads": torch.get_num_threads(),
        },
        "cache": {
            "models": str(cache.models_dir()),
            "hub": str(cache.hub_cache_dir() or "Hugging Face default (HF_HOME)"),
            "offline": cache.hub_offline(),
        },
    }
    catalog = load_catalog()
    info["catalog"] = {
        "path": str(catalog.path),
        "models": [{"id": m.id, "repo_id": m.repo_id, "task": m.task, "status": model_status(m)} for m in catalog],
    }
    if args.json:
        print_result(args, info)
        return 0
    v = info["versions"]
    print("CT-FM " + v["ctfm"] + "  (" + ", ".join(f"{k} {val}" for k, val in v.items() if k != "ctfm") + ")")
    d = info["device"]
    print(f"device: auto -> {d['auto']}; CUDA {'yes: ' + ', '.join(d['cuda_devices']) if d['cuda'] else 'no'}; "
          f"{d['threads']} CPU threads")
    print(f"models folder: {info['cache']['models']}")
    print(f"download cache: {info['cache']['hub']}{'  (HF_HUB_OFFLINE: no downloads)' if info['cache']['offline'] else ''}")
    print(f"catalogue: {info['catalog']['path']}")
    for m in info["catalog"]["models"]:
        print(f"  {m['id']:<28} {m['task']:<22} {m['status']}")
    return 0


def cmd_models(args) -> int:
    catalog = load_catalog()
    if args.action == "list":  # no torch: the list is quick everywhere
        claimed, rows, lines = set(), [], []
        for m in catalog:
            status = model_status(m)
            rows.append({"id": m.id, "repo_id": m.repo_id, "status": status, "title": m.title,
                         "description": m.description, "folder": None})
            lines.append(f"{m.id:<28} {m.repo_id or '-':<45} {status}\n    {m.title}: {m.description}")
            imported = cache.imported_model(m.repo_id or m.id)
            if imported is not None:
                claimed.add(imported.name)
                rows[-1]["folder"] = str(imported)
        for model_id, folder in cache.imported_models():  # imported under an id the catalogue does not know
            if folder.name not in claimed:
                status = cache.import_status(folder)
                rows.append({"id": model_id, "repo_id": None, "status": status, "title": None, "description": None,
                             "folder": str(folder)})
                lines.append(f"{model_id:<28} {'-':<45} {status}\n    imported model in {folder}; "
                             f"use it as --model {_quoted(model_id)} or --weights {_quoted(model_id)}")
        print_result(args, {"models": rows}, *lines)
        return 0
    if args.action == "download":
        entry = catalog.find(args.name)
        if entry is not None and not entry.repo_id:
            raise cache.WeightsNotAvailableError(
                f"{entry.title} ({entry.id}) has no published weights to download. {entry.how_to}".strip())
        repo_id = entry.repo_id if entry else args.name
        cache.model_folder_name(repo_id)  # an id that could name another place is refused before anything
        revision = args.revision or (entry.revision if entry else None)
        why = cache.hub_unreachable(cache.DOWNLOAD_PROBE_SECONDS)
        if why is not None and cache.hub_cached(repo_id, revision) is None:  # fail now, before torch loads
            raise cache.WeightsNotAvailableError(cache.unavailable_message(repo_id, entry, why, download=True))
        from . import weights

        folder = model_store.download(repo_id, revision=revision, entry=entry, progress=args.progress_cb, explicit=True)
        model, info = weights.load_model(folder if entry is None else args.name, catalog=catalog)
        print_result(args, {"id": repo_id, "architecture": info.architecture, "folder": str(folder)},
                     f"{repo_id}: {info.architecture} ready at {folder}")
        return 0
    from . import weights

    if args.action == "import":
        dest = weights.import_model(args.name, repo_id=args.id, catalog=catalog, force=args.force)
        model_id = (cache.import_marker(dest) or {}).get("id") or dest.name
        entry = catalog.find(model_id)
        shown = _quoted(entry.id if entry else model_id)
        status = cache.import_status(dest)
        note = f" ({cache.NOT_PUBLISHED})" if status == cache.NOT_PUBLISHED else ""
        notes = list(weights.model_notes(dest, model_id, catalog)) if entry is None else []
        print_result(args, {"id": entry.id if entry else model_id, "folder": str(dest), "status": status,
                            "notes": notes},
                     f"imported {shown} into {dest}{note}; use it as --model {shown} or --weights {shown}",
                     *(f"note: {line}" for line in notes))
        return 0
    if args.action == "remove":
        removed = model_store.remove_model(args.name, catalog=catalog)
        print_result(args, {"name": args.name, "removed": [str(r) for r in removed]},
                     *([f"removed {r}" for r in removed] or [f"{args.name}: nothing to remove"]))
        return 0
    raise AssertionError(args.action)


def _quoted(name: str) -> str:
    import shlex

    return shlex.quote(str(name))


def cmd_embed(args) -> int:
    from .files import atomic_output, check_outputs

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy, not {out.name}")
    point = None
    if args.point is not None:
        point = parse_point(args.point)
        if args.ras:
            point = point * np.array([-1.0, -1.0, 1.0])
    mode = args.mode or ("point" if point is not None else "volume")
    if point is not None and mode != "point":
        raise ValueError(f"--point is used only by --mode point; leave it out for --mode {mode}")
    check_outputs([out], [args.image], overwrite=args.overwrite)
    from .image import read_image

    image = read_image(args.image, series_uid=args.series)
    _warn_if_not_ct(image, args.image)
    check_models(args)  # before torch loads: a model that cannot be had is refused at once
    from .embed import embed_image

    vector = embed_image(
        image, weights=args.weights, mode=mode, point_lps=point, aggregate=args.aggregate,
        device=args.device, precision=args.precision, threads=args.threads, batch_size=args.batch_size,
        progress=args.progress_cb,
    )
    if not np.isfinite(vector).all():
        raise ValueError("the embedding holds NaN or infinite values: the weights or the image are broken; "
                         "nothing was written")
    with atomic_output(out, overwrite=args.overwrite) as tmp:
        np.save(tmp, vector)
    print_result(args, {"out": str(out), "mode": mode, "dim": int(vector.shape[0])},
                 f"wrote {vector.shape[0]}-d {mode} embedding to {out}")
    return 0


# --- ctfm segment ----------------------------------------------------------------------

# What a batch folder offers: the scans CTFMLib.scans finds, and single DICOM files (one image each).
IMAGE_SUFFIXES = (*SCAN_SUFFIXES, ".dcm")


def write_segmentation(result, out: Path, overwrite: bool = True, dicom: Optional[tuple] = None) -> list:
    """Write a label map (+ ``.labels.json`` {value: name}), a Slicer ``.seg.nrrd`` or a DICOM SEG (``.dcm``:
    ``dicom`` is ``(series folder, series UID or None, seg type, model sha256 or None)``); returns the files written.

    The files are written together through :func:`CTFMLib.files.atomic_outputs`: a failure leaves
    neither of them, nor a temporary file; ``overwrite=False`` never replaces an existing file.
    """
    from .files import atomic_outputs
    from .image import write_image
    from .labels import write_seg_nrrd

    if segmentation_suffix(out) == DICOM_SEG_SUFFIX:
        from .dicom_seg import ALGORITHM_NAME, write_dicom_seg

        folder, series, seg_type, sha256 = dicom
        return [write_dicom_seg(result.labels, result.label_info, folder, out, algorithm=(ALGORITHM_NAME, __version__,
                                sha256), seg_type=seg_type or "labelmap", series_uid=series, overwrite=overwrite)]
    if segmentation_suffix(out) == ".seg.nrrd":
        return [write_seg_nrrd(result.labels, result.label_info, out, overwrite=overwrite)]
    files = segmentation_files(out)
    with atomic_outputs(files, overwrite=overwrite) as (label_map, sidecar):
        write_image(result.labels, label_map)
        sidecar.write_text(sidecar_text(result.label_info), encoding="utf-8")
    return files


def _image_files(folder: Path) -> list:
    """Images in a folder (files with an image suffix, sub-folders as DICOM series), by name."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        name = p.name.lower()
        if p.is_dir() or (name.endswith(IMAGE_SUFFIXES) and not name.endswith(".seg.nrrd")):
            found.append(p)
    return found


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _csv_jobs(source: Path, out_dir: Path, out_format: str) -> list:
    import csv

    from .files import child_path

    with open(source, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    header = [h.strip().lower() for h in rows[0]] if rows else []
    has_header = "image" in header or "path" in header
    columns = {name: i for i, name in enumerate(header)} if has_header else {"image": 0}
    image_column = columns.get("image", columns.get("path"))
    jobs = []
    for line, row in enumerate(rows[1 if has_header else 0:], 2 if has_header else 1):
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
        image = row[image_column].strip() if image_column < len(row) else ""
        if not image:
            continue
        path = Path(image)
        path = path if path.is_absolute() else source.parent / path
        series = cells.get("series") or None
        name = cells.get("out") or f"{_stem(path)}{'_' + series[-8:] if series else ''}.{out_format}"
        # An output name is a plain file name inside --out-dir: never a path that leaves it.
        jobs.append((path, series, child_path(out_dir, name, f"{source.name} line {line}: the output name")))
    return jobs


def segment_jobs(source: Path, out_dir: Path, out_format: str) -> list:
    """``[(input, series UID or None, output)]`` for a folder of images or a CSV (column ``image``,
    optional ``series`` and ``out``, a file name inside ``out_dir``; relative paths are relative to the CSV)."""
    from .files import child_path

    if source.is_dir():
        jobs = [(p, None, child_path(out_dir, f"{_stem(p)}.{out_format}", "output name")) for p in _image_files(source)]
    elif source.suffix.lower() == ".csv":
        jobs = _csv_jobs(source, out_dir, out_format)
    else:
        raise ValueError(f"--out-dir needs a folder of images or a .csv list as input, not {source}")
    if not jobs:
        raise ValueError(f"no images found in {source}")
    return jobs


# --- ctfm segment --dicom-tree: every CT series of a tree of DICOM studies -------------------------------

SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("series", "study", "folder", "status", "seconds", "structures", "reason")


def _tree_file_name(name: str, flag: str) -> str:
    """With ``--dicom-tree``, ``--sr``/``--statistics`` name a file in each series' folder: a plain name."""
    from .files import safe_name

    if Path(name).name != name or name == SUMMARY_NAME:
        raise ValueError(f"with --dicom-tree, {flag} is a file name written in each series' folder "
                         f"(e.g. {flag} {Path(name).name or 'NAME'}), not {name!r}")
    return safe_name(name, flag)


def job_extras(args, out: Optional[Path], stats_files: list) -> tuple:
    """``(report file or None, statistics files)`` of one output: as given with ``--out``; with ``--dicom-tree``
    the same names inside that series' folder (a plain ``--out-dir`` batch writes neither)."""
    if out is None or not args.dicom_tree:
        return (Path(args.sr) if args.sr else None), stats_files
    return (out.parent / args.sr if args.sr else None), [out.parent / f.name for f in stats_files]


def job_files(args, out: Path, stats_files: list) -> list:
    """Every file one job writes besides the segmentation itself (its report and statistics)."""
    report, stats = job_extras(args, out, stats_files)
    return ([report] if report else []) + stats


def _earlier_summary(path: Path) -> dict:
    """The rows of a summary an earlier run wrote, by (study, series): a series done then keeps its numbers."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {(r.get("study", ""), r.get("series", "")): r for r in csv.DictReader(f)}
    except (OSError, ValueError, csv.Error):
        return {}


def dicom_tree_jobs(args, source: Path, out_dir: Path, stats_files: list) -> tuple:
    """``(jobs, rows, job rows)`` of ``--dicom-tree``: a job ``(series folder, series UID, DIR/study/series/seg)``
    for every CT series of the tree whose outputs are not all there (all, with ``--overwrite``); ``rows`` the
    summary's rows, one for each series or non-image object found and each folder of unreadable files; a job's
    row (``job rows[output]``) is completed by the batch loop."""
    from .dicom import list_dicom_tree
    from .files import child_path

    if not source.is_dir():
        raise ValueError(f"--dicom-tree needs a folder of DICOM studies (any nesting) as input, not {source}")
    images, objects, unreadable = list_dicom_tree(source)
    earlier = _earlier_summary(out_dir / SUMMARY_NAME)
    seg_name = "seg.dcm" if args.out_format == "dcm" else f"labels.{args.out_format}"
    jobs, rows, job_rows = [], [], {}

    def where(paths) -> str:
        folders = sorted({str(Path(p).parent.relative_to(source)) for p in paths})
        return folders[0] if len(folders) == 1 else f"{folders[0]} (and {count(len(folders) - 1, 'other folder')})"

    def row(info, status: str, reason: str = "", folder: str = "") -> dict:
        rows.append({"series": info.uid if info else "", "study": info.study_uid if info else "",
                     "folder": folder or where(info.files), "status": status, "seconds": "", "structures": "",
                     "reason": reason})
        if status:
            say(args, f"{status}: {rows[-1]['folder']} ({info.uid if info else 'no series'}): "
                      f"{reason or 'its outputs exist (add --overwrite to segment it again)'}")
        return rows[-1]

    for info in objects:
        row(info, "skipped", f"{count(info.num_files, 'DICOM object')} without images ({info.modality or '?'}), "
                             "not a CT series")
    for info in images:
        modality = info.modality.upper()
        if modality != "CT":
            row(info, "skipped", f"modality {info.modality or '(none)'}"
                + (" (a segmentation, perhaps an earlier result)" if modality == "SEG" else "") + ", not CT")
            continue
        if info.localizer:
            row(info, "skipped", "localizer (scout, topogram) images: projections planned on, not a CT volume")
            continue
        folders = {p.parent for p in info.files}
        if len(folders) > 1:
            row(info, "failed", f"its {count(info.num_files, 'file')} lie in {count(len(folders), 'folder')}: "
                                "copy the series into one folder")
            continue
        try:
            out = child_path(child_path(child_path(out_dir, info.study_uid or "no-study-uid", "StudyInstanceUID"),
                                        info.uid or _no_uid_name(source, folders), "SeriesInstanceUID"), seg_name)
        except ValueError as e:  # no UID, or one that is not a plain folder name
            row(info, "failed", f"{_one_line(e)}: its output folder {out_dir}/<study UID>/<series UID> cannot be named")
            continue
        files = segmentation_files(out) + job_files(args, out, stats_files)
        present = [f.name for f in files if f.exists()]
        if present and not args.overwrite:
            if len(present) == len(files):
                done = row(info, "done", "")
                before = earlier.get((info.study_uid, info.uid), {})
                if before.get("status") in ("written", "done"):
                    done.update(seconds=before.get("seconds", ""), structures=before.get("structures", ""))
            else:
                missing = [f.name for f in files if f.name not in present]
                row(info, "failed", f"{', '.join(present)} exist from an earlier run but {', '.join(missing)} not: "
                                    "add --overwrite to segment it again")
            continue
        jobs.append((next(iter(folders)), info.uid, out))
        job_rows[out] = row(info, "")
    by_folder = {}
    for path, why in unreadable:
        by_folder.setdefault(path.parent, []).append(f"{path.name}: {why}")
    for folder, problems in sorted(by_folder.items()):
        row(None, "failed", f"{count(len(problems), 'DICOM file')} cannot be read (corrupt or truncated?): "
                            + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
            folder=str(folder.relative_to(source)))
    if not rows:
        raise ValueError(f"no DICOM series in {source} or its subfolders")
    return jobs, rows, job_rows


def _no_uid_name(source: Path, folders: set) -> str:
    """The output folder of a series without a SeriesInstanceUID (anonymised data): named by its folder in the
    tree, the same on every run, so a rerun finds it done."""
    import hashlib

    where = next(iter(folders)).resolve().relative_to(source.resolve()).as_posix()
    return "no-uid-" + hashlib.sha256(where.encode("utf-8")).hexdigest()[:16]


def _remove_empty_folders(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are empty (a failed series')."""
    folder, root = folder.resolve(), root.resolve()
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty, or not ours to remove
            return
        folder = folder.parent


def finish_tree(args, out_dir: Path, rows: list, results: list) -> int:
    """Write ``DIR/summary.csv`` (atomically) and say what the ``--dicom-tree`` batch did; 1 when a series failed."""
    import csv
    import io

    from .files import atomic_write_text

    rows = sorted(rows, key=lambda r: (r["study"], r["series"], r["folder"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary = atomic_write_text(out_dir / SUMMARY_NAME, text.getvalue(), overwrite=True)
    tally = {status: sum(r["status"] == status for r in rows) for status in ("written", "done", "skipped", "failed")}
    print_result(args, {"summary": str(summary), "series": rows, "results": results, **tally},
                 f"{count(len(rows), 'series', 'series')}: " + ", ".join(f"{n} {s}" for s, n in tally.items())
                 + f"; summary in {summary}")
    return 1 if tally["failed"] else 0


def check_dicom_options(args, out_suffix: Optional[str]) -> None:
    """Refuse, in one line and before any work, the DICOM SEG options where they mean nothing: ``--sr`` and
    ``--dicom-reference`` name one series or file (``--out`` only), all three need a ``.dcm`` output."""
    given = [flag for flag, value in (("--dicom-reference", args.dicom_reference), ("--seg-type", args.seg_type),
                                      ("--sr", args.sr)) if value]
    one = [flag for flag in given if flag != "--seg-type" and not (flag == "--sr" and args.dicom_tree)]
    if one and not args.out:
        raise ValueError(f"{one[0]} names one file: use it with --out SEG.dcm (one image), not with --out-dir or --plan"
                         + (" (with --dicom-tree, --sr names the report in each series' folder)" if one == ["--sr"] else ""))
    if given and out_suffix != DICOM_SEG_SUFFIX:
        raise ValueError(f"{given[0]} goes with a DICOM SEG output: --out SEG.dcm (or --out-format dcm with --out-dir)")
    if args.sr and not str(args.sr).lower().endswith(".dcm"):
        raise ValueError(f"--sr must be a file ending in .dcm (a DICOM Structured Report), not {Path(args.sr).name}")
    if args.sr and args.dicom_tree:
        _tree_file_name(args.sr, "--sr")


def dicom_reference(args, image: Path, out: Path) -> Optional[Path]:
    """The DICOM series folder a ``.dcm`` output (DICOM SEG) references: ``--dicom-reference``, else the input when
    it is a folder (a DICOM series); None for other outputs. Refused in one line when there is none."""
    if segmentation_suffix(out) != DICOM_SEG_SUFFIX:
        return None
    if args.dicom_reference:
        folder = Path(args.dicom_reference)
        if not folder.is_dir():
            raise ValueError(f"--dicom-reference {folder} is not a folder: give the DICOM series folder the input "
                             "was made from")
        return folder
    if image.is_dir():
        return image
    raise ValueError(f"a DICOM SEG ({out.name}) references the CT's DICOM series: give a DICOM series folder as "
                     f"input, or --dicom-reference SERIES_FOLDER for {image.name} made from one")


def _segment_quality(args) -> str:
    from .segment_plan import DEFAULT_QUALITY

    if args.fast and args.quality not in (None, "fast"):
        raise ValueError(f"--fast is --quality fast; it cannot go with --quality {args.quality}")
    return "fast" if args.fast else (args.quality or DEFAULT_QUALITY)


def cmd_segment(args) -> int:
    """``ctfm segment``: one image (``--out``), its plan (``--plan``) or a batch (``--out-dir``); a batch under
    ``torchrun`` is shared out over the processes (:func:`_segment_ranks`)."""
    from . import ranks

    if ranks.requested():
        return _segment_ranks(args)
    plan = _segment_plan(args)
    if isinstance(plan, int):  # nothing to segment: said so
        return plan
    check_models(args)  # before torch loads
    options = _segment_options(args, args.device)
    model, labels = _segment_model(args, plan, args.progress_cb)
    outcomes = _segment_each(args, plan, plan["jobs"], model, labels, options, args.progress_cb)
    return _segment_summary(args, plan, outcomes)


def _segment_plan(args):
    """What ``ctfm segment`` will do, every option and output checked: ``{"jobs": [(input, series, output)], ...}``;
    or the exit status when a batch has nothing left to segment (after saying so)."""
    from .files import check_outputs
    from .segment_plan import parse_spacing

    quality = _segment_quality(args)
    spacing = parse_spacing(args.spacing)
    if args.plan and (args.out or args.out_dir):
        raise ValueError("--plan prints what a segmentation would do and writes nothing: leave out --out/--out-dir")
    if not args.plan and bool(args.out) == bool(args.out_dir):
        raise ValueError("give either --out FILE (one image) or --out-dir DIR (a folder or CSV of images), or --plan")
    if args.dicom_tree and (args.plan or args.out or args.series):
        raise ValueError("--dicom-tree segments every CT series of a folder tree into --out-dir: leave out "
                         + ("--plan" if args.plan else "--out" if args.out else "--series"))
    source = Path(args.image)
    stats_files = statistics_files(args)
    skipped = []  # batch: images whose outputs exist (without --overwrite)
    rows, job_rows = None, {}  # --dicom-tree: the summary's rows; a job's output -> its row
    if args.plan:  # one image (a file or a DICOM series folder), as with --out
        check_dicom_options(args, None)
        jobs = [(source, args.series, None)]
    elif args.out:
        out = Path(args.out)
        check_dicom_options(args, segmentation_suffix(out))
        reference = dicom_reference(args, source, out)
        jobs = [(source, args.series, out)]
        sr_files = [Path(args.sr)] if args.sr else []
        check_outputs(segmentation_files(out) + stats_files + sr_files, [source, reference], overwrite=args.overwrite)
    else:
        check_dicom_options(args, segmentation_suffix(Path("x." + args.out_format)))
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out-dir {out_dir} is a file: give a folder")
        if args.dicom_tree:
            from .files import is_inside

            if source.is_dir() and (is_inside(out_dir, source) or out_dir.resolve() == source.resolve()):
                # A rerun would read its own results as studies (and a user's tree is not ours to write into).
                raise ValueError(f"--out-dir {out_dir} lies inside the tree it reads ({source}): give a folder "
                                 "outside it")
            jobs, rows, job_rows = dicom_tree_jobs(args, source, out_dir, stats_files)
        else:
            jobs = segment_jobs(source, out_dir, args.out_format)
        # No output may be an input (or the list itself) or repeat another; existing outputs are skipped below.
        outputs = [f for _, _, out in jobs for f in segmentation_files(out) + job_files(args, out, stats_files)]
        check_outputs(outputs, [source] + [path for path, _, _ in jobs], overwrite=True)
        if rows is not None and not jobs:
            return finish_tree(args, out_dir, rows, [])
        if not args.overwrite and rows is None:
            done = [job for job in jobs if any(f.exists() for f in segmentation_files(job[2]))]
            for path, _, out in done:
                say(args, f"{out} exists: skipped {path.name} (add --overwrite to segment it again)")
            jobs = [job for job in jobs if job not in done]
            skipped = [str(p) for p, _, _ in done]
            if not jobs:
                print_result(args, {"results": [], "failed": [], "skipped": skipped},
                             f"nothing to do: all {count(len(done), 'output')} exist")
                return 0
    structures = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
    # One object, so that a row and its job_rows entry stay one dict when it is sent to other processes.
    return {"jobs": jobs, "rows": rows, "job_rows": job_rows, "skipped": skipped, "stats_files": stats_files,
            "quality": quality, "spacing": spacing, "structures": structures}


def _segment_model(args, plan: dict, progress) -> tuple:
    """``(model, labels)`` of ``--model``; an unknown structure fails here, once, before any image is read."""
    from .segment import load_segmentation_model, select_structures

    model, labels = load_segmentation_model(args.model, progress)
    select_structures(labels, plan["structures"])
    return model, labels


def _segment_options(args, device: str):
    """The run options (device, precision, threads, batch size) of ``ctfm segment`` on ``device``."""
    from .runtime import run_options

    return run_options(device, args.precision, args.threads, None, args.batch_size)


def _segment_each(args, plan: dict, jobs: list, model, labels, options, progress_cb, numbers=None,
                  total: Optional[int] = None, who: str = "") -> list:
    """Segment ``jobs`` in turn: ``[("result" | "failed", entry)]``, one for each job (none with ``--plan``).

    In a batch a failed input is reported and the rest go on; ``numbers``/``total`` number the jobs within
    the whole batch (a rank's share of it) and ``who`` (``rank r: ``) names the process on its lines."""
    from .image import read_image
    from .segment import plan_for, segment_image

    quality, spacing, structures = plan["quality"], plan["spacing"], plan["structures"]
    stats_files, job_rows = plan["stats_files"], plan["job_rows"]
    numbers = list(numbers) if numbers is not None else list(range(1, len(jobs) + 1))
    total = len(jobs) if total is None else total
    outcomes = []
    for k, ((path, series, out), n) in enumerate(zip(jobs, numbers), 1):
        prefix = who + (f"[{n}/{total}] {path.name}: " if total > 1 else "")
        # A batch's bar runs once over all its inputs, each input a slice of it.
        progress = subrange(progress_cb, (k - 1) / len(jobs), k / len(jobs)) if args.out_dir else progress_cb
        written = []
        sr_file, job_stats = job_extras(args, out, stats_files)
        try:
            reference = dicom_reference(args, path, out) if out is not None else None
            image = read_image(path, series_uid=series)
            _warn_if_not_ct(image, path, prefix)
            if reference is not None:  # before the work: the SEG must lie on the series' grid
                from .dicom_seg import check_on_grid, source_series_datasets

                check_on_grid(image, source_series_datasets(reference, series), reference, what="input image")
            work = plan_for(image, model, options, quality, spacing, interpolation=args.interpolation,
                            progress=progress)
            if args.plan:
                print_result(args, plan_json(path, work), *plan_sentences(path, work))
                continue
            where = ("at the input's spacing" if work.working_spacing is None else
                     "at " + "x".join(f"{v:g}" for v in work.working_spacing) + " mm (S, P, L)")
            progress(None, Estimate(work.expected_seconds, f"{prefix}{quality} quality {where}, "
                     f"{count(work.windows_run, 'window')}, {options.device}, {options.precision}"))
            result = segment_image(image, model=model, labels=labels, structures=structures, quality=quality,
                                   spacing=spacing, interpolation=args.interpolation,
                                   largest_component=args.largest_component, options=options,
                                   progress=progress, max_memory_gb=args.max_memory_gb, plan=work)
            # before anything is written
            stats = segment_statistics(image, result) if job_stats or sr_file else None
            dicom = (reference, series, args.seg_type, getattr(model, "ctfm_sha256", None))
            written += write_segmentation(result, out, overwrite=args.overwrite, dicom=dicom)
            if sr_file:
                written.append(write_report(args, out, stats, dicom[3], sr_file))
            if job_stats:
                written += write_statistics_files(args, stats, job_stats)
            present = int(np.count_nonzero(np.bincount(result.labels.array.ravel())[1:]))
            if out in job_rows:
                job_rows[out].update(status="written", seconds=f"{result.seconds:.1f}", structures=present)
            outcomes.append(("result", {"image": str(path), "files": [str(f) for f in written],
                                        "structures_present": present, "seconds": round(float(result.seconds), 1),
                                        "expected_seconds": round(float(work.expected_seconds), 1)}))
            line = (f"{prefix}wrote {', '.join(map(str, written))} ({count(present, 'structure')} present, "
                    f"{duration(result.seconds)})")
            if args.out_dir:
                say(args, line)
            else:
                print_result(args, outcomes[-1][1], line)
        except Exception as e:  # noqa: BLE001 - in a batch every failure is reported and the rest go on
            if not args.out_dir or isinstance(e, Cancelled):
                raise
            for f in written:  # an input's outputs come all or none: a rerun then finds none, not some
                f.unlink(missing_ok=True)
            outcomes.append(("failed", {"image": str(path), "error": _one_line(e)}))
            print(f"ctfm: {who}FAILED {path}: {_one_line(e)}", file=sys.stderr, flush=True)
            if out in job_rows:
                job_rows[out].update(status="failed", reason=_one_line(e))
                _remove_empty_folders(out.parent, Path(args.out_dir))
    return outcomes


def _segment_summary(args, plan: dict, outcomes: list) -> int:
    """Say what a segmentation did (a batch: its summary; ``--dicom-tree``: also ``summary.csv``); the exit status,
    1 when an input failed."""
    results = [entry for kind, entry in outcomes if kind == "result"]
    failed = [entry for kind, entry in outcomes if kind == "failed"]
    if plan["rows"] is not None:
        return finish_tree(args, Path(args.out_dir), plan["rows"], results)
    if args.out_dir:
        n = len(plan["jobs"])
        print_result(args, {"results": results, "failed": failed, "skipped": plan["skipped"]},
                     f"segmented {n - len(failed)} of {count(n, 'image')}"
                     + (f"; failed: {', '.join(f['image'] for f in failed)}" if failed else ""))
    return 1 if failed else 0


def _segment_ranks(args) -> int:
    """``ctfm segment FOLDER --out-dir DIR`` as one of several processes under ``torchrun``
    (:mod:`CTFMLib.ranks`): rank 0 plans, every rank segments its share, rank 0 sums up; the same exit
    status on every rank."""
    from . import ranks
    from .progress import null_progress

    owned = ranks.join()
    try:
        rank, world = ranks.rank(), ranks.world()
        progress_cb = args.progress_cb if rank == 0 else null_progress  # one bar, over rank 0's share
        loaded = []

        def plan_and_load():
            if args.out or args.plan:
                raise ValueError(f"{'--out' if args.out else '--plan'} is about one image: nothing to share out "
                                 "under torchrun (WORLD_SIZE > 1); run it as a single process, or give --out-dir DIR")
            plan = _segment_plan(args)
            if not isinstance(plan, int) and plan["jobs"]:
                check_models(args)
                _segment_options(args, args.device)  # a bad --device or --precision is refused once, here
                loaded.extend(_segment_model(args, plan, progress_cb))
            return plan

        plan, code = _on_rank_0(args, rank, plan_and_load)
        if code is None and isinstance(plan, int):
            code = plan  # nothing to segment: rank 0 said so
        if code is not None:
            return code
        mine = ranks.share(plan["jobs"], rank, world)
        if ranks.local_rank() != 0:  # the first process of each machine fills its model cache, then the others
            ranks.barrier()
        if mine and not loaded:
            from .segment import load_segmentation_model

            loaded.extend(load_segmentation_model(args.model, progress_cb))
        if ranks.local_rank() == 0:
            ranks.barrier()
        from .runtime import rank_device

        options = _segment_options(args, rank_device(args.device, ranks.local_rank()))
        outcomes = _segment_each(args, plan, mine, *(loaded or (None, None)), options, progress_cb,
                                 numbers=range(rank + 1, len(plan["jobs"]) + 1, world), total=len(plan["jobs"]),
                                 who=f"rank {rank}: ")
        rows = [(out, plan["job_rows"][out]) for _, _, out in mine if out in plan["job_rows"]]
        gathered = ranks.gather((outcomes, rows))

        def summarise():
            everything = [None] * len(plan["jobs"])
            for r, (theirs, their_rows) in enumerate(gathered):
                everything[r::world] = theirs  # back in the order of the jobs
                for out, row in their_rows:
                    plan["job_rows"][out].update(row)
            return _segment_summary(args, plan, everything)

        status, failed_status = _on_rank_0(args, rank, summarise)
        return status if failed_status is None else failed_status
    finally:
        ranks.leave(owned)


def _on_rank_0(args, rank: int, work) -> tuple:
    """``work()`` on rank 0, its value sent to every rank: ``(value, None)``; when it failed ``(None, exit status)``
    on every rank. A refusal is printed here, once, before the other ranks hear of it: torchrun stops the
    processes still running as soon as one exits with an error, and rank 0 must have said why by then."""
    from . import ranks

    outcome, error = None, None
    if rank == 0:
        try:
            outcome = ("done", work())
        except Cancelled:  # the others stop too
            ranks.broadcast(("exit", 130))
            raise
        except Exception as e:  # noqa: BLE001 - reported below, or by main() when unexpected
            refusal = isinstance(e, _refusals()) and not args.debug
            if refusal:
                print(f"ctfm: error: {_one_line(e)}", file=sys.stderr, flush=True)
            else:
                error = e
            outcome = ("exit", EXIT_ERROR if refusal else 1)
        except BaseException:  # Ctrl-C, SIGTERM: the others stop too
            ranks.broadcast(("exit", 130))
            raise
    kind, value = ranks.broadcast(outcome)
    if error is not None:
        raise error
    return (value, None) if kind == "done" else (None, value)


def write_report(args, seg: Path, stats: dict, sha256, report: Path) -> Path:
    """``--sr``: the TID 1500 report of the SEG just written; if it fails, that SEG goes too (nothing half done)."""
    from .dicom_seg import ALGORITHM_NAME
    from .dicom_sr import write_dicom_sr

    try:
        return write_dicom_sr(seg, stats, report, algorithm=(ALGORITHM_NAME, __version__, sha256),
                              overwrite=args.overwrite)
    except BaseException:
        seg.unlink(missing_ok=True)
        raise


def statistics_files(args) -> list:
    """``segment --statistics stats.json``: ``[stats.json, stats.csv]`` (the CSV beside it, same stem), else []."""
    if not args.statistics:
        return []
    if not args.out and not args.dicom_tree:
        raise ValueError("--statistics names one file: use it with --out (one image), not with --out-dir or --plan "
                         "(with --dicom-tree, it names the file in each series' folder)")
    if args.dicom_tree:
        _tree_file_name(args.statistics, "--statistics")
    path = Path(args.statistics)
    if not path.name.lower().endswith(".json") or path.name.lower().endswith(".labels.json"):
        raise ValueError(f"--statistics must be a file ending in .json (not .labels.json), not {path.name}; the "
                         "CSV is written beside it")
    from .statistics import csv_path_for

    return [path, csv_path_for(path)]


def segment_statistics(image, result) -> dict:
    """Organ statistics of a segmentation on its input's (native) grid, named as its labels."""
    from .statistics import structure_statistics

    return structure_statistics(image, result.labels, {int(i.value): i.name for i in result.label_info})


def write_statistics_files(args, stats: dict, files: list) -> list:
    """Write stats.json and/or the CSV (atomically, together); a note names the structures cut by the border."""
    from .statistics import write_statistics

    written = write_statistics(stats, *files, overwrite=args.overwrite)
    cut = [name for name, s in stats.items() if s["touches_border"]]
    if cut:
        say(args, f"note: the image border cuts {count(len(cut), 'structure')}, so their volumes are lower bounds: "
                  + ", ".join(cut))
    return written


def cmd_stats(args) -> int:
    """``ctfm stats IMAGE LABELS``: organ statistics of an existing label map on its image's grid; prints one line
    per structure (with ``--json`` one object holding them) and writes ``--out`` (JSON) and ``--csv``."""
    from .files import check_outputs
    from .image import ImageError, read_image
    from .labels import read_seg_nrrd, read_sidecar, sidecar_path
    from .statistics import structure_statistics, write_statistics

    if args.out and not str(args.out).lower().endswith(".json"):
        raise ValueError(f"--out must be a file ending in .json, not {Path(args.out).name}")
    if args.csv and not str(args.csv).lower().endswith(".csv"):
        raise ValueError(f"--csv must be a file ending in .csv, not {Path(args.csv).name}")
    files = [Path(p) if p else None for p in (args.out, args.csv)]
    labels_path = Path(args.labels)
    inputs = [args.image, labels_path]
    if not labels_path.name.lower().endswith(".seg.nrrd"):
        try:
            inputs.append(sidecar_path(labels_path))
        except ValueError:
            pass
    check_outputs([f for f in files if f], inputs, overwrite=args.overwrite)
    image = read_image(args.image, series_uid=args.series)
    _warn_if_not_ct(image, args.image)
    if labels_path.name.lower().endswith(".seg.nrrd"):
        if not labels_path.is_file():
            raise ImageError(f"no such file: {labels_path}")
        try:
            labels, infos = read_seg_nrrd(labels_path)
        except RuntimeError as e:
            raise ImageError(f"cannot read {labels_path.name} as a segmentation: {_one_line(e)}") from None
        names = {int(i.value): i.name for i in infos}
    else:
        labels = read_image(labels_path)
        try:
            names = read_sidecar(labels_path)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{sidecar_path(labels_path).name} beside {labels_path.name} is not a "
                             "{value: name} JSON object: fix it or move it away") from None
    try:
        stats = structure_statistics(image, labels, names)
    except ImageError as e:
        raise ImageError(f"{labels_path.name}: {e}") from None
    written = write_statistics(stats, *files, overwrite=args.overwrite) if any(files) else []
    lines = [(f"{name}: {s['volume_ml']:.1f} mL ({count(s['voxels'], 'voxel')}), {s['hu_mean']:.0f} HU mean "
              f"(sd {s['hu_std']:.0f}, {s['hu_min']:.0f} to {s['hu_max']:.0f})"
              + (" - touches the image border: the volume is a lower bound" if s["touches_border"] else ""))
             for name, s in stats.items()] or [f"{labels_path}: no structure (every voxel is 0)"]
    print_result(args, {"image": str(args.image), "labels": str(labels_path), "files": [str(f) for f in written],
                        "statistics": stats}, *lines, *(f"wrote {f}" for f in written))
    return 0


def read_labels_file(path: Path) -> tuple:
    """``(label map Image, [LabelInfo])`` of a ``.seg.nrrd`` (names, colours and terminology from the file) or of
    a label map with its ``.labels.json`` (names; colours and codes as :func:`CTFMLib.labels.load_labels` gives
    them); refused in one line when either is missing or unreadable."""
    from .image import ImageError, read_image
    from .labels import load_labels, read_seg_nrrd, read_sidecar, sidecar_path

    if not path.is_file():
        raise ImageError(f"no such file: {path}")
    if path.name.lower().endswith(".seg.nrrd"):
        try:
            return read_seg_nrrd(path)
        except RuntimeError as e:
            raise ImageError(f"cannot read {path.name} as a segmentation: {_one_line(e)}") from None
    sidecar = sidecar_path(path)  # refuses a suffix that is no label map's
    try:
        names = read_sidecar(path)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{sidecar.name} beside {path.name} is not a {{value: name}} JSON object: fix it or move "
                         "it away") from None
    if names is None:
        raise ValueError(f"{path.name} has no {sidecar.name} beside it: a DICOM SEG names its segments, so give the "
                         "label map with its names (as `ctfm segment` writes them) or a .seg.nrrd")
    return read_image(path), load_labels(names)


def cmd_export_seg(args) -> int:
    """``ctfm export-seg LABELS --reference SERIES --out SEG.dcm``: an existing result (a label map with its
    ``.labels.json``, or a ``.seg.nrrd``) on the grid of a DICOM series, written as the DICOM SEG that
    ``ctfm segment SERIES --out SEG.dcm`` writes; the CT-FM Segment panel's "Export DICOM SEG" runs it in a
    child process (highdicom needs pydicom 3, which Slicer 5.6-5.10 do not bundle)."""
    from .dicom_seg import ALGORITHM_NAME, write_dicom_seg
    from .files import check_outputs
    from .labels import sidecar_path

    out, labels_path, reference = Path(args.out), Path(args.labels), Path(args.reference)
    if segmentation_suffix(out) != DICOM_SEG_SUFFIX:
        raise ValueError(f"--out must be a file ending in .dcm (a DICOM SEG), not {out.name}")
    if not reference.is_dir():
        raise ValueError(f"--reference {reference} is not a folder: give the DICOM series folder the labels were "
                         "computed on")
    inputs = [labels_path, reference]
    if not labels_path.name.lower().endswith(".seg.nrrd"):
        try:
            inputs.append(sidecar_path(labels_path))
        except ValueError:
            pass
    check_outputs([out], inputs, overwrite=args.overwrite)
    labels, infos = read_labels_file(labels_path)
    write_dicom_seg(labels, infos, reference, out, algorithm=(ALGORITHM_NAME, __version__, None),
                    seg_type=args.seg_type, series_uid=args.series, overwrite=args.overwrite)
    names = {int(i.value): i.name for i in infos}
    present = [names[int(v)] for v in np.unique(np.asarray(labels.array)) if int(v) != 0]
    print_result(args, {"labels": str(labels_path), "reference": str(reference), "files": [str(out)],
                        "seg_type": args.seg_type, "segments": present},
                 f"wrote {out} ({args.seg_type} DICOM SEG, {count(len(present), 'segment')}: {', '.join(present)})")
    return 0


def plan_json(path: Path, plan) -> dict:
    """``segment --plan --json``: the plan's fields, the input's size and spacing marked ``(x, y, z)``."""
    return {"image": str(path), **plan.to_dict()}


def plan_sentences(path: Path, plan) -> list:
    """What ``segment --plan`` prints without ``--json``: the grid (axes named), windows, time and memory."""
    d = plan_json(path, plan)
    working = d["working"]
    where = ("the input's spacing" if not working["resampled"] else
             "x".join(f"{v:g}" for v in working["spacing_mm"]) + " mm (S, P, L)")
    windows = d["windows"]
    lines = [f"{path}: {size(d['input']['shape'])} at "
             + "x".join(f"{v:g}" for v in d["input"]["spacing"]) + " mm (x, y, z)",
             (f"{d['quality']} quality at {where}: working grid {size(working['grid'], 'SPL')}, "
              f"{count(windows['run'], 'window')} of {windows['total']} to run ({windows['skipped']} all air), "
              f"window {size(d['roi'], 'SPL')}"),
             (f"expected time: about {duration(d['expected_seconds'])} on {d['device']} ({d['precision']}; "
              f"{d['estimate']}); expected peak memory {d['expected_peak_gb']:g} GB")]
    return lines + [f"note: {note}" for note in d["notes"]]


def cmd_train(args) -> int:
    """Train; prints the summary (sentences, or with ``--json`` the summary object). Exit 0 only when the
    schedule ran to its end: a run stopped by SIGTERM (SIGINT) keeps its checkpoint and summary but exits
    143 (130), so schedulers see it did not finish."""
    from .train.run import run
    from .train.trainer import TrainingError

    try:
        summary = run(args.task, args.config, args.out, resume=args.resume, max_steps=args.max_steps,
                      device=args.device, progress=args.progress_cb, allow_non_ct=args.allow_non_ct,
                      max_memory_gb=args.max_memory_gb)
    except TrainingError as e:
        print(f"ctfm: training stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print_result(args, {k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items()},
                     *train_sentences(args.task, summary))
    code = int(summary.get("exit_code", 0))
    if code and main_process:
        print(f"ctfm: training stopped ({summary.get('stop_reason')}) after step {summary.get('steps')}, before the "
              f"end of its schedule; the checkpoint {summary.get('checkpoint')} is kept: run again with --resume to "
              "continue", file=sys.stderr)
    return code


def train_sentences(task: str, summary: dict) -> list:
    """What ``ctfm train`` prints without ``--json``: steps, last loss, where the model and checkpoint are."""
    loss = summary.get("last_loss")
    loss = f"{loss:.4g}" if isinstance(loss, (int, float)) else "none"
    scans = summary.get("scans")
    lines = [f"{task}: {count(int(summary.get('steps') or 0), 'step')}"
             + (f" on {count(int(scans), 'scan')}" if isinstance(scans, int) else "")
             + f", last loss {loss} ({summary.get('device')})"]
    if summary.get("exported"):
        lines.append(f"model: {summary['exported']}")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    skipped = summary.get("skipped") or []
    if skipped:
        lines.append(f"skipped {count(len(skipped), 'scan')}: "
                     + "; ".join(f"{path} ({why})" for path, why in list(skipped)[:5])
                     + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    return lines


def cmd_triage(args) -> int:
    """Triage one head CT; prints the verdict (with ``--json`` one JSON object, the last stdout line), and writes
    that object to ``--json-out`` when given."""
    from .files import atomic_outputs, check_outputs
    from .image import WRITE_SUFFIXES, read_image, write_image
    from .progress import subrange
    from .triage import load_triage, triage_image

    if args.method and not args.saliency:
        raise ValueError("--method chooses how the saliency map is computed; give --saliency HEAT.nii.gz as well")
    if args.saliency and not str(args.saliency).lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"--saliency must be an image file ending in {', '.join(WRITE_SUFFIXES)}, not {args.saliency}")
    if args.json_out and not str(args.json_out).lower().endswith(".json"):
        raise ValueError(f"--json-out must be a file ending in .json, not {args.json_out}")
    outputs = [Path(p) for p in (args.json_out, args.saliency) if p]
    check_outputs(outputs, [args.image], overwrite=args.overwrite)
    image = read_image(args.image, series_uid=args.series)
    _warn_if_not_ct(image, args.image)
    check_models(args)
    net, config, _ = load_triage(args.model)
    model = (net, {**config, "name": str(args.model)})  # loaded once, for the result and the saliency map
    progress = subrange(args.progress_cb, 0.0, 0.2 if args.saliency else 1.0)
    result = triage_image(image, model, device=args.device, progress=progress)
    if not np.isfinite(result.probability):
        raise ValueError("the triage model gave no finite probability: its weights are broken; nothing was written")
    heat = None
    if args.saliency:
        from .saliency import saliency_image  # imported only when a map is asked for

        heat = saliency_image(image, target="triage", triage_model=model, method=args.method or "gradient",
                              device=args.device, progress=subrange(args.progress_cb, 0.2, 1.0))
    verdict = {**result.to_dict(), "saliency": str(args.saliency) if args.saliency else None}
    with atomic_outputs(outputs, overwrite=args.overwrite) as temporaries:
        for path, tmp in zip(outputs, temporaries):
            if heat is not None and path == Path(args.saliency):
                write_image(heat.heatmap, tmp)
            else:
                tmp.write_text(json.dumps(verdict) + "\n", encoding="utf-8")
    relation = ">=" if result.probability >= result.threshold else "<"
    lines = [(f"{result.decision}: probability {result.probability:.3f} {relation} threshold "
              f"{result.threshold:.3f} (logit {result.logit:+.3f}; {result.seconds:.1f} s)")]
    lines += [f"wrote {path}" for path in outputs]
    print_result(args, verdict, *lines)
    return 0


def cmd_saliency(args) -> int:
    """A saliency heatmap: writes HEAT.nii.gz (or, from a DICOM series, HEAT.dcm: a DICOM Parametric Map) and
    HEAT.json; prints what it wrote (with ``--json`` HEAT.json's object, the last stdout line)."""
    from .arguments import spacing_mm
    from .files import check_outputs
    from .image import read_image
    from .saliency import parse_box, parse_target, saliency_image, sidecar_json, write_saliency

    target, point, class_name = parse_target(args.target)
    if str(args.out).lower().endswith(".dcm") and not Path(args.image).is_dir():
        raise ValueError(f"--out {Path(args.out).name}: a DICOM Parametric Map references the DICOM series the map is "
                         f"computed on, and {args.image} is not a series folder; give the series, or use .nii.gz")
    check_outputs([Path(args.out), sidecar_json(args.out)], [args.image], overwrite=args.overwrite)
    ras = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    if args.ras and point is not None:
        point = point * ras
    center = parse_point(args.center) * (ras if args.ras else 1.0) if args.center is not None else None
    region = None
    if args.roi is not None:
        region = tuple(c * ras if args.ras else c for c in parse_box(args.roi))
    if target == "triage" and not args.model:
        raise ValueError("--target triage needs --model FOLDER: a triage model written by `ctfm train classify`")
    if target != "triage" and args.model:
        raise ValueError("--model is the triage model (--target triage); give the encoder or segmentation model "
                         "with --weights")
    if target == "triage" and args.weights:
        raise ValueError("--target triage takes its network from --model; leave out --weights")
    if center is not None and (target == "point" or args.cube is None):
        raise ValueError("--center is the centre of --cube for the embedding, class and triage targets "
                         "(the point target's cube is centred on its point)")
    if args.cube is not None and point is None and center is None:
        raise ValueError("--cube needs a centre: use --target point:X,Y,Z, or --center X,Y,Z with other targets")
    spacing = "auto" if args.spacing is None else args.spacing
    if spacing not in ("auto", "native"):
        try:
            spacing = (spacing_mm(spacing),) * 3
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--spacing is auto, native or a voxel size in mm: it {e}") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    image = read_image(args.image, series_uid=args.series)
    _warn_if_not_ct(image, args.image)
    check_models(args)
    result = saliency_image(
        image, weights=args.weights, target=target, method=args.method, point_lps=center if point is None else point,
        class_name=class_name, triage_model=args.model, region_lps=region, cube_mm=args.cube, mask_size=args.mask_size,
        overlap=args.overlap, batch_size=args.batch_size, device=args.device, progress=args.progress_cb,
        spacing=None if spacing == "native" else spacing, steps=args.steps, max_memory_gb=args.max_memory_gb,
        precision=args.precision,
    )
    extra = {"image": str(args.image)}
    if result.peak_lps is not None:
        extra["peak_ras"] = [round(float(v), 3) for v in result.peak_lps * ras]
    written = write_saliency(result, args.out, extra, overwrite=args.overwrite, dicom_series=args.image,
                             series_uid=args.series, target_text=args.target)
    print_result(args, written, *saliency_sentences(written, sidecar_json(args.out)))
    return 0


def saliency_sentences(summary: dict, sidecar) -> list:
    """What ``ctfm saliency`` prints without ``--json``: the files, the target and method, the region, the peak."""
    lines = [(f"wrote {summary['heatmap']} and {sidecar} ({summary.get('target')}, {summary.get('method')}, "
              f"{duration(float(summary.get('seconds') or 0.0))})")]
    region = summary.get("region")
    if region:
        lines.append("region: " + ", ".join(f"{v:g}" for v in region["min_lps"]) + " to "
                     + ", ".join(f"{v:g}" for v in region["max_lps"]) + " mm (LPS)")
    if summary.get("peak_ras") is not None:
        lines.append("peak at " + ", ".join(f"{v:g}" for v in summary["peak_ras"]) + " mm (RAS, as Slicer shows it)")
    return lines + [f"note: {note}" for note in summary.get("notes") or []]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ctfm", description="CT-FM: a 3D CT foundation model, from the command line.")
    p.add_argument("--version", action="version", version=f"ctfm {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, print the full Python traceback too")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="how to show progress (json: one JSON object a line on stderr)")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device, cache folders and the model catalogue")
    add_json_flag(info, "the information")
    info.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="list, download, import or remove models")
    models.add_argument("action", choices=("list", "download", "import", "remove"),
                        help="list the catalogue and the imports; download ID; import FOLDER_OR_ZIP; remove ID")
    models.add_argument("name", nargs="?", help="model id or repo id; for import, a folder or .zip")
    models.add_argument("--revision", help="download: a branch, tag or commit")
    models.add_argument("--id", help="import: the name to file the model under, which --model and --weights then "
                                     "take: a catalogue id, OWNER/NAME or a name (default: the folder's or zip's "
                                     "name)")
    models.add_argument("--force", action="store_true",
                        help="import: accept other weights than the published ones under a published catalogue id "
                             "(shown as 'imported, not the published weights')")
    add_json_flag(models)
    models.set_defaults(func=cmd_models)

    embed = sub.add_parser("embed", help="compute a 512-d CT-FM embedding")
    embed.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    embed.add_argument("--weights", default="ct_fm_feature_extractor",
                       help="model id, Hugging Face repo id, folder or .safetensors file (default: %(default)s)")
    embed.add_argument("--out", required=True, help="output .npy file")
    embed.add_argument("--mode", choices=("volume", "scan", "point"),
                       help="volume: the whole volume at once; scan: 24x128x128 patches at 3x1x1 mm, combined "
                            "(--aggregate); point: the patch around --point (default: point with --point, else volume)")
    embed.add_argument("--point", help="X,Y,Z in mm (LPS unless --ras) for --mode point")
    embed.add_argument("--ras", action="store_true", help="--point is in RAS (as Slicer shows it)")
    embed.add_argument("--aggregate", choices=("mean", "max", "min"), default="mean", help="scan mode: how patches combine")
    embed.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    embed.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_run_options(embed)
    add_json_flag(embed)
    embed.set_defaults(func=cmd_embed)

    seg = sub.add_parser("segment", help="segment a CT (whole-body structures or a tumour model)")
    seg.add_argument("image",
                     help="NIfTI, NRRD, MHA file or DICOM series folder; with --out-dir a folder of them or a CSV")
    seg.add_argument("--model", default="whole-body",
                     help="whole-body, a model folder, catalogue id or Hugging Face repo id (default: %(default)s)")
    seg.add_argument("--out", help="output label map: .nii.gz, .nii, .nrrd, .mha (+ .labels.json), .seg.nrrd, or .dcm "
                                   "(DICOM SEG, on the grid of a DICOM series input or of --dicom-reference)")
    seg.add_argument("--out-dir", help="batch: the folder for the outputs")
    seg.add_argument("--dicom-tree", action="store_true",
                     help="with --out-dir: IMAGE is a folder tree of DICOM studies (any nesting); every CT series in "
                          "it is segmented into DIR/<StudyInstanceUID>/<SeriesInstanceUID>/ (seg.dcm with --out-format "
                          "dcm, else labels.<format> + .labels.json; --sr and --statistics then name files in that "
                          "folder), localizers and non-CT series are skipped, and DIR/summary.csv lists every series "
                          "(done, written, skipped or failed, with the reason). A series whose outputs all exist is "
                          "done and not run again (unless --overwrite). Exit 1 when a series failed in this run (a "
                          "corrupt one fails again on each rerun), else 0: a rerun where all is done exits 0")
    seg.add_argument("--out-format", default="nii.gz", choices=("nii.gz", "nii", "nrrd", "mha", "seg.nrrd", "dcm"),
                     help="batch: output file type (default: %(default)s; dcm: DICOM SEG, for DICOM series folders)")
    seg.add_argument("--dicom-reference", metavar="SERIES_FOLDER",
                     help="with --out SEG.dcm and an image file as input: the DICOM series it was made from (same "
                          "grid), which the DICOM SEG references (--series picks one in a folder of several)")
    seg.add_argument("--seg-type", choices=("labelmap", "binary"),
                     help="DICOM SEG type: labelmap (default; one frame a slice) or binary (one frame a segment and "
                          "slice, for viewers without LABELMAP support)")
    seg.add_argument("--sr", metavar="REPORT.dcm",
                     help="with --out SEG.dcm: also write a DICOM Structured Report (TID 1500) with each structure's "
                          "volume and mean HU, referencing the SEG's segments")
    seg.add_argument("--quality", choices=("full", "standard", "fast"),
                     help="full (default): the model card's window overlap 0.625; standard: overlap 0.5, about 20%% "
                          "fewer windows, labels differ on a few %% of voxels (see the README); fast: at 3 mm, much "
                          "faster, coarser")
    seg.add_argument("--fast", action="store_true", help="the same as --quality fast")
    seg.add_argument("--spacing", default="model",
                     help="the voxel size to segment at: model (the spacing the model was trained at; default), "
                          "native (the input's: the model card), or mm: one number or three (S,P,L)")
    seg.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                     help="with a resampled working grid: bring the class evidence back to the input's voxels "
                          "linearly and take the argmax there (default), or map the labels (nearest)")
    seg.add_argument("--plan", action="store_true",
                     help="print what the segmentation would do (grid, windows, expected time and memory; as JSON "
                          "with --json) "
                          "and run nothing")
    seg.add_argument("--structures", help="comma-separated structure names to keep (default: all)")
    seg.add_argument("--largest-component", action="store_true",
                     help="keep only the largest connected piece of each structure")
    seg.add_argument("--statistics", metavar="STATS.json",
                     help="also write organ statistics (volume, HU, centroid, box, border flag; as `ctfm stats`) "
                          "on the input's grid to this .json, and a CSV beside it with the same stem")
    seg.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace existing outputs (batch: segment again the images whose outputs exist)")
    seg.add_argument("--max-memory-gb", type=memory_gb,
                     help="refuse to start when the estimated peak memory is above this (default: 85%% of available)")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    seg.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32 (default)")
    seg.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch")
    seg.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")
    add_json_flag(seg, "the result (a batch: one object with its results and failures at the end; --plan: the "
                       "plan)")
    seg.set_defaults(func=cmd_segment)

    st = sub.add_parser("stats", help="organ statistics of a label map: volume, HU, centroid, bounding box, border")
    st.add_argument("image", help="the CT the labels belong to: NIfTI, NRRD, MHA file or DICOM series folder")
    st.add_argument("labels", help="its label map on the same grid: .nii.gz, .nii, .nrrd, .mha (names from the "
                                   ".labels.json beside it) or .seg.nrrd")
    st.add_argument("--out", help="write the statistics to this .json ({structure: {...}}: TotalSegmentator's "
                                  "statistics.json fields volume (mm3) and intensity (mean HU), plus ours)")
    st.add_argument("--csv", help="write them to this .csv too, one row per structure")
    st.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    st.add_argument("--overwrite", action="store_true", help="replace --out / --csv if they exist")
    add_json_flag(st, "the statistics")
    st.set_defaults(func=cmd_stats)

    ex = sub.add_parser("export-seg", help="an existing label map or .seg.nrrd as a DICOM SEG referencing its "
                                           "DICOM series")
    ex.add_argument("labels", help="the result on the series' grid: .nii.gz, .nii, .nrrd, .mha (names from the "
                                   ".labels.json beside it) or .seg.nrrd")
    ex.add_argument("--reference", required=True, metavar="SERIES_FOLDER",
                    help="the DICOM series folder the labels were computed on (same grid); the SEG references it")
    ex.add_argument("--out", required=True, help="the DICOM SEG to write: a file ending in .dcm")
    ex.add_argument("--seg-type", choices=("labelmap", "binary"), default="labelmap",
                    help="labelmap (default; one frame a slice) or binary (one frame a segment and slice, for "
                         "viewers without LABELMAP support)")
    ex.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_json_flag(ex)
    ex.set_defaults(func=cmd_export_seg)

    tr = sub.add_parser("train", help="pretrain CT-FM or fine-tune it (runs under torchrun as well)")
    tr.add_argument("task", choices=("pretrain", "segment", "classify"),
                    help="pretrain (contrastive, as CT-FM), segment (fine-tune a SegResNetDS) or classify "
                         "(triage: full, frozen trunk or linear probe)")
    tr.add_argument("--config", help="training configuration (.json, or .yaml with PyYAML); defaults otherwise")
    tr.add_argument("--out", help="output folder: checkpoints, metrics.csv, the trained model (default: run.out_dir); "
                                  "a new or empty folder, or an earlier run of the same task")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    tr.add_argument("--max-steps", type=positive_int, help="stop after this many steps (default: optim.max_steps)")
    tr.add_argument("--device", help="auto, cpu, cuda or mps (default: run.device)")
    tr.add_argument("--allow-non-ct", action="store_true",
                    help="train on scans whose values do not look like a CT in Hounsfield units (no air or fat, "
                         "e.g. MR); without it they are skipped and listed in skipped.csv (data.allow_non_ct)")
    tr.add_argument("--max-memory-gb", type=memory_gb,
                    help="memory a pretraining step may use (default: 85%% of what is available; "
                         "run.max_memory_gb): the step runs in micro-batches of crops that fit, or is refused "
                         "before any scan is read")
    add_json_flag(tr, "the run's summary")
    tr.set_defaults(func=cmd_train)

    tri = sub.add_parser("triage", help="head-CT triage with a model trained by `ctfm train classify`")
    tri.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder (a head CT in HU)")
    tri.add_argument("--model", required=True,
                     help="the triage model folder (<out_dir>/model of `ctfm train classify`) or an imported id")
    tri.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    add_json_flag(tri)
    tri.add_argument("--json-out", metavar="FILE", help="also write the result (the --json object) to this .json file")
    tri.add_argument("--saliency", help="also write a heat map of what drove the result (.nii.gz, .nrrd, .mha)")
    tri.add_argument("--method", choices=("occlusion", "gradient"),
                     help="saliency method (default: gradient; occlusion on the triage grid takes thousands of passes)")
    tri.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    tri.add_argument("--overwrite", action="store_true", help="replace --json-out / --saliency if they exist")
    tri.set_defaults(func=cmd_triage)

    sal = sub.add_parser("saliency", help="a heatmap of the voxels that drive an embedding, a class or a triage")
    sal.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder (a CT in HU)")
    sal.add_argument("--target", required=True,
                     help="embedding (the scan), point:X,Y,Z (the patch there, mm), class:NAME (a segmentation "
                          "class) or triage")
    sal.add_argument("--method", choices=("occlusion", "gradient"), default="occlusion",
                     help="occlusion (upstream's, slow) or gradient (integrated gradients, fast); default occlusion")
    sal.add_argument("--weights", help="the encoder (embedding, point; default ct_fm_feature_extractor) or the "
                                       "segmentation model (class; default whole-body)")
    sal.add_argument("--model", help="triage: the triage model folder (<out_dir>/model of `ctfm train classify`)")
    limit = sal.add_mutually_exclusive_group()
    limit.add_argument("--roi", help="only this box: X0,Y0,Z0,X1,Y1,Z1 in mm, two opposite corners")
    limit.add_argument("--cube", type=positive_float, help="only a cube of this edge (mm) around the point (or --center)")
    sal.add_argument("--center", help="X,Y,Z in mm: the --cube's centre for the embedding, class and triage targets")
    sal.add_argument("--ras", action="store_true", help="points and --roi are RAS (as Slicer shows them), not LPS")
    sal.add_argument("--out", required=True, help="the heatmap: .nii.gz, .nii, .nrrd or .mha, or .dcm (a DICOM "
                                                  "Parametric Map) for a DICOM series (+ a .json beside it)")
    sal.add_argument("--mask-size", type=positive_int, help="occlusion cube edge in voxels (default: 10; triage 4x10x10, S, P, L)")
    sal.add_argument("--overlap", type=fraction, default=0.25, help="overlap of the occlusion cubes (default: 0.25)")
    sal.add_argument("--steps", type=positive_int, default=4, help="gradient: integration steps (default: 4)")
    sal.add_argument("--spacing", help="embedding and class: auto (embedding 3 mm, class native), native, or MM")
    sal.add_argument("--batch-size", type=positive_int, help="occluded copies per pass (default 12) or gradient steps (1)")
    sal.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    sal.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    sal.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                     help="fp32 (default), bf16 (the network's passes under bf16 autocast: faster on GPUs and on CPUs "
                          "with AVX512-BF16/AMX, a slightly different map) or auto (bf16 where it is faster)")
    sal.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch")
    sal.add_argument("--max-memory-gb", type=memory_gb, help="refuse before running when the estimated peak memory "
                                                          "is higher (default: 85%% of the memory available)")
    sal.add_argument("--overwrite", action="store_true", help="replace --out and its .json if they exist")
    add_json_flag(sal, "the result (what HEAT.json holds)")
    sal.set_defaults(func=cmd_saliency)

    from .retrieval.commands import add_index_parser  # ctfm index add|query|info|remove|compact|eval

    add_index_parser(sub, _add_run_options, add_json_flag)
    _accept_global_options_anywhere(p)
    return p


def _accept_global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--progress`` and ``--debug`` also after the subcommand (``ctfm segment CT --progress json``): each
    subcommand knows them too, with no default of its own, so the value given before it stays otherwise."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="on an error, print the full Python traceback too")
                subparser.add_argument("--progress", choices=("bar", "json", "none"), default=argparse.SUPPRESS,
                                       help="how to show progress (json: one JSON object a line on stderr)")
                _accept_global_options_anywhere(subparser)

def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default), bf16 (faster on GPUs and on CPUs with AVX512-BF16/AMX, slightly different) "
                        "or auto (bf16 where it is faster, else fp32)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch")
    p.add_argument("--batch-size", type=positive_int, default=2, help="patches per forward pass (default: 2)")


def _warn_if_not_ct(image, name, prefix: str = "") -> None:
    """One ``ctfm: warning:`` line on stderr when ``image`` does not look like a CT in HU (CTFMLib.ct_check)."""
    from .ct_check import warning_for

    warning = warning_for(image, name)
    if warning:
        print(f"ctfm: {prefix}warning: {warning}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    """An exception's message as one line (a traceback never reaches the user without --debug)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def _refusals() -> tuple:
    """Exception types that mean "this input or option cannot be used": one line, exit 2.

    Nothing is imported here (an error must not wait for torch): image and weights errors are ValueErrors.
    """
    kinds = [cache.WeightsError, ValueError, OSError]
    for module, name in (("CTFMLib.segment", "SegmentationError"), ("CTFMLib.retrieval.store", "RetrievalIndexError"),
                         ("CTFMLib.train.trainer", "TrainingError"), ("CTFMLib.train.config", "ConfigError")):
        if module in sys.modules:  # imported only when a command used it (they pull in torch)
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


def _model_sources(args) -> list:
    """The models a command will load (``--weights``, ``--model`` or their defaults), to check before it starts."""
    command = args.command
    if command == "embed":
        return [args.weights]
    if command in ("segment", "triage"):
        return [args.model]
    if command == "saliency":
        target = str(args.target).strip().lower()
        if target == "triage":
            return [args.model] if args.model else []
        return [args.weights or ("whole-body" if target.startswith("class:") else "ct_fm_feature_extractor")]
    return []


def check_models(args) -> None:
    """Refuse at once, once the options are checked but before torch loads or any input is read, a model
    that is neither on this computer nor downloadable now (:func:`CTFMLib.cache.check_available`: the hub is
    tried once, briefly)."""
    sources = _model_sources(args)
    if not sources:
        return
    catalog = load_catalog()
    for source in sources:
        cache.check_available(source, catalog)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """CT-FM's own warnings as one line each (``ctfm: note:`` for what it says about a model)."""
    from .catalog import ModelNote

    package = str(Path(__file__).resolve().parent)
    if not (issubclass(category, ModelNote) or str(Path(filename).resolve()).startswith(package)):
        return _default(message, category, filename, lineno, file, line)
    kind = "note" if issubclass(category, ModelNote) else "warning"
    try:
        print(f"ctfm: {kind}: {_one_line(message)}", file=file or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    import functools
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.name:
        parser.error(f"models {args.action} needs a name")
    args.progress_cb = make_renderer(args.progress)
    from .catalog import ModelNote

    with warnings.catch_warnings():  # restored on return (main may run inside another program)
        warnings.simplefilter("always", ModelNote)  # what it says of a model, every time it is loaded
        warnings.showwarning = functools.partial(_show_warning, _default=warnings.showwarning)
        return _run(args)


def _run(args) -> int:
    with terminate_on_sigterm():  # SIGTERM (Slicer's Cancel) unwinds like Ctrl-C: temporary files are removed
        try:
            return args.func(args)
        except Cancelled:
            print("ctfm: cancelled", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("ctfm: interrupted", file=sys.stderr)
            return 130
        except Terminated as e:
            print("ctfm: terminated", file=sys.stderr)
            return e.exit_code
        except BrokenPipeError:  # the reader of our output went away (`ctfm models list | head`)
            _silence_stdout()
            return 141
        except MemoryError:
            if args.debug:
                raise
            print("ctfm: error: not enough memory for this input with these settings: close other programs, or "
                  "use a coarser spacing, a smaller region or --fast", file=sys.stderr)
            return EXIT_ERROR
        except Exception as e:  # noqa: BLE001 - the one place that turns every failure into one line
            if args.debug:
                raise
            if isinstance(e, _refusals()):
                print(f"ctfm: error: {_one_line(e)}", file=sys.stderr)
                return EXIT_ERROR
            print(f"ctfm: error: {_one_line(e)} ({type(e).__name__}: an unexpected failure; run with --debug for "
                  "the full trace and report it)", file=sys.stderr)
            return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
