"""An embedded, crash-safe vector index of CT scans: one vector per scan and one per patch.

Records, layout and file format: :mod:`CTFMLib.retrieval.store`; search backends: :mod:`CTFMLib.retrieval.search`.

- **One set of weights.** An index records the model id and weights sha256 it was built with and
  refuses vectors (``add``), queries (``search``) or an ``open`` that name other weights: vectors of
  different weights are not comparable, so one search never mixes them.
- **Crash safety.** ``add``/``update`` take SQLite's write lock (``BEGIN IMMEDIATE``), append the
  vectors after the committed rows, fsync them, and only then commit the scan's row ranges and its
  checksum. A process killed at any point leaves either the whole scan or none of it; bytes past the
  committed rows are never read and are cut by the next writer (or by ``open`` when no writer is
  active, or at once when the write fails or is interrupted by SIGTERM/SIGINT).
- **Integrity.** :meth:`VectorIndex.check_report` with ``deep`` verifies every scan against its
  checksum; a writer refuses to extend a vector file shorter than its committed rows; and
  :meth:`VectorIndex.repair` (``ctfm index check INDEX --repair``) drops the damaged scans by writing
  a new generation of only the intact ones.
- **Atomic creation.** :meth:`VectorIndex.create` creates the vector files, schema and meta while it
  holds SQLite's exclusive lock on ``index.sqlite``: a second creator waits, then finds the index
  (``open_or_create`` opens it; ``create`` refuses), so no creator ever truncates another's files.
- **Concurrency.** One writer at a time (others wait up to ``timeout`` seconds), any number of
  readers in other processes: SQLite's WAL gives each search a consistent snapshot of the committed
  rows, and vector files only ever grow past them, so a reader sees whole scans only.
- **Read-only media.** Readers (``readonly=True``) open SQLite read-only (``mode=ro``) and, where
  the folder cannot be written (a DVD, a read-only share) or the disk is full, as ``immutable``;
  SQLite and file errors become one-line :class:`RetrievalIndexError` naming the cause.
- Not for network file systems (SQLite WAL needs shared memory on one machine).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from . import search as _search
from . import store
from .store import (  # noqa: F401  (defined with the storage, used from here)
    AlreadyIndexedError,
    CheckReport,
    Hit,
    IndexError_,
    RetrievalIndexError,
    ScanRecord,
)

FORMAT = 1
_COLUMNS = ("id, path, series_uid, patient_id, study_uid, geometry, preprocessing, metadata, model_id, weights_hash, "
            "added_at, scan_row, patch_start, patch_count, centres")
_WRITTEN = _COLUMNS[4:] + ", checksum"  # what add/update write (the id is SQLite's)
_CREATOR_WAIT_S = 2.0  # how long an open waits for a creator that made index.sqlite but has not filled it yet
_LOW_SPACE = 256 * 1024  # bytes: below this a reader opens immutable rather than create SQLite's -shm file


def _guarded(method):
    """SQLite and file errors of a public method become one :class:`RetrievalIndexError` line with the cause."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RetrievalIndexError, sqlite3.ProgrammingError):  # the latter: a closed index, a caller's mistake
            raise
        except (sqlite3.Error, OSError) as e:
            raise store.index_error(e, self.root) from e

    return wrapper


class VectorIndex:
    """Scan- and patch-level vectors of one model's embeddings; see the module docstring.

    Use :meth:`create` or :meth:`open`; one instance may be shared by threads (calls are serialised).
    """

    def __init__(self, root: Path, conn: sqlite3.Connection, meta: dict, readonly: bool, timeout: float):
        self.root, self._conn, self.readonly, self.timeout = root, conn, readonly, timeout
        self.model_id, self.weights_hash = meta["model_id"], meta["weights_hash"]
        self.dim, self.preprocessing = int(meta["dim"]), json.loads(meta["preprocessing"])
        self._lock = threading.RLock()
        self._snap: Optional[store.Snapshot] = None
        self._views = {}
        self._records = {}
        self._faiss = _search.FaissCache(root, save=not readonly)
        self._checksums = None  # whether the scans table has the checksum column (None: not looked yet)
        self._tidy = False  # a reader that made SQLite's -wal/-shm files removes them when it is the last to close

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, model_id: str, weights_hash: str, dim: int, preprocessing: Optional[dict] = None,
               timeout: float = 60.0) -> "VectorIndex":
        """A new, empty index in folder ``path`` (created; an existing folder must not hold an index).

        Atomic: made under SQLite's exclusive lock, so of two concurrent creators one creates and the
        other then finds the index and is refused ("already holds"); :meth:`open_or_create` opens it instead.
        """
        return cls._create(Path(path), model_id, weights_hash, dim, preprocessing, timeout, exist_ok=False)

    @classmethod
    def _create(cls, root: Path, model_id, weights_hash, dim, preprocessing, timeout, exist_ok) -> "VectorIndex":
        _refuse_file(root)
        if not model_id or not weights_hash or int(dim) < 1:
            raise RetrievalIndexError("create() needs a model id, the weights' sha256 and the vector length (dim >= 1)")
        meta = {"format": str(FORMAT), "model_id": str(model_id), "weights_hash": str(weights_hash).lower(),
                "dim": str(int(dim)), "preprocessing": store.to_json(preprocessing or {}, "preprocessing"),
                "created_at": repr(time.time()), "generation": "0", "scan_rows": "0", "patch_rows": "0",
                "version": "0"}
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store.index_error(e, root) from None
        _refuse_unwritable(root)
        try:
            conn = sqlite3.connect(str(root / store.DB_NAME), timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise store.index_error(e, root) from e
        made = []
        try:
            # The lock comes first: a second creator waits here, and then sees the first one's index.
            conn.execute("BEGIN EXCLUSIVE")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                if tables:
                    raise RetrievalIndexError(f"{root / store.DB_NAME} is a SQLite database but not a CT-FM index: "
                                              "choose another folder")
                for level in store.LEVELS:  # an empty database: no committed rows anywhere, so nothing to keep
                    made.append(store.vector_file(root, level, 0))
                    store.create_vector_file(made[-1], int(dim))
                for statement in store.SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")
                made = []
                _use_wal(conn)
                conn.execute("PRAGMA synchronous = FULL")
                store.fsync_dir(root)
                index = cls(root, conn, meta, False, timeout)
                index._checksums = True
                return index
            conn.execute("ROLLBACK")
        except BaseException as e:
            if conn.in_transaction:
                for p in made:  # still holding the lock: nobody else has seen them
                    _search.unlink_quietly(p)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            conn.close()
            if isinstance(e, (sqlite3.Error, OSError)):
                raise store.index_error(e, root) from e
            raise
        conn.close()
        if not exist_ok:
            raise RetrievalIndexError(f"{root} already holds a retrieval index: open it, or choose another folder")
        return cls._opened_for(root, model_id, weights_hash, dim, preprocessing, timeout)

    @classmethod
    def _opened_for(cls, root, model_id, weights_hash, dim, preprocessing, timeout) -> "VectorIndex":
        """The existing index at ``root``, refused unless it has these weights, this length and these settings."""
        index = cls.open(root, model_id, weights_hash, timeout=timeout)
        problem = None
        if index.dim != int(dim):
            problem = f"{root} holds {index.dim}-d vectors, not {dim}-d: use another index folder"
        elif preprocessing is not None and json.loads(store.to_json(preprocessing, "preprocessing")) != index.preprocessing:
            problem = (f"{root} was built with other settings ({json.dumps(index.preprocessing, sort_keys=True)}): "
                       "vectors of other settings do not mix; use another index folder")
        if problem:
            index.close()
            raise RetrievalIndexError(problem)
        return index

    @classmethod
    def open(cls, path, model_id: Optional[str] = None, weights_hash: Optional[str] = None, readonly: bool = False,
             timeout: float = 60.0) -> "VectorIndex":
        """Open an index; refuses when ``model_id``/``weights_hash`` are given and differ from the index's.

        ``readonly``: SQLite is opened read-only (``mode=ro``), and ``immutable`` where the folder cannot be
        written or the disk is full, so a read-only copy (DVD, share) can be searched. A writable open of a
        read-only folder is refused with a one-line reason.
        """
        root = Path(path)
        _refuse_file(root)
        if not (root / store.DB_NAME).is_file():
            raise RetrievalIndexError(f"{root} is not a retrieval index (no {store.DB_NAME}): create one first "
                                      "(`ctfm index add INDEX SCANS...`)")
        if not readonly:
            _refuse_unwritable(root)
        conn, meta, tidy = _open_database(root, readonly, timeout)
        if "format" not in meta:
            conn.close()
            raise RetrievalIndexError(f"{root} is an incompletely created index: delete the folder and create it again")
        if int(meta["format"]) != FORMAT:
            conn.close()
            raise RetrievalIndexError(f"{root} has index format {meta['format']}; this version reads format {FORMAT}: "
                                      "update CT-FM or rebuild the index")
        index = cls(root, conn, meta, readonly, timeout)
        index._tidy = tidy
        try:
            index._refuse_other_weights(model_id, weights_hash)
        except RetrievalIndexError:
            index.close()
            raise
        if not readonly:
            index._repair()
        return index

    @classmethod
    def open_or_create(cls, path, model_id: str, weights_hash: str, dim: int, preprocessing: Optional[dict] = None,
                       timeout: float = 60.0) -> "VectorIndex":
        """The index at ``path``, created when there is none (atomically: concurrent callers get one index).

        Refused unless an existing index has these weights, this vector length and (when given) these settings.
        """
        root = Path(path)
        db = root / store.DB_NAME
        if db.is_file() and db.stat().st_size > 0:
            return cls._opened_for(root, model_id, weights_hash, dim, preprocessing, timeout)
        return cls._create(root, model_id, weights_hash, dim, preprocessing, timeout, exist_ok=True)

    def close(self) -> None:
        """Close SQLite and let go of the mapped vector files (a removable disk can be unmounted)."""
        with self._lock:
            self._conn.close()
            self._snap, self._views, self._records = None, {}, {}
            self._faiss.mem.clear()
            if self._tidy:
                self._tidy = False
                _tidy_sidecars(self.root)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_guarded
    def __len__(self) -> int:
        return len(self._snapshot().rows)

    def _refuse_other_weights(self, model_id=None, weights_hash=None) -> None:
        store.refuse_other_weights(self, model_id, weights_hash)

    # ---- writing -------------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """A write transaction holding SQLite's write lock; yields the current meta dict.

        On any failure (a refusal, a full disk, SIGTERM/SIGINT) the transaction is rolled back and what it
        appended to the vector files is cut again while the lock is still held. An index made before
        checksums gets its ``checksum`` column here, in the first write transaction.
        """
        if self.readonly:
            raise RetrievalIndexError(f"{self.root} was opened read-only; open it with readonly=False to change it")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):
                    raise RetrievalIndexError(f"another process is writing to {self.root} (waited "
                                              f"{self.timeout:g} s): let it finish, then retry") from e
                raise store.index_error(e, self.root) from e
            meta, upgraded = None, False
            try:
                meta = dict(self._conn.execute("SELECT key, value FROM meta"))
                if not self._checksums and not store.has_checksums(self._conn):
                    self._conn.execute("ALTER TABLE scans ADD COLUMN checksum TEXT")
                    upgraded = True
                yield meta
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # still the only writer: cut what this transaction appended
                    if meta is not None:
                        self._cut_tails(meta)
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolled back already: the real error follows
                elif meta is not None:  # a failed COMMIT (disk full) that SQLite rolled back, lock and all
                    self._cut_tails_as_writer()
                raise
            if upgraded or self._checksums is None:
                self._checksums = True

    def _cut_tails_as_writer(self) -> None:
        """Take the write lock again, if free right now, just to cut what a failed transaction appended."""
        try:
            self._conn.execute("PRAGMA busy_timeout = 0")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._cut_tails(dict(self._conn.execute("SELECT key, value FROM meta")))
            finally:
                self._conn.execute("ROLLBACK")  # nothing changed in SQLite
        except sqlite3.Error:
            pass  # another writer has the lock: it cuts the tail itself before appending
        finally:
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.Error:
                pass

    def _cut_tails(self, meta: dict) -> None:
        gen = int(meta["generation"])
        for level in store.LEVELS:
            try:
                store.truncate_tail(store.vector_file(self.root, level, gen), int(meta[f"{level}_rows"]), self.dim)
            except OSError:
                pass  # a missing file: nothing appended; the next writer cuts any tail

    def _set_meta(self, **values) -> None:
        self._conn.executemany("UPDATE meta SET value = ? WHERE key = ?", [(str(v), k) for k, v in values.items()])

    def _repair(self) -> None:
        """Cut uncommitted tails and delete other generations' files, if no writer is active right now."""
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout = 0")
            try:
                with self._writing() as meta:
                    gen = int(meta["generation"])
                    for level in store.LEVELS:
                        store.truncate_tail(store.vector_file(self.root, level, gen), int(meta[f"{level}_rows"]),
                                            self.dim)
                    for _, g, p in store.vector_files(self.root):
                        if g != gen:
                            _search.unlink_quietly(p)
                    self._faiss.drop_generations(gen)
            except (RetrievalIndexError, OSError, sqlite3.Error):
                pass  # a writer is active (it cuts the tail itself before appending), read-only or missing files
            finally:
                self._conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    def _check_vectors(self, scan_vector, patch_vectors, patch_centres_lps):
        return store.check_vectors(self.dim, scan_vector, patch_vectors, patch_centres_lps)

    def _put(self, record: ScanRecord, scan_vector, patch_vectors, patch_centres_lps, weights_hash, replace) -> int:
        self._refuse_other_weights(weights_hash=weights_hash)
        if not isinstance(record, ScanRecord) or not str(record.path):
            raise RetrievalIndexError("add()/update() need a ScanRecord with a path")
        s, p, c = self._check_vectors(scan_vector, patch_vectors, patch_centres_lps)
        digest = store.checksum(s, p)
        fields = (str(record.path), store.opt_str(record.series_uid), store.opt_str(record.patient_id),
                  store.opt_str(record.study_uid), store.to_json(store.geometry_dict(record.geometry), "geometry"),
                  store.to_json(record.preprocessing, "preprocessing"), store.to_json(record.metadata, "metadata"),
                  self.model_id, self.weights_hash, time.time())
        with self._writing() as meta:
            old = self._id_of(record.path, record.series_uid)
            if old is not None and not replace:
                raise AlreadyIndexedError(f"{record.path} (series {record.series_uid}) is already in the index as "
                                          f"scan {old}: use update() to replace it, or skip it", old)
            gen, scan_rows, patch_rows = int(meta["generation"]), int(meta["scan_rows"]), int(meta["patch_rows"])
            store.append_rows(store.vector_file(self.root, "scan", gen), scan_rows, self.dim, s[None])
            store.append_rows(store.vector_file(self.root, "patch", gen), patch_rows, self.dim, p)
            # Only now, with the vectors on disk, does the commit below make them visible.
            values = fields + (scan_rows, patch_rows, len(p), store.centres_to_blob(c), digest)
            if old is None:
                cur = self._conn.execute(f"INSERT INTO scans ({_WRITTEN}) VALUES ({', '.join('?' * len(values))})",
                                         values)
                scan_id = cur.lastrowid
            else:
                names = _WRITTEN.split(", ")
                self._conn.execute(f"UPDATE scans SET {', '.join(n + ' = ?' for n in names)} WHERE id = ?",
                                   values + (old,))
                scan_id = old
            self._set_meta(scan_rows=scan_rows + 1, patch_rows=patch_rows + len(p), version=int(meta["version"]) + 1)
        return int(scan_id)

    @_guarded
    def add(self, record: ScanRecord, scan_vector, patch_vectors, patch_centres_lps, weights_hash=None) -> int:
        """Add one scan atomically: (D,) scan vector, (N, D) patch vectors, (N, 3) patch centres in LPS mm.

        Returns the new scan id. Refuses a scan whose (path, series_uid) is already indexed with
        :class:`AlreadyIndexedError` (see :meth:`update`) and, when ``weights_hash`` is given, vectors of
        weights other than the index's.
        """
        return self._put(record, scan_vector, patch_vectors, patch_centres_lps, weights_hash, replace=False)

    @_guarded
    def update(self, record: ScanRecord, scan_vector, patch_vectors, patch_centres_lps, weights_hash=None) -> int:
        """Replace the scan with the same (path, series_uid) atomically, keeping its id (adds it when absent)."""
        return self._put(record, scan_vector, patch_vectors, patch_centres_lps, weights_hash, replace=True)

    @_guarded
    def remove(self, target: Union[int, str, os.PathLike], series_uid: Optional[str] = None) -> int:
        """Remove a scan by id, or by path (every series of it unless ``series_uid`` is given); returns the count.

        The vectors stay in the files, unreachable, until :meth:`compact`.
        """
        with self._writing() as meta:
            if isinstance(target, (int, np.integer)):
                cur = self._conn.execute("DELETE FROM scans WHERE id = ?", (int(target),))
            elif series_uid is None:
                cur = self._conn.execute("DELETE FROM scans WHERE path = ?", (str(target),))
            else:
                cur = self._conn.execute("DELETE FROM scans WHERE path = ? AND ifnull(series_uid, '') = ?",
                                         (str(target), str(series_uid)))
            if cur.rowcount:
                self._set_meta(version=int(meta["version"]) + 1)
            return cur.rowcount

    def _rewrite(self, meta: dict, keep: list, sources: dict) -> tuple:
        """Write generation G+1 holding the rows of ``keep`` [(id, scan_row, patch_start, patch_count)] in that
        order and point the scans at it (inside the caller's write transaction); returns (scan rows, patch rows)."""
        gen = int(meta["generation"])
        new = {lv: store.vector_file(self.root, lv, gen + 1) for lv in store.LEVELS}
        for path in new.values():  # a leftover of an interrupted compaction is never committed: overwrite it
            store.create_vector_file(path, self.dim)
        store.copy_rows(sources["scan"], store.merge_runs((r[1], 1) for r in keep), new["scan"])
        moved, patch_rows = [], 0
        for scan_id, _, start, count in keep:  # scans in id order; a scan's patches stay contiguous
            moved.append((patch_rows, scan_id))
            patch_rows += count
        store.copy_rows(sources["patch"], store.merge_runs((r[2], r[3]) for r in keep if r[3]), new["patch"])
        store.fsync_dir(self.root)
        self._conn.executemany("UPDATE scans SET scan_row = ?, patch_start = ? WHERE id = ?",
                               [(i, ps, sid) for i, (ps, sid) in enumerate(moved)])
        self._set_meta(generation=gen + 1, scan_rows=len(keep), patch_rows=patch_rows,
                       version=int(meta["version"]) + 1)
        return len(keep), patch_rows

    def _drop_generation(self, gen: int) -> None:
        """After a switch to generation gen + 1: delete gen's files and stale FAISS indexes."""
        for lv in store.LEVELS:  # readers that mapped the old files keep reading them until they reload
            _search.unlink_quietly(store.vector_file(self.root, lv, gen))
        self._faiss.drop_generations(gen + 1)
        self._snap, self._views = None, {}

    @_guarded
    def compact(self) -> dict:
        """Rewrite the vector files without removed rows (a new generation, switched to in one commit)."""
        with self._writing() as meta:
            gen = int(meta["generation"])
            rows = self._conn.execute("SELECT id, scan_row, patch_start, patch_count FROM scans ORDER BY id").fetchall()
            old = {lv: store.map_rows(store.vector_file(self.root, lv, gen), int(meta[f"{lv}_rows"]), self.dim)
                   for lv in store.LEVELS}
            before = int(meta["scan_rows"]), int(meta["patch_rows"])
            _, patch_rows = self._rewrite(meta, rows, old)
        del old
        self._drop_generation(gen)
        return {"generation": gen + 1, "scan_rows_dropped": before[0] - len(rows),
                "patch_rows_dropped": before[1] - patch_rows}

    @_guarded
    def repair(self) -> dict:
        """Drop the damaged scans (vectors past a file's end or lost with it, checksum mismatch, all-zero or
        non-finite vectors of scans without a checksum, broken rows) by writing a new generation that holds
        only the intact ones, so the index is consistent and writable again.

        Returns ``{"repaired": bool, "dropped": [{"scan_id", "path", "series_uid", "reason"}], "kept": n,
        "generation": g}``. Damage to ``index.sqlite`` itself cannot be repaired: refused, "rebuild".
        """
        with self._writing() as meta:
            gen = int(meta["generation"])
            report = store.check_index(self.root, self._conn, self.dim, self.model_id, self.weights_hash, deep=True,
                                       in_transaction=True)
            if report.fatal:
                raise RetrievalIndexError(f"{self.root / store.DB_NAME} itself is damaged ({report.fatal[0]}): a "
                                          "repair cannot fix that; rebuild the index")
            dropped = report.as_dict()["damaged"]
            if not report.problems:
                return {"repaired": False, "dropped": [], "kept": report.scans, "generation": gen}
            rows = self._conn.execute("SELECT id, scan_row, patch_start, patch_count FROM scans ORDER BY id").fetchall()
            keep = [r for r in rows if r[0] not in report.damaged]
            sources = {}
            for lv in store.LEVELS:
                sources[lv], _ = store.map_available(store.vector_file(self.root, lv, gen), int(meta[f"{lv}_rows"]),
                                                     self.dim)
            self._conn.executemany("DELETE FROM scans WHERE id = ?", [(sid,) for sid in report.damaged])
            self._rewrite(meta, keep, sources)
        del sources
        self._drop_generation(gen)
        return {"repaired": True, "dropped": dropped, "kept": len(keep), "generation": gen + 1}

    # ---- reading -------------------------------------------------------------------------------------------
    def _id_of(self, path, series_uid) -> Optional[int]:
        row = self._conn.execute("SELECT id FROM scans WHERE path = ? AND ifnull(series_uid, '') = ifnull(?, '')",
                                 (str(path), store.opt_str(series_uid))).fetchone()
        return None if row is None else int(row[0])

    @_guarded
    def contains(self, path, series_uid: Optional[str] = None) -> bool:
        """Whether (path, series_uid) is indexed (``None`` matches only a scan added without a series UID)."""
        with self._lock:
            return self._id_of(path, series_uid) is not None

    def _snapshot(self) -> store.Snapshot:
        with self._lock:
            self._conn.execute("BEGIN")  # both SELECTs read the same committed state
            try:
                meta = dict(self._conn.execute("SELECT key, value FROM meta"))
                if self._snap is not None and int(meta["version"]) == self._snap.version:
                    return self._snap
                rows = self._conn.execute(f"SELECT {_COLUMNS} FROM scans ORDER BY id").fetchall()
            finally:
                self._conn.execute("COMMIT")
            self._snap = store.Snapshot(int(meta["version"]), int(meta["generation"]), int(meta["scan_rows"]),
                                   int(meta["patch_rows"]), rows)
            return self._snap

    def _view(self, snap: store.Snapshot, level: str) -> _search.LevelView:
        cached = self._views.get(level)
        if cached is not None and cached[0] == snap.version:
            return cached[1]
        rows = snap.scan_rows if level == "scan" else snap.patch_rows
        vectors = store.map_rows(store.vector_file(self.root, level, snap.generation), rows, self.dim)
        old = cached[1] if cached is not None else None
        if old is not None and old.generation == snap.generation and old.rows <= rows:
            norms = np.concatenate([old.norms, _search.row_norms(vectors, old.rows)])  # only the appended rows
        else:
            norms = _search.row_norms(vectors)
        view = _search.LevelView(level, snap.generation, vectors, norms, snap.owner(level))
        self._views[level] = (snap.version, view)
        return view

    def _record(self, row) -> ScanRecord:
        key = (row[0], row[10])  # (id, added_at): an update gives a new added_at
        rec = self._records.get(key)
        if rec is None:
            rec = ScanRecord(row[1], row[2], row[3], row[4], json.loads(row[5]), json.loads(row[6]),
                             json.loads(row[7]))
            self._records[key] = rec
        return rec

    @_guarded
    def scans(self) -> list:
        """(scan_id, ScanRecord) of every indexed scan, by id."""
        return [(r[0], self._record(r)) for r in self._snapshot().rows]

    @_guarded
    def get(self, scan_id: int) -> ScanRecord:
        for r in self._snapshot().rows:
            if r[0] == scan_id:
                return self._record(r)
        raise RetrievalIndexError(f"no scan with id {scan_id} in {self.root}")

    @_guarded
    def vectors(self, scan_id: int) -> tuple:
        """(scan vector (D,), patch vectors (N, D), patch centres (N, 3) LPS mm) of one scan, as stored."""
        for _ in range(5):
            snap = self._snapshot()
            row = next((r for r in snap.rows if r[0] == scan_id), None)
            if row is None:
                raise RetrievalIndexError(f"no scan with id {scan_id} in {self.root}")
            try:
                s = store.map_rows(store.vector_file(self.root, "scan", snap.generation), snap.scan_rows, self.dim)
                p = store.map_rows(store.vector_file(self.root, "patch", snap.generation), snap.patch_rows, self.dim)
            except FileNotFoundError:  # compacted meanwhile: read the new generation
                self._refuse_missing(snap, "scan", "patch")
                continue
            return (np.array(s[row[11]]), np.array(p[row[12]:row[12] + row[13]]), store.blob_to_centres(row[14]))
        raise RetrievalIndexError(f"{self.root} keeps changing generation; retry")

    def _refuse_missing(self, snap: store.Snapshot, *levels) -> None:
        """After a vector file of ``snap`` was not found: fine when a compaction switched generations meanwhile
        (the caller retries); damage when the generation is still the same."""
        self._snap = None
        if self._snapshot().generation == snap.generation:
            for level in levels:
                path = store.vector_file(self.root, level, snap.generation)
                if not path.exists():
                    raise store.missing_file_error(path)

    @_guarded
    def search(self, query, k: int = 10, level: str = "scan", metric: str = "cosine", exclude_patient=None,
               exclude_study=None, where: Optional[Callable[[ScanRecord], bool]] = None, backend: str = "auto",
               max_per_scan: Optional[int] = None, weights_hash: Optional[str] = None,
               metadata: Optional[dict] = None):
        """The ``k`` most similar scans (``level="scan"``) or patches (``"patch"``) to ``query``.

        query: (D,) -> list[Hit]; (Q, D) -> one list per query. exclude_patient / exclude_study: an id or a
        collection of ids whose scans are left out; where: keep only scans whose record it accepts;
        metadata: keep only scans whose metadata contains this dict (as PostgreSQL's jsonb ``@>``, see
        :func:`store.json_contains`); max_per_scan: at most this many patch hits per scan (1 = best location in
        each scan);
        backend: "exact" (numpy), "faiss", or "auto" (FAISS when installed and >= 100,000 candidate rows).
        """
        if backend == "hnsw":
            raise RetrievalIndexError(f"backend='hnsw' is for PostgreSQL indexes; {self.root} is a folder index, whose "
                                      "approximate search is FAISS: use backend='faiss', 'exact' or 'auto'")
        if metadata is not None and not isinstance(metadata, dict):
            raise RetrievalIndexError(f"metadata must be a dict of the values to match; got {type(metadata).__name__}")
        if level not in store.LEVELS or metric not in ("cosine", "l2") or backend not in ("auto", "exact", "faiss"):
            raise RetrievalIndexError(f"level must be scan|patch, metric cosine|l2, backend auto|exact|faiss; got "
                                      f"{level!r}, {metric!r}, {backend!r}")
        if int(k) < 1 or (max_per_scan is not None and int(max_per_scan) < 1):
            raise RetrievalIndexError("k and max_per_scan must be at least 1")
        self._refuse_other_weights(weights_hash=weights_hash)
        q = np.asarray(query, dtype=np.float32)
        single = q.ndim == 1
        if q.shape[-1:] != (self.dim,) or q.ndim > 2:
            raise RetrievalIndexError(f"queries must be ({self.dim},) or (Q, {self.dim}); got shape {q.shape}")
        q = q.reshape(-1, self.dim)
        if not np.isfinite(q).all():
            raise RetrievalIndexError("the query contains NaN or infinity: its embedding failed")
        with self._lock:
            for _ in range(5):
                snap = self._snapshot()
                try:
                    view = self._view(snap, level)
                    break
                except FileNotFoundError:  # compacted between the snapshot and the file: take a new snapshot
                    self._refuse_missing(snap, level)
            else:
                raise RetrievalIndexError(f"{self.root} keeps changing generation; retry")
            allowed = view.owner >= 0
            keep = self._scan_filter(snap, exclude_patient, exclude_study, where, metadata or None)
            if keep is not None:
                allowed &= keep[view.owner]  # a removed row's owner -1 picks the final False
            faiss_ok = _search.faiss_module() is not None
            if backend == "faiss" and not faiss_ok:
                raise RetrievalIndexError("backend='faiss' needs FAISS: pip install faiss-cpu (or use backend='exact')")
            use_faiss = backend == "faiss" or (backend == "auto" and faiss_ok
                                               and allowed.sum() >= _search.FAISS_AUTO_MIN_ROWS)
            run = self._faiss.search if use_faiss else _search.search_exact
            found = run(view, q, int(k), metric, allowed, max_per_scan)
            hits = [[self._hit(snap, view, level, r, s) for r, s in zip(rows, sims)] for rows, sims in found]
        return hits[0] if single else hits

    def _scan_filter(self, snap, exclude_patient, exclude_study, where, metadata=None) -> Optional[np.ndarray]:
        if exclude_patient is None and exclude_study is None and where is None and metadata is None:
            return None
        bad_p, bad_s = store.as_set(exclude_patient), store.as_set(exclude_study)
        if metadata is not None:
            metadata = json.loads(store.to_json(metadata, "metadata filter"))  # as stored: JSON values, not Python objects
        return np.array([(r[3] is None or r[3] not in bad_p) and (r[4] is None or r[4] not in bad_s)
                         and (metadata is None or store.json_contains(self._record(r).metadata, metadata))
                         and (where is None or bool(where(self._record(r)))) for r in snap.rows] + [False], bool)

    def _hit(self, snap, view, level, row, sim) -> Hit:
        r = snap.rows[view.owner[row]]
        centre = store.blob_to_centres(r[14])[row - r[12]] if level == "patch" else None
        return Hit(int(r[0]), r[1], float(sim), level, centre, r[3], r[4], self._record(r))

    # ---- status --------------------------------------------------------------------------------------------
    @_guarded
    def info(self) -> dict:
        snap = self._snapshot()
        live_patches = sum(r[13] for r in snap.rows)
        return {
            "path": str(self.root), "format": FORMAT, "model_id": self.model_id, "weights_hash": self.weights_hash,
            "dim": self.dim, "preprocessing": self.preprocessing, "scans": len(snap.rows), "patches": live_patches,
            "stored_scan_rows": snap.scan_rows, "stored_patch_rows": snap.patch_rows,
            "removed_rows": snap.scan_rows - len(snap.rows) + snap.patch_rows - live_patches,
            "generation": snap.generation, "bytes": store.bytes_under(self.root),
            "faiss_available": _search.faiss_module() is not None,
        }

    @_guarded
    def verify_files(self) -> None:
        """Refuse, naming ``ctfm index check --repair``, an index whose vector files a writer must not extend
        (missing, foreign header, shorter than the committed rows): cheap, for refusing before any work."""
        snap = self._snapshot()
        for level in store.LEVELS:
            rows = snap.scan_rows if level == "scan" else snap.patch_rows
            store.verify_vector_file(store.vector_file(self.root, level, snap.generation), rows, self.dim)

    @_guarded
    def check(self, deep: bool = False) -> list:
        """Consistency problems (empty = consistent); ``deep`` also verifies every vector (see :meth:`check_report`)."""
        return self.check_report(deep).problems

    @_guarded
    def check_report(self, deep: bool = False) -> CheckReport:
        """What :meth:`check` finds, with notes (scans without a checksum) and the damaged scans by id.

        ``deep`` reads every committed vector: each scan is verified against the checksum written when it
        was added; scans of indexes made before checksums are checked for NaN/infinity and all-zero vectors.
        """
        with self._lock:
            return store.check_index(self.root, self._conn, self.dim, self.model_id, self.weights_hash, deep)


def _refuse_file(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RetrievalIndexError(f"{root} is a file, not an index folder: give the index's folder (a new one is "
                                  "created by `ctfm index add`)")


def _writable(root: Path) -> bool:
    return os.access(root, os.W_OK)


def _refuse_unwritable(root: Path) -> None:
    if not _writable(root):
        raise RetrievalIndexError(f"{root} cannot be written (a read-only disk or folder): `ctfm index add`, "
                                  "`remove`, `compact` and `check --repair` need to write there; query, info and "
                                  "eval work")


def _connect(root: Path, timeout: float, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
    db = root / store.DB_NAME
    if readonly:  # never writes; immutable also takes no locks and makes no -wal/-shm files
        uri = db.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn = sqlite3.connect(str(db), timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")  # a returned add() survives power loss too, not only a crash
    return conn


def _sidecars(root: Path) -> dict:
    db = root / store.DB_NAME
    return {suffix: Path(f"{db}{suffix}") for suffix in ("-wal", "-shm")}


def _refuse_unmerged_wal(root: Path) -> None:
    wal = _sidecars(root)["-wal"]
    if wal.exists() and wal.stat().st_size > 0:
        raise RetrievalIndexError(f"{root} cannot be written here (read-only or full disk) and {wal.name} holds "
                                  f"changes not yet merged into {store.DB_NAME}: open the index once where it can be "
                                  "written (or free some space), then it reads here too")


def _drop_unused_sidecars(root: Path, existed: dict) -> None:
    """Remove the -wal/-shm files a failed read-only open just made: an empty -wal and a -shm too short for
    any process to have mapped it (SQLite maps 32 KiB at least); files that existed before are left alone."""
    files = _sidecars(root)
    try:
        unused = files["-wal"].stat().st_size == 0 if files["-wal"].exists() else True
        unused = unused and (not files["-shm"].exists() or files["-shm"].stat().st_size < 32768)
    except OSError:
        return
    if unused:
        for suffix, path in files.items():
            if not existed[suffix]:
                _search.unlink_quietly(path)


def _tidy_sidecars(root: Path) -> None:
    """A read-only connection cannot remove SQLite's -wal/-shm files when it closes last; a read-write
    connection that finds nothing to write does (only when it is the last connection: SQLite checks)."""
    try:
        conn = sqlite3.connect(str(root / store.DB_NAME), timeout=0, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM meta").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        pass


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL (readers alongside a writer) when a creator could not (another process was reading)."""
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:
        pass  # busy now: the next writer's open switches


def _live_shm(root: Path) -> bool:
    """Whether SQLite's -shm file looks in use: a connection maps at least 32 KiB of it (smaller: a failed open's)."""
    try:
        return _sidecars(root)["-shm"].stat().st_size >= 32768
    except OSError:
        return False


def _open_database(root: Path, readonly: bool, timeout: float) -> tuple:
    """``(connection, meta, tidy)`` for :meth:`VectorIndex.open`, every failure one line with its cause.

    Where SQLite could not make its -shm file (a folder that cannot be written, a full disk) and no live
    connection has one, a reader opens ``immutable`` instead and a writer is refused before it makes any
    file; a failed open removes the -wal/-shm files it made when nobody can be using them.
    """
    files = _sidecars(root)
    existed = {suffix: os.path.lexists(p) for suffix, p in files.items()}
    cramped = not _live_shm(root) and (not _writable(root) or store.low_on_space(root, _LOW_SPACE))
    if cramped and not readonly:
        raise RetrievalIndexError(f"no space left on the disk that holds {root}: free some space and run again "
                                  "(the index is unchanged)")
    immutable = readonly and cramped
    deadline = time.monotonic() + _CREATOR_WAIT_S
    while True:
        if immutable:
            _refuse_unmerged_wal(root)
        try:
            conn = _connect(root, timeout, readonly, immutable)
        except sqlite3.Error as e:
            raise store.index_error(e, root) from e
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if not readonly:
                _use_wal(conn)
            return conn, meta, readonly and not immutable and not any(existed.values()) and _writable(root)
        except sqlite3.OperationalError as e:
            conn.close()
            low = str(e).lower()
            if "no such table" in low:
                if _empty_database(root, readonly, timeout) and time.monotonic() < deadline:
                    time.sleep(0.05)  # a creator made the file and is about to lock it: wait for it
                    continue
                raise RetrievalIndexError(f"{root} is an incompletely created index (or not a CT-FM index): delete "
                                          "the folder and create it again") from e
            if not immutable and ("disk i/o" in low or "unable to open" in low or "full" in low):
                _drop_unused_sidecars(root, existed)
                if readonly and not _live_shm(root):  # nothing can change under an immutable read then
                    immutable = True
                    continue
            raise store.index_error(e, root) from e
        except sqlite3.Error as e:
            conn.close()
            raise store.index_error(e, root) from e


def _empty_database(root: Path, readonly: bool, timeout: float) -> bool:
    """Whether index.sqlite holds no table at all (being created, or its creator died)."""
    try:
        conn = _connect(root, timeout, readonly, immutable=readonly and not _writable(root))
        try:
            return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        finally:
            conn.close()
    except sqlite3.Error:
        return False
