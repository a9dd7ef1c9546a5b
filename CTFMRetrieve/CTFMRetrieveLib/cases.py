"""An index folder seen from Slicer: is it an index, what it holds, and files for loaded volumes.

An index (``ctfm index``, :class:`CTFMLib.retrieval.VectorIndex`) refers to its scans by file
path, so a volume that exists only in the scene is first written into the index folder
(``<index>/volumes/<name>.nrrd``, world geometry); a volume loaded from an image file that is
unchanged since (and not under a transform) is indexed where it is. The node remembers the file
(:data:`CASE_PATH_ATTRIBUTE`) so a second add, and "exclude the query's own case", find it again.
Reading statistics opens the SQLite index read-only in this process (no torch): it is quick and
works while a child process adds to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from CTFMLib.image import ImageError, write_image
from CTFMLib.text import count
from CTFMSlicer.nodes import check_scalar_volume, image_from_volume_node, path_is_set

INDEX_DB = "index.sqlite"  # CTFMLib.retrieval.store.DB_NAME
VOLUMES_FOLDER = "volumes"
CASE_PATH_ATTRIBUTE = "CTFMRetrieve.CasePath"
CASE_SERIES_ATTRIBUTE = "CTFMRetrieve.CaseSeries"
CASE_STAMP_ATTRIBUTE = "CTFMRetrieve.CaseStamp"  # the voxels' modification time when the file was written
READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
HEATMAP_ATTRIBUTE = "CTFM.target"  # CT-FM saliency maps (CTFMSlicer.overlay) are not CT scans


def is_index(path) -> bool:
    return path_is_set(path) and (Path(path) / INDEX_DB).is_file()


def index_folder_problem(path, must_exist: bool) -> Optional[str]:
    """Why ``path`` cannot be used as an index folder (a sentence), or None.

    ``must_exist``: searching needs an index; adding may create one in an empty or new folder.
    """
    if not path_is_set(path):
        return "Choose an index folder (an existing index, or a new folder to create one in)."
    path = Path(path)
    if is_index(path):
        return None
    if path.exists() and not path.is_dir():
        return f"{path} is a file; an index is a folder."
    if must_exist:
        return f"{path} holds no index yet: add cases to create one."
    if path.is_dir() and any(p.name != VOLUMES_FOLDER for p in path.iterdir()):
        return f"{path} is not empty and holds no index; choose an empty or new folder for a new index."
    return None


def index_statistics(path) -> dict:
    """``ctfm index info`` of the index at ``path`` (model, settings, scans, patches, bytes); raises on failure."""
    from CTFMLib.retrieval.index import VectorIndex

    with VectorIndex.open(path, readonly=True) as index:
        return index.info()


def statistics_text(info: dict) -> str:
    """One line for the panel: scans, patches, size and model."""
    size = float(info.get("bytes") or 0)
    unit = next((u for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if size >= f), "B")
    scale = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}[unit]
    where = "in the database" if info.get("backend") == "postgresql" else "on disk"
    return (f"{count(int(info.get('scans') or 0), 'case')}, {count(int(info.get('patches') or 0), 'place')} "
            f"(patches), {size / scale:.1f} {unit} {where}; model {info.get('model_id')}")


# --- volumes as files ---------------------------------------------------------------------


def _voxel_stamp(node) -> str:
    data = node.GetImageData()
    return str(data.GetMTime()) if data is not None else ""


def stored_file(node) -> Optional[Path]:
    """The image file ``node`` was loaded from, if the index can use it as it is; else None."""
    if node.GetParentTransformNode() is not None:
        return None  # the file lacks the transform: index what the user sees instead
    storage = node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return None
    path = Path(storage.GetFileName())
    if not path.is_file() or not path.name.lower().endswith(READABLE_SUFFIXES):
        return None
    if node.GetModifiedSinceRead():
        return None
    return path.resolve()


def case_of(node) -> Optional[tuple]:
    """``(path, series_uid or None)`` of the indexed file that holds this node's voxels, if known and unchanged."""
    path = node.GetAttribute(CASE_PATH_ATTRIBUTE)
    if path and node.GetAttribute(CASE_STAMP_ATTRIBUTE) == _voxel_stamp(node) and Path(path).exists():
        return Path(path), node.GetAttribute(CASE_SERIES_ATTRIBUTE) or None
    stored = stored_file(node)
    return (stored, None) if stored else None


def remember_case(node, path, series_uid: Optional[str] = None) -> None:
    """Mark ``node`` as holding the voxels of ``path`` (and series) as they are now."""
    node.SetAttribute(CASE_PATH_ATTRIBUTE, str(path))
    node.SetAttribute(CASE_SERIES_ATTRIBUTE, series_uid or "")
    node.SetAttribute(CASE_STAMP_ATTRIBUTE, _voxel_stamp(node))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"


def volume_file_for_index(node, index_root) -> Path:
    """A file the index can refer to for ``node``: its own file if unchanged, else a new NRRD in the index folder.

    Never overwrites: a name already taken in ``<index>/volumes`` gets a numbered suffix.
    """
    known = case_of(node)
    if known is not None:
        return known[0]
    folder = Path(index_root) / VOLUMES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    base = _safe_name(node.GetName())
    path, n = folder / f"{base}.nrrd", 1
    while path.exists():
        n += 1
        path = folder / f"{base}-{n}.nrrd"
    write_image(image_from_volume_node(node), path, compress=True)
    remember_case(node, path.resolve())
    return path.resolve()


def volumes_to_add(scene) -> list:
    """The scene's volumes that may be CT scans: grey-level with voxels, not label maps, not CT-FM heatmaps."""
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(HEATMAP_ATTRIBUTE) is not None:
            continue
        if check_volume(node) is not None:  # no voxels, or a vector volume (they subclass scalar ones)
            continue
        nodes.append(node)
    return nodes


def check_volume(node) -> Optional[str]:
    """Why ``node`` cannot be a query or be added (a sentence), or None."""
    try:
        check_scalar_volume(node)
    except ImageError as e:
        return f"{e}."
    return None
