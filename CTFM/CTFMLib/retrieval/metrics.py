"""Retrieval metrics, defined as CT-FM's evaluations computed them.

Input: for each query, the relevance of its ranked results, best first: ``rel[i] = 1`` when
result ``i + 1`` is relevant (same label as the query), else 0; the query itself is never
among its results. ``relevance`` is a list of such lists (queries may have different lengths),
or one flat list for a single query. Every ``*_at_k`` function returns the mean over queries.

With ``n = min(k, number of results)`` and ``H = rel[1] + ... + rel[n]`` (hits in the top k):

- **HR@k**, hit rate: 1 when ``H > 0``, else 0. (CT-FM's OrganMNIST3D protocol, ``hit_rate_k``.)
- **P@k**, precision: ``H / n``; dividing by ``n``, not ``k``, when fewer than k results exist,
  as the 3D-MIR notebooks' mean over the available ranks does.
- **AP@k**, average precision at k: ``(1 / H) * sum over i <= n with rel[i] = 1 of P@i``, and 0
  when ``H = 0``. It is normalised by the hits retrieved in the top k, not by all relevant items
  in the database: CT-FM's OrganMNIST3D ``ap_k``, and 3D-MIR's per-query
  ``sklearn.metrics.average_precision_score`` over the top-10 ranks, which equals it.
- **mAP**: the mean over queries of AP over each query's whole ranking (``k=None``). When the
  ranking holds the entire database, every relevant item is in it, so this is the classic mean
  average precision (normalised by all relevant items).

Protocols: OrganMNIST3D (CT-FM): queries = the val + test volumes, database = the train volumes,
ranked by L2 distance of the embeddings, label = organ class, HR@k and AP@k for k = 3, 5, 10.
3D-MIR: queries = the test volumes, database = the train volumes of the same organ, ranked by
cosine distance, relevant = same lesion flag (or lesion group), P@k for k = 3, 5, 10 and AP
over the top 10. ``ctfm index eval`` ranks the whole database, so its mAP is the classic one.

Semantic search (CT-FM's quantitative semantic-search evaluation): a patch centred on a
structure's centroid in one scan queries another scan; the score is the distance in mm from the
centre of the best-matching patch to the centroid of the same structure in the searched scan
(:func:`semantic_distance`, the mean over queries).

``ctfm index eval`` (:func:`evaluate` on an index, :func:`read_labels` for its labels CSV) scores an index with
these, leave-one-out.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def relevance(query_labels: Sequence, ranked_labels: Sequence) -> list:
    """Per query, ``[label of result == label of query]`` for its ranked results (lists of 0/1)."""
    if len(query_labels) != len(ranked_labels):
        raise ValueError(f"{len(query_labels)} query labels but {len(ranked_labels)} rankings")
    return [[int(r == q) for r in ranked] for q, ranked in zip(query_labels, ranked_labels)]


def _queries(relevance) -> list:
    rows = list(relevance)
    if not rows:
        raise ValueError("no queries: relevance is empty")
    if all(np.ndim(r) == 0 for r in rows):  # one flat list: a single query
        rows = [rows]
    out = []
    for r in rows:
        a = np.asarray(r, dtype=np.float64).reshape(-1)
        if np.any((a != 0) & (a != 1)):
            raise ValueError("relevance values must be 0/1 (or booleans)")
        out.append(a)
    return out


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    return int(k)


def _average_precision(rel: np.ndarray) -> float:
    hits = rel.sum()
    if hits == 0:
        return 0.0
    precision_at_i = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision_at_i * rel).sum() / hits)


def hit_rate_at_k(relevance, k: int) -> float:
    """HR@k: the fraction of queries with at least one relevant result in their top k."""
    k = _check_k(k)
    return float(np.mean([float(r[:k].sum() > 0) for r in _queries(relevance)]))


def precision_at_k(relevance, k: int) -> float:
    """P@k: the mean over queries of the fraction of relevant results among the top min(k, available)."""
    k = _check_k(k)
    return float(np.mean([r[:k].mean() if len(r) else 0.0 for r in _queries(relevance)]))


def average_precision_at_k(relevance, k: int) -> float:
    """AP@k (mean over queries): precision at each hit in the top k, averaged over those hits; 0 without hits."""
    k = _check_k(k)
    return float(np.mean([_average_precision(r[:k]) for r in _queries(relevance)]))


def mean_average_precision(relevance, k: Optional[int] = None) -> float:
    """mAP: the mean over queries of AP over the whole ranking (``k=None``) or its top ``k``."""
    if k is not None:
        return average_precision_at_k(relevance, k)
    return float(np.mean([_average_precision(r) for r in _queries(relevance)]))


def semantic_distance(best_match_lps, target_centre_lps) -> float:
    """Mean Euclidean distance (mm) from best-match centres to target structure centres, ``(3,)`` or ``(Q, 3)``."""
    a = np.asarray(best_match_lps, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(target_centre_lps, dtype=np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"{len(a)} best matches but {len(b)} target centres")
    return float(np.linalg.norm(a - b, axis=1).mean())


def read_labels(path) -> list:
    """``[(absolute path, series_uid or None, label, split)]`` from a CSV with columns path,label[,series_uid,split]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no labels file {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise ValueError(f"{path} needs columns 'path' and 'label' (it has: {', '.join(columns) or 'none'})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    out = []
    for number, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise ValueError(f"{path} row {number}: 'path' and 'label' must not be empty")
        split = row.get("split", "").lower() or None
        if split not in (None, "query", "database"):
            raise ValueError(f"{path} row {number}: split must be query or database, not {row['split']!r}")
        p = Path(row["path"]).expanduser()
        p = (p if p.is_absolute() else path.parent / p).resolve()
        out.append((str(p), row.get("series_uid") or None, row["label"], split))
    return out


def evaluate(index, labels: list, ks=(1, 3, 5, 10), metric: str = "cosine", exclude_patient: bool = False) -> dict:
    """Leave-one-out retrieval scores of an index's labelled scans (the metrics above).

    Each query scan's stored scan vector ranks every database scan but itself (and its patient's
    with ``exclude_patient``); relevant = same label. Without a ``split`` every labelled scan is
    both a query and in the database.
    """
    def find(path, series):
        for key, value in by_key.items():
            if key[0] == path and (series is None or key[1] == series):
                yield key, value

    by_key = {(rec.path, rec.series_uid): (scan_id, rec) for scan_id, rec in index.scans()}
    label_of, queries, database, missing = {}, [], set(), []
    for path, series, label, split in labels:
        found = list(find(path, series))
        if not found:
            missing.append(path + (f" (series {series})" if series else ""))
        for key, (scan_id, rec) in found:
            label_of[scan_id] = label
            if split in (None, "query"):
                queries.append((scan_id, rec))
            if split in (None, "database"):
                database.add(scan_id)
    if not queries or not database:
        raise ValueError("the labels name no indexed scan to query with or to search"
                         + (f" (not in the index: {'; '.join(missing[:5])})" if missing else "")
                         + "; add the scans first (`ctfm index add`), with the same paths")
    db_keys = {key for key, (sid, _) in by_key.items() if sid in database}
    relevance = []
    for scan_id, rec in queries:
        allowed = db_keys - {(rec.path, rec.series_uid)}  # never the query itself
        if not allowed:
            continue
        hits = index.search(index.vectors(scan_id)[0], k=len(allowed), level="scan", metric=metric,
                            exclude_patient=rec.patient_id if exclude_patient else None,
                            where=lambda r, allowed=allowed: (r.path, r.series_uid) in allowed)
        relevance.append([int(label_of[h.scan_id] == label_of[scan_id]) for h in hits])
    if not relevance:
        raise ValueError("every query's database is empty: label at least two scans")
    result = {"queries": len(relevance), "database": len(database), "metric": metric, "not_indexed": missing,
              "mAP": mean_average_precision(relevance)}
    for k in ks:
        result[f"HR@{k}"] = hit_rate_at_k(relevance, k)
        result[f"P@{k}"] = precision_at_k(relevance, k)
        result[f"AP@{k}"] = average_precision_at_k(relevance, k)
    return result
