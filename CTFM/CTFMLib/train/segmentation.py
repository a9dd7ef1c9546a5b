"""Segmentation fine-tuning: SegResNetDS whose encoder starts from CT-FM, upstream's TotalSegmentator recipe.

Data: each scan comes with a label map on the same voxel grid (a CSV column names it). Both are brought
to the model grid the segmentation model card uses at inference (SPL, HU -1024..2048 -> 0..1, foreground
crop; native spacing unless ``segment.spacing``) and cached on disk (:class:`LabelledScanCache`), with a
sample of voxel positions of every label value for crop sampling.

Training (:class:`SegmentTask`, a :class:`~CTFMLib.train.trainer.Task`):

- label-balanced crops of ``segment.crop_size``: the centre is a random voxel of a structure drawn
  uniformly among the chosen structures present in the scan (background never, as upstream's
  ``RandCropByLabelClasses`` with ratios ``[0, 1, ..., 1]``); scans smaller than the crop are padded
  with air (0) and background;
- upstream's augmentations (``segment.augment``): affine (rotation, zoom; p 0.2), Gaussian smoothing
  (p 0.2), intensity scale (p 0.5) and shift (p 0.5), Gaussian noise (p 0.2);
- deep-supervision Dice + cross-entropy (:func:`deep_supervision_loss`: MONAI's ``DeepSupervisionLoss``
  with ``DiceCELoss(softmax, to_onehot_y, include_background, squared_pred, smooth_nr=0, smooth_dr=1e-5)``);
- validation: sliding-window inference over each validation scan (the crop size as window, Gaussian
  blending) and the Dice of every structure on the model grid.

Export: a model folder (``config.json`` + ``model.safetensors`` + ``labels.json``) that
``CTFMLib.segment.segment_image`` / CTFMSegment / ``ctfm segment --model FOLDER`` load as they are;
the validation Dice per structure is recorded under ``_validation`` in ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_output
from ..image import ImageError, read_image
from ..networks import SegResEncoder, SegResNetDS
from ..preprocess import HU_MAX, HU_MIN, PreprocessConfig, preprocess
from .common import config_section, pass_order_index, seeded_model
from .crops import augment, crop_window, extract
from .data import ScanCache, ScanRef, read_scan, source_stamp
from .distributed import rank_indices
from .trainer import unwrap

ARCHITECTURE = "SegResNetDS"
INDEX_SAMPLES = 4096  # voxel positions kept per label value for crop centres
VAL_SIGMA_SCALE = 0.125  # Gaussian blending of validation windows, as inference
_ORDER, _CROP, _AUGMENT = 21, 22, 23  # seed tags: sample order, crop position, augmentation never share a stream


# --- data ------------------------------------------------------------------------------------


@dataclass
class LabelledScan:
    """A preprocessed scan and its labels on the model grid.

    ``image``: float32 ``(D, H, W)`` in ``[0, 1]``; ``labels``: the label map's own values, same shape;
    ``samples``: ``{value: flat indices}`` of up to :data:`INDEX_SAMPLES` voxels of each value present.
    """

    image: np.ndarray
    labels: np.ndarray
    samples: dict = field(default_factory=dict)
    name: str = ""

    @property
    def present(self) -> list:
        return sorted(self.samples)


def read_label_map(path, image) -> np.ndarray:
    """The label map at ``path`` as a non-negative integer array on ``image``'s voxel grid.

    Raises :class:`~CTFMLib.image.ImageError` when it lies on another grid, holds fractions or
    negative values, or is not 3-D.
    """
    labels = read_image(path)
    if labels.array.ndim != 3:
        raise ImageError(f"label map {path} is not a 3-D image (shape {labels.array.shape})")
    if not labels.geometry.same_grid(image.geometry, atol=1e-3):
        raise ImageError(f"label map {path} is not on its scan's voxel grid (label {labels.shape}, spacing "
                         f"{np.round(labels.spacing, 3).tolist()}; scan {image.shape}, spacing "
                         f"{np.round(image.spacing, 3).tolist()}); resample it onto the scan first")
    array = labels.array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise ImageError(f"label map {path} holds non-integer values; label maps hold whole numbers")
    elif array.dtype.kind not in "iu":
        raise ImageError(f"label map {path} has voxel type {array.dtype}; label maps hold whole numbers")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageError(f"label map {path} holds values outside 0..65535 ({lo}..{hi})")
    return array.astype(np.uint8 if hi < 256 else np.uint16, copy=False)


def index_samples(labels: np.ndarray, seed: int, limit: int = INDEX_SAMPLES) -> dict:
    """``{value: sorted flat indices}``: up to ``limit`` voxels of each non-zero value, drawn without replacement."""
    flat = labels.ravel()
    counts = np.bincount(flat)
    rng = np.random.default_rng(seed)
    out = {}
    for value in np.flatnonzero(counts[1:]) + 1:
        where = np.flatnonzero(flat == value)
        if where.size > limit:
            where = np.sort(rng.choice(where, limit, replace=False))
        out[int(value)] = where.astype(np.int64)
    return out


class LabelledScanCache(ScanCache):
    """:class:`~CTFMLib.train.data.ScanCache` for (scan, label map) pairs.

    Per scan: ``<key>.npy`` (image, float32), ``<key>.labels.npy`` (label values, uint8/uint16),
    ``<key>.index.npz`` (voxel samples per value) and ``<key>.json``. The label map is the file in the
    scan's CSV column ``label_column`` (relative to the CSV's folder). Entries are rebuilt when the
    scan or its label file changes. Scans are not filtered like pretraining's (fine-tuning data is
    curated); unreadable pairs, label maps on another grid and non-CT images are skipped with a reason
    (images whose values do not look like a CT in HU too, unless ``allow_non_ct``).
    """

    def __init__(self, folder, spacing=None, label_column: str = "segmentation", orientation: str = "SPL",
                 allow_non_ct: bool = False):
        super().__init__(folder, spacing=spacing, hu_range=(HU_MIN, HU_MAX), orientation=orientation,
                         allow_non_ct=allow_non_ct)
        self.label_column = str(label_column)

    @property
    def config(self) -> dict:
        return {**super().config, "kind": "segment", "label_column": self.label_column,
                "index_samples": INDEX_SAMPLES}

    def _init_args(self) -> tuple:
        return (str(self.folder), self.spacing, self.label_column, self.orientation, self.allow_non_ct)

    def label_path(self, scan: ScanRef) -> Path:
        raw = str(scan.label.get(self.label_column, "")).strip()
        if not raw:
            raise ImageError(f"{scan.describe()} has no label map: its CSV column {self.label_column!r} "
                             "(segment.label_column) is empty or missing")
        path = Path(raw).expanduser()
        return path if path.is_absolute() or not scan.base else Path(scan.base) / path

    def stamp(self, scan: ScanRef) -> str:
        label = self.label_path(scan)
        st = label.stat()
        text = f"{source_stamp(scan)}\n{label.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
        return hashlib.sha1(text.encode()).hexdigest()

    def labels_path(self, scan: ScanRef) -> Path:
        return self.folder / f"{scan.key}.labels.npy"

    def index_path(self, scan: ScanRef) -> Path:
        return self.folder / f"{scan.key}.index.npz"

    def cached(self, scan: ScanRef) -> Optional[LabelledScan]:
        image = super().cached(scan)
        if image is None:
            return None
        try:
            labels = np.load(self.labels_path(scan), mmap_mode="r")
            with np.load(self.index_path(scan)) as index:
                samples = {int(k[1:]): index[k] for k in index.files}
        except (OSError, ValueError):
            return None
        if labels.shape != image.shape:
            return None
        return LabelledScan(image, labels, samples, Path(scan.path).name)

    def _build(self, scan: ScanRef, stamp: str, check: bool) -> Optional[str]:
        image = read_scan(scan)
        skip, non_ct = self._check_ct(scan, stamp, image, check)
        if skip:
            return skip
        labels = read_label_map(self.label_path(scan), image)
        pre = preprocess(image, PreprocessConfig(orientation=self.orientation, spacing=self.spacing))
        model_labels = pre.to_model(labels, "nearest")
        seed = int(scan.key[:8], 16)
        samples = index_samples(model_labels, seed)
        # Labels and index first, then the image and the record that vouches for all three.
        with atomic_output(self.labels_path(scan)) as tmp, open(tmp, "xb") as f:
            np.save(f, model_labels)
        with atomic_output(self.index_path(scan)) as tmp, open(tmp, "xb") as f:
            np.savez(f, **{f"v{k}": v for k, v in samples.items()})
        with atomic_output(self.array_path(scan)) as tmp, open(tmp, "xb") as f:
            np.save(f, pre.array)
        self._write_info(scan, stamp, {"shape": list(pre.array.shape), "spacing": pre.geometry.spacing.tolist(),
                                       "present": sorted(samples), "labels": str(self.label_path(scan)),
                                       "non_ct": non_ct})
        return None


def resolve_classes(labels, structures: Sequence, present: Sequence[int]) -> list:
    """``[(label value, name), ...]`` in output-channel order (channel ``i + 1`` is item ``i``).

    ``labels``: ``{value: name}``, a ``labels.json`` path, ``"totalsegmentator"`` (the 117 whole-body
    names) or ``None`` (``label_<value>``). ``structures``: names or values to learn; empty = every
    value ``labels`` names, or, without ``labels``, every value ``present`` in the data.
    """
    names = _label_names(labels)
    by_name = {_norm(n): v for v, n in names.items()}
    if not structures:
        values = sorted(names) if names else sorted(int(v) for v in present)
    else:
        values = []
        for item in structures:
            if isinstance(item, bool):
                raise ValueError(f"segment.structures lists {item!r}; give label names or values")
            if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
                values.append(int(item))
            elif _norm(str(item)) in by_name:
                values.append(by_name[_norm(str(item))])
            else:
                known = ", ".join(sorted(names.values())[:20]) or "none (segment.labels is empty)"
                raise ValueError(f"segment.structures names {item!r}, which segment.labels does not define; "
                                 f"known names: {known}")
    if not values:
        raise ValueError("no structures to learn: the label maps hold only background (0) and segment.labels "
                         "names none")
    if len(set(values)) != len(values) or min(values) < 1:
        raise ValueError(f"segment.structures must name distinct label values >= 1, got {values}")
    missing = sorted(set(values) - {int(v) for v in present})
    if len(missing) == len(values):
        raise ValueError(f"none of the chosen label values {values} occurs in the training label maps "
                         f"(they hold {sorted(int(v) for v in present)})")
    return [(v, names.get(v, f"label_{v}")) for v in values]


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _label_names(labels) -> dict:
    if labels is None:
        return {}
    if isinstance(labels, str) and labels.strip().lower() in ("totalsegmentator", "total", "whole-body"):
        from ..labels import whole_body_labels

        return {x.value: x.name for x in whole_body_labels()}
    if isinstance(labels, (str, Path)):
        path = Path(labels).expanduser()
        if path.is_dir():
            path = path / "labels.json"
        try:
            labels = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"segment.labels: cannot read {path} as a labels.json ({e})") from None
    if not isinstance(labels, dict):
        raise ValueError("segment.labels must be {value: name}, a labels.json path, 'totalsegmentator' or null")
    out = {}
    for key, spec in labels.items():
        name = spec.get("name") if isinstance(spec, dict) else spec
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"segment.labels keys are label values, not {key!r}") from None
        if value != 0:
            out[value] = str(name)
    return out


# --- crops ----------------------------------------------------------------------------------


def sample_crop(scan: LabelledScan, size: Sequence[int], values: Sequence[int], rng: np.random.Generator) -> tuple:
    """A label-balanced crop ``(image, labels)`` of ``size``: centred on a voxel of one of ``values`` drawn
    uniformly among those present (any voxel when none is)."""
    present = [v for v in values if v in scan.samples and len(scan.samples[v])]
    shape = scan.image.shape
    if present:
        value = present[int(rng.integers(len(present)))]
        where = scan.samples[value]
        centre = np.unravel_index(int(where[int(rng.integers(len(where)))]), shape)
    else:
        centre = [int(rng.integers(n)) for n in shape]
    starts = crop_window(shape, size, centre)
    return extract(scan.image, starts, size, 0.0), extract(scan.labels, starts, size, 0)


# --- loss ------------------------------------------------------------------------------------


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth_dr: float = 1e-5) -> torch.Tensor:
    """MONAI ``DiceCELoss(softmax=True, to_onehot_y=True, include_background=True, squared_pred=True,
    smooth_nr=0, smooth_dr=1e-5)``: mean over (batch, class) of the soft Dice loss plus the mean
    cross-entropy. ``logits`` ``(B, C, ...)``, ``target`` ``(B, 1, ...)`` class indices.

    Computed without a one-hot copy of the target (118 classes x a 96x160x160 crop would be 1.2 GB).
    """
    b, c = logits.shape[:2]
    t = target[:, 0].long()
    ce = F.cross_entropy(logits.float(), t)
    p = torch.softmax(logits.float(), dim=1)
    flat_t = t.reshape(b, -1)
    p_true = p.gather(1, t[:, None]).reshape(b, -1)
    intersection = torch.zeros(b, c, device=p.device).scatter_add_(1, flat_t, p_true)
    target_sum = torch.zeros(b, c, device=p.device).scatter_add_(1, flat_t, torch.ones_like(p_true))
    pred_sum = (p * p).reshape(b, c, -1).sum(-1)
    dice = 1.0 - 2.0 * intersection / (pred_sum + target_sum + smooth_dr)
    return dice.mean() + ce


def deep_supervision_loss(outputs, target: torch.Tensor) -> torch.Tensor:
    """MONAI ``DeepSupervisionLoss(weight_mode="exp")``: output ``l`` (finest first) weighs ``max(0.5 ** l,
    0.0625)``; its target is the label map resized to its size (``nearest-exact``, as MONAI); the sum."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    total = 0.0
    for level, out in enumerate(outputs):
        t = target
        if tuple(out.shape[2:]) != tuple(target.shape[2:]):
            t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest-exact").long()
        total = total + max(0.5**level, 0.0625) * dice_ce_loss(out, t)
    return total


def dice_scores(prediction: np.ndarray, reference: np.ndarray, classes: int) -> np.ndarray:
    """Dice of each class ``1..classes`` (``nan`` where both are empty), from one confusion count."""
    k = classes + 1
    counts = np.bincount(reference.astype(np.int64).ravel() * k + prediction.astype(np.int64).ravel(),
                         minlength=k * k).reshape(k, k)
    tp = np.diag(counts)[1:].astype(np.float64)
    denominator = counts.sum(0)[1:] + counts.sum(1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * tp / denominator, np.nan)


# --- the model -------------------------------------------------------------------------------


class FineTuneNet(SegResNetDS):
    """SegResNetDS that can keep its encoder fixed (``freeze_encoder``): parameters without gradients and
    batch norms in eval mode. Its state dict is a plain SegResNetDS's."""

    def __init__(self, *args, freeze_encoder: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.freeze_encoder = bool(freeze_encoder)

    def freeze(self) -> FineTuneNet:
        self.freeze_encoder = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self


# --- the task --------------------------------------------------------------------------------


def _as_scan(item, i: int, what: str) -> LabelledScan:
    if isinstance(item, LabelledScan):
        scan = item
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, labels = (np.asarray(a) for a in item)
        labels = labels.astype(np.uint16 if labels.size and labels.max() > 255 else np.uint8, copy=False)
        scan = LabelledScan(image.astype(np.float32, copy=False), labels, index_samples(labels, i), f"{what} {i}")
    else:
        raise ValueError(f"{what} item {i} must be a LabelledScan or an (image, labels) pair")
    if scan.image.ndim != 3 or scan.image.shape != scan.labels.shape:
        raise ValueError(f"{what} item {i}: image {scan.image.shape} and labels {scan.labels.shape} must be the "
                         "same 3-D shape")
    return scan


class SegmentTask:
    """The segmentation :class:`~CTFMLib.train.trainer.Task`.

    ``classes``: ``[(label value, name), ...]``: output channel ``i + 1`` learns value ``classes[i][0]``
    (other values are background). ``data`` / ``validation``: :class:`LabelledScan` items (or
    ``(image, labels)`` pairs of preprocessed arrays). ``config``: ``load_config(path, "segment")``.
    """

    def __init__(self, config: dict, classes: Sequence, data: Sequence, validation: Optional[Sequence] = None):
        self.config = config
        seg, model, run = (config_section(config, k, "segment") for k in ("segment", "model", "run"))
        self.classes = [(int(v), str(n)) for v, n in classes]
        if not self.classes:
            raise ValueError("classes is empty: give at least one (label value, name)")
        self.values = [v for v, _ in self.classes]
        if max(self.values) > 65535:
            raise ValueError(f"label values must be 1..65535, got {max(self.values)}")
        self.lut = np.zeros(65536, dtype=np.int64)  # label value (uint8/uint16) -> output channel
        self.lut[self.values] = np.arange(1, len(self.values) + 1)
        self.crop_size = tuple(int(s) for s in seg["crop_size"])
        self.init_filters = int(model["init_filters"])
        self.blocks_down = [int(b) for b in model["blocks_down"]]
        factor = 2 ** (len(self.blocks_down) - 1)
        if len(self.crop_size) != 3 or any(s < 1 or s % factor for s in self.crop_size):
            raise ValueError(f"segment.crop_size must be three sizes divisible by {factor} (2 ** (levels - 1) of "
                             f"model.blocks_down {self.blocks_down}), got {list(seg['crop_size'])}")
        self.dsdepth = int(seg["dsdepth"])
        if not 1 <= self.dsdepth <= len(self.blocks_down) - 1:
            raise ValueError(f"segment.dsdepth must be 1..{len(self.blocks_down) - 1} (decoder levels), "
                             f"got {self.dsdepth}")
        self.augment_cfg = dict(seg.get("augment") or {})
        self.val_overlap = float(seg.get("val_overlap", 0.625))
        if not 0.0 <= self.val_overlap < 1.0:
            raise ValueError(f"segment.val_overlap must be in [0, 1), got {self.val_overlap}")
        self.freeze_encoder = bool(seg.get("freeze_encoder", False))
        self.seed = int(run.get("seed", 0))
        self.batch_size = int(run["scans_per_step"])
        self.data = [_as_scan(item, i, "training") for i, item in enumerate(data)]
        if not self.data:
            raise ValueError("no training scans")
        self.validation = [_as_scan(item, i, "validation") for i, item in enumerate(validation or [])]
        self.last_validation: Optional[dict] = None

    @property
    def out_channels(self) -> int:
        return len(self.classes) + 1

    # --- model -----------------------------------------------------------------------------

    def network_config(self) -> dict:
        return {"architecture": ARCHITECTURE, "spatial_dims": 3, "in_channels": 1, "out_channels": self.out_channels,
                "init_filters": self.init_filters, "blocks_down": list(self.blocks_down), "dsdepth": self.dsdepth}

    def build_model(self) -> FineTuneNet:
        """SegResNetDS (random from ``run.seed``) whose encoder is then loaded from ``model.weights`` when set."""

        def wrap(encoder: SegResEncoder) -> FineTuneNet:
            net = FineTuneNet(init_filters=self.init_filters, in_channels=1, out_channels=self.out_channels,
                              blocks_down=self.blocks_down, dsdepth=self.dsdepth)
            net.encoder = encoder
            return net

        net = seeded_model(self.seed, self.init_filters, self.blocks_down, self.config["model"].get("weights"), wrap)
        return net.freeze() if self.freeze_encoder else net

    # --- data ------------------------------------------------------------------------------

    def sample(self, step: int, slot: int) -> tuple:
        """Global ``slot`` of step ``step``: ``(image (1, D, H, W) float32, labels (1, D, H, W) int64 channels)``."""
        index = pass_order_index(self.seed, _ORDER, (step - 1) * self.batch_size + slot, len(self.data))
        rng = np.random.default_rng([self.seed, _CROP, step, slot])
        image, labels = sample_crop(self.data[index], self.crop_size, self.values, rng)
        labels = self.lut[labels]
        return augment(image, labels, np.random.default_rng([self.seed, _AUGMENT, step, slot]), self.augment_cfg)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict:
        if step < 1:
            raise ValueError(f"steps are numbered from 1, got {step}")
        pairs = [self.sample(step, slot) for slot in rank_indices(self.batch_size, rank, world)]
        return {"x": torch.stack([p[0] for p in pairs]), "y": torch.stack([p[1] for p in pairs])}

    # --- loss, validation, export ------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        outputs = model(batch["x"].to(device, non_blocking=True))
        return deep_supervision_loss(outputs, batch["y"].to(device, non_blocking=True))

    def channel_labels(self, scan: LabelledScan) -> np.ndarray:
        return self.lut.astype(np.uint8 if self.out_channels <= 256 else np.uint16)[np.asarray(scan.labels)]

    @torch.no_grad()
    def predict(self, model: nn.Module, scan: LabelledScan, device) -> np.ndarray:
        """Channel labels of a whole scan by sliding-window inference with the crop size as window."""
        from ..sliding_window import stitch

        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            return stitch(np.asarray(scan.image, dtype=np.float32), lambda x: net(x.to(device)).float().cpu(),
                          self.out_channels, self.crop_size, self.val_overlap, VAL_SIGMA_SCALE, 1,
                          out_dtype=np.uint8 if self.out_channels <= 256 else np.uint16)
        finally:
            net.train(was_training)

    def validate(self, model: nn.Module, device) -> dict:
        """``{"val_dice": mean over scans of the mean Dice of the structures in each}``; ``{}`` without scans."""
        if not self.validation:
            return {}
        per_scan = []
        for scan in self.validation:
            per_scan.append(dice_scores(self.predict(model, scan, device), self.channel_labels(scan),
                                        len(self.classes)))
        scores = np.array(per_scan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # structures absent from every validation scan
            by_class = np.nanmean(scores, axis=0)
            mean = float(np.nanmean(np.nanmean(scores, axis=1)))
        self.last_validation = {"dice": mean, "dice_per_structure": {
            name: (None if np.isnan(d) else float(d)) for (_, name), d in zip(self.classes, by_class)},
            "scans": len(self.validation)}
        return {"val_dice": mean}

    def export(self, model: nn.Module, folder: Path) -> None:
        """``config.json`` (SegResNetDS arguments, training notes, validation Dice), ``model.safetensors``
        and ``labels.json`` (channel -> structure name), the layout ``weights.load_model`` reads."""
        from ..weights import save_pretrained

        net = unwrap(model)
        if self.validation and self.last_validation is None:
            self.validate(net, torch.device("cpu"))
        config = {**self.network_config(),
                  "_training": {"task": "segment", "label_values": self.values, "crop_size": list(self.crop_size),
                                "spacing": self.config["segment"].get("spacing"), "training_scans": len(self.data),
                                "encoder_weights": self.config["model"].get("weights")},
                  "_preprocessing": {"orientation": "SPL", "hu_range": [HU_MIN, HU_MAX], "crop_foreground": True,
                                     "spacing": self.config["segment"].get("spacing")}}
        if self.last_validation is not None:
            config["_validation"] = self.last_validation
        labels = {str(i + 1): {"name": name} for i, (_, name) in enumerate(self.classes)}
        state_net = SegResNetDS(init_filters=self.init_filters, in_channels=1, out_channels=self.out_channels,
                                blocks_down=self.blocks_down, dsdepth=self.dsdepth)
        state_net.load_state_dict(net.state_dict())
        save_pretrained(state_net, Path(folder), config, labels)

