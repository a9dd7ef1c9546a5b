"""Scan-level triage (e.g. "is there an acute bleed?") fine-tuned from the CT-FM encoder.

Input: a head CT in Hounsfield units on the SPL triage grid ``(D, H, W)``, as
:func:`CTFMLib.triage.triage_volume` gives it (orientation, foreground crop on HU > 0, then resampling to
``classify.spacing``; training caches scans with it in :class:`TriageScanCache`, ``ctfm triage`` calls it
at inference, so both feed the network the same input). :func:`triage_input` centre-pads (upstream's
"minimum" mode) / crops it to ``classify.size``, windows it four times (blood, subdural, stroke, bone),
scales each window to ``[0, 1]`` and stacks them along the first spatial axis: ``(1, 4 * S, P, L)``,
upstream's ``1 x 192 x 128 x 128`` for the default ``48 x 128 x 128``.

Model (:class:`TriageModel`): CT-FM encoder -> global average of the deepest map -> ``Linear(C, hidden)``
-> ReLU -> ``Linear(hidden, 1)`` (``hidden = 0``: one ``Linear(C, 1)``): one logit per scan.
``classify.mode`` "full" trains everything, "frozen" only the head (encoder parameters fixed, its batch
norms kept in eval mode), "probe" a linear probe (logistic regression) on cached embeddings: the frozen
encoder embeds every training and validation scan once (on the trainer's device, at the first step;
cached in ``cache_dir``, see :mod:`.probe`), steps train ``Linear(C, 1)`` on standardised embeddings
only (``classify.hidden`` and ``classify.flip_p`` are not used), and the export is the same whole
model as the other modes, with the standardisation folded into the linear head.

:class:`ClassifyTask` is the trainer's :class:`~CTFMLib.train.trainer.Task`: binary cross-entropy on
logits, AUROC and loss on a held-out list, and an export of the whole model (``encoder.*`` + ``head.*``)
with the decision threshold (Youden-optimal on the validation set when it has both classes) that
:func:`load_triage_model` reads back.
"""

from __future__ import annotations

import copy
import json
import math
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model_store import TRIAGE_ARCHITECTURE as ARCHITECTURE
from ..networks import TriageModel
from ..triage_model import (  # noqa: F401
    DEFAULT_SIZE,
    DEFAULT_SPACING,
    DEFAULT_WINDOWS,
    PAD_MODE,
    center_crop_slices,
    center_pad_crop,
    load_triage_model,
    triage_input,
)
from .common import config_section, pass_order_index, seeded_model
from .data import ScanCache
from .distributed import rank_indices
from .probe import EmbeddingCache, Standardize, arrays_digest, cache_key, embed_all, fold_standardize, state_digest
from .trainer import unwrap

MODES = ("full", "frozen", "probe")

# Tags mixed into the seeds so the sample order and the augmentation never share a random stream.
_ORDER, _AUGMENT = 11, 12


# --- the training data (the network and its input: CTFMLib.triage_model) ------------------------


class TriageScanCache(ScanCache):
    """:class:`~CTFMLib.train.data.ScanCache` of scans as triage sees them: float32 HU on the SPL grid at
    ``spacing`` after the foreground crop, exactly :func:`CTFMLib.triage.triage_volume` (what ``ctfm triage``
    computes at inference); :func:`triage_input` then pads/crops and windows it at each step."""

    KIND = "triage"
    PRETRAINING_FILTERS = False  # head CTs of 30 slices at 5 mm are what triage is for

    def __init__(self, folder, spacing=DEFAULT_SPACING, orientation: str = "SPL", allow_non_ct: bool = False):
        super().__init__(folder, spacing=spacing, orientation=orientation, allow_non_ct=allow_non_ct)

    @property
    def config(self) -> dict:
        config = {k: v for k, v in super().config.items() if k != "hu_range"}  # HU kept as read
        return {**config, "kind": self.KIND, "filters": "modality and localizer only"}

    def _init_args(self) -> tuple:
        return (str(self.folder), self.spacing, self.orientation, self.allow_non_ct)

    def preprocess(self, image) -> np.ndarray:
        from ..triage import triage_volume

        return triage_volume(image, self.spacing, self.orientation).hu


# --- metrics -------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U; ties count one half); ``nan`` without both classes."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.arange(1, s.size + 1)
    # Tied scores share the mean of their ranks.
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    if uniq.size < s.size:
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def youden_threshold(probabilities, labels) -> float | None:
    """The probability cut (positive when ``p >= t``) maximising sensitivity + specificity - 1.

    The cut lies halfway between the chosen score and the next lower one, so small shifts keep the same
    decisions. ``None`` without both classes.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    cuts = np.unique(p)[::-1]  # descending: each distinct score as ">= cut"
    best, best_j = None, -np.inf
    for i, cut in enumerate(cuts):
        pred = p >= cut
        j = (pred & y).sum() / n_pos - (pred & ~y).sum() / n_neg
        if j > best_j:
            lower = cuts[i + 1] if i + 1 < cuts.size else 0.0
            best, best_j = (cut + lower) / 2.0, j
    return float(best)


# --- the task ------------------------------------------------------------------------------




def _check_items(items, what: str) -> list:
    items = list(items or [])
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{what} item {i} must be a (volume_hu, label) pair, got {type(item).__name__}")
        volume, label = item
        if getattr(volume, "ndim", 0) != 3:
            raise ValueError(f"{what} item {i}: the volume must be a 3-D (D, H, W) HU array, got shape "
                             f"{getattr(volume, 'shape', None)}")
        if label not in (0, 1, True, False):
            raise ValueError(f"{what} item {i}: the label must be 0 or 1, got {label!r}")
    return items


class ClassifyTask:
    """The triage :class:`~CTFMLib.train.trainer.Task`.

    ``data`` / ``validation``: sequences of ``(volume_hu, label)``; ``volume_hu`` a ``(D, H, W)`` HU array on
    the SPL triage grid at ``classify.spacing`` (:func:`CTFMLib.triage.triage_volume`; any size:
    :func:`triage_input` pads/crops), ``label`` 0 or 1. ``config`` is
    ``load_config(path, "classify")`` (sections ``classify``, ``model``, ``run``, ``optim``).
    ``cache_dir``: where probe mode keeps the embeddings (``None``: in memory only).
    """

    def __init__(self, config: dict, data: Sequence, validation: Sequence | None = None, cache_dir=None):
        self.config = config
        cls, model, run = (config_section(config, k, "classify") for k in ("classify", "model", "run"))
        self.mode = str(cls.get("mode", "full"))
        if self.mode not in MODES:
            raise ValueError(f"classify.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.size = tuple(int(s) for s in cls.get("size", DEFAULT_SIZE))
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"classify.size must be three positive voxel counts (S, P, L), got {cls.get('size')}")
        self.windows = [tuple(float(v) for v in w) for w in cls.get("windows", DEFAULT_WINDOWS)]
        if not self.windows or any(len(w) != 2 or not w[1] > w[0] for w in self.windows):
            raise ValueError(f"classify.windows must be a non-empty list of [lo, hi] HU pairs with hi > lo, "
                             f"got {cls.get('windows')}")
        self.hidden = int(cls.get("hidden", 256))
        self.flip_p = float(cls.get("flip_p", 0.0))
        self.val_batch = max(1, int(cls.get("val_batch", 4)))
        self.default_threshold = float(cls.get("threshold", 0.5))
        # Not used on the volumes (they come resampled); recorded in the export for inference to resample alike.
        self.spacing = [float(v) for v in cls.get("spacing", DEFAULT_SPACING)]
        if self.hidden < 0 or not 0.0 <= self.flip_p <= 1.0 or not 0.0 < self.default_threshold < 1.0:
            raise ValueError(f"classify.hidden must be >= 0 (0 = a linear head), classify.flip_p in [0, 1] and "
                             f"classify.threshold in (0, 1); got {self.hidden}, {self.flip_p}, "
                             f"{self.default_threshold}")
        if self.mode == "probe":
            self.hidden, self.flip_p = 0, 0.0  # a linear head on fixed embeddings: no hidden layer, no flips
        self.init_filters = int(model["init_filters"])
        self.blocks_down = [int(b) for b in model["blocks_down"]]
        if self.init_filters < 1 or not self.blocks_down or min(self.blocks_down) < 1:
            raise ValueError(f"model.init_filters must be >= 1 and model.blocks_down a non-empty list of block counts "
                             f">= 1, got {self.init_filters} and {self.blocks_down}")
        self.seed = int(run.get("seed", 0))
        self.batch_size = int(run["scans_per_step"])
        self.data = _check_items(data, "training")
        if not self.data:
            raise ValueError("no training scans: give at least one (volume_hu, label) pair")
        self.validation = _check_items(validation, "validation")
        self._val_device = None  # where validate() last ran: export re-validates there
        self.embedding_cache = EmbeddingCache(cache_dir)
        self._inputs_key = None  # digest of the preprocessing and every scan, computed once
        self._probe_memo = None  # (weakref to the encoder, device, {set: tensor}) of the last embeddings()

    # --- model ---------------------------------------------------------------------------

    def encoder_config(self) -> dict:
        return {"architecture": "SegResEncoder", "spatial_dims": 3, "in_channels": 1,
                "init_filters": self.init_filters, "blocks_down": list(self.blocks_down)}

    def build_model(self) -> TriageModel:
        """Encoder (random from ``run.seed``, or ``model.weights``) + head, on the CPU."""
        model = seeded_model(self.seed, self.init_filters, self.blocks_down, self.config["model"].get("weights"),
                             lambda encoder: TriageModel(encoder, self.hidden, frozen=False))
        if self.mode in ("frozen", "probe"):
            model = _freeze(model)
        if self.mode == "probe":
            # Standardised inputs: the head's weights stay O(1) whatever the scale of the features.
            model.head = nn.Sequential(Standardize(model.encoder.out_channels), model.head)
        return model

    def embeddings(self, model: nn.Module, device) -> dict:
        """Probe mode: ``{"train": (N, C), "validation": (M, C)}`` float32 embeddings on ``device``.

        Computed by ``model``'s encoder (frozen: hashed once per encoder object) on ``device`` the first
        time, then read from memory or ``cache_dir``. Also fits the head's :class:`~.probe.Standardize`
        to the training embeddings (a pure function of them, so a resumed run gets the same values).
        """
        net = unwrap(model)
        encoder, device = net.encoder, torch.device(device)
        memo = self._probe_memo
        if memo is None or memo[0]() is not encoder or memo[1] != device:
            if self._inputs_key is None:
                prep = json.dumps({"size": list(self.size), "windows": [list(w) for w in self.windows],
                                   "pad": PAD_MODE})
                self._inputs_key = cache_key(prep, arrays_digest([v for v, _ in self.data]),
                                             arrays_digest([v for v, _ in self.validation]))
            key = cache_key(state_digest(encoder), self._inputs_key)

            def prepare(volume):
                return triage_input(volume, self.size, self.windows)

            def compute():
                return {name: embed_all(encoder, [v for v, _ in items], prepare, device, self.val_batch)
                        for name, items in (("train", self.data), ("validation", self.validation))}

            sets = self.embedding_cache.get(key, compute)
            if isinstance(net.head, nn.Sequential) and isinstance(net.head[0], Standardize):
                net.head[0].fit(sets["train"])
            self._probe_memo = (weakref.ref(encoder), device,
                                {name: torch.from_numpy(a).to(device) for name, a in sets.items()})
        return self._probe_memo[2]

    # --- data ----------------------------------------------------------------------------

    def sample_index(self, step: int, slot: int) -> int:
        """Which training item fills global ``slot`` of step ``step``: a seeded permutation per pass over the data."""
        g = (step - 1) * self.batch_size + slot
        return pass_order_index(self.seed, _ORDER, g, len(self.data))

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict:
        """``{"x": (b, 1, 4*S, P, L) float32, "y": (b,) float32, "items": [...]}`` for this rank's samples.

        Global slot ``i`` of step ``step`` depends only on (seed, step, i): its item and its flip.
        Probe mode has no ``"x"``: :meth:`loss` looks the ``items`` up in the cached embeddings.
        """
        if step < 1:
            raise ValueError(f"steps are numbered from 1, got {step}")
        xs, ys, items = [], [], []
        for slot in rank_indices(self.batch_size, rank, world):
            index = self.sample_index(step, slot)
            volume, label = self.data[index]
            if self.mode == "probe":
                ys.append(float(label))
                items.append(index)
                continue
            x = triage_input(volume, self.size, self.windows)
            rng = np.random.default_rng([self.seed, _AUGMENT, step, slot])
            if rng.random() < self.flip_p:
                x = x[..., ::-1]  # left-right (L axis)
            xs.append(np.ascontiguousarray(x))
            ys.append(float(label))
            items.append(index)
        out = {"y": torch.tensor(ys, dtype=torch.float32), "items": items}
        if xs:
            out["x"] = torch.from_numpy(np.stack(xs))
        return out

    # --- loss, validation, export ----------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict, device) -> torch.Tensor:
        """Mean binary cross-entropy of the logits (probe mode: of the head on the items' cached embeddings)."""
        if self.mode == "probe":
            embedded = self.embeddings(model, device)["train"][torch.as_tensor(batch["items"], device=device)]
            logits = model(embedded, embedded=True)
        else:
            logits = model(batch["x"].to(device, non_blocking=True))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["y"].to(device))

    @torch.no_grad()
    def predict(self, model: nn.Module, volumes: Sequence[np.ndarray], device="cpu") -> np.ndarray:
        """Logits ``(N,)`` of ``volumes`` (HU arrays), in eval mode, ``classify.val_batch`` at a time."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        out = []
        try:
            for start in range(0, len(volumes), self.val_batch):
                chunk = volumes[start:start + self.val_batch]
                x = torch.from_numpy(np.stack([triage_input(v, self.size, self.windows) for v in chunk]))
                out.append(net(x.to(device)).float().cpu().numpy())
        finally:
            net.train(was_training)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def validate(self, model: nn.Module, device) -> dict:
        """``{"val_auc", "val_loss"}`` on the validation list (``{}`` without one); AUC is nan with one class."""
        self._val_device = torch.device(device)
        metrics, _ = self._validation_metrics(model, device)
        return metrics

    def _validation_metrics(self, model, device) -> tuple:
        if not self.validation:
            return {}, None
        if self.mode == "probe":
            with torch.no_grad():
                logits = unwrap(model)(self.embeddings(model, device)["validation"], embedded=True)
            logits = logits.float().cpu().numpy()
        else:
            logits = self.predict(model, [v for v, _ in self.validation], device)
        labels = np.array([float(y) for _, y in self.validation])
        loss = nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(),
                                                              torch.from_numpy(labels))
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return {"val_auc": auroc(logits, labels), "val_loss": float(loss)}, youden_threshold(probs, labels)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``config.json`` + ``model.safetensors``: the whole :class:`TriageModel` (:func:`load_triage_model`).

        The validation set is evaluated once more with exactly these weights (on the device validation last
        used) so the recorded metrics and the Youden threshold belong to the exported model. Probe mode
        folds the standardisation into the linear head: the file holds a plain ``Linear(C, 1)``.
        """
        from ..weights import save_pretrained

        net = unwrap(model)
        device = self._val_device or torch.device("cpu")
        evaluated = copy.deepcopy(net).to(device) if device.type != "cpu" else net
        metrics, youden = self._validation_metrics(evaluated, device)
        threshold, source = (youden, "youden") if youden is not None else (self.default_threshold, "default")
        if isinstance(net.head, nn.Sequential) and isinstance(net.head[0], Standardize):
            net = copy.deepcopy(net).cpu()  # its standardisation was fitted at the first step (and checkpointed)
            net.head = fold_standardize(net.head[0], net.head[1])
        config = {
            "architecture": ARCHITECTURE,
            "encoder": self.encoder_config(),
            "head": [net.encoder.out_channels] + ([self.hidden] if self.hidden else []) + [1],
            "mode": self.mode,
            "threshold": threshold,
            "threshold_source": source,
            "validation": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
            "validation_scans": len(self.validation),
            "training_scans": len(self.data),
            # Keys starting with "_" are notes: network builders ignore them.
            "_preprocessing": {"orientation": "SPL", "input": "HU", "spacing": list(self.spacing),
                               "crop_foreground": "HU > 0, before resampling", "size": list(self.size),
                               "windows": [list(w) for w in self.windows], "stack_axis": "S",
                               "pad": PAD_MODE, "output": "logit; probability = sigmoid(logit)"},
        }
        save_pretrained(net, Path(folder), config)


def _freeze(model: TriageModel) -> TriageModel:
    model.frozen = True
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.train(model.training)
    return model
