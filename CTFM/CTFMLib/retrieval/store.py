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

Integrity: each scan's row carries ``checksum``, the SHA-256 (hex) of its scan vector's bytes
followed by its patch vectors' bytes, written in the commit that makes the scan visible (compaction
copies rows unchanged, so it stays valid). :func:`check_index` with ``deep`` verifies every scan
against it; rows of indexes made before checksums (``NULL``) are reported as unverified and checked
for what damage looks like there (all-zero or non-finite vectors). A writer never extends a vector
file that is shorter than its committed rows (that would zero-fill the missing vectors): it refuses
and names ``ctfm index check INDEX --repair``.
"""

from __future__ import annotations

import errno
import hashlib
import json
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
    centres BLOB NOT NULL,                  -- (patch_count, 3) float64 LPS mm, little-endian
    checksum TEXT                           -- SHA-256 hex of the vector bytes (NULL: added before checksums)
);
CREATE UNIQUE INDEX scans_key ON scans (path, ifnull(series_uid, ''));
"""


class RetrievalIndexError(RuntimeError):
    """The index cannot do what was asked; the message says why and what to do."""


IndexError_ = RetrievalIndexError  # the name used in the design notes


class AlreadyIndexedError(RetrievalIndexError):
    """``add()`` of a scan that is in the index already (another process may have added it meanwhile)."""

    def __init__(self, message: str, scan_id: int):
        super().__init__(message)
        self.scan_id = scan_id


NO_CHECKSUM = "no checksum (added before checksums)"


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


def json_contains(value, pattern) -> bool:
    """Whether JSON ``value`` contains ``pattern`` as PostgreSQL's jsonb ``@>`` decides: an object contains an
    object whose every key it has with a containing value, an array contains an array whose every element some
    element of it contains, scalars must be equal (true is not 1); so both index backends filter alike."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and json_contains(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        if not isinstance(value, list):
            return False
        return all(any(json_contains(v, p) for v in value) for p in pattern)
    if isinstance(value, (dict, list)):  # (jsonb's one exception, a top-level array holding a scalar, never applies:
        return False                     # metadata is an object)
    if isinstance(pattern, bool) or isinstance(value, bool):
        return isinstance(pattern, bool) and isinstance(value, bool) and pattern == value
    return value == pattern


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
    from ..files import fsync_dir as _fsync_dir

    _fsync_dir(path)


# --- messages for damage ------------------------------------------------------------------------


def repair_hint(root) -> str:
    return f"the index is damaged; run `ctfm index check {root} --repair` (it drops the damaged scans and says which)"


def missing_file_error(path: Path) -> RetrievalIndexError:
    path = Path(path)
    return RetrievalIndexError(f"vector file {path.name} is missing from {path.parent}: {repair_hint(path.parent)}, "
                               "or rebuild the index")


def short_file_error(path: Path, rows: int, dim: int, size: int) -> RetrievalIndexError:
    path = Path(path)
    whole = max(0, (size - HEADER) // row_bytes(dim))
    return RetrievalIndexError(f"vector file {path.name} is shorter than its rows: it holds {whole} of its {rows} "
                               f"committed rows (truncated or damaged); {repair_hint(path.parent)}")


def bad_header_error(path: Path, reason: str) -> RetrievalIndexError:
    path = Path(path)
    return RetrievalIndexError(f"vector file {path.name} {reason}; {repair_hint(path.parent)}, or rebuild the index")


# --- vector files ---------------------------------------------------------------------------------


def create_vector_file(path: Path, dim: int) -> None:
    header = MAGIC + struct.pack("<II", FILE_FORMAT, dim)
    # Called under the index's exclusive lock: whatever is there is a dead creator's leftover (or a planted
    # link, removed as a link), and the new file is created exclusively, so no link is ever followed.
    Path(path).unlink(missing_ok=True)
    with open(path, "xb") as f:
        f.write(header.ljust(HEADER, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def _parse_header(head: bytes, path: Path) -> int:
    if len(head) < HEADER or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a CT-FM vector file (bad header)")
    fmt, dim = struct.unpack("<II", head[8:16])
    if fmt != FILE_FORMAT:
        raise ValueError(f"{path} has vector file format {fmt}; this version reads format {FILE_FORMAT}")
    return dim


def read_header(path: Path) -> int:
    """The row width D of a vector file; ValueError when the header is not ours."""
    with open(path, "rb") as f:
        return _parse_header(f.read(HEADER), path)


def row_bytes(dim: int) -> int:
    return 4 * dim


def whole_rows(path: Path, dim: int) -> int:
    """How many whole rows the file holds (0 for a file shorter than its header)."""
    return max(0, (os.path.getsize(path) - HEADER) // row_bytes(dim))


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


def verify_vector_file(path: Path, rows: int, dim: int) -> None:
    """Refuse (:class:`RetrievalIndexError` naming the repair) a vector file that is missing, not ours, of
    another row length or shorter than its ``rows`` committed rows: what a writer must not extend."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(HEADER), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise missing_file_error(path) from None
    try:
        found = _parse_header(head, path)
    except ValueError as e:
        raise bad_header_error(path, f"has a damaged header ({str(e).split(' (')[-1].rstrip(')')})") from None
    if found != dim:
        raise bad_header_error(path, f"holds {found}-d rows, not the index's {dim}-d")
    if size < HEADER + rows * row_bytes(dim):
        raise short_file_error(path, rows, dim, size)


def append_rows(path: Path, rows: int, dim: int, block: np.ndarray) -> int:
    """Write ``block`` (n, dim) after the ``rows`` committed rows and fsync; returns its first row.

    Anything past the committed rows is overwritten: it can only be a dead writer's tail. A file
    shorter than the committed rows, missing, or with a foreign header is damage: refused with a
    :class:`RetrievalIndexError` that names ``ctfm index check --repair`` (extending it would
    zero-fill the lost vectors and hide the damage).
    """
    block = np.ascontiguousarray(block, dtype="<f4")
    end = HEADER + rows * row_bytes(dim)
    verify_vector_file(path, rows, dim)  # the caller holds the write lock: nobody changes it meanwhile
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
    """The first ``rows`` rows of a vector file, memory-mapped read-only, shape (rows, dim) float32.

    FileNotFoundError for a missing file (a reader may retry: compaction replaced it); a file shorter
    than ``rows`` rows is a :class:`RetrievalIndexError` naming the damage and the repair.
    """
    if rows == 0:
        read_header(path)  # still fail on a missing file, as for rows > 0
        return np.zeros((0, dim), dtype=np.float32)
    size = os.path.getsize(path)
    if size < HEADER + rows * row_bytes(dim):
        raise short_file_error(path, rows, dim, size)
    return np.memmap(path, dtype="<f4", mode="r", offset=HEADER, shape=(rows, dim))


def map_available(path: Path, rows: int, dim: int):
    """``(vectors, None)``: the committed rows the file still holds (at most ``rows``), or ``(None, reason)``."""
    try:
        found = read_header(path)
    except FileNotFoundError:
        return None, f"{Path(path).name} is missing"
    except (OSError, ValueError) as e:
        return None, f"{Path(path).name} is unreadable ({e})"
    if found != dim:
        return None, f"{Path(path).name} holds {found}-d vectors, not the index's {dim}-d"
    n = min(rows, whole_rows(path, dim))
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32), None
    return np.memmap(path, dtype="<f4", mode="r", offset=HEADER, shape=(n, dim)), None


def checksum(scan_vector, patch_vectors) -> str:
    """SHA-256 (hex) of a scan's vector bytes as stored: the scan vector, then its patch vectors."""
    h = hashlib.sha256()
    for part in (scan_vector, patch_vectors):
        part = np.ascontiguousarray(part, dtype="<f4")
        if part.size:  # a scan without patches adds no bytes (memoryview cannot cast an empty array)
            h.update(memoryview(part).cast("B"))
    return h.hexdigest()


def centres_to_blob(centres: np.ndarray) -> bytes:
    return np.ascontiguousarray(centres, dtype="<f8").tobytes()


def blob_to_centres(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f8").reshape(-1, 3).copy()


def has_checksums(conn) -> bool:
    """Whether the ``scans`` table has the ``checksum`` column (indexes made before it do not)."""
    return any(r[1] == "checksum" for r in conn.execute("PRAGMA table_info(scans)"))


# --- checking -------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What :func:`check_index` found.

    problems: sentences (empty = consistent); notes: facts that are not damage (scans without a
    checksum); damaged: {scan id: (path, series_uid, reason)}, the scans :meth:`VectorIndex.repair`
    drops; fatal: problems a repair cannot fix (SQLite's own file is damaged: rebuild).
    """

    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    damaged: dict = field(default_factory=dict)
    fatal: list = field(default_factory=list)
    scans: int = 0

    def as_dict(self) -> dict:
        return {"consistent": not self.problems, "scans": self.scans, "problems": list(self.problems),
                "notes": list(self.notes), "fatal": list(self.fatal),
                "damaged": [{"scan_id": sid, "path": p, "series_uid": s, "reason": r}
                            for sid, (p, s, r) in sorted(self.damaged.items())]}


def check_index(root: Path, conn, dim: int, model_id: str, weights_hash: str, deep: bool = False,
                in_transaction: bool = False) -> CheckReport:
    """Problems of an index as plain sentences in a :class:`CheckReport` (no problems = consistent).

    ``deep`` also reads every committed vector: each scan is verified against its checksum (scans
    without one: no NaN/infinity and no all-zero vector, the marks of a zero-filled file). An
    uncommitted tail after the committed rows is not a problem: it is never read and the next
    writer cuts it. ``in_transaction``: the caller holds a transaction (the repair does).
    """
    import json

    report = CheckReport()
    quick = conn.execute("PRAGMA quick_check").fetchone()[0]
    if quick != "ok":
        report.fatal.append(f"SQLite reports: {quick}")
    checked = has_checksums(conn)
    columns = ("id, path, series_uid, geometry, preprocessing, metadata, model_id, weights_hash, scan_row, "
               "patch_start, patch_count, length(centres), " + ("checksum" if checked else "NULL"))
    if not in_transaction:
        conn.execute("BEGIN")
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        rows = conn.execute(f"SELECT {columns} FROM scans ORDER BY id").fetchall()
    finally:
        if not in_transaction:
            conn.execute("COMMIT")
    report.scans = len(rows)
    gen = int(meta["generation"])
    committed = {lv: int(meta[f"{lv}_rows"]) for lv in LEVELS}
    available, lost = {}, {}  # level -> committed rows the file really holds; why the others are lost
    for lv in LEVELS:
        path = vector_file(root, lv, gen)
        lost[lv] = f"past the end of {path.name}"
        try:
            if read_header(path) != dim:
                report.problems.append(f"{path.name} holds vectors of another length than the index's {dim}")
                available[lv], lost[lv] = 0, f"unreadable ({path.name} holds vectors of another length)"
            else:
                available[lv] = min(committed[lv], whole_rows(path, dim))
                if available[lv] < committed[lv]:
                    report.problems.append(f"{path.name} is shorter than its {committed[lv]} committed rows "
                                           f"(it holds {available[lv]})")
        except FileNotFoundError:
            report.problems.append(f"{path.name} is missing")
            available[lv], lost[lv] = 0, f"lost ({path.name} is missing)"
        except (OSError, ValueError) as e:
            report.problems.append(f"{path.name}: {e}")
            available[lv], lost[lv] = 0, f"lost ({path.name} is unreadable)"

    def damage(sid, path, series, reason):
        if sid not in report.damaged:
            report.damaged[sid] = (path, series, reason)
            report.problems.append(f"scan {sid} ({path}{f', series {series}' if series else ''}): {reason}")

    scan_rows_seen, spans, unverified = {}, [], 0
    for sid, path, series, geom, prep, md, mid, wh, srow, pstart, pcount, clen, digest in rows:
        if mid != model_id or wh != weights_hash:
            damage(sid, path, series, f"embedded with model {mid} / weights {wh[:16]}..., not the index's")
        if not 0 <= srow < committed["scan"] or srow in scan_rows_seen:
            damage(sid, path, series, f"points at scan row {srow}, outside the committed rows or shared")
        scan_rows_seen.setdefault(srow, sid)
        if pstart < 0 or pcount < 0 or pstart + pcount > committed["patch"]:
            damage(sid, path, series, f"points at patch rows {pstart}..{pstart + pcount}, past the committed rows")
        spans.append((pstart, pstart + pcount, sid))
        if clen != 24 * pcount:
            damage(sid, path, series, f"has {clen // 24} patch centres for {pcount} patches")
        for name, text in (("geometry", geom), ("preprocessing", prep), ("metadata", md)):
            try:
                json.loads(text)
            except ValueError:
                damage(sid, path, series, f"has unreadable {name}")
        if sid in report.damaged:
            continue
        if srow >= available["scan"]:
            damage(sid, path, series, f"its scan vector is {lost['scan']} and its patch vectors are {lost['patch']}"
                   if pcount and pstart + pcount > available["patch"] else f"its scan vector is {lost['scan']}")
        elif pcount and pstart + pcount > available["patch"]:
            damage(sid, path, series, f"its patch vectors are {lost['patch']}")
        if digest is None:
            unverified += 1
    spans.sort()
    for (a0, a1, sa), (b0, b1, sb) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0:
            report.problems.append(f"scans {sa} and {sb} share patch rows {b0}..{min(a1, b1)}")
    if deep:
        _verify_vectors(root, gen, dim, committed, available, rows, report, damage)
    if unverified:
        report.notes.append(f"{unverified} of {len(rows)} scans have {NO_CHECKSUM}: "
                            + ("only NaN and all-zero vectors were looked for there" if deep else "not verified"))
    report.problems[:0] = report.fatal
    return report


def _verify_vectors(root, gen, dim, committed, available, rows, report, damage) -> None:
    """The deep part of :func:`check_index`: every committed vector of every intact-looking scan."""
    vectors = {}
    for lv in LEVELS:
        if available[lv]:
            vectors[lv] = np.memmap(vector_file(root, lv, gen), dtype="<f4", mode="r", offset=HEADER,
                                    shape=(available[lv], dim))
    for sid, path, series, *_, srow, pstart, pcount, clen, digest in rows:
        if sid in report.damaged:
            continue
        s = np.asarray(vectors["scan"][srow])
        p = np.asarray(vectors["patch"][pstart:pstart + pcount]) if pcount else np.zeros((0, dim), np.float32)
        if digest is not None:
            if checksum(s, p) != digest:
                damage(sid, path, series, "its vectors do not match their checksum (changed on disk since added)")
            continue
        if not (np.isfinite(s).all() and np.isfinite(p).all()):
            damage(sid, path, series, "its vectors contain NaN or infinity")
            continue
        zeros = int(not s.any()) + int((~p.any(axis=1)).sum()) if p.size else int(not s.any())
        if zeros:
            damage(sid, path, series, f"{zeros} of its {1 + pcount} vectors are all zeros (zero-filled: lost)")
    # rows of removed scans are never read; rows beyond them only by a repair's copy, which skips them
    del vectors


# --- SQLite and OS errors as one line --------------------------------------------------------------


def low_on_space(root, limit: int = 1 << 20) -> bool:
    """Whether the disk holding ``root`` has less than ``limit`` bytes free (1 MiB)."""
    import shutil

    try:
        return shutil.disk_usage(root).free < limit
    except OSError:
        return False


def index_error(e: BaseException, root) -> RetrievalIndexError:
    """One line for a failed SQLite or file operation on the index at ``root``, naming the cause."""
    root = Path(root)
    db = root / DB_NAME
    text = str(e).strip() or type(e).__name__
    low = text.lower()
    full = f"no space left on the disk that holds {root}: free some space and run again (the index is unchanged)"
    if isinstance(e, OSError):
        if getattr(e, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return RetrievalIndexError(full)
        name = getattr(e, "filename", None)
        if isinstance(e, FileNotFoundError) and name and _NAME.match(Path(str(name)).name):
            return missing_file_error(Path(str(name)))
        if getattr(e, "errno", None) == errno.EROFS:
            return RetrievalIndexError(f"{root} is on a read-only disk: `ctfm index add/remove/compact` need to "
                                       "write there; query, info and eval work")
        if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
            return RetrievalIndexError(f"not allowed to change files in {root}: check its permissions")
        return RetrievalIndexError(f"the index {root} could not be used: {e.strerror or text}"
                                   + (f" ({name})" if name else ""))
    if "not a database" in low:
        return RetrievalIndexError(f"{root} is not a CT-FM index ({DB_NAME} is not a SQLite database: file is not "
                                   "a database): rebuild the index")
    if "disk is full" in low or ("disk i/o" in low and low_on_space(root)):
        return RetrievalIndexError(full)
    if "locked" in low or "busy" in low:
        return RetrievalIndexError(f"another process is writing to {root}: let it finish, then retry")
    if "readonly" in low or "read-only" in low:
        return RetrievalIndexError(f"{db} cannot be written (read-only disk or file): `ctfm index add/remove/"
                                   "compact` need to write there; query, info and eval work")
    if "disk i/o" in low:
        return RetrievalIndexError(f"{db} could not be read or written (disk I/O error): check the disk and its "
                                   "free space, then run again")
    if "unable to open" in low:
        return RetrievalIndexError(f"{db} cannot be opened: check that its folder exists and that you may read "
                                   "(and, to change the index, write) it")
    return RetrievalIndexError(f"{db} cannot be read ({text}); rebuild the index")


def to_json(value, what: str) -> str:
    """``value`` as the JSON text an index stores (sorted keys; numpy values as plain ones); refused in one line."""
    try:
        return json.dumps(value, default=plain, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise RetrievalIndexError(f"the scan's {what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}")


def opt_str(v) -> Optional[str]:
    return None if v is None else str(v)


def as_set(v) -> set:
    """The ids a filter names: one id, or a collection of them, as strings."""
    if v is None:
        return set()
    return {str(v)} if isinstance(v, (str, int)) else {str(x) for x in v}


def check_vectors(dim: int, scan_vector, patch_vectors, patch_centres_lps) -> tuple:
    """``(scan (D,) float32, patches (N, D) float32, centres (N, 3) float64)`` of one scan, refused in one line
    (:class:`RetrievalIndexError`) unless the shapes fit an index of ``dim``-d vectors and every value is finite."""
    s = np.asarray(scan_vector, dtype=np.float32)
    p = np.asarray(patch_vectors, dtype=np.float32)
    c = np.asarray(patch_centres_lps, dtype=np.float64)
    if p.size == 0:  # a scan without patches
        p, c = p.reshape(0, dim), c.reshape(-1, 3)
    if s.shape != (dim,) or p.ndim != 2 or p.shape[1] != dim:
        raise RetrievalIndexError(f"this index holds {dim}-d vectors; got a scan vector of shape {s.shape} "
                                  f"and patch vectors of shape {p.shape}: embed with the index's model")
    if c.shape != (len(p), 3):
        raise RetrievalIndexError(f"{len(p)} patch vectors need ({len(p)}, 3) LPS centres; got shape {c.shape}")
    if not (np.isfinite(s).all() and np.isfinite(p).all() and np.isfinite(c).all()):
        raise RetrievalIndexError("vectors or centres contain NaN or infinity: the embedding failed; not added")
    return s, p, c


def refuse_other_weights(index, model_id=None, weights_hash=None) -> None:
    """Refuse (one line) ``model_id``/``weights_hash`` that differ from those ``index`` (either kind) was built
    with: vectors of different weights are not comparable."""
    hash_differs = weights_hash is not None and str(weights_hash).lower() != index.weights_hash
    if hash_differs or (model_id is not None and str(model_id) != index.model_id):
        given = ([f"model '{model_id}'"] if model_id is not None else []) + (
            [f"weights sha256 {str(weights_hash).lower()[:16]}..."] if weights_hash is not None else [])
        raise RetrievalIndexError(
            f"{index.root} was built with model '{index.model_id}' (weights sha256 {index.weights_hash[:16]}...), "
            f"not with {' and '.join(given)}. Vectors of different weights are not comparable: use the weights "
            "the index was built with, or build a separate index for these weights (`ctfm index reembed "
            "INDEX NEW_INDEX --weights ...` re-embeds all its scans).")
