"""Checking, loading and saving CT-FM weights: the torch half of the model store.

Finding a model (:func:`~CTFMLib.model_store.resolve`, downloads, published checksums), reading its small
JSON files and removing it is :mod:`CTFMLib.model_store`, which imports no torch. A weights *source* is one of:

- a catalogue id (``ct_fm_feature_extractor``) or alias (``whole-body``), a Hugging Face
  repo id (``project-lighter/ct_fm_feature_extractor``) or the name a model was imported
  under (``my-model``, by default its folder's name): an imported copy in the CTFM model
  folder is used first, else the Hugging Face cache, else a download when the hub answers
  (:func:`CTFMLib.cache.hub_unreachable`; never under ``HF_HUB_OFFLINE``);
- a folder in the published layout: ``config.json`` + ``model.safetensors``;
- a single ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.ckpt`` file
  read with ``torch.load(weights_only=True)``: nothing is ever unpickled.

Nothing is built or loaded before it is checked (:func:`build_and_load`): the config's types and
ranges (:func:`CTFMLib.networks.validate_config`), the network's size (built on the meta device,
which allocates nothing), and every tensor's name, shape and dtype against the file's header
(safetensors headers are read without loading; pickled checkpoints are size-checked before
``torch.load``). Only then are the tensors read; they must be finite floating-point values where the
network has floats (float16/bfloat16/float64 are cast to float32), batch-norm variances must not be
negative, and the loaded network must give finite outputs on a small constant input. Loading is
strict: :class:`WeightsMismatchError` names the missing, unexpected and mis-shaped tensors.
(Upstream users lost results to a ``strict=False`` load that matched nothing and left the network
random.)

A model is known by its weights, however it was referenced (:func:`match_catalogue`): a folder, file
or import whose ``model.safetensors`` has a catalogue entry's published sha256, or, where none is
published, that entry's network and output count, gets the entry's labels, terminology and spacing,
and says so (a :class:`~CTFMLib.catalog.ModelNote`).

Imports (:func:`import_model`) copy only the files a model needs, as regular files, into a private
folder in the model store, check them there, and then replace an earlier import in one rename;
every delete goes through :func:`CTFMLib.files.remove_tree` with the store it cleans.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import struct
import time
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import torch
from torch import nn

from . import cache, files
from .cache import MARKER_NAME, NOT_PUBLISHED, WEIGHTS_NAME
from .catalog import Catalog, ModelEntry, ModelNote, load_catalog
from .model_store import (
    CONFIG_NAME,
    LABELS_NAME,
    MAX_CONFIG_BYTES,
    MAX_JSON_BYTES,
    TERM_SUFFIX,
    TRIAGE_ARCHITECTURE,
    read_config,
    read_labels,
    resolve,
    sha256_file,
    short_text,
    verify_published,
    weights_file_of,
)
from .networks import (
    ARCHITECTURES,
    CTFM_ENCODER_CONFIG,
    MAX_PARAMETERS,
    build_network,
    check_network_size,
    meta_network,
    probe_size,
    state_layout,
    validate_config,
)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Prefixes under which a checkpoint may hold the network we want: Lightning
# systems (``model.``, upstream pretraining's ``backbone.``), DDP (``module.``),
# torch.compile (``_orig_mod.``), and a SegResNetDS's ``encoder.`` for its trunk.
SUBMODULE_PREFIXES = ("model.backbone.", "backbone.", "model.encoder.", "model.", "module.", "_orig_mod.", "encoder.")
SHOW = 8

# Size limits of the files a model is made of. The weights: the largest network allowed
# (networks.MAX_PARAMETERS) in float64, plus safetensors' own 100 MB header limit (config.json and
# labels.json: model_store.MAX_CONFIG_BYTES / MAX_JSON_BYTES).
MAX_HEADER_BYTES = 100_000_000
MAX_WEIGHTS_BYTES = 8 * MAX_PARAMETERS + MAX_HEADER_BYTES
# A zip holding a model is refused when it claims to expand past this (what it holds beyond the model's
# own files is never extracted).
MAX_ZIP_BYTES = MAX_WEIGHTS_BYTES + 64 * MAX_JSON_BYTES
# torch.save stores its records uncompressed: a checkpoint expands to about its own size. This much
# more (zip headers, a re-zipped small file) is tolerated; more is a decompression bomb.
PICKLE_ALLOWANCE = 1 << 20
_CHUNK = 1 << 20


# Defined without torch (CTFMLib.cache), so a command can refuse a model before PyTorch is loaded; importable
# from here too, where every weights error has always been caught.
WeightsError = cache.WeightsError


class NotPublishedError(WeightsError):
    """Weights offered under a published catalogue id cannot be shown to be the published ones
    (``force`` imports them anyway, marked as not the published weights)."""


class WeightsMismatchError(WeightsError):
    """A checkpoint's tensors do not match the network's, by name or by shape."""

    def __init__(self, missing, unexpected, mismatched, source=""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {_listing(self.unexpected)}")
        if self.mismatched:
            shown = [f"{n} (network {tuple(a)}, file {tuple(b)})" for n, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} with the wrong shape: {_listing(shown)}")
        where = f" in {source}" if source else ""
        super().__init__(f"the weights{where} do not fit the network; " + "; ".join(parts))


def _listing(names) -> str:
    names = [short_text(n) for n in names]
    more = f", ... ({len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


@dataclass
class ModelInfo:
    """Where a loaded model came from."""

    source: str
    path: Path
    architecture: str
    config: dict
    sha256: Optional[str] = None
    labels: Optional[dict] = None
    entry: Optional[ModelEntry] = None
    notes: list = field(default_factory=list)


# --- reading tensors ---------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a weights file, known without reading its values."""

    shape: tuple
    dtype: str
    floating: bool


# safetensors dtype -> (bytes per element, floating point)
_ST_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True), "F8_E4M3": (1, True),
    "F8_E5M2": (1, True), "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False), "BOOL": (1, False),
}


def _invalid_safetensors(name: str, why: str) -> WeightsError:
    return WeightsError(f"{name} is not a valid safetensors file (corrupt or truncated?): {why}")


def parse_safetensors_header(header: bytes, file_size: int, name: str) -> dict:
    """``{tensor name: TensorInfo}`` from a safetensors header (the JSON after the 8-byte length).

    The tensors must exactly tile the data that follows the header in a file of ``file_size`` bytes.
    """
    try:
        data = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _invalid_safetensors(name, "its header is not JSON") from None
    if not isinstance(data, dict):
        raise _invalid_safetensors(name, "its header is not a JSON object")
    data_size = file_size - 8 - len(header)
    layout, spans = {}, []
    for key, spec in data.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            itemsize, floating = _ST_DTYPES[dtype]
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*shape, begin, end]):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise _invalid_safetensors(name, f"tensor {short_text(key, 60)} is described wrongly") from None
        count = 1
        for n in shape:
            count *= n
        if end - begin != count * itemsize:
            raise _invalid_safetensors(name, f"tensor {short_text(key, 60)} has {end - begin} bytes for shape {shape}")
        layout[key] = TensorInfo(tuple(shape), dtype, floating)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _invalid_safetensors(name, "its tensors overlap or leave gaps")
        position = end
    if position != data_size:
        raise _invalid_safetensors(name, f"the header describes {position} bytes of tensors, the file holds "
                                         f"{max(data_size, 0)}")
    return layout


def _header_length(first: bytes, file_size: int, name: str) -> int:
    if len(first) < 8:
        raise _invalid_safetensors(name, f"{file_size} bytes is too short")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise _invalid_safetensors(name, f"its header claims {n} bytes")
    return n


def safetensors_header(path) -> dict:
    """``{tensor name: TensorInfo}`` of a ``.safetensors`` file, read from its header alone (no tensor is loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = _header_length(f.read(8), size, path.name)
            header = f.read(n)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
    if len(header) != n:
        raise _invalid_safetensors(path.name, "it ends inside its header")
    return parse_safetensors_header(header, size, path.name)


def check_torch_archive(path) -> None:
    """Refuse a pickled checkpoint whose zip records would expand far beyond the file (a decompression bomb).

    ``torch.save`` stores records uncompressed, so a real checkpoint expands to about its own size;
    the zip directory is read without inflating anything. Legacy (non-zip) checkpoints are not
    compressed and pass; ``torch.load(weights_only=True)`` still refuses anything but tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise WeightsError(f"refused to load {path.name}: its zip directory is damaged (not a checkpoint torch "
                           "wrote)") from None
    total = sum(i.file_size for i in infos)
    bombs = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED
             and i.file_size > PICKLE_ALLOWANCE and i.file_size > 20 * max(i.compress_size, 1)]
    if total > size + PICKLE_ALLOWANCE or bombs:
        raise WeightsError(
            f"refused to load {path.name}: its records would expand to {total:,} bytes from {size:,} on disk "
            f"(a decompression bomb, not a checkpoint torch wrote); convert it to .safetensors in a trusted "
            "environment")


def read_state_dict(path) -> dict:
    """Read tensors from a .safetensors file or a weights-only torch checkpoint (checked before reading)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        safetensors_header(path)  # a clear refusal, before safetensors reads anything
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise _invalid_safetensors(path.name, short_text(e, 200)) from None
    if name.endswith(PICKLE_SUFFIXES):
        check_torch_archive(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises several types; all mean "not plain tensors"
            raise WeightsError(
                f"refused to load {path.name}: it is not a plain-tensor checkpoint ({type(e).__name__}). "
                "Only tensors are read, never pickled code; convert it to .safetensors in a trusted environment."
            ) from None
        return _tensors_of_checkpoint(obj, path.name)
    raise WeightsError(f"unknown weights format {path.name}: use .safetensors, or .pt/.pth/.ckpt")


def _tensors_of_checkpoint(obj, name: str) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{name} holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{name} holds no tensors")
    return tensors


class WeightsFile:
    """A weights file whose tensor names, shapes and dtypes (:attr:`layout`) are known before its values.

    Safetensors: from the header, the values are read by :meth:`tensors` only when asked for.
    Pickled checkpoints: size-checked (:func:`check_torch_archive`), then read weights-only.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"no weights file at {self.path}")
        self._tensors = None
        if self.path.name.lower().endswith(".safetensors"):
            self.layout = safetensors_header(self.path)
        else:
            self._tensors = read_state_dict(self.path)
            self.layout = {k: TensorInfo(tuple(v.shape), str(v.dtype).replace("torch.", ""), v.is_floating_point())
                           for k, v in self._tensors.items()}

    def tensors(self) -> dict:
        if self._tensors is None:
            self._tensors = read_state_dict(self.path)
        return self._tensors


def select_submodule(state: dict, expected: set) -> tuple:
    """Return ``(state, prefix)``: the tensors under the prefix that names the wanted network.

    Keys that already match are kept as they are. Otherwise the first known
    prefix whose stripped keys overlap the expected ones is taken, and tensors
    outside it (a projection head, an optimizer's copies) are left out.
    """
    if set(state) & expected:
        return state, ""
    for prefix in SUBMODULE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and set(sub) & expected:
            return sub, prefix
    return state, ""


def _compare_layout(layout: dict, found: dict, source: str) -> None:
    """Names and shapes (``found``: name -> shape) must match the network's ``layout`` exactly."""
    missing = [k for k in layout if k not in found]
    unexpected = [k for k in found if k not in layout]
    mismatched = [(k, layout[k][0], tuple(found[k])) for k in layout if k in found and tuple(found[k]) != layout[k][0]]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(missing, unexpected, mismatched, source)


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def _check_dtypes(layout: dict, floating: dict, dtypes: dict, source: str) -> None:
    """Floating-point tensors where the network has floating-point ones (names the others)."""
    wrong = [f"{k} ({dtypes[k]})" for k, is_float in floating.items() if layout[k][1] and not is_float]
    if wrong:
        raise WeightsError(f"the weights{_where(source)} hold integer or boolean tensors where the network has "
                           f"floating-point ones: {_listing(wrong)}; they are not usable weights")


def checked_state(layout: dict, state: dict, source: str = "") -> dict:
    """``state`` made ready to load: dtypes checked and cast, values checked.

    Floating-point parameters and buffers must be finite floating-point tensors (cast to float32);
    batch-norm ``running_var`` must be >= 0; integer buffers (``num_batches_tracked``) become int64.
    Every refusal names the tensors.
    """
    _check_dtypes(layout, {k: v.is_floating_point() for k, v in state.items()},
                  {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}, source)
    out, bad, negative = {}, [], []
    for k, v in state.items():
        if layout[k][1]:
            v = v.to(torch.float32)
            if not bool(torch.isfinite(v).all()):
                bad.append(k)
            elif k.rsplit(".", 1)[-1] == "running_var" and bool((v < 0).any()):
                negative.append(k)
        elif v.is_complex():
            raise WeightsError(f"the weights{_where(source)} hold a complex tensor: {short_text(k)}")
        else:
            v = v.to(torch.int64)
        out[k] = v
    if bad:
        raise WeightsError(f"the weights{_where(source)} contain NaN or infinite values in {_listing(bad)}")
    if negative:
        raise WeightsError(f"the weights{_where(source)} have negative batch-norm variances in {_listing(negative)} "
                           "(a variance is never negative): the file is corrupt")
    return out


def check_state_dict(model: nn.Module, state: dict, source: str = "") -> None:
    """Raise :class:`WeightsError` unless names, shapes, dtypes and values fit ``model``."""
    layout = state_layout(model)
    _compare_layout(layout, {k: v.shape for k, v in state.items()}, source)
    checked_state(layout, state, source)


def load_state_dict_strict(model: nn.Module, state: dict, source: str = "") -> str:
    """Load ``state`` into ``model`` strictly (checked, cast); returns the checkpoint prefix that was stripped."""
    layout = state_layout(model)
    state, prefix = select_submodule(state, set(layout))
    _compare_layout(layout, {k: v.shape for k, v in state.items()}, source)
    model.load_state_dict(checked_state(layout, state, source), strict=True)
    return prefix


def check_outputs_finite(model: nn.Module, source: str = "") -> None:
    """Run ``model`` once on a small constant input; refuse non-finite outputs, naming the first layer that made them.

    The input is a cube of :func:`~CTFMLib.networks.probe_size` voxels of value 0.5 (a normalised CT lies
    in about 0..1): small enough to cost nothing, large enough for every level of the network.
    """
    from .networks import SegResEncoder

    encoder = model if isinstance(model, SegResEncoder) else getattr(model, "encoder", None)
    channels = getattr(encoder, "in_channels", 1)
    size = probe_size(model)
    x = torch.full((1, channels, size, size, size), 0.5)
    first = []

    def finite(values) -> bool:
        if isinstance(values, torch.Tensor):
            return not values.is_floating_point() or bool(torch.isfinite(values).all())
        if isinstance(values, (list, tuple)):
            return all(finite(v) for v in values)
        return True

    def hook(module, inputs, output, name=""):
        if not first and finite(inputs) and not finite(output):
            first.append(name)

    handles = [m.register_forward_hook(lambda mod, i, o, n=name: hook(mod, i, o, n))
               for name, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model.forward(x)  # a check, not a use: hooks that count the model's calls are not run
    finally:
        for h in handles:
            h.remove()
    if finite(out):
        return
    if first:
        module = model.get_submodule(first[0])
        names = [f"{first[0]}.{n}" for n, _ in [*module.named_parameters(recurse=False),
                                                 *module.named_buffers(recurse=False)]
                 if not n.startswith("num_batches")]
        where = f"first at {_listing(names) if names else first[0]}"
    else:
        where = "the network as a whole"
    raise WeightsError(f"the weights{_where(source)} make the network's output NaN or infinite on a constant "
                       f"test input ({where}): they are corrupt or not trained weights")


def build_and_load(build: Callable[[], nn.Module], weights, source: str = "") -> tuple:
    """Build the network ``build()`` makes and load ``weights`` (a path or :class:`WeightsFile`) into it, checked.

    In order, before anything large is allocated: the network is built on the meta device and its
    size checked (:func:`~CTFMLib.networks.check_network_size`); the file's tensor names, shapes and
    dtypes are compared with it. Then the tensors are read and checked (:func:`checked_state`), the
    real network is built and loaded strictly, and its output on a constant input must be finite.
    Returns ``(model in eval mode on the CPU, prefix stripped from the checkpoint's names)``.
    """
    weights = weights if isinstance(weights, WeightsFile) else WeightsFile(weights)
    source = source or str(weights.path)
    try:
        meta = meta_network(build)
        check_network_size(meta, "the network its config describes")
    except (TypeError, ValueError, RuntimeError) as e:
        raise WeightsError(f"the config of {source} does not describe a usable network: {short_text(e, 300)}") from None
    layout = state_layout(meta)
    found, prefix = select_submodule(weights.layout, set(layout))
    _compare_layout(layout, {k: v.shape for k, v in found.items()}, source)
    _check_dtypes(layout, {k: v.floating for k, v in found.items()}, {k: v.dtype for k, v in found.items()}, source)
    state, _ = select_submodule(weights.tensors(), set(layout))
    state = checked_state(layout, state, source)
    every = {n for n, _ in meta.named_parameters()} | {n for n, _ in meta.named_buffers()}
    # Every tensor comes from the file: allocate without the random initialisation a build() would do.
    model = meta.to_empty(device="cpu") if every <= set(layout) else build()
    model.load_state_dict(state, strict=True)
    model.eval()
    check_outputs_finite(model, source)
    return model, prefix


def infer_config(state: dict) -> dict:
    """Constructor arguments of the CT-FM network that ``state`` was saved from.

    Used for a bare weights file without ``config.json``. ``state`` maps names to tensors or
    anything with a ``shape`` (:class:`TensorInfo`).
    """
    keys = set(state)
    encoder_prefix = "encoder." if any(k.startswith("encoder.") for k in keys) else ""
    init = state.get(f"{encoder_prefix}conv_init.weight")
    if init is None or len(init.shape) != 5:
        raise WeightsError("cannot tell which network these weights belong to (no conv_init.weight); provide config.json")
    blocks = {}
    for k in keys:
        m = re.match(rf"^{re.escape(encoder_prefix)}layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            level, block = int(m.group(1)), int(m.group(2))
            blocks[level] = max(blocks.get(level, 0), block + 1)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise WeightsError("cannot tell how many levels these weights have; provide config.json")
    config = {
        "spatial_dims": 3,
        "in_channels": int(init.shape[1]),
        "init_filters": int(init.shape[0]),
        "blocks_down": [blocks[i] for i in range(len(blocks))],
    }
    if encoder_prefix:
        heads = sorted(int(m.group(1)) for k in keys if (m := re.match(r"^up_layers\.(\d+)\.head\.weight$", k)))
        if not heads:
            raise WeightsError("segmentation weights without output heads; provide config.json")
        config["out_channels"] = int(state[f"up_layers.{heads[-1]}.head.weight"].shape[0])
        config["dsdepth"] = len(heads)
    return config


# --- finding weights -----------------------------------------------------------------


# --- loading -----------------------------------------------------------------------


def _network_config(config: dict, where: str) -> str:
    try:
        return validate_config(config)
    except ValueError as e:
        raise WeightsError(f"{where} does not describe a supported network: {short_text(e, 300)}") from None


def load_model(source, expect: Optional[str] = None, catalog: Optional[Catalog] = None, progress=None):
    """Build and strictly load the network that ``source`` holds; returns ``(model, ModelInfo)``.

    ``expect="SegResEncoder"`` loads only the encoder, also from a segmentation
    checkpoint (its ``encoder.`` tensors). The model is returned in eval mode on the CPU.
    Everything is checked first (:func:`build_and_load`).
    """
    if expect is not None and expect not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {expect!r}")
    path, entry = resolve(str(source), catalog, progress)
    weights_file = weights_file_of(path)
    folder = path if path.is_dir() else path.parent
    notes = []
    digest = verify_published(path, weights_file, entry, notes)
    weights = WeightsFile(weights_file)
    config = read_config(folder) if path.is_dir() else None
    where = f"{folder / CONFIG_NAME}" if config is not None else f"the config inferred from {weights_file.name}"
    if config is None:
        config = infer_config(select_submodule(weights.layout, {"conv_init.weight", "encoder.conv_init.weight"})[0])
    arch = file_arch = _network_config(config, where)
    if expect == "SegResEncoder" and arch == "SegResNetDS":
        config = {k: config[k] for k in ("spatial_dims", "in_channels", "init_filters", "blocks_down") if k in config}
        config = {**{k: v for k, v in CTFM_ENCODER_CONFIG.items() if k not in config}, **config}
        arch = _network_config(config, where)
    elif expect is not None and expect != arch:
        raise WeightsError(f"{source} holds a {arch}, not a {expect}")
    model, prefix = build_and_load(lambda: build_network(config), weights, str(weights_file))
    info = ModelInfo(str(source), path, arch, config, digest, read_labels(folder) if path.is_dir() else None, entry,
                     notes)
    for note in notes:  # a forced import under a published id says so wherever it is used
        _tell(note)
    if entry is None and arch == file_arch:  # a folder, file or import: known by its weights, if at all
        match = match_catalogue(weights_file, weights.layout, arch, catalog, digest)
        if match is not None:
            info.entry, how = match
            _tell(_match_note(source, how, info.entry, bool(info.labels)), info.notes)
            info.sha256 = info.sha256 or info.entry.sha256(WEIGHTS_NAME)  # matched by it, where published
    if info.labels is None and info.entry is not None and info.entry.labels and arch == "SegResNetDS":
        info.labels = info.entry.labels
    if prefix:
        info.notes.append(f"took the tensors under '{prefix}'")
    return model, info


def _match_note(source, how: str, entry: ModelEntry, own_labels: bool) -> str:
    own = " (its own labels.json names its outputs)" if own_labels else ""
    return f"{short_text(source, 200)}: {how}; it gets the labels, terminology and spacing of {entry.id}{own}"


def model_notes(folder, name: str, catalog: Optional[Catalog] = None) -> list:
    """What using the checked model ``folder`` will say about it, without loading it: the catalogue model
    its weights match, or that its output names are guessed or unknown (:func:`CTFMLib.labels.labels_for_model`).
    For ``ctfm models import``, to say so at once."""
    from .labels import labels_for_model

    folder = Path(folder)
    config = read_config(folder)
    if config is None or config.get("architecture") == TRIAGE_ARCHITECTURE:
        return []
    arch = _network_config(config, str(folder / CONFIG_NAME))
    weights_file = folder / WEIGHTS_NAME
    info = ModelInfo(name, folder, arch, config, labels=read_labels(folder))
    match = match_catalogue(weights_file, WeightsFile(weights_file).layout, arch, catalog)
    if match is not None:
        info.entry = match[0]
        info.notes.append(_match_note(name, match[1], match[0], bool(info.labels)))
    if arch == "SegResNetDS":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModelNote)
            labels_for_model(info)  # adds its note where the names are guessed or unknown
    return info.notes


def _tell(note: str, notes: Optional[list] = None) -> None:
    """Say something about the model being loaded: a :class:`~CTFMLib.catalog.ModelNote` (the command line
    prints it as one ``ctfm: note:`` line), also kept in ``notes``."""
    if notes is not None:
        notes.append(note)
    warnings.warn(note, ModelNote, stacklevel=3)


def match_catalogue(weights_file, layout: dict, architecture: str, catalog: Optional[Catalog] = None,
                    digest: Optional[str] = None) -> Optional[tuple]:
    """The published catalogue model that ``weights_file`` holds, and how that is known; or None.

    Known by the weights, however they were referenced: first a published ``sha256`` of
    ``model.safetensors`` (computed only when the catalogue has one to compare, ``digest`` when known);
    where no checksum is published, the entry's network (:meth:`~CTFMLib.catalog.ModelEntry.signature`:
    architecture, CT-FM encoder shape and output count, read from the file's tensor shapes) and its
    published size where known. An entry whose checksum is published never matches by network alone
    (other weights of that shape are not it), and two entries of one network match neither.
    """
    weights_file = Path(weights_file)
    catalog = catalog if catalog is not None else load_catalog()
    published = [m for m in catalog if m.repo_id and m.architecture == architecture]
    hashed = [m for m in published if m.sha256(WEIGHTS_NAME)]
    if hashed and weights_file.name.lower().endswith(".safetensors"):
        digest = digest or sha256_file(weights_file)
        for m in hashed:
            if digest == m.sha256(WEIGHTS_NAME):
                return m, f"its weights are the published {m.id} ({m.repo_id}; same sha256)"
    try:
        shape = infer_config(select_submodule(layout, {"conv_init.weight", "encoder.conv_init.weight"})[0])
    except WeightsError:
        return None
    size = weights_file.stat().st_size
    hits = []
    for m in published:
        signature = m.signature()
        if signature is None or m.sha256(WEIGHTS_NAME):
            continue
        if m.size(WEIGHTS_NAME) is not None and m.size(WEIGHTS_NAME) != size:
            continue
        if all(shape.get(k) == signature[k] for k in ("in_channels", "init_filters", "blocks_down", "out_channels")):
            hits.append((m, signature))
    if len(hits) != 1:
        return None
    m, signature = hits[0]
    return m, (f"its weights have the network of the published {m.id} ({m.repo_id}: {m.architecture}, "
               f"init_filters {signature['init_filters']}, blocks {signature['blocks_down']}, "
               f"{signature['out_channels']} outputs; no published checksum to compare)")



# --- saving and importing ---------------------------------------------------------------


def save_pretrained(model: nn.Module, folder, config: dict, labels: Optional[dict] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``labels.json``), the published layout.

    Each file is written atomically (:func:`CTFMLib.files.atomic_output`: a private temporary file,
    fsync'ed, given normal permissions and renamed), so an interrupted save never leaves a
    half-written file that would later load, and colleagues can read a shared model folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with files.atomic_output(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    files.atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2))
    if labels is not None:
        files.atomic_write_text(folder / LABELS_NAME, json.dumps(labels, indent=1))
    return folder


def _needed(name: str) -> bool:
    """The files a model is made of (nothing else is ever copied into the model store)."""
    return name in (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME) or (name.endswith(TERM_SUFFIX) and name != TERM_SUFFIX)


def _limit(name: str) -> int:
    return {WEIGHTS_NAME: MAX_WEIGHTS_BYTES, CONFIG_NAME: MAX_CONFIG_BYTES}.get(name, MAX_JSON_BYTES)


def _copy_member(read: Callable[[int], bytes], size: int, dest: Path, label: str) -> None:
    """Copy ``size`` bytes from ``read`` into the new file ``dest`` (atomically), never more.

    ``size`` is what the source declares (a zip's ``file_size``, a file's ``st_size``); it must be within the
    member's limit, and for the weights exactly what the safetensors header describes. The copy stops with
    an error as soon as the source gives more or fewer bytes than declared.
    """
    name = dest.name
    if size > _limit(name):
        raise WeightsError(f"{label} is {size:,} bytes, more than a {name} may be ({_limit(name):,})")
    with files.atomic_output(dest, overwrite=False) as tmp:
        with open(tmp, "xb") as out:
            copied = 0
            if name == WEIGHTS_NAME:
                first = read(8)
                n = _header_length(first, size, label)
                header = _read_exactly(read, n, label)
                parse_safetensors_header(header, size, label)  # size must be exactly what the tensors need
                out.write(first + header)
                copied = 8 + n
            while True:
                block = read(min(_CHUNK, size - copied + 1))
                if not block:
                    break
                copied += len(block)
                if copied > size:
                    raise WeightsError(f"{label} holds more bytes than it declares ({size:,}): refused")
                out.write(block)
            if copied != size:
                raise WeightsError(f"{label} ends after {copied:,} of its {size:,} bytes (truncated)")


def _read_exactly(read, n: int, label: str) -> bytes:
    parts, got = [], 0
    while got < n:
        block = read(min(_CHUNK, n - got))
        if not block:
            raise _invalid_safetensors(label, "it ends inside its header")
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _zip_member_path(name: str) -> Optional[PurePosixPath]:
    """A zip member's path, or None when it could point outside the extraction folder."""
    normal = name.replace("\\", "/")
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal):
        return None
    parts = PurePosixPath(normal).parts
    if any(p == ".." for p in parts):
        return None
    return PurePosixPath(normal)


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _stage_zip(source: Path, staged: Path) -> None:
    """Extract only the model's own files from a zip into ``staged``, each checked and capped."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise WeightsError(f"{source.name} is not a valid zip file") from None
    with archive:
        infos = archive.infolist()
        paths = {}
        for info in infos:
            member = _zip_member_path(info.filename)
            if member is None:
                raise WeightsError(f"{source.name} has an unsafe path: {short_text(info.filename, 200)}")
            paths[info.filename] = member
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_BYTES:
            raise WeightsError(f"{source.name} claims to expand to {total:,} bytes, more than any model "
                               f"({MAX_ZIP_BYTES:,}): refused")
        hits = [i for i in infos if not i.is_dir() and paths[i.filename].name == WEIGHTS_NAME]
        if len(hits) != 1:
            raise WeightsError(f"{source.name} must hold exactly one {WEIGHTS_NAME}, found {len(hits)}")
        home = paths[hits[0].filename].parent
        members = [i for i in infos if not i.is_dir() and paths[i.filename].parent == home
                   and _needed(paths[i.filename].name)]
        names = [paths[i.filename].name for i in members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise WeightsError(f"{source.name} holds {', '.join(twice)} more than once")
        for info in members:
            label = f"{source.name}:{info.filename}"
            if _is_zip_symlink(info):
                raise WeightsError(f"{label} is a symbolic link; a model's files must be regular files")
            try:
                with archive.open(info) as member:
                    _copy_member(member.read, info.file_size, staged / paths[info.filename].name, label)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise WeightsError(f"{label} is damaged ({short_text(e, 120)})") from None


def _stage_folder(source: Path, staged: Path) -> None:
    """Copy only the model's own files from a folder into ``staged``: regular files, never through a link."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for name in sorted(os.listdir(source)):
        if not _needed(name):
            continue
        path = source / name
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise WeightsError(f"{path} is a symbolic link; CT-FM copies only regular files: put the file itself "
                               "in the folder")
        if not stat.S_ISREG(info.st_mode):
            raise WeightsError(f"{path} is not a regular file")
        try:
            fd = os.open(path, os.O_RDONLY | nofollow | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(f.fileno())
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                raise WeightsError(f"{path} changed while it was being imported")
            _copy_member(f.read, now.st_size, staged / name, str(path))


def _import_id(repo_id: Optional[str], source: Path) -> str:
    """The id to file an import under: the one given, else the folder's (or zip's) name, as the user sees it.

    Refused (one line) before anything is copied when it could name another place
    (:func:`CTFMLib.cache.model_folder_name`: the path rules of :mod:`CTFMLib.files`).
    """
    if repo_id is not None:
        cache.model_folder_name(repo_id)  # refused here, before anything else, when it could name another place
        return repo_id
    stem = source.name[: -len(".zip")] if source.name.lower().endswith(".zip") else source.name
    try:
        cache.model_folder_name(stem)
    except ValueError as e:
        raise WeightsError(f"cannot name the imported model after {short_text(source, 200)} ({e}); give it a name: "
                           f"`ctfm models import {_quote(source)} --id NAME`") from None
    return stem


def _quote(path) -> str:
    import shlex

    return shlex.quote(str(path))


@contextmanager
def _signals_held():
    """Hold SIGTERM/SIGINT back for a few system calls that must not be separated (POSIX; elsewhere a no-op).

    A signal that arrives meanwhile is delivered when the block ends, so a cancel still cancels.
    """
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = block(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, previous)


def _install(staged: Path, dest: Path, work: Path) -> None:
    """Put the checked folder ``staged`` at ``dest``, replacing an earlier import, with renames only.

    Whatever runs at the same time, ``dest`` is always absent or a complete model; an earlier import
    is moved into ``work`` (deleted with it) only in the moment before the new one takes its place,
    with signals held back, and moved back if that fails.
    """
    with _signals_held():
        moved = None
        try:
            for attempt in range(50):
                try:
                    os.rename(staged, dest)
                    files.fsync_dir(dest.parent)
                    return
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM) or (
                            e.errno in (errno.EACCES, errno.EPERM) and not os.path.lexists(dest)):
                        raise
                if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
                    raise WeightsError(f"{dest} exists and is not a model folder; remove it and import again")
                try:
                    os.rename(dest, work / f"previous-{attempt}")
                    moved = work / f"previous-{attempt}"
                except FileNotFoundError:
                    pass  # another import moved it meanwhile
                except OSError as e:  # Windows: a file in the old folder is open
                    if attempt >= 49:
                        raise WeightsError(f"cannot replace {dest} ({e.strerror or e}); close what uses it and "
                                           "retry") from None
                    time.sleep(0.1)
            raise WeightsError(f"cannot replace {dest}: other imports keep writing it; retry")
        except BaseException:
            if moved is not None and not os.path.lexists(dest):
                try:
                    os.rename(moved, dest)  # the earlier import stays, rather than none
                except OSError:
                    pass
            raise


def _check_model_folder(staged: Path, config: dict, label: str) -> None:
    """Everything a later load will check, done now on the staged copy (labels included), the same way for every
    network (a triage model's encoder and head too: :func:`CTFMLib.networks.validate_config`)."""
    _network_config(config, f"{label}/{CONFIG_NAME}")
    build_and_load(lambda: build_network(config), staged / WEIGHTS_NAME, label)
    read_labels(staged, label)


def import_model(source, repo_id: Optional[str] = None, catalog: Optional[Catalog] = None,
                 force: bool = False) -> Path:
    """Copy a model folder or zip into the CTFM model folder, for computers without internet; returns its folder.

    Only ``config.json``, ``model.safetensors``, ``labels.json`` and ``*.term.json`` are copied, as
    regular files (a symbolic link among them is refused), each size-capped. The copy is staged in a
    private folder in the model store, checked there like a load would (config, network size, tensors,
    values, labels), and then replaces an earlier import of the same id in one rename; on any error,
    cancel or signal nothing is left behind.

    Without ``repo_id`` the model is filed under its folder's (or zip's) name, which every command then
    takes (``--model NAME``, ``--weights NAME``); a name that is a catalogue id or alias (``whole-body``)
    files it as that catalogue model. Under a catalogue id with published weights the import must be those
    weights (the published checksum), or ``force=True``: it is then recorded (``ctfm-import.json``) and
    shown everywhere as "imported, not the published weights".
    """
    source = Path(source)
    catalog = catalog if catalog is not None else load_catalog()
    if repo_id is not None:
        given = catalog.find(repo_id)
        cache.model_folder((given.repo_id or given.id) if given else repo_id)  # refuse a bad id before any work
    if not (source.is_dir() or (source.is_file() and source.suffix.lower() == ".zip")):
        raise WeightsError(f"import takes a model folder or a .zip, not {source}")
    model_id = _import_id(repo_id, source)
    entry = catalog.find(model_id)  # a catalogue id, repo id or alias (a folder named whole-body) is that model
    if entry is not None:
        model_id = entry.repo_id or entry.id
    cache.model_folder(model_id)
    store = cache.models_dir()
    dest = None
    with files.temporary_folder(store, "-import", for_path=store / "model") as work:
        try:
            staged = work / "model"
            os.mkdir(staged)  # normal permissions (the umask's); the private folder around it keeps others out
            if source.is_dir():
                _stage_folder(source, staged)
            else:
                _stage_zip(source, staged)
            if not (staged / WEIGHTS_NAME).is_file() or not (staged / CONFIG_NAME).is_file():
                raise WeightsError(f"a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME}; {source} lacks one")
            config = read_config(staged, source)
            dest = cache.model_folder(model_id)
            digest = sha256_file(staged / WEIGHTS_NAME)
            published = None
            if entry is not None and entry.repo_id:
                published = _published_check(staged, digest, entry, source, force, named=repo_id is not None)
            _check_model_folder(staged, config, str(source))
            marker = {"id": model_id, "source": str(source.resolve()), "sha256": digest, "published": published,
                      "forced": bool(force and published is False),
                      "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            files.atomic_write_text(staged / MARKER_NAME, json.dumps(marker, indent=1), overwrite=False)
            _install(staged, dest, work)
        except OSError as e:
            if isinstance(e, files.WriteError):
                raise
            raise files.WriteError(e.errno, files.describe_os_error(e, dest or store / "model")) from None
    return dest


def _published_check(staged: Path, digest: str, entry: ModelEntry, source: Path, force: bool,
                     named: bool = True) -> bool:
    """Whether an import under a published catalogue id is the published model; refuses it unless ``force``."""
    problems = []
    for spec in entry.files:
        name, target = spec.get("name"), staged / str(spec.get("name"))
        if not name or not target.is_file():
            continue
        size, known = entry.size(name), entry.sha256(name)
        if size is not None and target.stat().st_size != size:
            problems.append(f"its {name} is {target.stat().st_size:,} bytes, the published one {size:,}")
        elif known and (digest if name == WEIGHTS_NAME else sha256_file(target)) != known.lower():
            problems.append(f"its {name} checksum differs from the published one")
    if not entry.sha256(WEIGHTS_NAME):
        problems.append(f"the catalogue has no published checksum of {WEIGHTS_NAME} to verify it against")
    if not problems:
        return True
    if force:
        return False
    how = "" if named else f"is named like the catalogue model {entry.id}, so it "
    raise NotPublishedError(
        f"{source} {how}cannot be imported as the published {entry.id} ({entry.repo_id}): {'; '.join(problems)}. "
        f"Import it under a name of its own: `ctfm models import {_quote(source)} --id NAME` (then use it as "
        f"--model NAME or --weights NAME); or as {entry.id} anyway: `ctfm models import {_quote(source)} --id {entry.id} --force` "
        f"(then shown as '{NOT_PUBLISHED}')")


