"""Whole-body segmentation: ours against the model card's MONAI pipeline, side by side; prints JSON.

    python Testing/Benchmarks/segment.py [--quick] [--precisions fp32,bf16] [--threads N]
    python Testing/Benchmarks/segment.py --synthetic-large [--quick]

Default: the real example CT resampled to 1.5 mm (244 x 202 x 224 voxels), the
full 118-class SegResNetDS (init_filters 32, blocks_down 1,2,2,4,4; random
weights, seed 0, head biases zeroed so the image rather than a bias picks the
class) written in the published layout. The reference is the model card:
MONAI LoadImage / Orientation SPL / ScaleIntensityRange / CropForeground,
``SlidingWindowInferer(roi_size=(96, 160, 160), overlap=0.625,
mode="gaussian")``, argmax, back onto the input grid. Each pipeline runs in its
own child process, so ``peak_rss_mb`` (ru_maxrss) is its own; ``seconds`` runs
from reading the image to labels on the input grid (model loading excluded).
Agreement: the fraction of input voxels where our labels equal the reference's.

``--quick``: the native 3 mm CT instead (2 windows), to check the benchmark runs.
``--synthetic-large``: ours only, on a synthetic 512 x 512 x 400 CT at
0.8 x 0.8 x 1.5 mm (with ``--quick``: stopped after 55 of its 490 windows,
when the blending buffers have reached their full size; ``--stop-after N``
chooses where).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTFM"))
sys.path.insert(0, str(ROOT / "Testing"))

CONFIG = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
          "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
ROI = (96, 160, 160)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- inputs ---------------------------------------------------------------------------------------


def write_model(folder: Path) -> Path:
    import torch

    from ctfm_testing.checkpoints import monai_segresnet, write_published_layout

    model = monai_segresnet(out_channels=118, init_filters=32, blocks_down=(1, 2, 2, 4, 4), dsdepth=4, seed=0)
    with torch.no_grad():
        for level in model.up_layers:
            if isinstance(level["head"], torch.nn.Conv3d):
                level["head"].bias.zero_()
    return write_published_layout(model, folder, CONFIG)


def resampled_ct(source: Path, spacing: float, out: Path) -> Path:
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(source))
    size = [int(round(n * s / spacing)) for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    fine = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), (spacing,) * 3,
                         ct.GetDirection(), -1024, ct.GetPixelID())
    sitk.WriteImage(fine, str(out))
    return out


def synthetic_large_ct(out: Path, slices: int) -> Path:
    """A life-size body phantom, 512 x 512 x ``slices`` at 0.8 x 0.8 x 1.5 mm, built slab by slab."""
    from CTFMLib.image import Image, write_image
    from ctfm_testing.phantoms import body_phantom

    spacing = np.array([0.8, 0.8, 1.5])
    shape = (512, 512, slices)
    origin = -spacing * (np.asarray(shape) - 1) / 2
    slabs = []
    for k0 in range(0, slices, 50):
        n = min(50, slices - k0)
        slab = body_phantom(shape=(512, 512, n), spacing=spacing, origin=origin + [0, 0, k0 * spacing[2]],
                            body_radius_mm=170.0, seed=k0)
        slabs.append(slab.array)
    write_image(Image(np.concatenate(slabs, axis=2), spacing, origin, metadata={"modality": "CT"}), out)
    return out


# --- one pipeline, in a child process ---------------------------------------------------------------------


def run_reference(args) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets.segresnet_ds import SegResNetDS
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange
    from safetensors.torch import load_file

    from CTFMLib.image import read_image
    from CTFMLib.preprocess import preprocess

    model = SegResNetDS(**{**CONFIG, "blocks_down": tuple(CONFIG["blocks_down"])})
    model.load_state_dict(load_file(str(Path(args.model) / "model.safetensors")), strict=True)
    model.eval()
    t0 = time.perf_counter()
    card = Compose([LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
                    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground()])
    x = card(args.image)
    inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=args.reference_batch, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        logits = inferer(x[None], model)
        labels = torch.softmax(logits, 1).argmax(1)[0].numpy().astype(np.uint8)
    del logits
    # The card's Invert: undo crop and orientation (CTFMLib's inverse, checked against MONAI's in the tests).
    labels = preprocess(read_image(args.image)).to_input(labels)
    seconds = time.perf_counter() - t0
    np.save(args.labels_out, labels)
    return {"pipeline": "model card (MONAI)", "precision": "fp32", "seconds": round(seconds, 1),
            "peak_rss_mb": peak_rss_mb(), "windows_batch": args.reference_batch}


def run_ours(args) -> dict:
    from CTFMLib.image import read_image
    from CTFMLib.progress import Cancelled
    from CTFMLib.segment import load_segmentation_model, run_options, segment_image

    model, labels = load_segmentation_model(args.model)
    options = run_options(args.device, args.precision, batch_size=args.batch_size)
    seen = []

    def stop_early(fraction, message):
        seen.append(message)
        if args.stop_after and message == f"window {args.stop_after} of {message.rsplit(' ', 1)[-1]}":
            raise Cancelled()

    t0 = time.perf_counter()
    image = read_image(args.image)
    try:
        result = segment_image(image, model=model, labels=labels, options=options, max_memory_gb=float("inf"),
                               progress=stop_early)
    except Cancelled:
        return {"pipeline": "ctfm segment", "precision": options.precision, "device": options.device,
                "stopped_after": [m for m in seen if m.startswith("window")][-1],
                "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}
    seconds = time.perf_counter() - t0
    np.save(args.labels_out, result.labels.array)
    return {"pipeline": "ctfm segment", "precision": options.precision, "channels_last": options.channels_last,
            "device": options.device, "seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "windows_batch": args.batch_size, "notes": result.notes}


def child(kind: str, image: Path, model: Path, labels_out: Path, args, precision="fp32") -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--image", str(image), "--model", str(model),
           "--labels-out", str(labels_out), "--precision", precision, "--device", args.device,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--stop-after", str(args.stop_after),
           "--reference-batch", str(args.reference_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"pipeline": kind, "precision": precision, "error": out.stderr.strip().splitlines()[-3:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the comparison ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", help="a CT (default: the example CT resampled to 1.5 mm)")
    p.add_argument("--quick", action="store_true", help="a small volume, to check the benchmark works")
    p.add_argument("--synthetic-large", action="store_true", help="ours only, 512 x 512 x 400 synthetic CT")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1, help="ours: windows per forward pass (default 1)")
    p.add_argument("--reference-batch", type=int, default=1,
                   help="the reference's sw_batch_size (default 1: batching is not faster on a CPU and costs memory)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--stop-after", type=int, default=0,
                   help="ours: stop after this many windows and report the peak memory so far (0: run to the end)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--labels-out", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps((run_reference if args.one == "reference" else run_ours)(args)))
        return

    with tempfile.TemporaryDirectory(prefix="ctfm-bench-") as tmp:
        tmp = Path(tmp)
        model = write_model(tmp / "model")
        if args.synthetic_large:
            image = synthetic_large_ct(tmp / "large.nii.gz", 400)
            what = "synthetic CT 512x512x400 at 0.8x0.8x1.5 mm"
            args.no_reference = True
            if args.quick and not args.stop_after:
                # The blending buffers are full-size once a row of windows (7 x 7) is done: the memory
                # peak is reached; the remaining windows repeat it (490 in all, about 40 min on 2 CPU threads).
                args.stop_after = 55
        elif args.image:
            image, what = Path(args.image), args.image
        else:
            from ctfm_testing.data import shared_data_dir

            data = shared_data_dir()
            if data is None:
                print(json.dumps({"skipped": "real CT data not found (set CTFM_TEST_DATA)"}))
                return
            source = data / "totalsegmentator_example" / "example_ct.nii.gz"
            if args.quick:
                image, what = source, "example CT, native 3 mm"
            else:
                image, what = resampled_ct(source, 1.5, tmp / "ct_1p5mm.nii.gz"), "example CT resampled to 1.5 mm"
        from CTFMLib.image import read_image

        shape = list(read_image(image).shape)
        runs = []
        if not args.no_reference:
            runs.append(child("reference", image, model, tmp / "ref.npy", args))
        for precision in args.precisions.split(","):
            runs.append(child("ours", image, model, tmp / f"ours_{precision}.npy", args, precision))
            if not args.no_reference and "error" not in runs[0] and "error" not in runs[-1]:
                ref, ours = np.load(tmp / "ref.npy"), np.load(tmp / f"ours_{precision}.npy")
                runs[-1]["agreement"] = round(float((ref == ours).mean()), 6)
                runs[-1]["time_vs_reference"] = round(runs[-1]["seconds"] / runs[0]["seconds"], 3)
                runs[-1]["memory_vs_reference"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        if not args.no_reference and "error" not in runs[0]:
            ref = np.load(tmp / "ref.npy")
            runs[0]["classes_present"] = int(len(np.unique(ref)))
        print(json.dumps({"benchmark": "segment", "image": what, "shape": shape, "model": CONFIG,
                          "threads": args.threads, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
