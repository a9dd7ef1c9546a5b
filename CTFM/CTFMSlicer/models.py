"""The hub's Models section: which CT-FM models this computer has, and download, import, remove.

- :func:`model_rows` lists the catalogue (``Models.json``, or ``CTFM_CATALOG``) with each
  model's :func:`~CTFMLib.model_store.model_status`, then the imported models the catalogue does not know (a
  triage model trained with CTFMTrain, say). Torch is not imported: the panel calls this
  when it opens, before PyTorch may be installed.
- :func:`start_download` runs ``ctfm models download ID`` in a child process
  (:class:`~CTFMSlicer.process.ProcessRunner`: progress, cancel kills the process tree).
- :func:`import_model` and :func:`remove_model` run in this process (file copies and deletes): the
  import through :mod:`CTFMLib.weights`, which needs torch (the widget ensures the dependencies first)
  to check the model like a load would; the removal through :mod:`CTFMLib.model_store`, which does not.

Where models live is :mod:`CTFMLib.cache` (``CTFM_CACHE``, which the panel's model folder sets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from CTFMLib import cache
from CTFMLib.cache import IMPORTED, NOT_PUBLISHED, WeightsError
from CTFMLib.model_store import (
    CONFIG_NAME,
    DOWNLOADED,
    MISSING,
    TRIAGE_ARCHITECTURE,
    model_status,
    read_config,
)

from .process import ProcessRunner, ctfm_cli_command, failure_text

# The panel's own way to train a model without published weights (`ctfm models list` says "train it with ctfm train").
TRAIN_YOURSELF = "train with CT-FM Train"
STATUSES = (IMPORTED, NOT_PUBLISHED, DOWNLOADED, MISSING, TRAIN_YOURSELF)

TRIAGE_TASK = "triage"
# config.json "architecture" -> the task shown for an imported model the catalogue does not list.
ARCHITECTURE_TASKS = {TRIAGE_ARCHITECTURE: TRIAGE_TASK, "SegResNetDS": "segmentation", "SegResEncoder": "embedding"}


def _read_config(folder: Path) -> dict:
    """A listed folder's config.json, or {} where it cannot be read (the table still lists the model)."""
    try:
        return read_config(folder) or {}
    except WeightsError:
        return {}


def _imported_task(config: dict) -> str:
    name = config.get("architecture") or config.get("_class_name")
    if name in ARCHITECTURE_TASKS:
        return ARCHITECTURE_TASKS[name]
    return "segmentation" if "out_channels" in config else "embedding"


def model_rows(catalog_path=None) -> list:
    """One dict per model for the Models table.

    Keys: ``id`` (what download/remove take), ``title``, ``task``, ``repo_id`` ("" when
    none), ``status`` (:data:`STATUSES`), ``in_catalogue`` and ``how_to`` (what to do when
    the model has no published weights). Catalogue models first, in catalogue order, then
    imported folders no catalogue entry claims, by name.
    """
    from CTFMLib.catalog import load_catalog

    catalog = load_catalog(catalog_path)
    rows, claimed = [], set()
    for m in catalog:
        try:
            claimed.add(cache.model_folder_name(m.repo_id or m.id))
        except ValueError:
            pass  # a catalogue id that cannot be a folder has no import
        rows.append({"id": m.id, "title": m.title, "task": m.task, "repo_id": m.repo_id or "",
                     "status": model_status(m, TRAIN_YOURSELF), "in_catalogue": True, "how_to": m.how_to})
    for model_id, path in cache.imported_models():  # complete imports only: never one being written
        if path.name in claimed:
            continue
        config = _read_config(path)
        rows.append({"id": model_id, "title": model_id, "task": _imported_task(config), "repo_id": "",
                     "status": cache.import_status(path), "in_catalogue": False, "how_to": ""})
    return rows


def download_problem(row: Optional[dict]) -> Optional[str]:
    """Why the model of a :func:`model_rows` row cannot be downloaded (a sentence), or None."""
    if row is None:
        return "Select a model in the table."
    if not row.get("repo_id"):
        if row.get("in_catalogue"):
            how = row.get("how_to") or "Train it with CT-FM Train, then import the model folder here."
            return f"{row['title']} has no published weights. {how}"
        return f"{row['id']} was imported from a folder; it has nothing to download."
    return None


def download_arguments(model_id: str, revision: Optional[str] = None) -> list:
    """``ctfm`` arguments (after ``--progress json``) that download a model."""
    args = ["models", "download", str(model_id)]
    if revision:
        args += ["--revision", str(revision)]
    return args


def start_download(model_id: str, on_progress: Optional[Callable] = None, on_done: Optional[Callable] = None,
                   revision: Optional[str] = None) -> ProcessRunner:
    """Download ``model_id`` (catalogue or Hugging Face id) in a child process; returns its runner.

    ``on_done(ok, message)`` follows from :meth:`ProcessRunner.poll`: ``True`` and the
    child's last line ("...: SegResEncoder ready at FOLDER") on success; ``False`` and
    the child's error (which says what to do: import the model, or set the folder) on
    failure, or "Cancelled.".
    """
    lines = []

    def line(stream, text):
        if stream == "stdout" and text.strip():
            lines.append(text.strip())

    def finished(result):
        if result.ok:
            ok, message = True, lines[-1] if lines else result.describe()
        elif result.cancelled:
            ok, message = False, "Cancelled."
        else:
            ok, message = False, failure_text(result.stderr_tail, result.describe())
        if on_done:
            on_done(ok, message)

    return ProcessRunner(ctfm_cli_command(*download_arguments(model_id, revision)), on_progress=on_progress,
                         on_line=line, on_done=finished)


def import_model(source, model_id: Optional[str] = None, catalog_path=None, force: bool = False) -> Path:
    """Copy a model folder (``config.json`` + ``model.safetensors``) or ``.zip`` into the model folder.

    ``model_id`` files it under a catalogue or repo id (a task you trained yourself is
    imported under its catalogue id); by default the id comes from its config or name.
    The weights are checked (readable, matching the network, known checksum) first; other
    weights than the published ones under a published id need ``force`` and are then shown
    as :data:`NOT_PUBLISHED`. Returns the imported folder. Needs torch.
    """
    from CTFMLib.catalog import load_catalog
    from CTFMLib.weights import import_model as _import

    source = Path(source)
    if source.is_file() and source.name == CONFIG_NAME:
        source = source.parent  # the file dialog picked the folder's config.json
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; choose a model folder or a .zip file")
    return _import(source, repo_id=model_id or None, catalog=load_catalog(catalog_path), force=force)


def remove_model(model_id: str, catalog_path=None) -> list:
    """Delete a model's imported copy and downloaded files; returns the folders removed."""
    from CTFMLib.catalog import load_catalog
    from CTFMLib.model_store import remove_model as _remove

    return _remove(str(model_id), catalog=load_catalog(catalog_path))


def triage_catalog_ids(catalog_path=None) -> tuple:
    """Catalogue ids of triage models (task "triage"); empty when the catalogue has none or is unreadable."""
    try:
        from CTFMLib.catalog import load_catalog

        return tuple(m.id for m in load_catalog(catalog_path) if m.task == TRIAGE_TASK)
    except (OSError, ValueError, TypeError, KeyError):
        return ()
