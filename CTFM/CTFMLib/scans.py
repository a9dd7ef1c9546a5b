"""Scans a user names, found: image files, folders, CSV lists (a ``path`` column) and DICOM trees become
:class:`ScanRef` records, one per volume (:func:`find_scans`), read back with :func:`read_scan`.

Training (:mod:`CTFMLib.train.data`) and retrieval (``ctfm index add``) both start from here; neither
imports the other.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .image import Image, read_image

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class DataError(ValueError):
    """The scan sources cannot be used: missing paths, a CSV without a ``path`` column, nothing found."""


# --- scan references -------------------------------------------------------------------


def scan_key(path, series_uid: str | None = None) -> str:
    """A stable file-name-safe id of one scan: a hash of its resolved path and DICOM series UID."""
    text = f"{Path(path).expanduser().resolve()}\n{'' if series_uid is None else series_uid}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


@dataclass
class ScanRef:
    """One volume to train on.

    ``path``: an image file, or for DICOM the folder holding the series (the
    nearest folder above all its files). ``series_uid``: the DICOM
    SeriesInstanceUID (``None`` for image files; may be ``""`` in anonymised
    data). ``label``: the other columns of the CSV row that named it (strings).
    ``key``: :func:`scan_key`, the scan's name in a :class:`ScanCache`.
    ``files``: a DICOM series' files in slice order (empty for image files).
    ``base``: the folder of the CSV that named it, against which relative paths in its other
    columns (e.g. a segmentation file) are resolved (``""`` when it was not named by a CSV).
    """

    path: str
    series_uid: str | None = None
    label: dict = field(default_factory=dict)
    key: str = ""
    files: tuple = ()
    base: str = ""

    def __post_init__(self):
        self.path = os.path.abspath(os.path.expanduser(str(self.path)))  # the cache matches entries by this path
        self.files = tuple(str(f) for f in self.files)
        if not self.key:
            self.key = scan_key(self.path, self.series_uid)

    @property
    def is_dicom(self) -> bool:
        return self.series_uid is not None or Path(self.path).is_dir()

    def describe(self) -> str:
        """The scan in a message: its path, plus the series for DICOM."""
        return self.path if self.series_uid is None else f"{self.path} (series {self.series_uid or '<empty uid>'})"


def _image_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_scans(sources: Sequence, recursive: bool = True, rejected: list | None = None) -> list:
    """The scans named by ``sources``, in order, each once.

    A source is an image file (.nii, .nii.gz, .nrrd, .mha, .mhd); a folder,
    searched for image files and DICOM series (subfolders too when
    ``recursive``); or a CSV file with a ``path`` column, paths relative to
    the CSV's folder, an optional ``series_uid`` column choosing one DICOM
    series of a folder, and any other columns kept as :attr:`ScanRef.label`.
    A DICOM tree gives one :class:`ScanRef` per series. A scan named twice
    (same resolved path and series) is kept once, with the first label.

    A CSV row names ONE scan: an image file, or the folder of a DICOM series (or study). Such a folder
    must hold DICOM files (or image files) at its top level or in its series folders one level down;
    only then is it searched, deeper subfolders included (a series may be spread over them). A row naming
    a folder without any (e.g. ``/etc``: it would make the DICOM probe read the header of every file of
    the tree), a FIFO, a device or a socket is not a scan: it is appended to ``rejected`` as
    ``(ScanRef, reason)`` (training reports it in ``skipped.csv``), as is a source folder in which
    nothing is found. Without ``rejected`` they are left out silently.
    Raises :class:`DataError` naming every missing path, or when nothing is found (with the reasons).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    scans, missing = [], []
    refused = rejected if rejected is not None else []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            missing.append(str(source))
        elif path.is_file() and path.suffix.lower() == ".csv":
            scans.extend(_from_csv(path, recursive, missing, refused))
        else:
            found = _from_path(path, recursive, {}, refused=refused)
            if not found and not _special(path):
                refused.append((ScanRef(str(path)), _nothing_found(path)))
            scans.extend(found)
    if missing:
        raise DataError(
            f"{len(missing)} scan path(s) do not exist: " + "; ".join(missing[:10])
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            + ". Fix or remove them (paths in a CSV are relative to the CSV's folder)."
        )
    unique = {}
    for scan in scans:
        unique.setdefault(scan.key, scan)
    if not unique:
        reasons = "; ".join(f"{ref.path}: {why}" for ref, why in refused[:3])
        raise DataError(
            "no scans found in " + ", ".join(str(s) for s in sources)
            + f": expected image files ({', '.join(IMAGE_SUFFIXES)}), DICOM series, or a CSV with a 'path' column"
            + (f" ({reasons})" if reasons else "")
        )
    return list(unique.values())


def _special(path: Path) -> str | None:
    """What a path is when it is neither a regular file nor a folder (never opened: a FIFO would block)."""
    for test, kind in ((Path.is_fifo, "a FIFO (named pipe)"), (Path.is_block_device, "a block device"),
                       (Path.is_char_device, "a character device"), (Path.is_socket, "a socket")):
        try:
            if test(path):
                return kind
        except OSError:
            return None
    return None


def _nothing_found(folder: Path) -> str:
    return (f"no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series in this folder"
            + ("" if folder.is_dir() else " (it is not a folder)"))


def _looks_like_dicom(path: Path) -> bool:
    """A cheap look at a file's first 132 bytes: the DICOM preamble's "DICM", or an old file's first tag."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def _holds_scan_files(folder: Path) -> bool:
    """Whether ``folder`` itself (not its subfolders) holds an image file or a file that looks like DICOM."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():  # is_file: regular files only, never a FIFO
            continue
        if _image_suffix(entry) or (entry.suffix.lower() != ".csv" and _looks_like_dicom(entry)):
            return True
    return False


def _scan_folder_reason(folder: Path) -> str | None:
    """Why a CSV row's folder is not the folder of a scan (``None`` when it is).

    It must hold DICOM (or image) files at its top, or in its series folders one level down (a study
    folder). Only the first 132 bytes of files at those two levels are read to decide, so a row naming
    an unrelated tree (``/etc``, a home folder) is reported, not searched file by file.
    """
    if _holds_scan_files(folder):
        return None
    try:
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        return f"the folder cannot be listed ({e.strerror or e})"
    if any(_holds_scan_files(sub) for sub in subfolders):
        return None
    return ("no DICOM or image file at the top of this folder or of its series folders: a CSV row names one "
            "scan (an image file, or the folder of a DICOM series or study), not a tree to search")


def _from_path(path: Path, recursive: bool, label: dict, series_uid: str | None = None,
               refused: list | None = None, row: bool = False) -> list:
    """The scans at ``path``; a FIFO, device or socket (and, for a CSV ``row``, a folder that holds no scan
    at its top) goes to ``refused`` with the reason instead."""
    kind = _special(path)
    if kind is not None:
        if refused is not None:
            refused.append((ScanRef(str(path), None, dict(label)), f"{kind}, not an image file or a folder"))
        return []
    if row and path.is_dir():
        reason = _scan_folder_reason(path)
        if reason is not None:
            if refused is not None:
                refused.append((ScanRef(str(path), None, dict(label)), reason))
            return []
    if path.is_file():
        if _image_suffix(path):
            return [ScanRef(str(path.resolve()), None, dict(label))]
        raise DataError(
            f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)}) nor a CSV list of scans; "
            "for DICOM, name the folder that holds the series"
        )
    return _from_folder(path, recursive, label, series_uid)


def _from_folder(folder: Path, recursive: bool, label: dict, series_uid: str | None = None) -> list:
    folder = folder.resolve()
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and not _hidden(p, folder))
    scans = []
    if series_uid is None:
        scans = [ScanRef(str(p), None, dict(label)) for p in files if _image_suffix(p)]
    # Everything else may be DICOM; list_dicom_series skips what is not (sidecar .raw, .csv, .txt ...).
    if any(not _image_suffix(p) and p.suffix.lower() != ".csv" for p in files):
        from .dicom import list_dicom_series

        for info in list_dicom_series(folder, recursive=recursive):
            if series_uid is not None and info.uid != series_uid.strip():
                continue
            parent = Path(os.path.commonpath([str(Path(f).parent) for f in info.files]))
            scans.append(ScanRef(str(parent), info.uid, dict(label), files=info.files))
    if series_uid is not None and not scans:
        raise DataError(f"no DICOM series with SeriesInstanceUID {series_uid!r} in {folder}")
    return scans


def _from_csv(path: Path, recursive: bool, missing: list, refused: list) -> list:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise DataError(f"{path} has no 'path' column (its columns: {', '.join(columns) or 'none'}); add one")
        # A row with more cells than the header puts the extras under the key None: ignored.
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    scans = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        if not row.get("path"):
            raise DataError(f"{path} row {number} has an empty 'path'")
        target = Path(row["path"]).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.exists():
            missing.append(f"{os.path.normpath(target)} (from {path.name} row {number})")
            continue
        label = {k: v for k, v in row.items() if k not in ("path", "series_uid") and k}
        before = len(refused)
        found = _from_path(target, recursive, label, row.get("series_uid") or None, refused=refused, row=True)
        if not found and len(refused) == before:
            refused.append((ScanRef(str(target), None, label), _nothing_found(target)))
        for scan in refused[before:]:
            scan[0].base = str(path.parent.resolve())
        for scan in found:
            scan.base = str(path.parent.resolve())
            scans.append(scan)
    return scans


def read_scan(scan: ScanRef) -> Image:
    """The voxels of a scan in HU (a DICOM series is read from its folder, recursively when it spans subfolders).

    A truncated NIfTI file is an :class:`~CTFMLib.image.ImageError` (``read_image`` checks it).
    """
    path = Path(scan.path)
    if not path.is_dir():
        return read_image(path)
    from .dicom import read_dicom_series

    nested = any(Path(f).parent != path for f in scan.files)
    return read_dicom_series(path, series_uid=scan.series_uid, recursive=nested)
