"""The ``ctfm`` command line.

    ctfm info
    ctfm models list | download ID | import FOLDER_OR_ZIP | remove ID
    ctfm embed IMAGE --weights SRC --out FILE.npy [--mode volume|scan|point --point X,Y,Z]

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
    return p


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--batch-size", type=int, default=2)


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
