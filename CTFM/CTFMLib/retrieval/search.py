"""Nearest-neighbour search over one level of a retrieval index: exact (numpy) and FAISS.

Both backends only *propose* candidate rows; the similarity of every returned hit is recomputed in
float64 from the stored vectors, so exact and FAISS results differ only in which rows they find,
never in the numbers they report. Similarity is the cosine in [-1, 1] (``metric="cosine"``) or the
negated Euclidean distance (``metric="l2"``), so larger is always more similar.

FAISS (optional: ``pip install faiss-cpu``) is chosen by size: below ``IVF_MIN_ROWS`` rows an HNSW
graph (no training, fine for small sets), from there on IVF-Flat with ``2 * sqrt(n)`` lists trained
on a sample (builds in about a minute per million 512-d vectors on 2 cores, and its inverted lists
keep clustered data - many scans of the same anatomy - together, where HNSW's recall drops).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

FAISS_AUTO_MIN_ROWS = 100_000  # backend="auto" uses FAISS from here on (exact search takes ~10 ms a query here)
IVF_MIN_ROWS = 50_000  # HNSW below, IVF-Flat from here (IVF needs ~39 training points per list)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_TRAIN_PER_LIST = 64
RESAVE_GROWTH = 1.25  # rewrite a saved FAISS index once the level has grown by this factor
_BLOCK_ROWS = 65536  # rows per matrix product: bounds temporary memory to q * 65536 floats


def faiss_module():
    """The ``faiss`` module, or None when it is not installed (exact search still works)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass
class LevelView:
    """The vectors of one level as one snapshot sees them.

    vectors: (rows, D) float32 (memory-mapped); norms: (rows,) float32 L2 norms;
    owner: (rows,) int64 position of the owning scan in the snapshot, -1 for a removed scan's rows.
    """

    level: str
    generation: int
    vectors: np.ndarray
    norms: np.ndarray
    owner: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])


def row_norms(vectors: np.ndarray, start: int = 0) -> np.ndarray:
    out = np.empty(vectors.shape[0] - start, dtype=np.float32)
    for a in range(start, vectors.shape[0], _BLOCK_ROWS):
        b = min(a + _BLOCK_ROWS, vectors.shape[0])
        out[a - start:b - start] = np.linalg.norm(np.asarray(vectors[a:b], dtype=np.float32), axis=1)
    return out


def exact_scores(view: LevelView, queries: np.ndarray, metric: str, allowed: np.ndarray) -> np.ndarray:
    """(q, rows) float32 similarities, ``-inf`` where ``allowed`` is False. Cost: one pass over the vectors."""
    q = np.asarray(queries, dtype=np.float32)
    out = np.full((q.shape[0], view.rows), -np.inf, dtype=np.float32)
    qn = np.linalg.norm(q, axis=1)
    for a in range(0, view.rows, _BLOCK_ROWS):
        b = min(a + _BLOCK_ROWS, view.rows)
        ok = allowed[a:b]
        if not ok.any():
            continue
        x = np.asarray(view.vectors[a:b], dtype=np.float32)
        dots = q @ x.T
        norms = view.norms[a:b]
        if metric == "cosine":
            denom = qn[:, None] * norms[None, :]
            s = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
        else:
            s = -np.sqrt(np.maximum(qn[:, None] ** 2 + norms[None, :] ** 2 - 2 * dots, 0))
        if not ok.all():
            s[:, ~ok] = -np.inf
        out[:, a:b] = s
    return out


def rescore(view: LevelView, query: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Exact float64 similarities of ``query`` (D,) to ``rows`` of the level."""
    if rows.size == 0:
        return np.zeros(0)
    order = np.argsort(rows)  # memmap reads in file order
    x = np.empty((rows.size, view.vectors.shape[1]), dtype=np.float64)
    x[order] = np.asarray(view.vectors[rows[order]], dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        denom = np.linalg.norm(x, axis=1) * np.linalg.norm(q)
        return np.divide(x @ q, denom, out=np.zeros(rows.size), where=denom > 0)
    return -np.linalg.norm(x - q[None, :], axis=1)


def pick(rows: np.ndarray, sims: np.ndarray, owner: np.ndarray, k: int, max_per_scan: Optional[int]):
    """The best ``k`` of the candidates, at most ``max_per_scan`` per scan; (rows, sims) best first."""
    order = np.lexsort((rows, owner[rows], -sims))  # ties: by scan (id order), then row, as the PostgreSQL index
    rows, sims = rows[order], sims[order]
    if max_per_scan is None:
        return rows[:k], sims[:k]
    taken, keep = {}, []
    for i, r in enumerate(rows):
        s = int(owner[r])
        if taken.get(s, 0) < max_per_scan:
            taken[s] = taken.get(s, 0) + 1
            keep.append(i)
            if len(keep) == k:
                break
    keep = np.asarray(keep, dtype=np.int64)
    return rows[keep], sims[keep]


def _want(k: int, max_per_scan: Optional[int], n_allowed: int) -> int:
    """How many candidates to ask a backend for: k plus a margin for float32 near-ties."""
    c = k + 8 if max_per_scan is None else 4 * k
    return min(c, n_allowed)


def search_exact(view, queries, k, metric, allowed, max_per_scan=None) -> list:
    """Per query: (rows, sims) best first. Candidates from float32 scores, sims recomputed exactly."""
    n_allowed = int(allowed.sum())
    results = []
    q_chunk = max(1, int(1e8 // max(view.rows, 1)))  # cap the (q, rows) score matrix at ~400 MB
    for a in range(0, len(queries), q_chunk):
        scores = exact_scores(view, queries[a:a + q_chunk], metric, allowed)
        for qi, s in enumerate(scores):
            c = _want(k, max_per_scan, n_allowed)
            while True:
                cand = np.argpartition(-s, c - 1)[:c] if 0 < c < s.size else np.flatnonzero(np.isfinite(s))
                cand = cand[np.isfinite(s[cand])]
                rows, sims = pick(cand, rescore(view, queries[a + qi], cand, metric), view.owner, k, max_per_scan)
                if len(rows) >= k or c >= n_allowed:
                    break
                c = min(4 * c, n_allowed)
            results.append((rows, sims))
    return results


class FaissCache:
    """FAISS indexes of one retrieval index, kept in memory and saved under ``<index>/faiss``.

    An index covers rows [0, ntotal) of one (level, metric, generation); rows appended later are
    added incrementally, removed rows are excluded per search with an ID selector, and
    ``compact()`` (a new generation) makes a fresh build.
    """

    def __init__(self, root: Path, save: bool = True):
        self.root, self.save = Path(root) / "faiss", save
        self.mem = {}  # (level, metric) -> (generation, faiss index, saved rows)

    @staticmethod
    def kind_for(rows: int) -> str:
        return "hnsw" if rows < IVF_MIN_ROWS else "ivf"

    def _fits(self, index, rows: int) -> bool:
        """Whether an existing index suits a level of ``rows`` rows (else rebuild)."""
        faiss = faiss_module()
        is_ivf = _ivf(faiss, index) is not None
        if is_ivf != (self.kind_for(rows) == "ivf"):
            return False
        return not is_ivf or _nlist(rows) <= 2 * _ivf(faiss, index).nlist  # rebuild once lists are 2x too few

    def get(self, view: LevelView, metric: str):
        key = (view.level, metric)
        gen, index, saved = self.mem.get(key, (None, None, 0))
        if gen != view.generation or index is None or index.ntotal > view.rows or not self._fits(index, view.rows):
            index, saved = self._load(view, metric)
        if index is None or not self._fits(index, view.rows):
            index, saved = _build(view, metric), 0
        if index.ntotal < view.rows:
            _add(index, view, metric, index.ntotal, view.rows)
        if self.save and index.ntotal >= RESAVE_GROWTH * max(saved, 1):
            saved = self._save(index, view, metric)
        self.mem[key] = (view.generation, index, saved)
        return index

    def _name(self, view, metric, rows):
        return self.root / f"{view.level}-{metric}-g{view.generation}-n{rows}.faiss"

    def _saved(self, level, metric, generation=None):
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob(f"{level}-{metric}-g*-n*.faiss"):
            g, n = p.stem.rsplit("-", 2)[1:]
            out.append((int(g[1:]), int(n[1:]), p))
        return [t for t in out if generation is None or t[0] == generation]

    def _load(self, view, metric):
        faiss = faiss_module()
        best = sorted(t for t in self._saved(view.level, metric, view.generation) if t[1] <= view.rows)
        if not best:
            return None, 0
        try:
            return faiss.read_index(str(best[-1][2])), best[-1][1]
        except (RuntimeError, OSError):  # deleted or half-copied by another process: rebuild
            return None, 0

    def _save(self, index, view, metric) -> int:
        from .. import files

        faiss = faiss_module()
        target = self._name(view, metric, index.ntotal)
        try:
            self.root.mkdir(exist_ok=True)
            with files.atomic_output(target) as tmp:  # private temporary, fsync'ed, renamed; removed on failure
                faiss.write_index(index, str(tmp))
        except (OSError, RuntimeError, ValueError):  # read-only or full: keep the index in memory only
            return index.ntotal
        for _, _, p in self._saved(view.level, metric):
            if p != target:
                unlink_quietly(p)
        return index.ntotal

    def drop_generations(self, keep: int) -> None:
        """Delete saved indexes of generations other than ``keep`` (after compaction)."""
        for level in ("scan", "patch"):
            for metric in ("cosine", "l2"):
                for g, _, p in self._saved(level, metric):
                    if g != keep:
                        unlink_quietly(p)
        self.mem.clear()

    def search(self, view, queries, k, metric, allowed, max_per_scan=None) -> list:
        """Like ``search_exact``; a query FAISS cannot fill (a very selective filter) falls back to exact."""
        faiss = faiss_module()
        index = self.get(view, metric)
        n_allowed = int(allowed.sum())
        sel_bits = None
        if n_allowed < index.ntotal:
            mask = np.zeros(index.ntotal, dtype=bool)
            mask[:view.rows] = allowed
            sel_bits = np.packbits(mask, bitorder="little")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if metric == "cosine":
            q = _normalised(q)
        results = [None] * len(q)
        c = _want(k, max_per_scan, n_allowed)
        todo = np.arange(len(q))
        while todo.size and c > 0:
            params, keep_alive = _params(faiss, index, c, sel_bits)
            _, found = index.search(q[todo], c, params=params)
            del keep_alive
            again = []
            for qi, ids in zip(todo, found):
                cand = ids[ids >= 0].astype(np.int64)
                cand = cand[cand < view.rows]
                rows, sims = pick(cand, rescore(view, queries[qi], cand, metric), view.owner, k, max_per_scan)
                results[qi] = (rows, sims)
                if len(rows) < min(k, n_allowed) and c < n_allowed:
                    again.append(qi)
            todo, c = np.asarray(again, dtype=np.int64), min(4 * c, n_allowed)
        for qi in todo:  # still short of k: exact search is always complete
            results[qi] = search_exact(view, queries[qi:qi + 1], k, metric, allowed, max_per_scan)[0]
        return [r if r is not None else (np.zeros(0, np.int64), np.zeros(0)) for r in results]


def _ivf(faiss, index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _params(faiss, index, c, sel_bits):
    sel = None
    if sel_bits is not None:
        sel = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(sel_bits))
    ivf = _ivf(faiss, index)
    if ivf is not None:
        p = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, max(16, ivf.nlist // 16)))
    else:
        p = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, c))
    if sel is not None:
        p.sel = sel
    return p, (sel, sel_bits)  # the caller holds these while FAISS reads them through raw pointers


def _nlist(rows: int) -> int:
    return max(16, int(2 * math.sqrt(rows)))


def _normalised(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _build(view: LevelView, metric: str):
    faiss = faiss_module()
    d = view.vectors.shape[1]
    fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if FaissCache.kind_for(view.rows) == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, fm)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    nlist = _nlist(view.rows)
    index = faiss.index_factory(d, f"IVF{nlist},Flat", fm)
    n_train = min(view.rows, IVF_TRAIN_PER_LIST * nlist)
    sample = np.sort(np.random.default_rng(0).choice(view.rows, n_train, replace=False))
    x = np.asarray(view.vectors[sample], dtype=np.float32)
    index.train(_normalised(x) if metric == "cosine" else x)
    return index


def _add(index, view: LevelView, metric: str, start: int, stop: int) -> None:
    for a in range(start, stop, _BLOCK_ROWS):
        x = np.array(view.vectors[a:min(a + _BLOCK_ROWS, stop)], dtype=np.float32)
        index.add(_normalised(x) if metric == "cosine" else x)


def unlink_quietly(path: Path) -> None:
    """Remove a file the index no longer needs (here and in the index); one that cannot be removed is left."""
    try:
        os.unlink(path)
    except OSError:
        pass
