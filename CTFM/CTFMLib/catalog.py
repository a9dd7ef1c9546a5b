"""The model catalogue: which CT-FM models exist and where to get them.

``Models.json`` (``Resources/Models.json`` in the source tree, installed next to
this package as ``resources/Models.json``) lists each model: ``id``, ``title``,
``task``, Hugging Face ``repo_id`` and ``revision``, ``files`` (name and
``sha256`` where known), ``architecture`` and ``labels``. ``CTFM_CATALOG``
(environment) points to another catalogue, e.g. a site's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CATALOG_NAME = "Models.json"


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

    def sha256(self, filename: str) -> Optional[str]:
        for f in self.files:
            if f.get("name") == filename:
                return f.get("sha256") or None
        return None

    @property
    def file_names(self) -> list:
        return [f["name"] for f in self.files]


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
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate model ids in {path}")
        return cls(models, path)

    def find(self, name: str) -> Optional[ModelEntry]:
        """A model by its catalogue id or its Hugging Face repo id."""
        for m in self.models:
            if name in (m.id, m.repo_id):
                return m
        return None

    def __iter__(self):
        return iter(self.models)


def load_catalog(path=None) -> Catalog:
    try:
        return Catalog.load(path)
    except FileNotFoundError:
        if path:
            raise
        return Catalog([], None)
