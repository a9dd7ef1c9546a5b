"""The model store without torch: which model folder a name means, what state it is in, and the files it holds.

A model folder holds ``config.json`` (:data:`CONFIG_NAME`), ``model.safetensors``
(:data:`CTFMLib.cache.WEIGHTS_NAME`), optionally ``labels.json`` (:data:`LABELS_NAME`) and ``*.term.json``
(:data:`TERM_SUFFIX`), and, when imported, ``ctfm-import.json`` (:data:`CTFMLib.cache.MARKER_NAME`). This module
finds one (:func:`resolve`, :func:`download`: huggingface_hub is imported only when asked), checks a published
model's sizes and checksums (:func:`verify_published`), reads its small JSON files with size limits
(:func:`read_config`, :func:`read_labels`), says what state a catalogue model is in (:func:`model_status`) and
why a folder a panel was given is not a model folder (:func:`folder_problem`), and deletes a model
(:func:`remove_model`).

It imports no torch, not even inside a function, and not :mod:`CTFMLib.weights` (which does): the Slicer
panels list and check models before PyTorch is installed, and a command refuses a model it cannot have before
PyTorch loads. :mod:`CTFMLib.weights` builds and loads the networks on top of it; :mod:`CTFMLib.cache` below it
says where models live.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from . import cache, files
from .cache import NOT_PUBLISHED, WEIGHTS_NAME, WeightsError, WeightsNotAvailableError
from .catalog import Catalog, ModelEntry, load_catalog

__all__ = [
    "CONFIG_NAME", "LABELS_NAME", "TERM_SUFFIX", "TRIAGE_ARCHITECTURE", "MAX_CONFIG_BYTES", "MAX_JSON_BYTES",
    "DOWNLOADED", "MISSING", "TRAIN_YOURSELF", "FOLDER_WORDS", "CHOOSE_FOLDER", "short_text", "one_line", "sha256_file", "resolve",
    "imported_model_path", "download", "verify_published", "weights_file_of", "read_config", "read_labels",
    "remove_model", "model_status", "folder_problem",
]

CONFIG_NAME = "config.json"
LABELS_NAME = "labels.json"
TERM_SUFFIX = ".term.json"
# config.json "architecture" of a scan classifier written by `ctfm train classify` (CTFMLib.networks.TriageModel).
TRIAGE_ARCHITECTURE = "TriageModel"
# A config or labels file is a few kB; these caps only stop a hostile file from filling memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_BYTES = 16 << 20
_CHUNK = 1 << 20

# What model_status says besides CTFMLib.cache's IMPORTED / NOT_PUBLISHED. TRAIN_YOURSELF is the command line's
# words; a surface with its own way to train (the Slicer panel: CT-FM Train) passes its own.
DOWNLOADED = "downloaded"
MISSING = "not on this computer"
TRAIN_YOURSELF = "train it with ctfm train"

# folder_problem's words for a folder of an expected architecture: what the panel calls the folder, what it
# calls the model, and where such a folder comes from.
FOLDER_WORDS = {TRIAGE_ARCHITECTURE: ("triage model folder", "triage model",
                                      "choose the 'model' folder of a CT-FM Train classify run.")}
CHOOSE_FOLDER = "Choose a CT-FM model folder."


def one_line(e) -> str:
    """An exception's message on one line (library errors may span several)."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def short_text(text, limit: int = 120) -> str:
    """``text`` on one line and at most ``limit`` characters (names from a file may be anything)."""
    text = str(text)
    if len(text) > limit or any(ord(c) < 32 for c in text):
        text = repr(text[:limit]) + ("..." if len(text) > limit else "")
    return text


# --- finding a model ------------------------------------------------------------------------


def sha256_file(path, chunk: int = _CHUNK) -> str:
    """The hex sha256 of a file, read in chunks (a model's weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve(source: str, catalog: Optional[Catalog] = None, progress=None) -> tuple:
    """Find weights on this computer (downloading if allowed); returns ``(path, catalogue entry or None)``.

    An existing path is taken as it is; otherwise ``source`` is a catalogue id (or alias), a repo id
    or the id a model was imported under (:func:`CTFMLib.cache.locate`).
    """
    path, entry, repo_id = cache.locate(source, catalog)
    if path is not None:
        return path, entry
    return download(repo_id, revision=entry.revision if entry else None, entry=entry, progress=progress), entry


def imported_model_path(repo_id: str) -> Optional[Path]:
    """The imported copy of a model id, or None (an id that cannot name a model folder has none)."""
    return cache.imported_model(repo_id)


def _hub_root() -> Path:
    """The Hugging Face cache folder CT-FM downloads into (the store :func:`remove_model` cleans)."""
    if cache.hub_cache_dir() is not None:
        return cache.hub_cache_dir()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download(repo_id: str, revision: Optional[str] = None, entry: Optional[ModelEntry] = None, progress=None,
             explicit: bool = False) -> Path:
    """Fetch a model repo's files into the Hugging Face cache (or find them there when offline).

    The hub is asked only when it accepts a connection (:func:`CTFMLib.cache.hub_unreachable`: within
    1.5 s, or 10 s for an ``explicit`` download, the ``ctfm models download`` command); otherwise, and
    under ``HF_HUB_OFFLINE``, only the cache is read, and a model not there is refused at once with the
    commands that work offline. The files are checked against the catalogue's published sizes and
    checksums where it knows them.
    """
    cache.model_folder_name(repo_id)  # the same rule for every id that becomes a folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsNotAvailableError(
            f"{repo_id} is not imported and huggingface_hub is not installed; "
            f"install it, or import the model with `ctfm models import FOLDER_OR_ZIP`"
        ) from None
    patterns = entry.file_names if entry and entry.files else [CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, "*.term.json"]
    # Unreachable (or HF_HUB_OFFLINE): only the cache is read, so nothing waits on the library's retries.
    offline = cache.hub_unreachable(cache.DOWNLOAD_PROBE_SECONDS if explicit else cache.PROBE_SECONDS)
    if progress:
        progress(None, f"fetching {repo_id}" if offline is None else f"looking for {repo_id} in the download cache")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache.hub_cache_dir()) if cache.hub_cache_dir() else None,
            allow_patterns=patterns,
            local_files_only=offline is not None,
        )
    except Exception as e:  # network, offline, auth and missing-repo errors all end the same way for the user
        why = offline or f"{type(e).__name__}: {short_text(one_line(e), 200)}"
        raise WeightsNotAvailableError(cache.unavailable_message(repo_id, entry, why, download=explicit)) from None
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsNotAvailableError(f"{repo_id} has no {WEIGHTS_NAME}")
    if entry is not None:
        verify_published(folder, folder / WEIGHTS_NAME, entry, [])
    return folder


def verify_published(path: Path, weights_file: Path, entry: Optional[ModelEntry], notes: list) -> Optional[str]:
    """Compare a model's files with the sizes and checksums its catalogue entry publishes; returns the weights' sha256.

    A copy imported with ``--force`` under a published id is not compared (it says it is not the
    published model); ``notes`` gets a line saying so.
    """
    if entry is None:
        return None
    folder = path if path.is_dir() else None
    marker = cache.import_marker(folder) if folder is not None else None
    if marker is not None and marker.get("published") is False:
        notes.append(f"{NOT_PUBLISHED}: imported with --force as {entry.id}, not checked against the catalogue")
        return None
    digest = None
    for spec in entry.files:
        name = spec.get("name")
        target = weights_file if name == weights_file.name else (folder / name if folder is not None and name else None)
        if target is None or not target.is_file():
            continue
        size, known = entry.size(name), entry.sha256(name)
        if size is not None and target.stat().st_size != size:
            raise WeightsError(
                f"{target} is {target.stat().st_size:,} bytes, the published {name} of {entry.repo_id or entry.id} "
                f"{size:,}: the file is corrupt or not the published one; remove it (`ctfm models remove {entry.id}`) "
                "and download again")
        if known:
            actual = sha256_file(target)
            if actual != known.lower():
                raise WeightsError(
                    f"checksum mismatch for {target}: expected sha256 {known}, got {actual}. The file is corrupt "
                    f"or not the published one; remove it (`ctfm models remove {entry.id}`) and download again.")
            if target == weights_file:
                digest = actual
    return digest


def weights_file_of(path: Path) -> Path:
    """The weights file a source path means: the file itself, else the folder's model.safetensors (or another
    .safetensors); :class:`~CTFMLib.cache.WeightsError` when the folder holds none."""
    if path.is_file():
        return path
    candidates = [path / WEIGHTS_NAME] + sorted(path.glob("*.safetensors"))
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsError(f"{path} holds no {WEIGHTS_NAME}")


def _read_json(path: Path, limit: int, what: str, shown=None):
    shown = shown or path
    try:
        size = path.stat().st_size
        if size > limit:
            raise WeightsError(f"{shown} is {size:,} bytes, too large for a {what} (at most {limit:,})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WeightsError(f"{shown} is not UTF-8 text") from None
    except OSError as e:
        raise WeightsError(f"cannot read {shown}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise WeightsError(f"{shown} is not valid JSON: {e}") from None


def read_config(folder: Path, shown=None) -> Optional[dict]:
    """A folder's ``config.json`` (a JSON object), or None when it has none.

    ``shown``: the folder named in messages (an import names its source, not its staging folder).
    """
    f = Path(folder) / CONFIG_NAME
    if not f.is_file():
        return None
    where = f"{shown}/{CONFIG_NAME}" if shown else f
    config = _read_json(f, MAX_CONFIG_BYTES, "config.json", where)
    if not isinstance(config, dict):
        raise WeightsError(f"{where} must hold a JSON object (the network's settings), not a {type(config).__name__}")
    return config


def read_labels(folder: Path, shown=None) -> Optional[dict]:
    """A folder's ``labels.json``, checked (:func:`CTFMLib.labels.load_labels`), or None; errors name the file."""
    from .labels import load_labels

    f = Path(folder) / LABELS_NAME
    if not f.is_file():
        return None
    where = f"{shown}/{LABELS_NAME}" if shown else f
    data = _read_json(f, MAX_JSON_BYTES, "labels.json", where)
    try:
        load_labels(data)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{where}: {short_text(e, 300)}") from None
    return data


def remove_model(name: str, catalog: Optional[Catalog] = None) -> list:
    """Delete a model's imported copy and its Hugging Face cache entry; returns what was removed.

    Each delete names the store it cleans (the model store, the Hugging Face cache), so nothing
    outside them is ever removed; an id that could name another place is refused.
    """
    catalog = catalog if catalog is not None else load_catalog()
    entry = catalog.find(name)
    repo_id = (entry.repo_id or entry.id) if entry else name
    folder = cache.model_folder(repo_id)
    removed = []
    if os.path.lexists(folder):
        files.remove_tree(folder, cache.models_dir(), "model folder")
        removed.append(str(folder))
    try:
        from huggingface_hub import scan_cache_dir

        root = _hub_root()
        info = scan_cache_dir(root)
    except Exception:  # no Hugging Face cache (or no huggingface_hub) is not an error when removing
        return removed
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            files.remove_tree(repo.repo_path, root, "download")
            removed.append(str(repo.repo_path))
    return removed


# --- what a surface shows ------------------------------------------------------------------------


def model_status(entry, train_yourself: str = TRAIN_YOURSELF) -> str:
    """A catalogue entry's state here: :data:`~CTFMLib.cache.IMPORTED` (or :data:`~CTFMLib.cache.NOT_PUBLISHED`
    after ``models import --force``), :data:`DOWNLOADED`, :data:`MISSING`, or ``train_yourself`` (no published
    weights: users train the model and import it under its catalogue id). Never the network, never torch."""
    # a task users train themselves is imported under its catalogue id, a published model under its repo id
    imported = imported_model_path(entry.repo_id or entry.id)
    if imported is not None:
        return cache.import_status(imported)
    if not entry.repo_id:
        return train_yourself
    return DOWNLOADED if cache.hub_cached(entry.repo_id, entry.revision) is not None else MISSING


def folder_problem(folder, expect: Optional[str] = None, choose: str = CHOOSE_FOLDER) -> Optional[str]:
    """Why ``folder`` is not a model folder (holding a network of architecture ``expect``, where given), as a
    sentence a panel shows; or None. ``choose``: the sentence when no folder is set (a parameter node's unset
    path reads back as ``.``). Only ``config.json`` is read, for ``expect``: the command that uses the folder
    checks the rest."""
    if folder is None or str(folder) in ("", "."):
        return choose
    folder = Path(folder)
    noun, what, where = FOLDER_WORDS.get(expect, ("model folder", f"{expect} model", "choose a folder that holds one."))
    if not folder.is_dir():
        return f"The {noun} {folder} does not exist."
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        layout = "" if expect else f" (a CT-FM model folder holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        return f"The {noun} {folder} lacks {' and '.join(missing)}{layout}."
    if expect is None:
        return None
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{folder / CONFIG_NAME} cannot be read: {e}"
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if architecture != expect:
        return f"{folder} holds a {architecture or 'CT-FM encoder or segmentation model'}, not a {what}; {where}"
    return None
