"""The model catalogue: which CT-FM models exist and where to get them.

``Models.json`` (``Resources/Models.json`` in the source tree, installed next to
this package as ``resources/Models.json``) lists each model: ``id``, ``title``,
``task``, Hugging Face ``repo_id`` and ``revision``, ``files`` (``name``, and the published
file's ``sha256`` and ``size`` in bytes where known, with the ``source`` page they were read
from), ``architecture``, ``labels`` and, for segmentation, ``spacing`` (the voxel size in mm along
S, P, L that the model was trained at and ``ctfm segment`` resamples to). A file that differs from a known ``sha256`` or ``size``
is refused (:func:`CTFMLib.model_store.verify_published`). ``CTFM_CATALOG`` (environment) points to another
catalogue, e.g. a site's own. At the top level, ``version`` is the file's format and ``ctfm_version``
the release the catalogue ships with (equal to ``ctfm --version``; only the models are read here).

A model is known by its weights, not only by its name (:meth:`ModelEntry.signature`,
``CTFMLib.weights.match_catalogue``): weights whose ``model.safetensors`` has an entry's published
``sha256``, or, where no checksum is published, the entry's network (:data:`CTFM_NETWORK`, or the
entry's optional ``network`` object, with as many outputs as the entry has labels), get that entry's
labels, terminology and spacing wherever they come from (a folder, a file, an import).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CATALOG_NAME = "Models.json"
WHOLE_BODY_ID = "whole_body_segmentation"
# Other names of catalogue models, as users type them (case and surrounding spaces ignored).
ALIASES = {"whole-body": WHOLE_BODY_ID, "whole_body": WHOLE_BODY_ID, "wholebody": WHOLE_BODY_ID}
# The network every published CT-FM model is built on (its encoder; CTFMLib.networks.CTFM_ENCODER_CONFIG).
CTFM_NETWORK = {"in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]}


class ModelNote(UserWarning):
    """What CT-FM says about a model it loads: which catalogue model its weights matched, or that its
    labels are guessed or unknown. The ``ctfm`` command line prints each as one ``ctfm: note:`` line."""


def canonical_name(name) -> str:
    """A catalogue alias (``whole-body``) as its catalogue id; any other name unchanged."""
    return ALIASES.get(str(name).strip().lower(), str(name))


def catalog_path() -> Path:
    env = os.environ.get("CTFM_CATALOG")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "resources" / CATALOG_NAME, here.parents[1] / "Resources" / CATALOG_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model catalogue {CATALOG_NAME} not found next to CTFMLib; set CTFM_CATALOG")


@dataclass
class ModelEntry:
    id: str
    title: str
    task: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    architecture: Optional[str] = None
    files: list = field(default_factory=list)
    labels: Optional[dict] = None
    description: str = ""
    license: str = ""
    source: str = "hub"  # "hub": published weights; "user": trained with CTFMTrain and imported
    how_to: str = ""
    spacing: Optional[list] = None  # mm along S, P, L the model works at (segmentation), where known
    network: Optional[dict] = None  # the published network's shape, where it is not CTFM_NETWORK

    def sha256(self, filename: str) -> Optional[str]:
        """The published file's sha256 (lower-case hex), or None when the catalogue does not know it."""
        for f in self.files:
            if f.get("name") == filename:
                return (f.get("sha256") or "").lower() or None
        return None

    def size(self, filename: str) -> Optional[int]:
        """The published file's size in bytes, or None when the catalogue does not know it."""
        for f in self.files:
            if f.get("name") == filename:
                value = f.get("size")
                return value if isinstance(value, int) and not isinstance(value, bool) else None
        return None

    @property
    def file_names(self) -> list:
        return [f["name"] for f in self.files]

    @property
    def output_count(self) -> Optional[int]:
        """How many outputs (background included) the model has: its ``network``'s ``out_channels``, else
        one more than its highest label value; None when the entry says neither."""
        given = (self.network or {}).get("out_channels")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        try:
            values = [int(k) for k in (self.labels or {})]
        except (TypeError, ValueError):
            return None
        return max(values) + 1 if values else None

    def signature(self) -> Optional[dict]:
        """The published network by which weights without a known checksum are recognised, or None.

        ``{"architecture", "in_channels", "init_filters", "blocks_down", "out_channels"}``: the
        :data:`CTFM_NETWORK` (or the entry's ``network``) with as many outputs as the entry has labels.
        Only published models with an output count have one: an encoder's shape alone says nothing
        about which weights it holds.
        """
        outputs = self.output_count
        if not self.repo_id or not self.architecture or outputs is None:
            return None
        shape = {**CTFM_NETWORK, **{k: v for k, v in (self.network or {}).items() if k in CTFM_NETWORK}}
        return {"architecture": self.architecture, **shape, "blocks_down": list(shape["blocks_down"]),
                "out_channels": outputs}


@dataclass
class Catalog:
    models: list
    path: Optional[Path] = None

    @classmethod
    def load(cls, path=None) -> "Catalog":
        path = Path(path) if path else catalog_path()
        data = json.loads(path.read_text(encoding="utf-8"))
        known = set(ModelEntry.__dataclass_fields__)
        models = [ModelEntry(**{k: v for k, v in m.items() if k in known}) for m in data["models"]]
        for m in models:
            _check_files(m, path)
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate model ids in {path}")
        return cls(models, path)

    def find(self, name: str) -> Optional[ModelEntry]:
        """A model by its catalogue id, its Hugging Face repo id or an alias (:data:`ALIASES`)."""
        name = canonical_name(name)
        for m in self.models:
            if name in (m.id, m.repo_id):
                return m
        return None

    def __iter__(self):
        return iter(self.models)


def _check_files(entry: ModelEntry, path) -> None:
    """A published checksum or size that could never match is a broken catalogue, not a broken download."""
    if not isinstance(entry.files, list):
        raise ValueError(f"{path}: files of {entry.id} must be a list")
    for f in entry.files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"{path}: each file of {entry.id} needs a name")
        sha = f.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            raise ValueError(f"{path}: sha256 of {entry.id}/{f['name']} is not 64 hex digits")
        size = f.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"{path}: size of {entry.id}/{f['name']} is not a number of bytes")


def load_catalog(path=None) -> Catalog:
    try:
        return Catalog.load(path)
    except FileNotFoundError:
        if path:
            raise
        return Catalog([], None)
