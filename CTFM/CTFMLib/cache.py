"""Where CT-FM keeps models on this computer.

- ``CTFM_CACHE`` (environment), when set, holds everything: imported models in
  ``$CTFM_CACHE/models`` and Hugging Face downloads in ``$CTFM_CACHE/hub``.
- Otherwise imported models go to ``$XDG_CACHE_HOME/ctfm/models`` (default
  ``~/.cache/ctfm/models``) and downloads to Hugging Face's own cache, which
  honours ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.

Each imported model is one folder in :func:`models_dir`, named by :func:`model_folder_name`
(the only way a model id becomes a path), holding the model's files and ``ctfm-import.json``
(:data:`MARKER_NAME`: its id, where it came from, its checksum, and whether it is the published
model of a catalogue id). Folders starting with ``.`` are imports still being written.

Finding a model (:func:`locate`) and whether it can be had now (:func:`check_available`) need no
torch either, so a command that cannot get its model fails at once, before PyTorch is loaded: the
Hugging Face hub is asked only when it answers a connection within :data:`PROBE_SECONDS` (tried once
per process, :func:`hub_unreachable`), and never under ``HF_HUB_OFFLINE``; otherwise the error names
the commands that work offline (:func:`unavailable_message`). This module imports no torch: the
Slicer panel lists models before PyTorch is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Optional

WEIGHTS_NAME = "model.safetensors"
MARKER_NAME = "ctfm-import.json"
IMPORTED = "imported"
NOT_PUBLISHED = "imported, not the published weights"
_MAX_MARKER_BYTES = 1 << 16
DEFAULT_ENDPOINT = "https://huggingface.co"
# How long a command that needs a download waits for the hub to accept a connection before it says the hub
# cannot be reached (an explicit `ctfm models download` waits longer: DOWNLOAD_PROBE_SECONDS).
PROBE_SECONDS = 1.5
DOWNLOAD_PROBE_SECONDS = 10.0
PROBE_MEMORY_SECONDS = 60.0  # how long an answer is kept (a long-lived process, Slicer, asks again after that)


class WeightsError(ValueError):
    """Weights cannot be used: unreadable, unsafe, corrupt or not what the model needs (one-line message)."""


class WeightsNotAvailableError(WeightsError):
    """The weights are not on this computer and cannot be downloaded now."""


def ctfm_home() -> Path:
    root = os.environ.get("CTFM_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "ctfm"


def models_dir() -> Path:
    """Folder of imported (offline) models, one sub-folder per model."""
    return ctfm_home() / "models"


def hub_cache_dir() -> Optional[Path]:
    """``cache_dir`` for huggingface_hub, or ``None`` for its default."""
    root = os.environ.get("CTFM_CACHE")
    return Path(root).expanduser() / "hub" if root else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_folder_name(repo_id: str) -> str:
    """The folder name of a model id (``owner/name`` -> ``owner--name``), or :class:`~CTFMLib.files.FileSafetyError`.

    A model id is a plain name or a Hugging Face ``owner/name``: at most one ``/``, each part a
    :func:`~CTFMLib.files.safe_name` (so no ``.``, ``..``, backslash, drive letter or control
    character), because the folder it names is created, replaced and deleted in :func:`models_dir`.
    """
    from .files import FileSafetyError, safe_name

    if not isinstance(repo_id, str):
        raise FileSafetyError(f"a model id must be text, not {type(repo_id).__name__}")
    parts = repo_id.split("/")
    shown = repr(repo_id) if len(repo_id) <= 80 else repr(repo_id[:77] + "...")
    if len(parts) > 2:
        raise FileSafetyError(f"model id {shown} has more than one '/': use NAME or OWNER/NAME")
    for part in parts:
        safe_name(part, f"model id {shown}" if len(parts) > 1 else "model id")
    return safe_name("--".join(parts), "model id")


def model_folder(repo_id: str) -> Path:
    """Where the imported copy of model ``repo_id`` lives: an entry directly in :func:`models_dir`.

    Refuses (:class:`~CTFMLib.files.FileSafetyError`) any id that could name another place.
    """
    from .files import child_path

    return child_path(models_dir(), model_folder_name(repo_id), "model id")


def imported_model(repo_id: str) -> Optional[Path]:
    """The imported copy of a model id (a folder with weights in :func:`models_dir`), or None.

    A lookup: an id that cannot name a model folder (``..``, a path ...) simply has no import.
    """
    from .files import FileSafetyError

    try:
        folder = model_folder(repo_id)
    except (FileSafetyError, OSError):
        return None
    return folder if not folder.is_symlink() and (folder / WEIGHTS_NAME).is_file() else None


def import_marker(folder) -> Optional[dict]:
    """The ``ctfm-import.json`` of an imported model folder, or None (none, unreadable or not an object)."""
    path = Path(folder) / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def import_status(folder) -> str:
    """:data:`IMPORTED`, or :data:`NOT_PUBLISHED` for weights imported with ``--force`` under a published id."""
    marker = import_marker(folder)
    return NOT_PUBLISHED if marker is not None and marker.get("published") is False else IMPORTED


def imported_models() -> list:
    """``[(model id, folder)]`` of every complete import, sorted by folder name.

    The id is the one the model was imported under (from its marker) when it names the same
    folder, else the folder name (which names it too).
    """
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if (folder.name.startswith(".") or folder.name.endswith(".partial") or folder.is_symlink()
                or not (folder / WEIGHTS_NAME).is_file()):
            continue  # an import being written (.ctfm-tmp-*), an older version's ".partial", a link or a file
        marker = import_marker(folder) or {}
        model_id = marker.get("id")
        try:
            same = isinstance(model_id, str) and model_folder_name(model_id) == folder.name
        except ValueError:
            same = False
        out.append((model_id if same else folder.name, folder))
    return out


# --- finding a model without torch ---------------------------------------------------------------


def _short(text, limit: int = 80) -> str:
    text = str(text)
    if len(text) > limit or any(ord(c) < 32 for c in text):
        text = repr(text[:limit]) + ("..." if len(text) > limit else "")
    return text


def is_repo_id(source: str) -> bool:
    """Whether ``source`` looks like a Hugging Face ``owner/name`` (and is not an existing path)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not Path(source).exists()


def locate(source, catalog=None) -> tuple:
    """Where a weights source is on this computer: ``(path or None, catalogue entry or None, repo id or None)``.

    An existing file or folder is taken as it is; otherwise ``source`` is a catalogue id (or an alias
    such as ``whole-body``), a Hugging Face repo id, or the id a model was imported under, and its
    imported copy is used. ``path`` is None when the model must come from the Hugging Face hub
    (``repo id``: which). A name that is none of these, or a catalogue model without published
    weights, is refused (:class:`WeightsError`, :class:`WeightsNotAvailableError`). Never the network.
    """
    from .catalog import load_catalog

    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return path, None, None
    catalog = catalog if catalog is not None else load_catalog()
    entry = catalog.find(source)
    model_id = (entry.repo_id or entry.id) if entry else source
    imported = imported_model(model_id)
    if imported is not None:
        return imported, entry, None
    if entry is None and not is_repo_id(source):
        known = ", ".join(m.id for m in catalog) or "none"
        mine = ", ".join(i for i, _ in imported_models()) or "none"
        raise WeightsError(f"no file, folder or known model named {_short(source)} (catalogue models: {known}; "
                           f"imported: {mine})")
    if entry is not None and not entry.repo_id:
        raise WeightsNotAvailableError(f"{entry.title} ({entry.id}) has no published weights. {entry.how_to}".strip())
    return None, entry, model_id


def hub_root() -> Path:
    """The Hugging Face cache folder downloads go to (``$CTFM_CACHE/hub``, else Hugging Face's own)."""
    if hub_cache_dir() is not None:
        return hub_cache_dir()
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # where huggingface_hub would put it (its documented defaults)
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def hub_folder_name(repo_id: str) -> str:
    """The folder of a model download in the Hugging Face cache (``models--owner--name``)."""
    return "models--" + repo_id.replace("/", "--")


def hub_cached(repo_id: str, revision: Optional[str] = None) -> Optional[Path]:
    """The downloaded snapshot folder of ``repo_id`` holding its weights, or None; never the network."""
    if not (hub_root() / hub_folder_name(repo_id)).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, WEIGHTS_NAME, cache_dir=hub_cache_dir(), revision=revision)
    except Exception:  # no huggingface_hub, an unreadable cache: not downloaded
        return None
    return Path(hit).parent if isinstance(hit, str) and os.path.isfile(hit) else None


def hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` (as huggingface_hub reads it), else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _probe_target(endpoint: str) -> tuple:
    """``(host, port, what)``: where a connection to the hub goes first (its proxy, where one is set)."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    scheme = parts.scheme or "https"
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80), f"the proxy {p.hostname}:{p.port or ''}"
    return host, port, endpoint


_probes: dict = {}
_probes_lock = threading.Lock()


def hub_unreachable(timeout: float = PROBE_SECONDS) -> Optional[str]:
    """None when the hub (or its proxy) accepts a connection within ``timeout`` seconds; else why not.

    ``HF_HUB_OFFLINE`` needs no test. The answer is kept for :data:`PROBE_MEMORY_SECONDS`: a command tries
    the hub once (again only with a longer ``timeout`` after it did not answer). The connection is made
    in a helper thread that is given up after ``timeout``, so a name lookup that hangs cannot hold the
    command.
    """
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    host, port, what = _probe_target(hub_endpoint())
    if not host:
        return f"HF_ENDPOINT {_short(hub_endpoint())} names no host"
    key = (host, port)
    with _probes_lock:
        known = _probes.get(key)
    if known is not None and time.monotonic() - known[2] < PROBE_MEMORY_SECONDS and (
            known[0] is None or known[1] >= timeout):
        return known[0]
    result = {}

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["error"] = e.strerror or type(e).__name__

    helper = threading.Thread(target=attempt, name="ctfm-hub-probe", daemon=True)
    helper.start()
    helper.join(timeout)
    if result.get("ok"):
        why = None
    elif "error" in result:
        why = f"cannot connect to {what}: {result['error']}"
    else:
        why = f"{what} did not answer within {timeout:g} s"
    with _probes_lock:
        _probes[key] = (why, timeout, time.monotonic())
    return why


def unavailable_message(repo_id: str, entry=None, why: str = "", download: bool = False) -> str:
    """One line: the model is not here and cannot be downloaded now (``why``), and the commands that work.

    Import a copy of its folder under the name the failed command used (with ``--force`` where no
    published checksum exists to verify a copy), or download it on a computer with internet and copy
    the download here. ``download``: the failed command was ``ctfm models download`` itself.
    """
    name = entry.id if entry is not None else repo_id
    force = entry is not None and bool(entry.repo_id) and not entry.sha256(WEIGHTS_NAME)
    command = f"ctfm models import FOLDER_OR_ZIP --id {shlex.quote(name)}" + (" --force" if force else "")
    shown = name if name == repo_id else f"{name} ({repo_id})"
    head = (f"cannot download {shown}, which is not on this computer" if download
            else f"{shown} is not on this computer and cannot be downloaded now")
    checked = (" (--force: no published checksum exists to verify a copy, so it is listed as "
               f"'{NOT_PUBLISHED}')") if force else ""
    return (f"{head} ({why}). Import a copy of its model folder or zip (config.json + model.safetensors): "
            f"`{command}`{checked}; or, on a computer with internet, run `ctfm models download {shlex.quote(name)}` "
            f"and copy the folder {hub_folder_name(repo_id)} of its download cache into {hub_root()} here.")


def check_available(source, catalog=None, timeout: float = PROBE_SECONDS) -> None:
    """Refuse at once (:class:`WeightsNotAvailableError`, one line) a model that is neither on this computer
    nor downloadable now; pass when it is here, downloaded, or the hub answers. No torch, no waiting."""
    path, entry, repo_id = locate(source, catalog)
    if path is not None or hub_cached(repo_id, entry.revision if entry else None) is not None:
        return
    why = hub_unreachable(timeout)
    if why is not None:
        raise WeightsNotAvailableError(unavailable_message(repo_id, entry, why))
