"""Finding, checking, loading and saving CT-FM weights.

A weights *source* is one of:

- a catalogue id (``ct_fm_feature_extractor``) or Hugging Face repo id
  (``project-lighter/ct_fm_feature_extractor``): an imported copy in the CTFM
  model folder is used first, else the Hugging Face cache, else a download
  (unless ``HF_HUB_OFFLINE`` is set);
- a folder in the published layout: ``config.json`` + ``model.safetensors``;
- a single ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.ckpt`` file
  read with ``torch.load(weights_only=True)``: nothing is ever unpickled.

Loading is strict: every tensor must match by name and shape, otherwise
:class:`WeightsMismatchError` names the missing, unexpected and mis-shaped
tensors. (Upstream users lost results to a ``strict=False`` load that matched
nothing and left the network random.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import cache
from .catalog import Catalog, ModelEntry, load_catalog
from .networks import ARCHITECTURES, CTFM_ENCODER_CONFIG, architecture_of, build_network

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Prefixes under which a checkpoint may hold the network we want: Lightning
# systems (``model.``, upstream pretraining's ``backbone.``), DDP (``module.``),
# torch.compile (``_orig_mod.``), and a SegResNetDS's ``encoder.`` for its trunk.
SUBMODULE_PREFIXES = ("model.backbone.", "backbone.", "model.encoder.", "model.", "module.", "_orig_mod.", "encoder.")
SHOW = 8


class WeightsError(Exception):
    """Weights cannot be used: unreadable, unsafe, corrupt or not what the model needs."""


class WeightsNotAvailableError(WeightsError):
    """The weights are not on this computer and cannot be downloaded now."""


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
    names = list(names)
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


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path) -> dict:
    """Read tensors from a .safetensors file or a weights-only torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path.name} is not a valid safetensors file (corrupt or truncated?): {e}") from None
    if name.endswith(PICKLE_SUFFIXES):
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


def check_state_dict(model: nn.Module, state: dict, source: str = "") -> None:
    """Raise :class:`WeightsMismatchError` unless names and shapes match exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, own[k].shape, state[k].shape) for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(missing, unexpected, mismatched, source)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"the weights{' in ' + source if source else ''} contain NaN or infinite values in {_listing(bad)}")


def load_state_dict_strict(model: nn.Module, state: dict, source: str = "") -> str:
    """Load ``state`` into ``model`` strictly; returns the checkpoint prefix that was stripped."""
    state, prefix = select_submodule(state, set(model.state_dict()))
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return prefix


def infer_config(state: dict) -> dict:
    """Constructor arguments of the CT-FM network that ``state`` was saved from.

    Used for a bare weights file without ``config.json``.
    """
    keys = set(state)
    encoder_prefix = "encoder." if any(k.startswith("encoder.") for k in keys) else ""
    init = state.get(f"{encoder_prefix}conv_init.weight")
    if init is None:
        raise WeightsError("cannot tell which network these weights belong to (no conv_init.weight); provide config.json")
    blocks = {}
    for k in keys:
        m = re.match(rf"^{re.escape(encoder_prefix)}layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            level, block = int(m.group(1)), int(m.group(2))
            blocks[level] = max(blocks.get(level, 0), block + 1)
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


def _is_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not Path(source).exists()


def resolve(source: str, catalog: Optional[Catalog] = None, progress=None) -> tuple:
    """Find weights on this computer (downloading if allowed); returns ``(path, catalogue entry or None)``."""
    path = Path(str(source)).expanduser()
    if path.exists():
        return path, None
    catalog = catalog if catalog is not None else load_catalog()
    entry = catalog.find(str(source))
    if entry is None and not _is_repo_id(str(source)):
        known = ", ".join(m.id for m in catalog) or "none"
        raise WeightsError(f"no file, folder or known model named {source!r} (catalogue models: {known})")
    repo_id = (entry.repo_id or entry.id) if entry else str(source)
    imported = imported_model_path(repo_id)
    if imported is not None:
        return imported, entry
    if entry is not None and not entry.repo_id:
        raise WeightsNotAvailableError(f"{entry.title} ({entry.id}) has no published weights. {entry.how_to}".strip())
    return download(repo_id, revision=entry.revision if entry else None, entry=entry, progress=progress), entry


def imported_model_path(repo_id: str) -> Optional[Path]:
    folder = cache.models_dir() / cache.model_folder_name(repo_id)
    return folder if (folder / WEIGHTS_NAME).is_file() else None


def download(repo_id: str, revision: Optional[str] = None, entry: Optional[ModelEntry] = None, progress=None) -> Path:
    """Fetch a model repo's files into the Hugging Face cache (or find them there when offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsNotAvailableError(
            f"{repo_id} is not imported and huggingface_hub is not installed; "
            f"install it, or import the model with `ctfm models import FOLDER_OR_ZIP`"
        ) from None
    patterns = entry.file_names if entry and entry.files else [CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, "*.term.json"]
    if progress:
        progress(None, f"fetching {repo_id}")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache.hub_cache_dir()) if cache.hub_cache_dir() else None,
            allow_patterns=patterns,
            local_files_only=cache.hub_offline(),
        )
    except Exception as e:  # network, offline, auth and missing-repo errors all end the same way for the user
        how = (
            f"Download it where the internet is reachable with `ctfm models download {entry.id if entry else repo_id}` "
            f"(or in Slicer: CT-FM > Models > Download), or copy a model folder (config.json + model.safetensors) "
            f"here with `ctfm models import FOLDER_OR_ZIP`."
        )
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if cache.hub_offline() else f"{type(e).__name__}: {e}"
        raise WeightsNotAvailableError(f"weights {repo_id} are not on this computer ({why}). {how}") from None
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsNotAvailableError(f"{repo_id} has no {WEIGHTS_NAME}")
    return folder


# --- loading -----------------------------------------------------------------------


def weights_file_of(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = [path / WEIGHTS_NAME] + sorted(path.glob("*.safetensors"))
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsError(f"{path} holds no {WEIGHTS_NAME}")


def read_config(folder: Path) -> Optional[dict]:
    f = folder / CONFIG_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise WeightsError(f"{f} is not valid JSON: {e}") from None


def read_labels(folder: Path) -> Optional[dict]:
    f = folder / LABELS_NAME
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def load_model(source, expect: Optional[str] = None, catalog: Optional[Catalog] = None, progress=None):
    """Build and strictly load the network that ``source`` holds; returns ``(model, ModelInfo)``.

    ``expect="SegResEncoder"`` loads only the encoder, also from a segmentation
    checkpoint (its ``encoder.`` tensors). The model is returned in eval mode on the CPU.
    """
    path, entry = resolve(str(source), catalog, progress)
    weights_file = weights_file_of(path)
    folder = path if path.is_dir() else path.parent
    known = entry.sha256(weights_file.name) if entry else None
    digest = None
    if known:
        digest = sha256_file(weights_file)
        if digest != known.lower():
            raise WeightsError(
                f"checksum mismatch for {weights_file}: expected sha256 {known}, got {digest}. "
                "The file is corrupt or not the published one; remove it (`ctfm models remove`) and download again."
            )
    state = read_state_dict(weights_file)
    config = read_config(folder) if path.is_dir() else None
    if config is None:
        config = infer_config(select_submodule(state, {"conv_init.weight", "encoder.conv_init.weight"})[0])
    arch = architecture_of(config)
    if expect is not None and expect not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {expect!r}")
    if expect == "SegResEncoder" and arch != "SegResEncoder":
        config = {k: config[k] for k in ("spatial_dims", "in_channels", "init_filters", "blocks_down") if k in config}
        config = {**{k: v for k, v in CTFM_ENCODER_CONFIG.items() if k not in config}, **config}
        arch = "SegResEncoder"
    elif expect is not None and expect != arch:
        raise WeightsError(f"{source} holds a {arch}, not a {expect}")
    try:
        model = build_network(config)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"config.json of {source} does not describe a supported network: {e}") from None
    prefix = load_state_dict_strict(model, state, str(weights_file))
    model.eval()
    info = ModelInfo(str(source), path, arch, config, digest, read_labels(folder) if path.is_dir() else None, entry)
    if info.labels is None and entry is not None and entry.labels and arch == "SegResNetDS":
        info.labels = entry.labels
    if prefix:
        info.notes.append(f"took the tensors under '{prefix}'")
    return model, info


# --- saving and importing ---------------------------------------------------------------


def save_pretrained(model: nn.Module, folder, config: dict, labels: Optional[dict] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``labels.json``), the published layout.

    Files are written under temporary names and renamed, so an interrupted save
    never leaves a half-written model that would later load.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files = {WEIGHTS_NAME: lambda p: save_file(state, str(p), metadata={"format": "pt"}),
             CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2), encoding="utf-8")}
    if labels is not None:
        files[LABELS_NAME] = lambda p: p.write_text(json.dumps(labels, indent=1), encoding="utf-8")
    for name, write in files.items():
        tmp = folder / f".{name}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def import_model(source, repo_id: Optional[str] = None, catalog: Optional[Catalog] = None) -> Path:
    """Copy a model folder or zip into the CTFM model folder, for computers without internet.

    The copy is checked (readable tensors, known checksum) before it replaces
    an earlier import of the same model.
    """
    source = Path(source)
    catalog = catalog if catalog is not None else load_catalog()
    with tempfile.TemporaryDirectory(prefix="ctfm-import-") as tmp:
        tmp = Path(tmp)
        if source.is_file() and source.suffix.lower() == ".zip":
            import zipfile

            try:
                with zipfile.ZipFile(source) as z:
                    for member in z.namelist():
                        target = (tmp / member).resolve()
                        if not str(target).startswith(str(tmp.resolve())):
                            raise WeightsError(f"{source.name} has an unsafe path: {member}")
                    z.extractall(tmp)
            except zipfile.BadZipFile:
                raise WeightsError(f"{source.name} is not a valid zip file") from None
            hits = [p.parent for p in tmp.rglob(WEIGHTS_NAME)]
            if len(hits) != 1:
                raise WeightsError(f"{source.name} must hold exactly one {WEIGHTS_NAME}, found {len(hits)}")
            staged = hits[0]
        elif source.is_dir():
            staged = source
        else:
            raise WeightsError(f"import takes a model folder or a .zip, not {source}")
        if not (staged / WEIGHTS_NAME).is_file() or not (staged / CONFIG_NAME).is_file():
            raise WeightsError(f"a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME}; {source} lacks one")
        config = read_config(staged)
        repo_id = repo_id or config.get("_name_or_path") or config.get("repo_id") or staged.name
        entry = catalog.find(repo_id)
        if entry is not None:
            repo_id = entry.repo_id or entry.id
            known = entry.sha256(WEIGHTS_NAME)
            if known and sha256_file(staged / WEIGHTS_NAME) != known.lower():
                raise WeightsError(f"{source} is not the published {repo_id}: its {WEIGHTS_NAME} checksum differs")
        if config.get("architecture") == "TriageModel":  # a scan classifier written by `ctfm train classify`
            from .train.classify import load_triage_model

            load_triage_model(staged)  # strict: the same check the triage command makes
        else:
            model = build_network(config)
            load_state_dict_strict(model, read_state_dict(staged / WEIGHTS_NAME), str(source))
        dest = cache.models_dir() / cache.model_folder_name(repo_id)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staged, partial)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
    return dest


def remove_model(name: str, catalog: Optional[Catalog] = None) -> list:
    """Delete a model's imported copy and its Hugging Face cache entry; returns what was removed."""
    catalog = catalog if catalog is not None else load_catalog()
    entry = catalog.find(name)
    repo_id = (entry.repo_id or entry.id) if entry else name
    removed = []
    folder = cache.models_dir() / cache.model_folder_name(repo_id)
    if folder.exists():
        shutil.rmtree(folder)
        removed.append(str(folder))
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(cache.hub_cache_dir())
        for repo in info.repos:
            if repo.repo_id == repo_id:
                shutil.rmtree(repo.repo_path)
                removed.append(str(repo.repo_path))
    except Exception:  # no HF cache at all is not an error when removing
        pass
    return removed
