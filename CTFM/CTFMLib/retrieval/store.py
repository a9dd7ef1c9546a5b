"""Records and on-disk layout of a retrieval index: SQLite metadata plus append-only vector files.

::

    <index>/index.sqlite      SQLite in WAL mode: table ``meta`` (key, value) and table ``scans``
    <index>/scan-g<G>.f32     one row of D float32 per scan (generation G)
    <index>/patch-g<G>.f32    one row of D float32 per patch
    <index>/faiss/            FAISS indexes built from the vector files (derived data, safe to delete)

A vector file is a 64-byte header (``b"CTFMVEC1"``, uint32 format 1, uint32 D, zero padding) followed by
rows of D little-endian float32; row r starts at byte ``64 + 4 * D * r``. How many rows are valid is
stored in SQLite (``meta.scan_rows`` / ``meta.patch_rows``), never inferred from the file size: a
writer appends and fsyncs rows *before* the SQLite commit that counts them, so a writer killed
mid-add leaves at most an uncommitted tail that readers never look at and the next writer truncates.
``compact()`` writes generation G+1 files and switches to them in one commit; files of other
generations are leftovers and are deleted by the next writer.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

HEADER = 64
MAGIC = b"CTFMVEC1"
FILE_FORMAT = 1
DB_NAME = "index.sqlite"
LEVELS = ("scan", "patch")
_NAME = re.compile(r"^(scan|patch)-g(\d+)\.f32$")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE scans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a removed scan's id never names another scan
    path TEXT NOT NULL,
    series_uid TEXT,
    patient_id TEXT,
    study_uid TEXT,
    geometry TEXT NOT NULL,                 -- JSON
    preprocessing TEXT NOT NULL,            -- JSON
    metadata TEXT NOT NULL,                 -- JSON
    model_id TEXT NOT NULL,
    weights_hash TEXT NOT NULL,
    added_at REAL NOT NULL,                 -- Unix time, seconds
    scan_row INTEGER NOT NULL,              -- row in scan-g<G>.f32
    patch_start INTEGER NOT NULL,           -- first row in patch-g<G>.f32
    patch_count INTEGER NOT NULL,
    centres BLOB NOT NULL                   -- (patch_count, 3) float64 LPS mm, little-endian
);
CREATE UNIQUE INDEX scans_key ON scans (path, ifnull(series_uid, ''));
"""


class RetrievalIndexError(RuntimeError):
    """The index cannot do what was asked; the message says why and what to do."""


IndexError_ = RetrievalIndexError  # the name used in the design notes


@dataclass
class ScanRecord:
    """What the index stores about a scan besides its vectors (all JSON-serialisable).

    geometry: {"shape": [i, j, k], "spacing": mm, "origin": LPS mm, "direction": 3x3} of the source image.
    """

    path: str
    series_uid: Optional[str] = None
    patient_id: Optional[str] = None
    study_uid: Optional[str] = None
    geometry: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass
class Hit:
    """One search result; ``similarity`` is a cosine in [-1, 1] or minus the L2 distance (larger = closer)."""

    scan_id: int
    path: str
    similarity: float
    level: str
    centre_lps: Optional[np.ndarray]  # (3,) LPS mm of the patch centre; None for scan hits
    patient_id: Optional[str]
    study_uid: Optional[str]
    record: ScanRecord


@dataclass
class Snapshot:
    """The committed state one read transaction saw.

    rows: one tuple per scan in ``index._COLUMNS`` order (11 scan_row, 12 patch_start, 13 patch_count);
    owner(level): (vector rows,) int64 position in ``rows`` of each row's scan, -1 for a removed scan's rows.
    """

    version: int
    generation: int
    scan_rows: int
    patch_rows: int
    rows: list
    owners: dict = field(default_factory=dict)  # level -> owner(level), computed once

    def owner(self, level: str) -> np.ndarray:
        if level not in self.owners:
            n = self.scan_rows if level == "scan" else self.patch_rows
            out = np.full(n, -1, dtype=np.int64)
            if self.rows:
                r = np.array([(t[11], t[12], t[13]) for t in self.rows], dtype=np.int64).reshape(-1, 3)
                if level == "scan":
                    out[r[:, 0]] = np.arange(len(r))
                else:
                    counts = r[:, 2]
                    first = np.repeat(r[:, 1] - (np.cumsum(counts) - counts), counts)
                    out[first + np.arange(counts.sum())] = np.repeat(np.arange(len(r)), counts)
            self.owners[level] = out
        return self.owners[level]



def plain(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (Path, os.PathLike)):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def geometry_dict(g) -> dict:
    """A dict as given, or the dict of a Geometry-like object (shape, spacing, origin, direction)."""
    if isinstance(g, dict) or g is None:
        return g or {}
    return {k: getattr(g, k) for k in ("shape", "spacing", "origin", "direction")}



def bytes_under(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # deleted meanwhile (compaction, a FAISS index replaced)
            pass
    return total


def merge_runs(spans) -> list:
    """(start, count) spans -> [start, stop) runs, merging spans that continue each other (few, large copies)."""
    runs = []
    for start, count in spans:
        if runs and runs[-1][1] == start:
            runs[-1][1] = start + count
        else:
            runs.append([start, start + count])
    return runs


def vector_file(root: Path, level: str, generation: int) -> Path:
    return Path(root) / f"{level}-g{generation}.f32"


def vector_files(root: Path) -> list:
    """(level, generation, path) of every vector file in ``root``."""
    out = []
    for p in Path(root).iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((m.group(1), int(m.group(2)), p))
    return out


def fsync_dir(path: Path) -> None:
    """Make a file creation/rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_vector_file(path: Path, dim: int) -> None:
    header = MAGIC + struct.pack("<II", FILE_FORMAT, dim)
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def read_header(path: Path) -> int:
    """The row width D of a vector file; ValueError when the header is not ours."""
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a CT-FM vector file (bad header)")
    fmt, dim = struct.unpack("<II", head[8:16])
    if fmt != FILE_FORMAT:
        raise ValueError(f"{path} has vector file format {fmt}; this version reads format {FILE_FORMAT}")
    return dim


def row_bytes(dim: int) -> int:
    return 4 * dim


def truncate_tail(path: Path, rows: int, dim: int) -> int:
    """Cut an uncommitted tail (a writer killed mid-add); returns the bytes removed. Call only as the writer."""
    size = HEADER + rows * row_bytes(dim)
    actual = os.path.getsize(path)
    if actual > size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        return actual - size
    return 0


def append_rows(path: Path, rows: int, dim: int, block: np.ndarray) -> int:
    """Write ``block`` (n, dim) after the ``rows`` committed rows and fsync; returns its first row.

    Anything past the committed rows is overwritten: it can only be a dead writer's tail.
    """
    block = np.ascontiguousarray(block, dtype="<f4")
    end = HEADER + rows * row_bytes(dim)
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != end:  # only then: Windows refuses to resize a file others have mapped
            f.truncate(end)
        f.seek(end)
        f.write(memoryview(block.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return rows


def copy_rows(source: np.ndarray, runs, path: Path, chunk: int = 65536) -> int:
    """Append ``source[a:b]`` for each (a, b) in ``runs`` to the empty vector file ``path``; fsync once."""
    n = 0
    with open(path, "r+b") as f:
        f.seek(HEADER)
        for a, b in runs:
            for c in range(a, b, chunk):
                block = np.ascontiguousarray(source[c:min(b, c + chunk)], dtype="<f4")
                f.write(memoryview(block.reshape(-1)).cast("B"))
                n += len(block)
        f.flush()
        os.fsync(f.fileno())
    return n


def map_rows(path: Path, rows: int, dim: int) -> np.ndarray:
    """The first ``rows`` rows of a vector file, memory-mapped read-only, shape (rows, dim) float32."""
    if rows == 0:
        read_header(path)  # still fail on a missing file, as for rows > 0
        return np.zeros((0, dim), dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode="r", offset=HEADER, shape=(rows, dim))


def centres_to_blob(centres: np.ndarray) -> bytes:
    return np.ascontiguousarray(centres, dtype="<f8").tobytes()


def blob_to_centres(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f8").reshape(-1, 3).copy()


def check_index(root: Path, conn, dim: int, model_id: str, weights_hash: str, deep: bool = False) -> list:
    """Problems of an index as plain sentences (empty = consistent); ``deep`` also scans vectors for NaN/inf.

    An uncommitted tail after the committed rows is not a problem: it is never read and the next writer cuts it.
    """
    import json

    problems = []
    quick = conn.execute("PRAGMA quick_check").fetchone()[0]
    if quick != "ok":
        problems.append(f"SQLite reports: {quick}")
    conn.execute("BEGIN")
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        rows = conn.execute("SELECT id, path, geometry, preprocessing, metadata, model_id, weights_hash, scan_row, "
                            "patch_start, patch_count, length(centres) FROM scans ORDER BY id").fetchall()
    finally:
        conn.execute("COMMIT")
    gen = int(meta["generation"])
    committed = {lv: int(meta[f"{lv}_rows"]) for lv in LEVELS}
    for lv in LEVELS:
        path = vector_file(root, lv, gen)
        try:
            if read_header(path) != dim:
                problems.append(f"{path.name} holds vectors of another length than the index's {dim}")
            elif os.path.getsize(path) < HEADER + committed[lv] * row_bytes(dim):
                problems.append(f"{path.name} is shorter than its {committed[lv]} committed rows")
        except (OSError, ValueError) as e:
            problems.append(f"{path.name}: {e}")
    scan_rows_seen, spans = set(), []
    for sid, path, geom, prep, md, mid, wh, srow, pstart, pcount, clen in rows:
        where = f"scan {sid} ({path})"
        if mid != model_id or wh != weights_hash:
            problems.append(f"{where} was embedded with model {mid} / weights {wh[:16]}..., not the index's")
        if not 0 <= srow < committed["scan"] or srow in scan_rows_seen:
            problems.append(f"{where} points at scan row {srow}, outside the committed rows or shared")
        scan_rows_seen.add(srow)
        if pstart < 0 or pcount < 0 or pstart + pcount > committed["patch"]:
            problems.append(f"{where} points at patch rows {pstart}..{pstart + pcount}, past the committed rows")
        spans.append((pstart, pstart + pcount, sid))
        if clen != 24 * pcount:
            problems.append(f"{where} has {clen // 24} patch centres for {pcount} patches")
        for name, text in (("geometry", geom), ("preprocessing", prep), ("metadata", md)):
            try:
                json.loads(text)
            except ValueError:
                problems.append(f"{where} has unreadable {name}")
    spans.sort()
    for (a0, a1, sa), (b0, b1, sb) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0:
            problems.append(f"scans {sa} and {sb} share patch rows {b0}..{min(a1, b1)}")
    if deep and not problems:
        for lv in LEVELS:
            vecs = map_rows(vector_file(root, lv, gen), committed[lv], dim)
            for a in range(0, committed[lv], 65536):
                if not np.isfinite(vecs[a:a + 65536]).all():
                    problems.append(f"{lv} vectors in rows {a}..{a + 65536} contain NaN or infinity")
    return problems
