"""The naive baseline the paper argues against: rank the database by the sum of absolute
differences (L1) between query and item, in pixel space or in backbone-feature space, with
no hashing at all. Also the cosine ranking of real-valued embeddings (e.g. SGML's), which
goes through the same chunked evaluator.

Pure numpy. Distances are computed one block of queries at a time and scored with the
public metrics of :mod:`fashionhash.evaluation.metrics` (a float distance matrix works with
all of them), so memory stays at a few tens of MB for 1,000 queries x 40,000 items and the
full ``(Q, N)`` matrix never exists. Keys match :func:`~fashionhash.evaluation.metrics.
evaluate_retrieval` where the metric is the same (``map``, ``map@1000``, ``p@10``, ``top1``,
``ndcg@10``, ...), so the rows sit in one table with the hashing methods.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fashionhash.evaluation.metrics import (
    DEFAULT_ATTR_KEYS, attribute_gain, mean_average_precision, ndcg_at_k, precision_at_k,
    relevance_from_labels, same_item_topk, top1_expected,
)

__all__ = ["l1_distances", "cosine_distances", "unit_rows", "rank_metrics", "l1_rank_metrics", "pixel_vectors"]

# (queries, items) of one L1 sub-block: the (8, 64, F) float32 temporary stays in L2 cache
_L1_QUERIES, _L1_ITEMS = 8, 64
_QUERY_CHUNK = 64  # queries scored at once: (64, N) float32 distances


def l1_distances(query: np.ndarray, db: np.ndarray) -> np.ndarray:
    """``(Q, F) x (N, F) -> (Q, N)`` float32 sums of absolute differences.

    Blocked so that every temporary is a few hundred kB: about 1 ns per
    (query, item, dimension) on one core, i.e. ~1 minute for 1,000 x 40,000 x 1,280 (use
    ``workers`` in :func:`rank_metrics` to spread query blocks over cores)."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    d = np.ascontiguousarray(db, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"need (Q, F) and (N, F) arrays, got {q.shape} and {d.shape}")
    out = np.empty((len(q), len(d)), np.float32)
    buf = np.empty((_L1_QUERIES, _L1_ITEMS, q.shape[1]), np.float32)
    for i in range(0, len(q), _L1_QUERIES):
        qq = q[i:i + _L1_QUERIES, None, :]
        for j in range(0, len(d), _L1_ITEMS):
            dd = d[None, j:j + _L1_ITEMS, :]
            t = buf[:qq.shape[0], :dd.shape[1]]
            np.subtract(qq, dd, out=t)
            np.abs(t, out=t)
            np.add.reduce(t, axis=2, out=out[i:i + _L1_QUERIES, j:j + _L1_ITEMS])
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` rows scaled to unit L2 norm, float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_distances(query: np.ndarray, db: np.ndarray) -> np.ndarray:
    """``(Q, D) x (N, D) -> (Q, N)`` float32 ``1 - cos``, in [0, 2]."""
    return np.clip(1.0 - unit_rows(query) @ unit_rows(db).T, 0.0, 2.0)


def rank_metrics(
    query_vecs: np.ndarray,
    db_vecs: np.ndarray,
    query_labels: np.ndarray | None,
    db_labels: np.ndarray | None,
    *,
    metric: str = "l1",
    query_attrs: Mapping[str, Any] | None = None,
    db_attrs: Mapping[str, Any] | None = None,
    attr_keys: Sequence[str] | None = DEFAULT_ATTR_KEYS,
    true_index: np.ndarray | None = None,
    db_extra: np.ndarray | None = None,
    map_k: int = 1000,
    ndcg_k: int = 10,
    prec_k: Sequence[int] = (10, 100),
    same_item_ks: Sequence[int] = (1, 10),
    chunk: int = _QUERY_CHUNK,
    workers: int = 1,
) -> dict[str, Any]:
    """Evaluate exhaustive real-valued ranking (``metric`` ``"l1"`` or ``"cosine"``).

    ``query_vecs (Q, F)``, ``db_vecs (N, F)``; labels and attributes as in
    :func:`~fashionhash.evaluation.metrics.evaluate_retrieval`. Returns ``map`` (mAP@all),
    ``map@{map_k}``, ``p@{k}``, ``top1``, ``ndcg@{ndcg_k}`` (attribute gains when attributes
    are given, the label version then as ``ndcg_labels@{ndcg_k}``), ``top1_attr``; with
    ``true_index (Q,)`` into ``db_vecs`` (or into ``db_vecs`` followed by ``db_extra``, the
    gallery of the same-product test), ``same_item_top{k}``. Each is the mean over queries
    of the per-query value defined in :mod:`fashionhash.evaluation.metrics` (stable ranking,
    tie-aware top-1). Labels/attributes only rank against ``db_vecs``; ``db_extra`` is used by
    the same-item metric only.

    Queries are scored ``chunk`` at a time; ``workers > 1`` runs chunks in threads (numpy
    releases the GIL in the distance kernels).
    """
    if metric not in ("l1", "cosine"):
        raise ValueError(f"metric is l1 or cosine, not {metric!r}")
    q = np.asarray(query_vecs, dtype=np.float32)
    db = np.asarray(db_vecs, dtype=np.float32)
    n_q, n = len(q), len(db)
    if n == 0:
        raise ValueError("empty database")
    with_labels = query_labels is not None and db_labels is not None
    with_attrs = query_attrs is not None and db_attrs is not None
    with_true = true_index is not None
    if not (with_labels or with_attrs or with_true):
        raise ValueError("need labels, attributes or true_index to evaluate against")
    if with_labels and (len(query_labels) != n_q or len(db_labels) != n):
        raise ValueError("labels do not match the number of queries / database items")
    gallery = db if db_extra is None else np.concatenate([db, np.asarray(db_extra, np.float32)])
    if with_true:
        ti = np.asarray(true_index, dtype=np.int64).reshape(-1)
        if ti.shape != (n_q,):
            raise ValueError(f"true_index must be ({n_q},), got {ti.shape}")
    if with_attrs:
        keys = list(attr_keys) if attr_keys is not None else sorted(set(query_attrs) & set(db_attrs))
        qa = {k: np.asarray(query_attrs[k], dtype=object) for k in keys}
    dist_fn = l1_distances if metric == "l1" else cosine_distances

    def score(s: slice) -> dict[str, float]:
        """Sums over the queries of ``s`` (not means: chunks are combined afterwards)."""
        c = s.stop - s.start
        d_gal = dist_fn(q[s], gallery)
        d = d_gal[:, :n]
        out: dict[str, float] = {}
        if with_labels:
            rel = relevance_from_labels(np.asarray(query_labels)[s], np.asarray(db_labels))
            out["map"] = c * mean_average_precision(d, rel)
            out[f"map@{map_k}"] = c * mean_average_precision(d, rel, k=map_k)
            for k in prec_k:
                out[f"p@{k}"] = c * precision_at_k(d, rel, k)
            out["top1"] = c * top1_expected(d, rel)
            out[f"ndcg_labels@{ndcg_k}" if with_attrs else f"ndcg@{ndcg_k}"] = c * ndcg_at_k(d, rel, ndcg_k)
        if with_attrs:
            gains = attribute_gain({k: v[s] for k, v in qa.items()}, db_attrs, keys)
            out[f"ndcg@{ndcg_k}"] = c * ndcg_at_k(d, gains, ndcg_k)
            out["top1_attr"] = c * top1_expected(d, gains)
        if with_true:
            for k, v in same_item_topk(d_gal, ti[s], same_item_ks).items():
                out[f"same_item_top{k}"] = c * v
        return out

    chunks = [slice(i, min(i + chunk, n_q)) for i in range(0, n_q, max(1, chunk))]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(score, chunks))
    else:
        results = [score(s) for s in chunks]
    totals: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            totals[k] = totals.get(k, 0.0) + v
    out: dict[str, Any] = {k: v / max(n_q, 1) for k, v in totals.items()}
    if with_labels or with_attrs:
        out["ndcg_gains"] = "attributes" if with_attrs else "labels"
    out.update({"n_query": int(n_q), "n_database": int(n), "distance": metric})
    return out


def l1_rank_metrics(query_vecs: np.ndarray, db_vecs: np.ndarray, query_labels: np.ndarray | None,
                    db_labels: np.ndarray | None, **kwargs) -> dict[str, Any]:
    """The naive baseline: :func:`rank_metrics` with the L1 distance (pixels or features)."""
    return rank_metrics(query_vecs, db_vecs, query_labels, db_labels, metric="l1", **kwargs)


def pixel_vectors(sources: Sequence, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Photos (paths, PIL images or ``(H, W)`` uint8 arrays) -> ``(N, size*size)`` float32
    greyscale thumbnails in [0, 1] (letterboxed on white, as the models see them) and an
    ``(N,)`` ok mask; unreadable photos get a zero row and ``ok=False``."""
    from PIL import Image

    from fashionhash.data.transforms import ImageError, letterbox, load_image

    out = np.zeros((len(sources), size * size), np.float32)
    ok = np.zeros(len(sources), bool)
    for i, src in enumerate(sources):
        try:
            if isinstance(src, np.ndarray):
                img = Image.fromarray(src)
            elif isinstance(src, Image.Image):
                img = src
            else:
                img = load_image(src)
        except ImageError:
            continue
        out[i] = np.asarray(letterbox(img.convert("L"), size), dtype=np.float32).reshape(-1) / 255.0
        ok[i] = True
    return out, ok
