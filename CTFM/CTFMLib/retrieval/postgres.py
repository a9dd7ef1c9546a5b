"""A retrieval index in PostgreSQL with the pgvector extension: one index shared by many workstations and nodes.

Same API and results as :class:`CTFMLib.retrieval.index.VectorIndex` (the embedded folder index); only
:mod:`CTFMLib.retrieval.backends` imports this module (psycopg 3 and the ``pgvector`` adapter:
``pip install 'ctfm[postgres]'``). The server needs pgvector >= 0.5 (HNSW).

URL: ``postgresql://user@host:5432/db?schema=NAME`` (default schema ``ctfm``; a Unix socket folder as
``?host=/path``); the password comes from ``PGPASSWORD`` or ``~/.pgpass``, never from a message: every message
names the URL as :func:`CTFMLib.retrieval.urls.display` shows it. One index per schema::

    meta     (key text PRIMARY KEY, value text)      format, model_id, weights_hash, dim, preprocessing (JSON),
                                                     created_at
    scans    (id bigint identity (never reused), path, series_uid, patient_id, study_uid,
              geometry/preprocessing/metadata jsonb, model_id, weights_hash, added_at (Unix s), patch_count,
              checksum (store.checksum of the vectors), embedding vector(D));
              UNIQUE (path, coalesce(series_uid, ''))
    patches  (scan_id -> scans ON DELETE CASCADE, patch_row, x, y, z (LPS mm centre), embedding vector(D));
              PRIMARY KEY (scan_id, patch_row)

- **Crash safety.** ``add``/``update`` write a scan's row and all its patches in ONE transaction: a writer
  killed at any point leaves nothing (the server rolls back), and readers see whole scans only, since every read
  runs in one REPEATABLE READ transaction. Ids are an identity column: a removed scan's id is never reused.
- **Concurrency.** Any number of writers and readers: two writers of the same (path, series) are serialised by
  the unique key (the second gets :class:`AlreadyIndexedError`, or replaces it with ``update``); creation holds a
  transaction-level advisory lock, so of two creators one creates and the other finds the index.
- **Search.** SQL proposes candidates (exact: a sequential scan; ``hnsw``: pgvector's HNSW index made by
  :meth:`PostgresIndex.build_hnsw`); as in the folder index, every returned similarity is recomputed in float64
  from the stored vectors and ties are broken by scan id then patch row, so both indexes return the same hits.
- **Read-only.** ``open(..., readonly=True)`` makes every transaction read-only; a role with SELECT only works
  too. Every psycopg error becomes one :class:`RetrievalIndexError` line naming the URL and the cause.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from . import search as _search
from . import store
from .store import AlreadyIndexedError, CheckReport, Hit, RetrievalIndexError, ScanRecord
from .urls import display

__all__ = ["DEFAULT_SCHEMA", "FORMAT", "PostgresIndex"]

FORMAT = 1
DEFAULT_SCHEMA = "ctfm"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_CREATE_LOCK = 0x43544D46  # pg_advisory_xact_lock key held by every creator in a database ("CTFM")
_EF_SEARCH_MAX = 1000  # pgvector's upper limit of hnsw.ef_search
# hnsw.ef_search of a search: on 1e6 clustered 512-d vectors (m=16, ef_construction=64) recall@10 was 0.87 at 256,
# 0.93 at 512 and 0.956 at 1000, p50 10, 11 and 23 ms (Testing/Benchmarks/retrieve.py data, 2 CPU cores).
HNSW_EF_SEARCH = _EF_SEARCH_MAX
_SCAN_COLUMNS = "id, path, series_uid, patient_id, study_uid, geometry, preprocessing, metadata, added_at"
_HNSW = {"scans": "scans_embedding_hnsw", "patches": "patches_embedding_hnsw"}


def split_url(url: str) -> tuple:
    """(libpq conninfo without ``schema``, schema name); refused in one line for a schema that is no identifier."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _IDENT.match(schema):
        raise RetrievalIndexError(f"{display(url)}: schema {schema!r} is not a plain SQL name: use lower-case "
                                  "letters, digits and _ (not first), at most 63 characters")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), schema


def _np(v) -> np.ndarray:
    """A stored vector as float32 numpy (the adapter gives a ``pgvector.Vector`` or an array)."""
    return np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)


def _cause(e: BaseException) -> str:
    text = " ".join(line.strip() for line in (str(e).strip() or type(e).__name__).splitlines() if line.strip())
    return text.rstrip(".")


def _error(e: BaseException, shown: str) -> RetrievalIndexError:
    """One line for a failed psycopg call on the index at ``shown`` (a URL without its password)."""
    errors = psycopg.errors
    cause = _cause(e)
    if isinstance(e, errors.ReadOnlySqlTransaction):
        return RetrievalIndexError(f"{shown} was opened read-only (or this role may only read): open it with "
                                   "readonly=False as a role that may write to change it")
    if isinstance(e, errors.InsufficientPrivilege):
        return RetrievalIndexError(f"not allowed to do this in {shown} ({cause}): ask the database administrator "
                                   "for the privileges, or use a role that has them")
    if isinstance(e, errors.UndefinedFile) or "extension \"vector\"" in cause:
        return RetrievalIndexError(f"the PostgreSQL extension 'vector' (pgvector) is missing in {shown}: ask the "
                                   f"database administrator to install it ({cause})")
    if isinstance(e, errors.LockNotAvailable) or isinstance(e, errors.QueryCanceled):
        return RetrievalIndexError(f"{shown} is busy (another process holds what this needs: {cause}); retry later")
    if isinstance(e, psycopg.OperationalError):
        return RetrievalIndexError(f"cannot use the PostgreSQL index {shown}: {cause}")
    return RetrievalIndexError(f"the PostgreSQL index {shown} could not be used: {cause}")


def _guarded(method):
    """psycopg errors of a public method become one :class:`RetrievalIndexError` line naming the URL and cause."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RetrievalIndexError:
            raise
        except psycopg.Error as e:
            raise _error(e, self.root) from e

    return wrapper


def _connect(url: str, timeout: float, readonly: bool = False) -> tuple:
    """(connection in autocommit mode, schema name, extension schema or None). Errors: one line."""
    conninfo, schema = split_url(url)
    shown = display(url)
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=max(1, int(round(timeout))),
                               application_name="ctfm-index")
    except psycopg.Error as e:
        raise _error(e, shown) from None
    try:
        conn.execute("SET lock_timeout = %s" % int(max(timeout, 0.001) * 1000))
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
        row = conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'") \
            .fetchone()
        return conn, schema, (row[0] if row else None)
    except BaseException as e:
        conn.close()
        if isinstance(e, psycopg.Error):
            raise _error(e, shown) from None
        raise


def _use(conn, schema: str, ext_schema: str) -> None:
    """Name the index's schema first (unqualified names) and the extension's (the ``vector`` type)."""
    names = [sql.Identifier(schema)] + ([sql.Identifier(ext_schema)] if ext_schema != schema else [])
    conn.execute(sql.SQL("SET search_path = {}").format(sql.SQL(", ").join(names)))
    register_vector(conn)


def _has_index(conn, schema: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".meta',)).fetchone()[0]


_SCHEMA_SQL = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE scans (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path text NOT NULL,
    series_uid text,
    patient_id text,
    study_uid text,
    geometry jsonb NOT NULL,
    preprocessing jsonb NOT NULL,
    metadata jsonb NOT NULL,
    model_id text NOT NULL,
    weights_hash text NOT NULL,
    added_at double precision NOT NULL,
    patch_count integer NOT NULL,
    checksum text NOT NULL,
    embedding vector({dim}) NOT NULL
);
CREATE UNIQUE INDEX scans_key ON scans (path, coalesce(series_uid, ''));
CREATE TABLE patches (
    scan_id bigint NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    patch_row integer NOT NULL,
    x double precision NOT NULL,
    y double precision NOT NULL,
    z double precision NOT NULL,
    embedding vector({dim}) NOT NULL,
    PRIMARY KEY (scan_id, patch_row)
)
"""


class PostgresIndex:
    """Scan- and patch-level vectors of one model's embeddings in a PostgreSQL schema; see the module docstring.

    Use :meth:`create` or :meth:`open`; one instance may be shared by threads (calls are serialised).
    """

    def __init__(self, url: str, conn, schema: str, meta: dict, readonly: bool, timeout: float):
        self.url, self.root, self._conn, self.schema = url, display(url), conn, schema
        self.readonly, self.timeout = readonly, timeout
        self.model_id, self.weights_hash = meta["model_id"], meta["weights_hash"]
        self.dim, self.preprocessing = int(meta["dim"]), json.loads(meta["preprocessing"])
        self._lock = threading.RLock()
        self._records = {}

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def exists(cls, url: str) -> bool:
        """Whether an index has been created in the URL's schema (connection problems: one-line error)."""
        conn, schema, _ = _connect(url, 30.0, readonly=True)
        try:
            return _has_index(conn, schema)
        except psycopg.Error as e:
            raise _error(e, display(url)) from None
        finally:
            conn.close()

    @classmethod
    def create(cls, url: str, model_id: str, weights_hash: str, dim: int, preprocessing: Optional[dict] = None,
               timeout: float = 60.0) -> "PostgresIndex":
        """A new, empty index in the URL's schema (which must not hold an index).

        Atomic: made under a transaction-level advisory lock, so of two concurrent creators one creates and the
        other then finds the index and is refused ("already holds"); :meth:`open_or_create` opens it instead.
        """
        return cls._create(url, model_id, weights_hash, dim, preprocessing, timeout, exist_ok=False)

    @classmethod
    def _create(cls, url, model_id, weights_hash, dim, preprocessing, timeout, exist_ok) -> "PostgresIndex":
        if not model_id or not weights_hash or int(dim) < 1:
            raise RetrievalIndexError("create() needs a model id, the weights' sha256 and the vector length (dim >= 1)")
        shown = display(url)
        meta = {"format": str(FORMAT), "model_id": str(model_id), "weights_hash": str(weights_hash).lower(),
                "dim": str(int(dim)), "preprocessing": store.to_json(preprocessing or {}, "preprocessing"),
                "created_at": repr(time.time())}
        conn, schema, ext = _connect(url, timeout)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))  # a second creator waits here
                if not _has_index(conn, schema):
                    if ext is None:
                        ext = _create_extension(conn, shown)
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                    _use(conn, schema, ext)
                    for statement in _SCHEMA_SQL.format(dim=int(dim)).split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.cursor().executemany("INSERT INTO meta VALUES (%s, %s)", list(meta.items()))
                    return cls(url, conn, schema, meta, False, timeout)
        except BaseException as e:
            conn.close()
            if isinstance(e, psycopg.Error):
                raise _error(e, shown) from None
            raise
        conn.close()
        if not exist_ok:
            raise RetrievalIndexError(f"{shown} already holds a retrieval index: open it, or choose another schema "
                                      "(?schema=NAME)")
        return cls._opened_for(url, model_id, weights_hash, dim, preprocessing, timeout)

    @classmethod
    def _opened_for(cls, url, model_id, weights_hash, dim, preprocessing, timeout) -> "PostgresIndex":
        """The existing index at ``url``, refused unless it has these weights, this length and these settings."""
        index = cls.open(url, model_id, weights_hash, timeout=timeout)
        problem = None
        if index.dim != int(dim):
            problem = f"{index.root} holds {index.dim}-d vectors, not {dim}-d: use another index (?schema=NAME)"
        elif preprocessing is not None and json.loads(store.to_json(preprocessing, "preprocessing")) != index.preprocessing:
            problem = (f"{index.root} was built with other settings ({json.dumps(index.preprocessing, sort_keys=True)})"
                       ": vectors of other settings do not mix; use another index (?schema=NAME)")
        if problem:
            index.close()
            raise RetrievalIndexError(problem)
        return index

    @classmethod
    def open(cls, url: str, model_id: Optional[str] = None, weights_hash: Optional[str] = None,
             readonly: bool = False, timeout: float = 60.0) -> "PostgresIndex":
        """Open an index; refuses when ``model_id``/``weights_hash`` are given and differ from the index's.

        ``readonly``: every transaction is read-only (``default_transaction_read_only``); a read-only role works.
        """
        shown = display(url)
        conn, schema, ext = _connect(url, timeout, readonly)
        try:
            if not _has_index(conn, schema):
                raise RetrievalIndexError(f"{shown} is not a retrieval index (schema {schema} holds none): create one "
                                          "first (`ctfm index add INDEX SCANS...`)")
            if ext is None:
                raise RetrievalIndexError(f"the PostgreSQL extension 'vector' (pgvector) is missing in {shown}: ask "
                                          "the database administrator to install it")
            _use(conn, schema, ext)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if int(meta.get("format", -1)) != FORMAT:
                raise RetrievalIndexError(f"{shown} has index format {meta.get('format')}; this version reads format "
                                          f"{FORMAT}: update CT-FM or rebuild the index")
            index = cls(url, conn, schema, meta, readonly, timeout)
        except BaseException as e:
            conn.close()
            if isinstance(e, psycopg.Error):
                raise _error(e, shown) from None
            raise
        try:
            index._refuse_other_weights(model_id, weights_hash)
        except RetrievalIndexError:
            index.close()
            raise
        return index

    @classmethod
    def open_or_create(cls, url: str, model_id: str, weights_hash: str, dim: int,
                       preprocessing: Optional[dict] = None, timeout: float = 60.0) -> "PostgresIndex":
        """The index at ``url``, created when there is none (atomically: concurrent callers get one index).

        Refused unless an existing index has these weights, this vector length and (when given) these settings.
        """
        return cls._create(url, model_id, weights_hash, dim, preprocessing, timeout, exist_ok=True)

    def close(self) -> None:
        """Close the connection (an open transaction of this instance is rolled back)."""
        with self._lock:
            self._conn.close()
            self._records = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_guarded
    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM scans").fetchone()[0])

    def _refuse_other_weights(self, model_id=None, weights_hash=None) -> None:
        store.refuse_other_weights(self, model_id, weights_hash)

    # ---- transactions --------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """One write transaction (READ COMMITTED): all or nothing, also when the process is killed."""
        if self.readonly:
            raise RetrievalIndexError(f"{self.root} was opened read-only; open it with readonly=False to change it")
        with self._lock, self._conn.transaction():
            yield self._conn

    @contextmanager
    def _reading(self):
        """One REPEATABLE READ, read-only transaction: every statement in it sees the same committed scans."""
        with self._lock, self._conn.transaction():
            self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield self._conn

    # ---- writing -------------------------------------------------------------------------------------------
    def _check_vectors(self, scan_vector, patch_vectors, patch_centres_lps):
        return store.check_vectors(self.dim, scan_vector, patch_vectors, patch_centres_lps)

    def _put(self, record: ScanRecord, scan_vector, patch_vectors, patch_centres_lps, weights_hash, replace) -> int:
        self._refuse_other_weights(weights_hash=weights_hash)
        if not isinstance(record, ScanRecord) or not str(record.path):
            raise RetrievalIndexError("add()/update() need a ScanRecord with a path")
        s, p, c = self._check_vectors(scan_vector, patch_vectors, patch_centres_lps)
        values = (str(record.path), store.opt_str(record.series_uid), store.opt_str(record.patient_id),
                  store.opt_str(record.study_uid), store.to_json(store.geometry_dict(record.geometry), "geometry"),
                  store.to_json(record.preprocessing, "preprocessing"), store.to_json(record.metadata, "metadata"),
                  self.model_id, self.weights_hash, time.time(), len(p), store.checksum(s, p), s)
        insert = ("INSERT INTO scans (path, series_uid, patient_id, study_uid, geometry, preprocessing, metadata, "
                  "model_id, weights_hash, added_at, patch_count, checksum, embedding) VALUES (%s, %s, %s, %s, "
                  "%s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s) "
                  "ON CONFLICT (path, coalesce(series_uid, ''))")
        with self._writing() as conn:
            if replace:  # an upsert keeps the id; a concurrent adder of the same scan waits for this commit
                scan_id = conn.execute(insert + " DO UPDATE SET patient_id = EXCLUDED.patient_id, study_uid = "
                                       "EXCLUDED.study_uid, geometry = EXCLUDED.geometry, preprocessing = "
                                       "EXCLUDED.preprocessing, metadata = EXCLUDED.metadata, model_id = "
                                       "EXCLUDED.model_id, weights_hash = EXCLUDED.weights_hash, added_at = "
                                       "EXCLUDED.added_at, patch_count = EXCLUDED.patch_count, checksum = "
                                       "EXCLUDED.checksum, embedding = EXCLUDED.embedding RETURNING id",
                                       values).fetchone()[0]
                conn.execute("DELETE FROM patches WHERE scan_id = %s", (scan_id,))
            else:  # DO NOTHING waits for a concurrent adder of the same scan, then finds its row
                row = conn.execute(insert + " DO NOTHING RETURNING id", values).fetchone()
                if row is None:
                    old = self._id_of(record.path, record.series_uid)
                    raise AlreadyIndexedError(f"{record.path} (series {record.series_uid}) is already in the index as "
                                              f"scan {old}: use update() to replace it, or skip it", old)
                scan_id = row[0]
            if len(p):
                with conn.cursor().copy("COPY patches (scan_id, patch_row, x, y, z, embedding) FROM STDIN "
                                        "WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "int4", "float8", "float8", "float8", "vector"])
                    for i in range(len(p)):
                        copy.write_row((scan_id, i, float(c[i, 0]), float(c[i, 1]), float(c[i, 2]), p[i]))
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
    def remove(self, target: Union[int, str], series_uid: Optional[str] = None) -> int:
        """Remove a scan by id, or by path (every series of it unless ``series_uid`` is given); returns the count."""
        with self._writing() as conn:
            if isinstance(target, (int, np.integer)):
                cur = conn.execute("DELETE FROM scans WHERE id = %s", (int(target),))
            elif series_uid is None:
                cur = conn.execute("DELETE FROM scans WHERE path = %s", (str(target),))
            else:
                cur = conn.execute("DELETE FROM scans WHERE path = %s AND coalesce(series_uid, '') = %s",
                                   (str(target), str(series_uid)))
            return cur.rowcount

    @_guarded
    def compact(self) -> dict:
        """VACUUM (ANALYZE) both tables: the server reuses removed rows' space anyway; this also refreshes the
        planner's statistics. Same shape as the folder index's result (nothing is renumbered here)."""
        if self.readonly:
            raise RetrievalIndexError(f"{self.root} was opened read-only; open it with readonly=False to change it")
        with self._lock:
            for table in ("scans", "patches"):
                self._conn.execute(sql.SQL("VACUUM (ANALYZE) {}.{}").format(sql.Identifier(self.schema),
                                                                           sql.Identifier(table)))
        return {"generation": 0, "scan_rows_dropped": 0, "patch_rows_dropped": 0, "vacuumed": True}

    @_guarded
    def repair(self) -> dict:
        """Drop the damaged scans (vectors that fail their checksum, a patch count that does not match the
        stored patches, other weights), in one transaction. Same result shape as ``VectorIndex.repair``."""
        with self._writing() as conn:
            report = self._report(conn, deep=True)
            dropped = report.as_dict()["damaged"]
            if not report.problems:
                return {"repaired": False, "dropped": [], "kept": report.scans, "generation": 0}
            conn.cursor().executemany("DELETE FROM scans WHERE id = %s", [(sid,) for sid in report.damaged])
        return {"repaired": True, "dropped": dropped, "kept": report.scans - len(report.damaged), "generation": 0}

    @_guarded
    def build_hnsw(self, m: int = 16, ef_construction: int = 64) -> dict:
        """Make pgvector's HNSW indexes (cosine) on the scan and patch vectors, if missing; ``backend="hnsw"``
        (and ``"auto"`` on large indexes) uses them. Returns which were built and how long that took."""
        if self.readonly:
            raise RetrievalIndexError(f"{self.root} was opened read-only; open it with readonly=False to change it")
        if int(m) < 2 or int(ef_construction) < 2 * int(m):
            raise RetrievalIndexError("build_hnsw needs m >= 2 and ef_construction >= 2 * m")
        built, t0 = [], time.monotonic()
        with self._lock:
            for table, name in _HNSW.items():
                if self._hnsw_exists(table):
                    continue
                self._conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding "
                                           "vector_cosine_ops) WITH (m = {}, ef_construction = {})").format(
                    sql.Identifier(name), sql.Identifier(table), sql.Literal(int(m)),
                    sql.Literal(int(ef_construction))))
                built.append(table)
        return {"built": built, "m": int(m), "ef_construction": int(ef_construction),
                "seconds": round(time.monotonic() - t0, 3), "hnsw": True}

    def _hnsw_exists(self, table: str) -> bool:
        return self._conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                  (f'"{self.schema}"."{_HNSW[table]}"',)).fetchone()[0]

    # ---- reading -------------------------------------------------------------------------------------------
    def _id_of(self, path, series_uid) -> Optional[int]:
        row = self._conn.execute("SELECT id FROM scans WHERE path = %s AND coalesce(series_uid, '') = "
                                 "coalesce(%s, '')", (str(path), store.opt_str(series_uid))).fetchone()
        return None if row is None else int(row[0])

    @_guarded
    def contains(self, path, series_uid: Optional[str] = None) -> bool:
        """Whether (path, series_uid) is indexed (``None`` matches only a scan added without a series UID)."""
        with self._lock:
            return self._id_of(path, series_uid) is not None

    def _record(self, row) -> ScanRecord:
        key = (row[0], row[8])  # (id, added_at): an update gives a new added_at
        rec = self._records.get(key)
        if rec is None:
            rec = ScanRecord(row[1], row[2], row[3], row[4], row[5], row[6], row[7])
            self._records[key] = rec
        return rec

    def _all_scans(self, conn) -> list:
        return conn.execute(f"SELECT {_SCAN_COLUMNS} FROM scans ORDER BY id").fetchall()

    @_guarded
    def scans(self) -> list:
        """(scan_id, ScanRecord) of every indexed scan, by id."""
        with self._reading() as conn:
            return [(int(r[0]), self._record(r)) for r in self._all_scans(conn)]

    @_guarded
    def get(self, scan_id: int) -> ScanRecord:
        with self._reading() as conn:
            row = conn.execute(f"SELECT {_SCAN_COLUMNS} FROM scans WHERE id = %s", (int(scan_id),)).fetchone()
        if row is None:
            raise RetrievalIndexError(f"no scan with id {scan_id} in {self.root}")
        return self._record(row)

    @_guarded
    def vectors(self, scan_id: int) -> tuple:
        """(scan vector (D,), patch vectors (N, D), patch centres (N, 3) LPS mm) of one scan, as stored."""
        with self._reading() as conn:
            row = conn.execute("SELECT embedding FROM scans WHERE id = %s", (int(scan_id),)).fetchone()
            if row is None:
                raise RetrievalIndexError(f"no scan with id {scan_id} in {self.root}")
            patches = conn.execute("SELECT x, y, z, embedding FROM patches WHERE scan_id = %s ORDER BY patch_row",
                                   (int(scan_id),)).fetchall()
        p = np.array([_np(r[3]) for r in patches], dtype=np.float32).reshape(-1, self.dim)
        c = np.array([r[:3] for r in patches], dtype=np.float64).reshape(-1, 3)
        return _np(row[0]), p, c

    @_guarded
    def search(self, query, k: int = 10, level: str = "scan", metric: str = "cosine", exclude_patient=None,
               exclude_study=None, where: Optional[Callable[[ScanRecord], bool]] = None, backend: str = "auto",
               max_per_scan: Optional[int] = None, weights_hash: Optional[str] = None,
               metadata: Optional[dict] = None):
        """The ``k`` most similar scans (``level="scan"``) or patches (``"patch"``) to ``query``.

        query: (D,) -> list[Hit]; (Q, D) -> one list per query. exclude_patient / exclude_study: an id or a
        collection of ids whose scans are left out; where: keep only scans whose record it accepts (evaluated
        here, once per call); metadata: keep only scans whose metadata contains this dict (jsonb ``@>``);
        max_per_scan: at most this many patch hits per scan (1 = best location in each scan);
        backend: "exact" (a sequential scan), "hnsw" (pgvector's HNSW index, see :meth:`build_hnsw`; cosine), or
        "auto" (HNSW when built and >= ``search.FAISS_AUTO_MIN_ROWS`` candidate rows, else exact).
        """
        if backend == "faiss":
            raise RetrievalIndexError(f"backend='faiss' is for folder indexes; {self.root} is a PostgreSQL index: use "
                                      "backend='hnsw' (after build_hnsw), 'exact' or 'auto'")
        if level not in store.LEVELS or metric not in ("cosine", "l2") or backend not in ("auto", "exact", "hnsw"):
            raise RetrievalIndexError(f"level must be scan|patch, metric cosine|l2, backend auto|exact|hnsw; got "
                                      f"{level!r}, {metric!r}, {backend!r}")
        if int(k) < 1 or (max_per_scan is not None and int(max_per_scan) < 1):
            raise RetrievalIndexError("k and max_per_scan must be at least 1")
        if metadata is not None and not isinstance(metadata, dict):
            raise RetrievalIndexError(f"metadata must be a dict of the values to match; got {type(metadata).__name__}")
        self._refuse_other_weights(weights_hash=weights_hash)
        q = np.asarray(query, dtype=np.float32)
        single = q.ndim == 1
        if q.shape[-1:] != (self.dim,) or q.ndim > 2:
            raise RetrievalIndexError(f"queries must be ({self.dim},) or (Q, {self.dim}); got shape {q.shape}")
        q = q.reshape(-1, self.dim)
        if not np.isfinite(q).all():
            raise RetrievalIndexError("the query contains NaN or infinity: its embedding failed")
        k = int(k)
        mps = None if max_per_scan is None else int(max_per_scan)
        table = "scans" if level == "scan" else "patches"
        if backend == "hnsw" and metric != "cosine":
            raise RetrievalIndexError("backend='hnsw' searches by cosine (build_hnsw makes cosine indexes): use "
                                      "metric='cosine' or backend='exact'")
        with self._reading() as conn:
            if backend == "hnsw" and not self._hnsw_exists(table):
                raise RetrievalIndexError(f"{self.root} has no HNSW index yet: build it (build_hnsw) or use "
                                          "backend='exact'")
            filters, params = self._filters(conn, exclude_patient, exclude_study, where, metadata)
            use_hnsw = backend == "hnsw" or (backend == "auto" and metric == "cosine" and self._hnsw_exists(table)
                                             and self._allowed(conn, level, filters, params)
                                             >= _search.FAISS_AUTO_MIN_ROWS)
            hits = [self._search_one(conn, v, k, level, metric, filters, params, mps, use_hnsw) for v in q]
            wanted = sorted({h[0] for found in hits for h in found})
            records = {}
            if wanted:
                for r in conn.execute(f"SELECT {_SCAN_COLUMNS} FROM scans WHERE id = ANY(%s)", (wanted,)):
                    records[int(r[0])] = r
        out = [[Hit(sid, records[sid][1], float(sim), level, centre, records[sid][3], records[sid][4],
                    self._record(records[sid])) for sid, sim, centre in found] for found in hits]
        return out[0] if single else out

    def _filters(self, conn, exclude_patient, exclude_study, where, metadata) -> tuple:
        """SQL conditions on ``s`` (the scans table) and their parameters; ``where`` is asked once per scan."""
        filters, params = [], []
        bad_p, bad_s = store.as_set(exclude_patient), store.as_set(exclude_study)
        if bad_p:
            filters.append("(s.patient_id IS NULL OR NOT s.patient_id = ANY(%s))")
            params.append(sorted(bad_p))
        if bad_s:
            filters.append("(s.study_uid IS NULL OR NOT s.study_uid = ANY(%s))")
            params.append(sorted(bad_s))
        if metadata:
            filters.append("s.metadata @> %s::jsonb")
            params.append(store.to_json(metadata, "metadata filter"))
        if where is not None:
            rows = conn.execute(f"SELECT {_SCAN_COLUMNS} FROM scans s"
                                + (" WHERE " + " AND ".join(filters) if filters else "") + " ORDER BY id",
                                params).fetchall()
            filters.append("s.id = ANY(%s)")
            params.append([int(r[0]) for r in rows if where(self._record(r))])
        return filters, params

    def _allowed(self, conn, level, filters, params) -> int:
        source = "scans s" if level == "scan" else "patches p JOIN scans s ON s.id = p.scan_id"
        if not filters:
            source = "scans" if level == "scan" else "patches"
        return int(conn.execute(f"SELECT count(*) FROM {source}" + (" WHERE " + " AND ".join(filters) if filters
                                                                   else ""), params).fetchone()[0])

    def _search_one(self, conn, q, k, level, metric, filters, params, mps, use_hnsw) -> list:
        """[(scan_id, similarity, centre or None)] best first for one query (D,) float32."""
        op = "<=>" if metric == "cosine" else "<->"
        if level == "scan":
            source, vec, prow, cols = "scans s", "s.embedding", "0::integer", "NULL::float8, NULL::float8, NULL::float8"
        else:
            source, vec, prow, cols = "patches p JOIN scans s ON s.id = p.scan_id", "p.embedding", "p.patch_row", \
                "p.x, p.y, p.z"
        where_sql = (" WHERE " + " AND ".join(filters)) if filters else ""
        c = k + 8 if mps is None else 4 * k
        if use_hnsw:
            while True:
                conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                    sql.Literal(min(_EF_SEARCH_MAX, max(HNSW_EF_SEARCH, c)))))
                conn.execute("SET LOCAL enable_seqscan = off")
                found, n = self._candidates(conn, q, k, metric, mps, f"SELECT s.id, {prow}, {cols}, {vec} FROM {source}"
                                            f"{where_sql} ORDER BY {vec} {op} %s LIMIT %s", params, c)
                conn.execute("SET LOCAL enable_seqscan = on")
                if len(found) >= k or c >= _EF_SEARCH_MAX:
                    break
                c = min(4 * c, _EF_SEARCH_MAX)
            if len(found) >= k:
                return found
            # a selective filter leaves HNSW short of k: the exact search below is always complete
        conn.execute("SET LOCAL enable_indexscan = off")  # exact: a sequential scan, whatever indexes exist
        conn.execute("SET LOCAL enable_bitmapscan = off")
        while True:
            if mps is None or level == "scan":
                query = (f"SELECT s.id, {prow}, {cols}, {vec} FROM {source}{where_sql} "
                         f"ORDER BY {vec} {op} %s, s.id, {prow} LIMIT %s")
            else:  # the best few places of each scan, in SQL; the margin covers float32 near-ties
                query = (f"SELECT id, patch_row, x, y, z, embedding FROM (SELECT s.id, p.patch_row, p.x, p.y, p.z, "
                         f"p.embedding, p.embedding {op} %s AS d, row_number() OVER (PARTITION BY s.id ORDER BY "
                         f"p.embedding {op} %s, p.patch_row) AS rank FROM {source}{where_sql}) t "
                         f"WHERE rank <= {mps + 2} ORDER BY d, id, patch_row LIMIT %s")
            found, n = self._candidates(conn, q, k, metric, mps, query, params, c, twice=mps is not None
                                        and level != "scan")
            if len(found) >= k or n < c:
                break
            c *= 4
        conn.execute("SET LOCAL enable_indexscan = on")  # for the next query of this transaction
        conn.execute("SET LOCAL enable_bitmapscan = on")
        return found

    def _candidates(self, conn, q, k, metric, mps, query, params, c, twice=False) -> tuple:
        """Run a candidate query and pick the best ``k`` by float64 similarity; (hits, candidates fetched)."""
        # the window query names the vector first (in its SELECT list), the others after the filters
        args = ([q, q] if twice else []) + list(params) + ([] if twice else [q]) + [c]
        rows = conn.execute(query, args).fetchall()
        if not rows:
            return [], 0
        rows.sort(key=lambda r: (r[0], r[1]))  # candidate positions in (scan id, patch row) order: the tie-break
        vectors = np.array([_np(r[5]) for r in rows], dtype=np.float32).reshape(len(rows), -1)
        owner = np.array([r[0] for r in rows], dtype=np.int64)
        view = _search.LevelView("candidates", 0, vectors, None, owner)
        cand = np.arange(len(rows))
        picked, sims = _search.pick(cand, _search.rescore(view, q, cand, metric), owner, k, mps)
        found = []
        for i, sim in zip(picked, sims):
            r = rows[int(i)]
            centre = None if r[2] is None else np.array(r[2:5], dtype=np.float64)
            found.append((int(r[0]), float(sim), centre))
        return found, len(rows)

    # ---- status --------------------------------------------------------------------------------------------
    @_guarded
    def info(self) -> dict:
        with self._reading() as conn:
            scans = int(conn.execute("SELECT count(*) FROM scans").fetchone()[0])
            patches = int(conn.execute("SELECT count(*) FROM patches").fetchone()[0])
            size = int(conn.execute("SELECT pg_total_relation_size('scans') + pg_total_relation_size('patches') "
                                    "+ pg_total_relation_size('meta')").fetchone()[0])
            hnsw = all(self._hnsw_exists(t) for t in _HNSW)
            server = conn.execute("SHOW server_version").fetchone()[0]
            pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        return {
            "path": self.root, "backend": "postgresql", "schema": self.schema, "format": FORMAT,
            "model_id": self.model_id, "weights_hash": self.weights_hash, "dim": self.dim,
            "preprocessing": self.preprocessing, "scans": scans, "patches": patches, "stored_scan_rows": scans,
            "stored_patch_rows": patches, "removed_rows": 0, "generation": 0, "bytes": size,
            "faiss_available": False, "hnsw": hnsw, "server_version": server, "pgvector_version": pgvector,
        }

    @_guarded
    def verify_files(self) -> None:
        """Nothing to verify before work (the server keeps the vectors); refuses only an unreachable index."""
        with self._lock:
            self._conn.execute("SELECT 1 FROM meta LIMIT 1")

    @_guarded
    def check(self, deep: bool = False) -> list:
        """Consistency problems (empty = consistent); ``deep`` also verifies every vector (see :meth:`check_report`)."""
        return self.check_report(deep).problems

    @_guarded
    def check_report(self, deep: bool = False) -> CheckReport:
        """What :meth:`check` finds, with the damaged scans by id: rows of other weights, a patch count that does
        not match the stored patches and, with ``deep``, vectors that fail the checksum written when added."""
        with self._reading() as conn:
            return self._report(conn, deep)

    def _report(self, conn, deep: bool) -> CheckReport:
        report = CheckReport()

        def damage(sid, path, series, reason):
            if sid not in report.damaged:
                report.damaged[sid] = (path, series, reason)
                report.problems.append(f"scan {sid} ({path}{f', series {series}' if series else ''}): {reason}")

        rows = conn.execute("SELECT s.id, s.path, s.series_uid, s.model_id, s.weights_hash, s.patch_count, "
                            "(SELECT count(*) FROM patches p WHERE p.scan_id = s.id), (SELECT coalesce(max(patch_row) "
                            "+ 1, 0) FROM patches p WHERE p.scan_id = s.id) FROM scans s ORDER BY s.id").fetchall()
        report.scans = len(rows)
        known = {}
        for sid, path, series, mid, wh, count, stored, top in rows:
            known[sid] = (path, series)
            if mid != self.model_id or wh != self.weights_hash:
                damage(sid, path, series, f"embedded with model {mid} / weights {wh[:16]}..., not the index's")
            if stored != count or top != count:
                damage(sid, path, series, f"has {stored} stored patches for its {count}")
        if deep:
            with conn.cursor(name="ctfm_check") as cur:  # server-side: one scan's vectors in memory at a time
                cur.execute("SELECT s.id, s.checksum, s.embedding, p.embedding FROM scans s LEFT JOIN patches p ON "
                            "p.scan_id = s.id ORDER BY s.id, p.patch_row")
                current, digest, scan_vec, patch_vecs = None, None, None, []

                def verify():
                    if current is not None and current not in report.damaged:
                        p = np.array(patch_vecs, dtype=np.float32).reshape(-1, self.dim)
                        if store.checksum(scan_vec, p) != digest:
                            damage(current, *known[current], "its vectors do not match their checksum (changed in "
                                   "the database since added)")

                for sid, dg, s, p in cur:
                    if sid != current:
                        verify()
                        current, digest, scan_vec, patch_vecs = sid, dg, _np(s), []
                    if p is not None:
                        patch_vecs.append(_np(p))
                verify()
        return report


def _create_extension(conn, shown: str) -> str:
    """Create pgvector (inside the creator's transaction); refused in one line when this role may not."""
    try:
        with conn.transaction():  # a savepoint: the refusal below leaves the outer transaction usable
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFile,
            psycopg.errors.FeatureNotSupported) as e:
        raise RetrievalIndexError(f"the PostgreSQL extension 'vector' (pgvector) is not installed in {shown} and this "
                                  f"role may not install it ({_cause(e)}): ask the database administrator to run "
                                  "CREATE EXTENSION vector there") from None
    return conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'") \
        .fetchone()[0]
