"""The ``ctfm`` command line.

    ctfm info
    ctfm models list | download ID | import FOLDER_OR_ZIP | remove ID
    ctfm embed IMAGE --weights SRC --out FILE.npy [--mode volume|scan|point --point X,Y,Z]
    ctfm segment IMAGE --model whole-body|FOLDER|HF_ID --out OUT.nii.gz|OUT.seg.nrrd [--fast] [--structures a,b]
    ctfm segment FOLDER_OR_CSV --model ... --out-dir DIR   (batch: failed inputs are reported and skipped)
    ctfm triage IMAGE --model FOLDER [--json OUT.json] [--saliency HEAT.nii.gz [--method occlusion|gradient]]
    ctfm saliency IMAGE --target embedding|point:X,Y,Z|class:NAME|triage [--weights SRC | --model FOLDER]
                  [--method occlusion|gradient] [--roi X0,Y0,Z0,X1,Y1,Z1 | --cube MM] --out HEAT.nii.gz
    ctfm index add|query|info|remove|compact|eval INDEX ...   (similar-case retrieval: CTFMLib.retrieval.commands)

Points are LPS millimetres (DICOM/ITK), or RAS (Slicer) with ``--ras``.
``--progress json`` prints machine-readable progress for the Slicer modules.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from . import __version__, cache
from .catalog import load_catalog
from .progress import Cancelled, make_renderer

EXIT_ERROR = 2


def _versions() -> dict:
    out = {"ctfm": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "SimpleITK", "safetensors", "huggingface_hub"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None) or getattr(module, "Version", lambda: "?")()
        except ImportError:
            out[name] = None
    return out


def model_status(entry) -> str:
    """``imported``, ``downloaded``, ``not on this computer``, or ``train with CTFMTrain`` (no published weights)."""
    from .weights import WEIGHTS_NAME, imported_model_path

    if not entry.repo_id:  # a task users train themselves; an import lands under the catalogue id
        return "imported" if imported_model_path(entry.id) is not None else "train with CTFMTrain"
    if imported_model_path(entry.repo_id) is not None:
        return "imported"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(
            entry.repo_id, WEIGHTS_NAME, cache_dir=cache.hub_cache_dir(), revision=entry.revision
        )
        if isinstance(hit, str) and os.path.isfile(hit):
            return "downloaded"
    except Exception:  # an unreadable or absent HF cache only means "not downloaded"
        pass
    return "not on this computer"


def cmd_info(args) -> int:
    import torch

    from .embed import select_device

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
        print(json.dumps(info, indent=2))
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
    from . import weights

    catalog = load_catalog()
    if args.action == "list":
        for m in catalog:
            print(f"{m.id:<28} {m.repo_id or '-':<45} {model_status(m)}\n    {m.title}: {m.description}")
        return 0
    if args.action == "download":
        entry = catalog.find(args.name)
        repo_id = entry.repo_id if entry else args.name
        folder = weights.download(repo_id, revision=args.revision or (entry.revision if entry else None), entry=entry,
                                  progress=args.progress_cb)
        model, info = weights.load_model(folder if entry is None else args.name, catalog=catalog)
        print(f"{repo_id}: {info.architecture} ready at {folder}")
        return 0
    if args.action == "import":
        dest = weights.import_model(args.name, repo_id=args.id, catalog=catalog)
        print(f"imported into {dest}")
        return 0
    if args.action == "remove":
        removed = weights.remove_model(args.name, catalog=catalog)
        print("\n".join(f"removed {r}" for r in removed) or f"{args.name}: nothing to remove")
        return 0
    raise AssertionError(args.action)


def parse_point(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"a point is three numbers X,Y,Z in mm, not {text!r}")
    return np.asarray(values)


def cmd_embed(args) -> int:
    from .embed import embed_image
    from .image import read_image

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy, not {out.name}")
    point = None
    if args.point:
        point = parse_point(args.point)
        if args.ras:
            point = point * np.array([-1.0, -1.0, 1.0])
    mode = args.mode or ("point" if point is not None else "volume")
    image = read_image(args.image, series_uid=args.series)
    vector = embed_image(
        image, weights=args.weights, mode=mode, point_lps=point, aggregate=args.aggregate,
        device=args.device, precision=args.precision, threads=args.threads, batch_size=args.batch_size,
        progress=args.progress_cb,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, vector)
    os.replace(tmp, out)
    print(f"wrote {vector.shape[0]}-d {mode} embedding to {out}")
    return 0


# --- ctfm segment ----------------------------------------------------------------------

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm")
LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def _label_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"cannot write labels to {path.name}: use one of {', '.join(LABEL_SUFFIXES)}")


def sidecar_path(out: Path) -> Path:
    """``OUT.labels.json`` next to a label map ``OUT.nii.gz`` / ``.nrrd`` / ``.mha``."""
    suffix = _label_suffix(out)
    return out.with_name(out.name[: -len(suffix)] + ".labels.json")


def write_segmentation(result, out: Path) -> list:
    """Write a label map (+ ``.labels.json`` {value: name}) or a Slicer ``.seg.nrrd``; returns the files written.

    Every file goes to a temporary name first, so a failure leaves no partial output.
    """
    from .image import write_image
    from .labels import label_dict, write_seg_nrrd

    if _label_suffix(out) == ".seg.nrrd":
        return [write_seg_nrrd(result.labels, result.label_info, out)]
    sidecar = sidecar_path(out)
    tmp = sidecar.with_name(f".{sidecar.name}.tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(json.dumps({str(k): v for k, v in label_dict(result.label_info).items()}, indent=1),
                       encoding="utf-8")
        write_image(result.labels, out)
        os.replace(tmp, sidecar)
    finally:
        if tmp.exists():
            tmp.unlink()
    return [out, sidecar]


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

    with open(source, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    header = [h.strip().lower() for h in rows[0]] if rows else []
    has_header = "image" in header or "path" in header
    columns = {name: i for i, name in enumerate(header)} if has_header else {"image": 0}
    image_column = columns.get("image", columns.get("path"))
    jobs = []
    for row in rows[1 if has_header else 0:]:
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
        image = row[image_column].strip() if image_column < len(row) else ""
        if not image:
            continue
        path = Path(image)
        path = path if path.is_absolute() else source.parent / path
        series = cells.get("series") or None
        name = cells.get("out") or f"{_stem(path)}{'_' + series[-8:] if series else ''}.{out_format}"
        jobs.append((path, series, out_dir / name))
    return jobs


def segment_jobs(source: Path, out_dir: Path, out_format: str) -> list:
    """``[(input, series UID or None, output)]`` for a folder of images or a CSV (column ``image``,
    optional ``series`` and ``out``; relative paths are relative to the CSV)."""
    if source.is_dir():
        jobs = [(p, None, out_dir / f"{_stem(p)}.{out_format}") for p in _image_files(source)]
    elif source.suffix.lower() == ".csv":
        jobs = _csv_jobs(source, out_dir, out_format)
    else:
        raise ValueError(f"--out-dir needs a folder of images or a .csv list as input, not {source}")
    if not jobs:
        raise ValueError(f"no images found in {source}")
    outs = [str(o) for _, _, o in jobs]
    repeated = sorted({o for o in outs if outs.count(o) > 1})
    if repeated:
        raise ValueError(f"several inputs would be written to the same file: {', '.join(repeated)}")
    return jobs


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def cmd_segment(args) -> int:
    from .image import read_image
    from .segment import estimate_seconds, load_segmentation_model, run_options, segment_image, select_structures

    if bool(args.out) == bool(args.out_dir):
        raise ValueError("give either --out FILE (one image) or --out-dir DIR (a folder or CSV of images)")
    source = Path(args.image)
    if args.out:
        out = Path(args.out)
        _label_suffix(out)
        jobs = [(source, args.series, out)]
    else:
        _label_suffix(Path("x." + args.out_format))
        jobs = segment_jobs(source, Path(args.out_dir), args.out_format)
    structures = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
    options = run_options(args.device, args.precision, args.threads, None, args.batch_size)
    model, labels = load_segmentation_model(args.model, args.progress_cb)
    select_structures(labels, structures)  # an unknown name fails once, before any image is read
    failed = []
    for n, (path, series, out) in enumerate(jobs, 1):
        prefix = f"[{n}/{len(jobs)}] {path.name}: " if len(jobs) > 1 else ""
        try:
            image = read_image(path, series_uid=series)
            expected = estimate_seconds(image, args.fast, options.device, options.precision, model=model,
                                        threads=options.threads)
            quality = "fast, 3 mm" if args.fast else "full resolution"
            print(f"{prefix}expected time: about {_duration(expected)} ({quality}, {options.device}, "
                  f"{options.precision})", flush=True)
            result = segment_image(image, model=model, labels=labels, structures=structures, fast=args.fast,
                                   largest_component=args.largest_component, options=options,
                                   progress=args.progress_cb, max_memory_gb=args.max_memory_gb)
            written = write_segmentation(result, out)
            present = int(np.count_nonzero(np.bincount(result.labels.array.ravel())[1:]))
            print(f"{prefix}wrote {', '.join(map(str, written))} ({present} structures present, "
                  f"{_duration(result.seconds)})", flush=True)
        except Exception as e:  # noqa: BLE001 - in a batch every failure is reported and the rest go on
            if not args.out_dir or isinstance(e, Cancelled):
                raise
            failed.append(path)
            print(f"ctfm: FAILED {path}: {e}", file=sys.stderr, flush=True)
    if args.out_dir:
        print(f"segmented {len(jobs) - len(failed)} of {len(jobs)} images"
              + (f"; failed: {', '.join(str(p) for p in failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def cmd_train(args) -> int:
    from .train.run import run
    from .train.trainer import TrainingError

    try:
        summary = run(args.task, args.config, args.out, resume=args.resume, max_steps=args.max_steps,
                      device=args.device, progress=args.progress_cb)
    except TrainingError as e:
        print(f"ctfm: training stopped: {e}", file=sys.stderr)
        return EXIT_ERROR
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items()}, default=str),
              flush=True)
    return 0


def cmd_triage(args) -> int:
    """Triage one head CT; prints one JSON object (the last stdout line), also written to ``--json``."""
    from .image import WRITE_SUFFIXES, read_image, write_image
    from .progress import subrange
    from .triage import load_triage, triage_image

    if args.method and not args.saliency:
        raise ValueError("--method chooses how the saliency map is computed; give --saliency HEAT.nii.gz as well")
    if args.saliency and not str(args.saliency).lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"--saliency must be an image file ending in {', '.join(WRITE_SUFFIXES)}, not {args.saliency}")
    image = read_image(args.image, series_uid=args.series)
    net, config, _ = load_triage(args.model)
    model = (net, {**config, "name": str(args.model)})  # loaded once, for the result and the saliency map
    progress = subrange(args.progress_cb, 0.0, 0.2 if args.saliency else 1.0)
    result = triage_image(image, model, device=args.device, progress=progress)
    saliency = None
    if args.saliency:
        from .saliency import saliency_image  # imported only when a map is asked for

        heat = saliency_image(image, target="triage", triage_model=model, method=args.method or "gradient",
                              device=args.device, progress=subrange(args.progress_cb, 0.2, 1.0))
        saliency = str(write_image(heat.heatmap, args.saliency))
    text = json.dumps({**result.to_dict(), "saliency": saliency})
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out)
    print(text, flush=True)
    return 0


def cmd_saliency(args) -> int:
    """A saliency heatmap: writes HEAT.nii.gz and HEAT.json, prints the JSON (the last stdout line)."""
    from .image import read_image
    from .saliency import parse_box, parse_target, saliency_image, sidecar_json, write_saliency

    target, point, class_name = parse_target(args.target)
    sidecar_json(args.out)  # a bad output name fails before any work
    ras = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    if args.ras and point is not None:
        point = point * ras
    center = parse_point(args.center) * (ras if args.ras else 1.0) if args.center else None
    region = None
    if args.roi:
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
    spacing = args.spacing or "auto"
    if spacing not in ("auto", "native"):
        try:
            spacing = (float(spacing),) * 3
        except ValueError:
            raise ValueError(f"--spacing is auto, native or a voxel size in mm, not {args.spacing!r}") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    image = read_image(args.image, series_uid=args.series)
    result = saliency_image(
        image, weights=args.weights, target=target, method=args.method, point_lps=center if point is None else point,
        class_name=class_name, triage_model=args.model, region_lps=region, cube_mm=args.cube, mask_size=args.mask_size,
        overlap=args.overlap, batch_size=args.batch_size, device=args.device, progress=args.progress_cb,
        spacing=None if spacing == "native" else spacing, steps=args.steps,
    )
    extra = {"image": str(args.image)}
    if result.peak_lps is not None:
        extra["peak_ras"] = [round(float(v), 3) for v in result.peak_lps * ras]
    print(json.dumps(write_saliency(result, args.out, extra)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctfm", description="CT-FM: a 3D CT foundation model, from the command line.")
    p.add_argument("--version", action="version", version=f"ctfm {__version__}")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="how to show progress (json: one JSON object a line on stderr)")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device, cache folders and the model catalogue")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="list, download, import or remove models")
    models.add_argument("action", choices=("list", "download", "import", "remove"))
    models.add_argument("name", nargs="?", help="model id or repo id; for import, a folder or .zip")
    models.add_argument("--revision", help="download: a branch, tag or commit")
    models.add_argument("--id", help="import: the repo id to file the model under (default: from its config or name)")
    models.set_defaults(func=cmd_models)

    embed = sub.add_parser("embed", help="compute a 512-d CT-FM embedding")
    embed.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder")
    embed.add_argument("--weights", default="ct_fm_feature_extractor",
                       help="model id, Hugging Face repo id, folder or .safetensors file (default: %(default)s)")
    embed.add_argument("--out", required=True, help="output .npy file")
    embed.add_argument("--mode", choices=("volume", "scan", "point"))
    embed.add_argument("--point", help="X,Y,Z in mm (LPS unless --ras) for --mode point")
    embed.add_argument("--ras", action="store_true", help="--point is in RAS (as Slicer shows it)")
    embed.add_argument("--aggregate", choices=("mean", "max", "min"), default="mean", help="scan mode: how patches combine")
    embed.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    _add_run_options(embed)
    embed.set_defaults(func=cmd_embed)

    seg = sub.add_parser("segment", help="segment a CT (whole-body structures or a tumour model)")
    seg.add_argument("image",
                     help="NIfTI, NRRD, MHA file or DICOM series folder; with --out-dir a folder of them or a CSV")
    seg.add_argument("--model", default="whole-body",
                     help="whole-body, a model folder, catalogue id or Hugging Face repo id (default: %(default)s)")
    seg.add_argument("--out", help="output label map: .nii.gz, .nii, .nrrd, .mha (+ .labels.json) or .seg.nrrd")
    seg.add_argument("--out-dir", help="batch: the folder for the outputs")
    seg.add_argument("--out-format", default="nii.gz", choices=("nii.gz", "nii", "nrrd", "mha", "seg.nrrd"),
                     help="batch: output file type (default: %(default)s)")
    seg.add_argument("--fast", action="store_true", help="resample to 3 mm first: much faster, coarser")
    seg.add_argument("--structures", help="comma-separated structure names to keep (default: all)")
    seg.add_argument("--largest-component", action="store_true",
                     help="keep only the largest connected piece of each structure")
    seg.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    seg.add_argument("--max-memory-gb", type=float,
                     help="refuse to start when the estimated peak memory is above this (default: 85%% of available)")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    seg.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32 (default)")
    seg.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    seg.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    seg.set_defaults(func=cmd_segment)

    tr = sub.add_parser("train", help="pretrain CT-FM or fine-tune it (runs under torchrun as well)")
    tr.add_argument("task", choices=("pretrain", "segment", "classify"))
    tr.add_argument("--config", help="training configuration (.json, or .yaml with PyYAML); defaults otherwise")
    tr.add_argument("--out", help="output folder: checkpoints, metrics.csv, the trained model (default: run.out_dir)")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    tr.add_argument("--max-steps", type=int, help="stop after this many steps (default: optim.max_steps)")
    tr.add_argument("--device", help="auto, cpu, cuda or mps (default: run.device)")
    tr.set_defaults(func=cmd_train)

    tri = sub.add_parser("triage", help="head-CT triage with a model trained by `ctfm train classify`")
    tri.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM series folder (a head CT in HU)")
    tri.add_argument("--model", required=True,
                     help="the triage model folder (<out_dir>/model of `ctfm train classify`) or an imported id")
    tri.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    tri.add_argument("--json", help="also write the result to this .json file")
    tri.add_argument("--saliency", help="also write a heat map of what drove the result (.nii.gz, .nrrd, .mha)")
    tri.add_argument("--method", choices=("occlusion", "gradient"),
                     help="saliency method (default: gradient; occlusion on the triage grid takes thousands of passes)")
    tri.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
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
    limit.add_argument("--cube", type=float, help="only a cube of this edge (mm) around the point (or --center)")
    sal.add_argument("--center", help="X,Y,Z in mm: the --cube's centre for the embedding, class and triage targets")
    sal.add_argument("--ras", action="store_true", help="points and --roi are RAS (as Slicer shows them), not LPS")
    sal.add_argument("--out", required=True, help="the heatmap: .nii.gz, .nii, .nrrd or .mha (+ a .json beside it)")
    sal.add_argument("--mask-size", type=int, help="occlusion cube edge in voxels (default: 10; triage 4x10x10)")
    sal.add_argument("--overlap", type=float, default=0.25, help="overlap of the occlusion cubes (default: 0.25)")
    sal.add_argument("--steps", type=int, default=4, help="gradient: integration steps (default: 4)")
    sal.add_argument("--spacing", help="embedding and class: auto (embedding 3 mm, class native), native, or MM")
    sal.add_argument("--batch-size", type=int, help="occluded copies per pass (default 12) or gradient steps (1)")
    sal.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    sal.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    sal.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    sal.set_defaults(func=cmd_saliency)

    from .retrieval.commands import add_index_parser  # ctfm index add|query|info|remove|compact|eval

    add_index_parser(sub, _add_run_options)
    return p


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--batch-size", type=int, default=2)


def _segmentation_error():
    """SegmentationError, imported only when a command failed (it pulls in torch)."""
    if "CTFMLib.segment" not in sys.modules:
        return ()
    return sys.modules["CTFMLib.segment"].SegmentationError


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.name:
        parser.error(f"models {args.action} needs a name")
    args.progress_cb = make_renderer(args.progress)
    from .image import ImageError
    from .weights import WeightsError

    try:
        return args.func(args)
    except _segmentation_error() as e:
        print(f"ctfm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Cancelled:
        print("ctfm: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ctfm: interrupted", file=sys.stderr)
        return 130
    except (ImageError, WeightsError, ValueError, FileNotFoundError) as e:
        print(f"ctfm: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
