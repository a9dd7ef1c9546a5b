"""Organ statistics: per structure of a label map, its size, its HU values, where it lies and whether it is cut off.

For each label value present (0 is background) on the image's own grid:

- ``voxels``; ``volume`` in mm3 and ``intensity`` (the mean HU): the two fields of TotalSegmentator's
  ``statistics.json`` (``{structure: {"volume": mm3, "intensity": mean}}``), same names and units, so tools
  that read that file read ours; ``volume_ml`` = ``volume`` / 1000;
- ``hu_mean``, ``hu_std`` (population), ``hu_min``, ``hu_max`` of the image under the mask;
- ``centroid_lps``: the mean voxel index mapped through the image geometry (oblique grids included), mm;
- ``bbox_index`` (``min``/``max``, inclusive voxel indices i, j, k) and ``bbox_lps``: the LPS box around the
  centres of that index box's eight corner voxels;
- ``touches_border``: the mask reaches the first or last index along an axis, so the structure may go on
  outside the field of view and its volume is a lower bound (``note`` says so; TotalSegmentator zeroes such
  structures instead, we keep the measured values and flag them).

Bounded memory: the label map is read once, in slabs along its slowest axis in memory; per slab only the
foreground voxels are gathered, per-label sums come from ``np.bincount`` (an integer CT's sums are kept exactly,
so the numbers do not depend on the slabs; a float CT's means and squared deviations are merged across slabs
with Chan's formula, which loses no precision), minima and maxima from
``np.minimum.at``/``np.maximum.at``, and per-axis histograms of (label, index) give the centroid, the bounding
box and the border flag. Torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .image import Geometry, Image, ImageError

__all__ = [
    "SLAB_VOXELS", "BORDER_NOTE", "CSV_COLUMNS",
    "structure_statistics", "statistics_rows", "statistics_json", "statistics_csv", "csv_path_for",
    "write_statistics",
]  # fmt: skip

SLAB_VOXELS = 1 << 22  # voxels per slab (4 Mi: with the temporaries about 150 MB at most)
_EXACT_CHUNK = 1 << 20
MAX_LABEL = 65535  # the per-axis histograms hold (label value x axis length) bins
BORDER_NOTE = ("touches the image border: the structure may continue outside the field of view, so its volume "
               "is a lower bound")
_AXES = ("x", "y", "z")
_INDEX = ("i", "j", "k")
CSV_COLUMNS = (
    ["structure", "label", "voxels", "volume", "volume_ml", "intensity", "hu_mean", "hu_std", "hu_min", "hu_max"]
    + [f"centroid_lps_{a}" for a in _AXES]
    + [f"bbox_index_{end}_{a}" for end in ("min", "max") for a in _INDEX]
    + [f"bbox_lps_{end}_{a}" for end in ("min", "max") for a in _AXES]
    + ["touches_border", "note"]
)


class _Accumulator:
    """Per-structure running statistics; label values are numbered in the order they turn up (``index``), so the
    arrays hold one row per structure present, however large its value."""

    def __init__(self, shape: tuple, exact: bool):
        self.shape = shape
        self.exact = exact  # integer HU of at most 16 bits: sums kept exactly, in int64
        self.s1 = np.zeros(0, np.int64)
        self.s2 = np.zeros(0, np.int64)
        self.index = np.full(MAX_LABEL + 1, -1, np.intp)  # label value -> row
        self.values = []  # row -> label value
        self.n = np.zeros(0, np.int64)
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)
        self.lo = np.zeros(0)
        self.hi = np.zeros(0)
        self.hist = [np.zeros((0, n), np.int64) for n in shape]

    def _rows(self, label: np.ndarray) -> np.ndarray:
        new = [int(v) for v in np.flatnonzero(np.bincount(label)) if self.index[v] < 0]
        if new:
            self.index[new] = np.arange(len(self.values), len(self.values) + len(new))
            self.values += new
            extra = len(new)
            self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
            self.s1 = np.concatenate([self.s1, np.zeros(extra, np.int64)])
            self.s2 = np.concatenate([self.s2, np.zeros(extra, np.int64)])
            self.mean = np.concatenate([self.mean, np.zeros(extra)])
            self.m2 = np.concatenate([self.m2, np.zeros(extra)])
            self.lo = np.concatenate([self.lo, np.full(extra, np.inf)])
            self.hi = np.concatenate([self.hi, np.full(extra, -np.inf)])
            self.hist = [np.concatenate([h, np.zeros((extra, h.shape[1]), np.int64)]) for h in self.hist]
        return self.index[label]

    def add(self, label: np.ndarray, value: np.ndarray, coords: list) -> None:
        """One slab's foreground voxels: their label values, image values and (i, j, k) indices."""
        row = self._rows(label)
        size = len(self.values)
        n = np.bincount(row, minlength=size)
        if self.exact:  # float64 sums of < 2**20 values below 2**32 are exact integers
            for start in range(0, row.size, _EXACT_CHUNK):
                r, v = row[start:start + _EXACT_CHUNK], value[start:start + _EXACT_CHUNK]
                self.s1 += np.bincount(r, v, minlength=size).astype(np.int64)
                self.s2 += np.bincount(r, v * v, minlength=size).astype(np.int64)
        seen = n > 0
        mean = np.bincount(row, value, minlength=size)
        mean[seen] /= n[seen]
        m2 = np.bincount(row, (value - mean[row]) ** 2, minlength=size)
        total = self.n + n
        delta = mean - self.mean
        weight = np.where(seen, n / np.maximum(total, 1), 0.0)
        # Chan et al.: merge (n_a, mean_a, M2_a) with the slab's (n_b, mean_b, M2_b) without losing precision
        self.m2 += m2 + delta ** 2 * self.n * weight
        self.mean += delta * weight
        self.n = total
        np.minimum.at(self.lo, row, value)
        np.maximum.at(self.hi, row, value)
        for axis, c in enumerate(coords):
            length = self.shape[axis]
            self.hist[axis] += np.bincount(row * length + c, minlength=size * length).reshape(size, length)


def _names_for(values, names: Optional[dict]) -> dict:
    """``{value: structure name}``: the given names, else ``label_<value>``; a repeated name gets ``_<value>``."""
    out, used = {}, set()
    for v in values:
        name = str((names or {}).get(int(v)) or f"label_{int(v)}")
        if name in used:
            name = f"{name}_{int(v)}"
        used.add(name)
        out[int(v)] = name
    return out


def _slow_axis(array: np.ndarray) -> int:
    """The axis with the largest stride: slabs along it are contiguous (``k`` for an image read from a file)."""
    strides = [abs(s) if n > 1 else 0 for s, n in zip(array.strides, array.shape)]
    return max(range(3), key=lambda a: (strides[a], a))


def _integral_labels(slab: np.ndarray) -> np.ndarray:
    """A slab of label values as non-negative integers; refuses fractions, negatives and huge values."""
    if slab.dtype.kind == "b":
        return slab.astype(np.uint8)
    if slab.dtype.kind == "f":
        if not np.all(np.isfinite(slab)) or not np.all(slab == np.round(slab)):
            raise ImageError("the label map holds values that are not whole numbers: give a label map, not an image")
    elif slab.dtype.kind not in "iu":
        raise ImageError(f"the label map holds {slab.dtype} values: give a label map of integers")
    if slab.size and (slab.min() < 0 or slab.max() > MAX_LABEL):
        raise ImageError(f"the label map holds values outside 0..{MAX_LABEL}: give a label map of structure numbers")
    return slab


def structure_statistics(image: Image, labels: Image, names: Optional[dict] = None,
                         slab: Optional[int] = None) -> dict:
    """``{structure name: {...}}`` for every label value present in ``labels`` (see the module docstring),
    in increasing label value; ``names`` is ``{value: name}`` (a sidecar's), ``slab`` the planes per slab
    (default: about :data:`SLAB_VOXELS` voxels). ``labels`` must lie on ``image``'s grid (ImageError)."""
    if not labels.geometry.same_grid(image.geometry):
        raise ImageError(f"the label map is not on the image's grid (label map {_grid(labels.geometry)}; image "
                         f"{_grid(image.geometry)}): give the label map made from this image")
    lab, img = labels.array, image.array
    axis = _slow_axis(lab)
    shape = lab.shape
    plane = int(np.prod(shape)) // max(shape[axis], 1)
    step = int(slab) if slab else max(1, SLAB_VOXELS // max(plane, 1))
    others = [a for a in range(3) if a != axis]
    acc = _Accumulator(shape, exact=img.dtype.kind in "iub" and img.dtype.itemsize <= 2)
    for start in range(0, shape[axis], step):
        cut = [slice(None)] * 3
        cut[axis] = slice(start, min(start + step, shape[axis]))
        order = (axis, *others)  # the slab as [slow, a, b], C order: flat indices decode in that order
        part = np.ascontiguousarray(lab[tuple(cut)].transpose(order)).reshape(-1)
        part = _integral_labels(part)
        fg = np.flatnonzero(part)
        if fg.size == 0:
            continue
        label = part[fg].astype(np.intp)
        value = np.ascontiguousarray(img[tuple(cut)].transpose(order)).reshape(-1)[fg].astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise ImageError("the image holds NaN or infinite values under the label map: give a CT in HU")
        n_a, n_b = shape[others[0]], shape[others[1]]
        coords = [None] * 3
        coords[axis] = fg // (n_a * n_b) + start
        coords[others[0]] = (fg // n_b) % n_a
        coords[others[1]] = fg % n_b
        del fg, part
        acc.add(label, value, coords)
    return _finish(acc, image.geometry, names)


def _finish(acc: _Accumulator, geometry: Geometry, names: Optional[dict]) -> dict:
    rows = sorted(range(len(acc.values)), key=lambda r: acc.values[r])
    named = _names_for([acc.values[r] for r in rows], names)
    voxel_mm3 = float(np.prod(geometry.spacing))
    out = {}
    for r in rows:
        v, n = acc.values[r], int(acc.n[r])
        index_sum = [float(h[r] @ np.arange(h.shape[1], dtype=np.float64)) for h in acc.hist]
        nonzero = [np.flatnonzero(h[r]) for h in acc.hist]
        lo = [int(nz[0]) for nz in nonzero]
        hi = [int(nz[-1]) for nz in nonzero]
        corners = np.array([[(lo, hi)[c >> a & 1][a] for a in range(3)] for c in range(8)], np.float64)
        corners_lps = geometry.index_to_physical(corners)
        touches = any(lo[a] == 0 or hi[a] == geometry.shape[a] - 1 for a in range(3))
        volume = n * voxel_mm3
        mean, var = float(acc.mean[r]), max(float(acc.m2[r]) / n, 0.0)
        if acc.exact:  # the same numbers whatever the slabs: from exact integer sums
            s1, s2 = int(acc.s1[r]), int(acc.s2[r])
            mean, var = s1 / n, (n * s2 - s1 * s1) / (n * n)
        out[named[v]] = {
            "label": v, "voxels": n, "volume": volume, "volume_ml": volume / 1000.0, "intensity": mean,
            "hu_mean": mean, "hu_std": math.sqrt(var),
            "hu_min": float(acc.lo[r]), "hu_max": float(acc.hi[r]),
            "centroid_lps": geometry.index_to_physical(np.array(index_sum) / n).tolist(),
            "bbox_index": {"min": lo, "max": hi},
            "bbox_lps": {"min": corners_lps.min(axis=0).tolist(), "max": corners_lps.max(axis=0).tolist()},
            "touches_border": touches, "note": BORDER_NOTE if touches else None,
        }
    return out


def _grid(g: Geometry) -> str:
    return ("x".join(str(n) for n in g.shape) + " voxels at " + "x".join(f"{s:g}" for s in g.spacing) + " mm, origin "
            + ", ".join(f"{o:g}" for o in g.origin))


def statistics_rows(stats: dict) -> list:
    """One flat row per structure, the columns of :data:`CSV_COLUMNS` (for the CSV and Slicer's table)."""
    rows = []
    for name, s in stats.items():
        row = {"structure": name, **{k: s[k] for k in CSV_COLUMNS[1:10]}}
        row.update({f"centroid_lps_{a}": s["centroid_lps"][n] for n, a in enumerate(_AXES)})
        for end in ("min", "max"):
            row.update({f"bbox_index_{end}_{a}": s["bbox_index"][end][n] for n, a in enumerate(_INDEX)})
            row.update({f"bbox_lps_{end}_{a}": s["bbox_lps"][end][n] for n, a in enumerate(_AXES)})
        row.update({"touches_border": s["touches_border"], "note": s["note"] or ""})
        rows.append(row)
    return rows


def statistics_json(stats: dict) -> str:
    """stats.json's text: ``{structure: {...}}`` as TotalSegmentator's statistics.json, plus our fields."""
    return json.dumps(stats, indent=1) + "\n"


def statistics_csv(stats: dict) -> str:
    """The CSV's text: a header of :data:`CSV_COLUMNS` and one row per structure."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(statistics_rows(stats))
    return text.getvalue()


def csv_path_for(json_path) -> Path:
    """The CSV written beside ``stats.json``: the same stem, ``.csv``."""
    path = Path(json_path)
    return path.with_name((path.name[:-5] if path.name.lower().endswith(".json") else path.name) + ".csv")


def write_statistics(stats: dict, json_path=None, csv_path=None, overwrite: bool = False) -> list:
    """Write the JSON and/or the CSV together, atomically (:func:`CTFMLib.files.atomic_outputs`); returns them."""
    from .files import atomic_outputs

    outputs = [(Path(p), text) for p, text in ((json_path, statistics_json), (csv_path, statistics_csv)) if p]
    with atomic_outputs([p for p, _ in outputs], overwrite=overwrite) as temporaries:
        for (_, text), tmp in zip(outputs, temporaries):
            tmp.write_text(text(stats), encoding="utf-8")
    return [p for p, _ in outputs]
