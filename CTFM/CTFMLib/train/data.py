"""Scans for training: discovery, CT-FM's scan filters, and an on-disk cache of preprocessed volumes.

:func:`find_scans` (:mod:`CTFMLib.scans`, shared with retrieval) turns what a user names (image files,
folders, CSV lists, DICOM trees) into :class:`ScanRef` records, one per volume. :func:`check_scan`
applies the filters CT-FM's pretraining data went through (modality CT, slice
thickness 1-5 mm, more than 50 slices, no localizers), from headers alone where
possible. :class:`ScanCache` preprocesses each scan once with
:func:`pretrain_preprocess` and keeps the result as a ``.npy`` file that
training memory-maps; :meth:`ScanCache.prepare` fills it with worker processes
and reports every scan it cannot use instead of stopping. It also leaves out
scans whose values do not look like a CT in HU (:mod:`CTFMLib.ct_check`: an MR
volume, a CT without its rescale), for every training task, unless the cache is
made with ``allow_non_ct`` (``data.allow_non_ct``, ``ctfm train --allow-non-ct``).

Conventions: voxels are HU indexed ``[i, j, k]`` in LPS (:mod:`CTFMLib.image`);
preprocessed arrays are float32 in [0, 1] on an SPL grid, axis 0 towards
Superior, 1 Posterior, 2 Left, spacing (3, 1, 1) mm by default.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..ct_check import not_ct_reason
from ..files import atomic_output, atomic_write_text
from ..image import Image, ImageError, first_line
from ..preprocess import apply_orientation, foreground_box, orientation_transform, resample_axes, validate_ct
from ..scans import IMAGE_SUFFIXES, DataError, ScanRef, find_scans, read_scan, scan_key  # noqa: F401

# CT-FM's pretraining filters (Pai et al., CT-FM): CT only, slices 1-5 mm thick, more than 50 of them, no scouts.
MIN_THICKNESS_MM, MAX_THICKNESS_MM = 1.0, 5.0
THICKNESS_TOLERANCE_MM = 1e-3  # headers store 1.0 as 0.99999
MIN_SLICES = 51
# A "volume" of this many slices or fewer is a localizer (scout) or a single image, whatever its header says.
LOCALIZER_MAX_SLICES = 3
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})

# Bumped when the preprocessing or the filters change, so old cache entries are recomputed
# (2: the CT check of CTFMLib.ct_check; every entry records its verdict, "non_ct").
CACHE_VERSION = 2
# A preprocessed scan larger than this (float32: 4 GiB) comes from a wrong spacing, not from a CT
# (a whole body at 1 mm is about 2000 x 500 x 500 = 5e8 voxels): refused before resampling.
MAX_PREPARED_VOXELS = 2 ** 30


# --- filtering ---------------------------------------------------------------------------


def check_scan(scan, pretraining: bool = True) -> str | None:
    """Why CT-FM's pretraining would not use this scan, or ``None`` when it would.

    ``scan`` is an :class:`~CTFMLib.image.Image` (its metadata and geometry), a
    :class:`~CTFMLib.dicom.SeriesInfo`, a :class:`ScanRef` or a path (headers
    only, no voxels read), or a dict of the facts of :func:`scan_header`.
    Unknown facts (a NIfTI has no modality) do not exclude a scan.
    Rules: modality CT; not a localizer (ImageType LOCALIZER/SCOUT/TOPOGRAM,
    or at most 3 slices); more than 50 slices; slice thickness 1-5 mm (DICOM
    SliceThickness, else the spacing along the slice axis). ``pretraining=False`` keeps only the
    first two (fine-tuning data is curated: a 5 mm head CT of 30 slices is a fine triage scan).
    """
    from ..dicom import SeriesInfo

    if isinstance(scan, Image):
        facts = image_facts(scan)
    elif isinstance(scan, SeriesInfo):
        facts = _series_facts(scan.modality, scan.files)
    elif isinstance(scan, Mapping):
        facts = scan
    else:
        facts = scan_header(scan if isinstance(scan, ScanRef) else ScanRef(str(scan)))
    return _reason(facts, pretraining)


def _reason(facts: Mapping, pretraining: bool = True) -> str | None:
    modality = (facts.get("modality") or "").strip().upper()
    if modality and modality != "CT":
        return f"not CT: modality {modality}"
    image_type = {str(v).strip().upper() for v in facts.get("image_type") or ()}
    if image_type & LOCALIZER_TYPES:
        return "localizer (scout) image: ImageType " + "\\".join(facts.get("image_type"))
    slices = facts.get("num_slices")
    if slices is not None and slices <= LOCALIZER_MAX_SLICES:
        return f"localizer (scout) or single image: only {slices} slice(s)"
    if not pretraining:
        return None
    if slices is not None and slices < MIN_SLICES:
        return f"too few slices: {slices} (CT-FM pretraining uses scans with more than {MIN_SLICES - 1})"
    thickness = facts.get("slice_thickness")
    if thickness is not None and not (
        MIN_THICKNESS_MM - THICKNESS_TOLERANCE_MM <= thickness <= MAX_THICKNESS_MM + THICKNESS_TOLERANCE_MM
    ):
        return f"slice thickness {thickness:g} mm outside {MIN_THICKNESS_MM:g}-{MAX_THICKNESS_MM:g} mm"
    return None


def slice_axis(direction) -> int:
    """The index axis closest to the patient's head-foot (LPS z) axis: the slice axis of an axial CT."""
    return int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3)[2, :])))


def image_facts(image: Image) -> dict:
    """The filter facts of a read image: DICOM's slice axis is k, other files' the axis closest to head-foot."""
    meta = image.metadata
    axis = 2 if "num_slices" in meta else slice_axis(image.direction)  # "num_slices": read from a DICOM series
    thickness = meta.get("slice_thickness")
    return {
        "modality": meta.get("modality") or None,
        "image_type": tuple(meta.get("image_type") or ()),
        "num_slices": int(image.shape[axis]),
        "slice_thickness": float(thickness) if thickness is not None else float(image.spacing[axis]),
    }


def scan_header(scan: ScanRef) -> dict:
    """The filter facts of a scan from its headers alone (no voxels): modality, image_type, num_slices,
    slice_thickness (mm). Raises :class:`~CTFMLib.image.ImageError` when the header cannot be read."""
    path = Path(scan.path)
    if not path.exists():
        raise ImageError(f"no such file or folder: {path}")
    if path.is_dir():
        return _series_facts(None, scan.files) if scan.files else {}
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageError(
            f"cannot read {path.name}: not a readable image file or it is corrupt ({first_line(e)})"
        ) from None
    keys = set(reader.GetMetaDataKeys())

    def meta(key):
        return reader.GetMetaData(key).strip() if key in keys else ""

    modality = meta("0008|0060")
    if not modality and meta("Modality").startswith("MET_MOD_"):  # MetaImage's own field, e.g. MET_MOD_CT
        modality = meta("Modality")[len("MET_MOD_"):]
    if modality.upper() == "UNKNOWN":
        modality = ""
    size = reader.GetSize()
    if len(size) < 3:
        return {"modality": modality or None, "num_slices": 1, "slice_thickness": None, "image_type": ()}
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(len(size), len(size))[:3, :3]
    axis = slice_axis(direction)
    thickness = _float(meta("0018|0050"))
    return {
        "modality": modality or None,
        "image_type": tuple(v for v in meta("0008|0008").split("\\") if v),
        "num_slices": int(size[axis]),
        "slice_thickness": thickness if thickness is not None else float(reader.GetSpacing()[axis]),
    }


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _series_facts(modality: str | None, files: Sequence) -> dict:
    """Facts of a DICOM series from its first file's header (a series shares these tags)."""
    import pydicom

    facts = {"modality": modality or None, "num_slices": len(files), "image_type": (), "slice_thickness": None}
    if not files:
        return facts
    ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True, force=True,
                         specific_tags=["Modality", "ImageType", "SliceThickness", "NumberOfFrames"])
    facts["modality"] = modality or str(ds.get("Modality") or "").strip() or None
    image_type = ds.get("ImageType")
    if image_type:
        values = [image_type] if isinstance(image_type, str) else image_type
        facts["image_type"] = tuple(str(v).strip() for v in values)
    facts["slice_thickness"] = _float(ds.get("SliceThickness"))
    frames = _float(ds.get("NumberOfFrames"))
    if len(files) == 1 and frames:
        facts["num_slices"] = int(frames)
    return facts


# --- preprocessing ------------------------------------------------------------------------


def pretrain_preprocess(
    image: Image, spacing=(3.0, 1.0, 1.0), hu_range=(-1024.0, 2048.0), orientation: str = "SPL"
) -> np.ndarray:
    """CT-FM's pretraining preprocessing of a CT in HU; returns float32 in [0, 1], shape (D, H, W) in ``orientation``.

    The upstream MONAI recipe, step by step: Orientation(``orientation``);
    Spacing(``spacing`` mm, bilinear) on MONAI's grid (voxel 0 stays put, a
    side of n voxels at s mm becomes ``round((n - 1) * s / t) + 1`` voxels);
    CropForeground on the raw HU (bounding box of HU > 0); then
    ScaleIntensityRange(``hu_range`` -> [0, 1], clipped). ``spacing=None``
    skips resampling. Padding to a crop size is left to the training task.
    Raises :class:`~CTFMLib.image.ImageError` for an image that is not a CT in
    HU, or that has no voxel above 0 HU.
    """
    validate_ct(image)
    perm, flip = orientation_transform(image.direction, orientation)
    data = apply_orientation(image.array, perm, flip)
    if spacing is not None:
        source = image.spacing[list(perm)]
        target = np.asarray(spacing, dtype=np.float64).reshape(3)
        if np.any(target <= 0):
            raise ValueError(f"spacing must be positive, got {list(target)}")
        out_shape = tuple(int(np.round((n - 1) * s / t)) + 1 for n, s, t in zip(data.shape, source, target))
        voxels = float(np.prod([float(n) for n in out_shape]))
        if voxels > MAX_PREPARED_VOXELS:
            raise ImageError(f"resampled to {list(target)} mm the scan would be {'x'.join(map(str, out_shape))} voxels "
                             f"({', '.join(orientation)}; {voxels * 4 / 2 ** 30:.1f} GiB), more than a CT needs; check its spacing "
                             f"({[round(float(v), 4) for v in source]} mm) and pretrain.spacing")
        data = resample_axes(data, target / source, out_shape, "linear")
    try:
        start, end = foreground_box(data)
    except ImageError:
        raise ImageError("the image has no voxel above 0 HU (no body in it?): nothing to train on") from None
    data = np.asarray(data[tuple(slice(s, e) for s, e in zip(start, end))], dtype=np.float32)
    lo, hi = (float(v) for v in hu_range)
    # MONAI's ScaleIntensityRange order: (x - a_min) / (a_max - a_min), then clip.
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0, out=out), dtype=np.float32)


# --- the cache ------------------------------------------------------------------------------


def source_stamp(scan: ScanRef) -> str:
    """A digest of the size and modification time of every file the scan is read from."""
    path = Path(scan.path)
    if path.is_dir():
        files = [Path(f) for f in scan.files] or sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = [path] + _mhd_data_files(path)
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _mhd_data_files(path: Path) -> list:
    if not path.name.lower().endswith(".mhd"):
        return []
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    data = path.parent / value.strip()
                    return [data] if value.strip() not in ("LOCAL", "LIST") and data.is_file() else []
    except OSError:
        pass
    return []


class ScanCache:
    """Preprocessed scans on disk: ``<key>.npy`` (float32, SPL) and ``<key>.json`` (where it came from).

    An entry is recomputed when the source files change (size or modification
    time) or when this cache's preprocessing settings differ from those it was
    made with. Files are written through :func:`CTFMLib.files.atomic_output`,
    so a killed process never leaves a half-written entry under a final name.

    Every entry records whether its scan looks like a CT in HU (``"non_ct"``: the reason it does not, or
    ``null``; :func:`CTFMLib.ct_check.not_ct_reason`). Without ``allow_non_ct`` such a scan is skipped with
    that reason (and listed in ``skipped.csv``); with it, it is used. The verdict is kept with the entry,
    so switching ``allow_non_ct`` neither reads nor preprocesses the other scans again.
    """

    PRETRAINING_FILTERS = True  # check_scan's slice-count and thickness rules (False: modality and localizer only)

    def __init__(self, folder, spacing=(3.0, 1.0, 1.0), hu_range=(-1024.0, 2048.0), orientation: str = "SPL",
                 allow_non_ct: bool = False):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.hu_range = tuple(float(v) for v in hu_range)
        self.orientation = str(orientation).upper()
        self.allow_non_ct = bool(allow_non_ct)

    @property
    def config(self) -> dict:
        """The settings an entry must have been made with to be reused (JSON-comparable)."""
        return {
            "version": CACHE_VERSION,
            "spacing": None if self.spacing is None else list(self.spacing),
            "hu_range": list(self.hu_range),
            "orientation": self.orientation,
        }

    def _init_args(self) -> tuple:
        return (str(self.folder), self.spacing, self.hu_range, self.orientation, self.allow_non_ct)

    def stamp(self, scan: ScanRef) -> str:
        """What must not change for an entry to stay valid: the source files' sizes and times."""
        return source_stamp(scan)

    def array_path(self, scan: ScanRef) -> Path:
        return self.folder / f"{scan.key}.npy"

    def info_path(self, scan: ScanRef) -> Path:
        return self.folder / f"{scan.key}.json"

    def _record(self, scan: ScanRef) -> dict | None:
        """The scan's ``.json`` record when it is current: same source, settings and file stamps."""
        try:
            info = json.loads(self.info_path(scan).read_text(encoding="utf-8"))
            same_source = info.get("source") == scan.path and info.get("series_uid") == scan.series_uid
            if info.get("config") != self.config or not same_source or info.get("stamp") != self.stamp(scan):
                return None
        except (OSError, ValueError, AttributeError):
            return None
        return info

    def cached(self, scan: ScanRef) -> np.ndarray | None:
        """The entry memory-mapped, or ``None`` when it is missing, stale, damaged or a skipped scan."""
        info = self._record(scan)
        if info is None or "skipped" in info or (info.get("non_ct") and not self.allow_non_ct):
            return None
        try:
            array = np.load(self.array_path(scan), mmap_mode="r")
        except (OSError, ValueError):
            return None
        if list(array.shape) != info.get("shape") or array.dtype != np.float32:
            return None
        return array

    def skip_reason(self, scan: ScanRef) -> str | None:
        """Why :meth:`prepare` skips this scan, as recorded for its current files and these settings: a filter's
        reason, or that it does not look like a CT (unless this cache allows such scans)."""
        info = self._record(scan)
        if info is None:
            return None
        non_ct = info.get("non_ct")
        if "skipped" in info:
            return None if non_ct and self.allow_non_ct else info["skipped"]  # allowed now: prepared again
        return non_ct if non_ct and not self.allow_non_ct else None

    def non_ct_reason(self, scan: ScanRef) -> str | None:
        """Why a cached scan does not look like a CT in HU (:func:`CTFMLib.ct_check.not_ct_reason`), or ``None``."""
        info = self._record(scan)
        return None if info is None else info.get("non_ct")

    def _check_ct(self, scan: ScanRef, stamp: str, image: Image, check: bool) -> tuple:
        """``(skip reason, non-CT reason)`` for a read scan: with ``check`` and without ``allow_non_ct`` a scan
        that does not look like a CT is recorded as skipped."""
        non_ct = not_ct_reason(image)
        if non_ct and check and not self.allow_non_ct:
            self._write_info(scan, stamp, {"skipped": non_ct, "non_ct": non_ct})
            return non_ct, non_ct
        return None, non_ct

    def get(self, scan: ScanRef) -> np.ndarray:
        """The preprocessed scan (read-only memory map), computed and stored on first use.

        Does not apply :func:`check_scan` (:meth:`prepare` does); raises
        :class:`~CTFMLib.image.ImageError` for a scan that cannot be read, or that does not look like a CT
        when this cache does not allow such scans.
        """
        array = self.cached(scan)
        if array is None:
            self._build(scan, self.stamp(scan), check=False)
            array = self.cached(scan)
            if array is None:
                non_ct = self.non_ct_reason(scan)
                if non_ct and not self.allow_non_ct:
                    raise ImageError(f"{scan.describe()} is left out: {non_ct} (allow_non_ct uses it)")
                raise ImageError(f"{scan.describe()} changed while it was being cached; run again")
        return array

    def preprocess(self, image: Image) -> np.ndarray:
        """The array an entry holds for one read scan (a subclass caches another preprocessing)."""
        return pretrain_preprocess(image, self.spacing, self.hu_range, self.orientation)

    def _build(self, scan: ScanRef, stamp: str, check: bool) -> str | None:
        """Read, (filter,) preprocess and store one scan; returns the filter's reason when ``check`` rejects it.

        ``stamp`` is taken before reading: a change during the read makes the entry stale, never wrong.
        """
        if check:
            # Before the voxels: most rejects cost a header read.
            reason = check_scan(scan_header(scan), self.PRETRAINING_FILTERS)
            if reason:
                self._write_info(scan, stamp, {"skipped": reason})
                return reason
        image = read_scan(scan)
        if check:
            # Facts known only after reading (a DICOM folder named without its files).
            reason = check_scan(image, self.PRETRAINING_FILTERS)
            if reason:
                self._write_info(scan, stamp, {"skipped": reason})
                return reason
        skip, non_ct = self._check_ct(scan, stamp, image, check)
        if skip:
            return skip
        array = self.preprocess(image)
        spacing = self.spacing
        if spacing is None:
            perm, _ = orientation_transform(image.direction, self.orientation)
            spacing = tuple(float(s) for s in image.spacing[list(perm)])
        # The array first, then the record that vouches for it.
        with atomic_output(self.array_path(scan)) as tmp, open(tmp, "xb") as f:
            np.save(f, array)
        self._write_info(scan, stamp, {"shape": list(array.shape), "spacing": list(spacing), "non_ct": non_ct})
        return None

    def _write_info(self, scan: ScanRef, stamp: str, fields: dict) -> None:
        info = {"source": scan.path, "series_uid": scan.series_uid, "key": scan.key, **fields,
                "config": self.config, "stamp": stamp, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.info_path(scan), json.dumps(info, indent=1))
        if "skipped" in fields and self.array_path(scan).exists():
            self.array_path(scan).unlink()  # an entry of an older version of the file

    def _prepare_one(self, scan: ScanRef) -> str | None:
        """Filter, read, preprocess and store one scan; returns why it was skipped, never raises.

        Deterministic rejections (filters, unreadable or corrupt files) are recorded, so a later
        :meth:`prepare` does not read the scan again until its files change; other errors are not.
        """
        try:
            if self.cached(scan) is not None:
                return None
            recorded = self.skip_reason(scan)
            if recorded:
                return recorded
            stamp = self.stamp(scan)
        except Exception as e:  # noqa: BLE001 - one bad scan must not stop the others; the reason is reported
            return f"{type(e).__name__}: {first_line(e)}"
        try:
            return self._build(scan, stamp, check=True)
        except ImageError as e:
            reason = first_line(e)
            try:
                self._write_info(scan, stamp, {"skipped": reason})
            except OSError:
                pass
            return reason
        except Exception as e:  # noqa: BLE001 - reported as the reason, not recorded (may be transient)
            return f"{type(e).__name__}: {first_line(e)}"

    def prepare(self, scans: Sequence, workers: int = 2, progress=None, rejected: Sequence = ()) -> tuple:
        """Fill the cache; returns ``(usable scans, [(skipped scan, reason), ...])``, both in input order.

        Scans already cached, or skipped before with the same files and settings,
        are not read again. Others are filtered (:func:`check_scan`), read and
        preprocessed by ``workers`` processes ("spawn"; 0 works in this
        process). A corrupt, unreadable or filtered scan is skipped with its
        reason, never raised; a worker process that dies (out of memory, a crash
        in a reader) is replaced and the scan it was on is skipped. The skipped
        scans are also written to ``<folder>/skipped.csv``. ``progress`` is a
        ``callback(fraction, message)`` called as scans finish. ``rejected``: ``(ScanRef, reason)`` pairs
        :func:`find_scans` refused (a FIFO, a folder without scans); they follow the skipped scans.
        """
        scans = list(scans)
        report = progress or (lambda fraction, message="": None)
        unique = {}
        for scan in scans:
            unique.setdefault(scan.key, scan)
        reasons = {}
        todo = []
        for key, scan in unique.items():
            if self.cached(scan) is not None:
                reasons[key] = None
            elif (recorded := self.skip_reason(scan)) is not None:
                reasons[key] = recorded
            else:
                todo.append(scan)
        total = len(unique)

        def finished(scan, reason):
            reasons[scan.key] = reason
            n_skipped = sum(r is not None for r in reasons.values())
            name = Path(scan.path).name
            report(len(reasons) / total, f"{len(reasons)} of {total} scans ready, {n_skipped} skipped: {name}")

        cached = len(reasons)
        report(cached / total if total else 1.0, f"preparing {len(todo)} of {total} scans ({cached} cached)")
        if workers <= 0:
            for scan in todo:
                finished(scan, self._prepare_one(scan))
        else:
            self._prepare_in_pool(todo, workers, finished)
        usable = [s for s in scans if reasons[s.key] is None]
        skipped = [(s, reasons[s.key]) for s in scans if reasons[s.key] is not None] + list(rejected)
        self._write_skipped(skipped)
        return usable, skipped

    def _prepare_in_pool(self, todo: list, workers: int, finished) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        pending = {scan.key: scan for scan in todo}  # insertion order = submission order
        suspects = None  # after a worker died: the scans it may have been on, retried one at a time
        while pending:
            batch = list(pending.values()) if suspects is None else suspects
            size = min(workers, len(batch)) if suspects is None else 1
            with ProcessPoolExecutor(size, mp_context=context) as pool:
                futures = {pool.submit(_prepare_worker, type(self), self._init_args(), scan): scan for scan in batch}
                try:
                    for future in as_completed(futures):
                        scan = futures[future]
                        try:
                            reason = future.result()
                        except BrokenProcessPool:
                            raise
                        except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled back
                            reason = f"{type(e).__name__}: {first_line(e)}"
                        del pending[scan.key]
                        finished(scan, reason)
                    suspects = None
                except BrokenProcessPool:
                    if suspects is None:
                        # Workers take scans in submission order, so the dead one held one of the first
                        # unfinished (the running ones and the one queued call per pool).
                        suspects = list(pending.values())[: size + 1]
                    else:
                        culprit = next(s for s in suspects if s.key in pending)  # one worker, in order
                        del pending[culprit.key]
                        finished(culprit, "the worker process died while preparing it (out of memory, or a crash "
                                          "in the image reader); check the file, or give the machine more memory")
                        suspects = [s for s in suspects if s.key in pending] or None
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # e.g. Cancelled from the progress callback
                    raise

    def _write_skipped(self, skipped: list) -> None:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["path", "series_uid", "key", "reason"])
        for scan, reason in skipped:
            writer.writerow([scan.path, "" if scan.series_uid is None else scan.series_uid, scan.key, reason])

        atomic_write_text(self.folder / "skipped.csv", text.getvalue())


def _prepare_worker(cache_class: type, init_args: tuple, scan: ScanRef) -> str | None:
    """Worker-process entry (module level, so "spawn" can import it); ``cache_class(*init_args)`` rebuilds the cache."""
    return cache_class(*init_args)._prepare_one(scan)
