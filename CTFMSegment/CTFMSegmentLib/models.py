"""Which segmentation models the module offers, whether they can run here, and what they segment.

No Qt and no torch (the panel calls these on every change): the catalogue
and the model folders' ``labels.json`` and ``config.json`` are read as JSON.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Optional

from CTFMLib.cache import WEIGHTS_NAME
from CTFMLib.model_store import CONFIG_NAME, LABELS_NAME
from CTFMLib.segment_plan import (
    DEFAULT_QUALITY,  # noqa: F401  (the panel's default quality)
    model_facts,
)
from CTFMLib.segment_plan import QUALITIES as QUALITY_PRESETS
from CTFMSlicer.nodes import path_is_set

WHOLE_BODY = "whole-body"
WHOLE_BODY_ID = "whole_body_segmentation"  # its catalogue id (``ctfm segment --model whole-body``)
FOLDER = "folder"
SEGMENTATION_TASK = "segmentation"
# ``ctfm segment --quality``: full (the model card's overlap), standard (overlap 0.5), fast (3 mm);
# the default is CTFMLib.segment_plan.DEFAULT_QUALITY.
QUALITIES = tuple(QUALITY_PRESETS)
# ``ctfm segment --spacing``: the model's own (default) or the input's (the model card, literally).
SPACINGS = ("model", "native")
# What the Model box says when "folder" is chosen without one (model_store.folder_problem says the rest).
CHOOSE_FOLDER = "Choose the folder of a CT-FM segmentation model."


def catalog_segmentation_models(catalog_path=None) -> list:
    """Catalogue entries of segmentation models (task "segmentation"), the whole-body model first.

    An unreadable catalogue gives an empty list: the panel must still open.
    """
    try:
        from CTFMLib.catalog import load_catalog

        entries = [m for m in load_catalog(catalog_path) if m.task == SEGMENTATION_TASK]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    return sorted(entries, key=lambda m: m.id != WHOLE_BODY_ID)


def model_choices(catalog_path=None) -> tuple:
    """What the Model box offers: whole-body, the catalogue's other segmentation models (tumour tasks), folder."""
    others = [m.id for m in catalog_segmentation_models(catalog_path) if m.id != WHOLE_BODY_ID]
    return (WHOLE_BODY, *others, FOLDER)


MODELS = model_choices()


def catalog_model_problem(model: str, catalog_path=None) -> Optional[str]:
    """Why a catalogue model cannot run here, or None.

    Tumour models have no published weights: the catalogue lists the task and
    the user trains the model with CT-FM Train and imports it under the
    catalogue id. Until then there is nothing to run. (Published models are
    downloaded by the child when needed.)
    """
    if model in (WHOLE_BODY, FOLDER):
        return None
    entry = next((m for m in catalog_segmentation_models(catalog_path) if m.id == model), None)
    if entry is None or entry.repo_id:
        return None
    from CTFMLib.cache import model_folder_name, models_dir

    if (models_dir() / model_folder_name(entry.id) / WEIGHTS_NAME).is_file():
        return None
    return (
        f"No '{entry.title}' model on this computer: no public weights exist for it. Train one with CT-FM Train, "
        f"then import its folder in CT-FM > Models (or `ctfm models import FOLDER --id {entry.id}`), "
        "or choose 'folder' and select it."
    )


def parse_structures(structures) -> list:
    """Structure names from a comma-separated text (or a list); blanks and repeats dropped, order kept."""
    if structures is None:
        return []
    items = structures.split(",") if isinstance(structures, str) else list(structures)
    names = []
    for item in items:
        name = str(item).strip()
        if name and name not in names:
            names.append(name)
    return names


def names_from_labels_dict(labels: dict) -> dict:
    """``{value: name}`` of a labels mapping in either published form ({"1": "liver"} or {"1": {"name": ...}})."""
    names = {}
    for key, entry in (labels or {}).items():
        name = entry.get("name") if isinstance(entry, dict) else entry
        if int(key) != 0 and name:
            names[int(key)] = str(name)
    return names


def model_label_names(model: str, modelFolder=None, catalog_path=None) -> Optional[dict]:
    """``{value: name}`` of the structures a model segments, or None where they are not known."""
    if model == FOLDER:
        if not path_is_set(modelFolder) or not (Path(modelFolder) / LABELS_NAME).is_file():
            return None
        try:
            return names_from_labels_dict(json.loads((Path(modelFolder) / LABELS_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError, TypeError):
            return None
    wanted = WHOLE_BODY_ID if model == WHOLE_BODY else model
    for entry in catalog_segmentation_models(catalog_path):
        if entry.id == wanted and entry.labels:
            return names_from_labels_dict(entry.labels)
    return None


def structure_key(name: str) -> str:
    """A structure name as ``ctfm segment --structures`` compares it: case, spaces and dashes ignored."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _accepted_names(names: dict) -> dict:
    """``{key: model name}`` for the names and, where CTFMLib.labels describes them, display names."""
    accepted = {}
    try:
        from CTFMLib.labels import load_labels

        for info in load_labels({str(v): n for v, n in names.items()}):
            accepted.setdefault(structure_key(info.display_name), info.name)
    except (ImportError, ValueError, TypeError, KeyError):
        pass
    accepted.update({structure_key(n): n for n in names.values()})
    return accepted


def structures_problem(structures, model: str, modelFolder=None, catalog_path=None) -> Optional[str]:
    """Why the structure subset does not fit the model (names it does not segment), or None."""
    names = parse_structures(structures)
    if not names:
        return None
    known = model_label_names(model, modelFolder, catalog_path)
    if known is None:
        return None  # the model's labels are unknown here; the model itself will check
    accepted = _accepted_names(known)
    unknown = [n for n in names if structure_key(n) not in accepted]
    if not unknown:
        return None
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(structure_key(name), list(known.values()), n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return f"The model does not segment: {', '.join(hints)}."


def model_argument(model: str, modelFolder=None) -> str:
    """What ``ctfm segment --model`` receives for a Model choice."""
    return str(Path(modelFolder)) if model == FOLDER else model


# --- what the model is, for the plan (no torch) --------------------------------------------------


def catalog_entry(model: str, catalog_path=None):
    """The catalogue entry ``ctfm segment --model`` would use for a Model choice, or None (folder models have none)."""
    if model == FOLDER:
        return None
    wanted = WHOLE_BODY_ID if model == WHOLE_BODY else model
    return next((m for m in catalog_segmentation_models(catalog_path) if m.id == wanted), None)


def _read_json_object(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _downloaded_config(entry) -> Optional[Path]:
    """The ``config.json`` of a published model in the Hugging Face cache, or None (not downloaded yet)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from CTFMLib.cache import hub_cache_dir
    except ImportError:  # not installed yet: nothing can have been downloaded with it
        return None
    try:
        hit = try_to_load_from_cache(entry.repo_id, CONFIG_NAME, cache_dir=hub_cache_dir(), revision=entry.revision)
    except Exception:  # an unreadable cache means "not downloaded": the catalogue's facts stand in
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def model_config_path(model: str, modelFolder=None, catalog_path=None) -> Optional[Path]:
    """Where the ``config.json`` of the model ``ctfm segment`` would load lies on this computer, or None.

    Found as :func:`CTFMLib.model_store.resolve` finds the model (without asking the hub for it):
    the folder itself; else the import under the catalogue entry's repo or id; else the download.
    """
    if model == FOLDER:
        return Path(modelFolder) / CONFIG_NAME if path_is_set(modelFolder) else None
    entry = catalog_entry(model, catalog_path)
    if entry is None:
        return None
    from CTFMLib.cache import imported_model

    imported = imported_model(entry.repo_id or entry.id)
    if imported is not None:
        return imported / CONFIG_NAME
    return _downloaded_config(entry) if entry.repo_id else None


def segmentation_model_facts(model: str, modelFolder=None, catalog_path=None) -> dict:
    """:func:`CTFMLib.segment_plan.model_facts` of a Model choice, from its ``config.json`` and catalogue entry.

    The same sources ``ctfm segment`` uses once it has loaded the model (a folder model has no
    catalogue entry); a published model not downloaded yet is described by its catalogue entry
    alone (its spacing, and the published network's width and classes, which the defaults are).
    """
    path = model_config_path(model, modelFolder, catalog_path)
    config = _read_json_object(path) if path is not None else None
    return model_facts(config, catalog_entry(model, catalog_path))
