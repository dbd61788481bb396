"""Retrieval metrics for hash codes (pure numpy).

Shapes and conventions shared by every function here:

* ``dist`` is a ``(Q, N)`` distance matrix (Q queries x N database items): Hamming distances
  as unsigned/signed integers, or any real-valued distance (no NaN). Smaller is closer.
* ``rel`` is a ``(Q, N)`` relevance matrix: bool, or graded gains ``>= 0``. Binary metrics
  (mAP, precision, recall) treat ``rel > 0`` as relevant; ``top1_expected`` and
  ``ndcg_at_k`` use the graded values as they are.
* **Ranking.** Unless a metric is stated to be tie-aware, a query's ranking is the *stable*
  sort of its row of ``dist``: ascending distance, ties broken by ascending database index
  (``np.argsort(dist, axis=1, kind="stable")``). Hash codes produce massive ties (only
  ``n_bits + 1`` distinct distances), so this deterministic order is part of the definition
  of every ranking metric; it makes results reproducible and independent of sort algorithm.
  The project's evaluation lists the database in :func:`tie_order` (a seeded random order)
  first, so that a catalogue whose ids are grouped by class does not decide the ties.
  ``top1_expected`` and ``same_item_topk`` instead average over a uniformly random order of
  the tied items, which is what a user of a Hamming index actually experiences.
* Every metric is a macro-average over queries (each query weighs the same).

The entry point used by the project is :func:`evaluate_retrieval`, which goes from packed
codes to a JSON-serialisable dict, processing queries in chunks so memory stays bounded.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, overload

import numpy as np

from fashionhash import codes

__all__ = [
    "DEFAULT_ATTR_KEYS",
    "rank",
    "mean_average_precision",
    "precision_at_k",
    "precision_within_radius",
    "pr_curve_by_radius",
    "top1_expected",
    "ndcg_at_k",
    "attribute_gain",
    "same_item_topk",
    "relevance_from_labels",
    "tie_order",
    "rerank_key",
    "evaluate_retrieval",
    "plot_pr_curves",
]

#: Attributes compared for graded relevance by default; mirrors
#: ``fashionhash.data.catalogue.GRADED_ATTRIBUTES`` (not imported: metrics stay independent
#: of the data layer; a test checks the two agree).
DEFAULT_ATTR_KEYS: tuple[str, ...] = ("articleType", "baseColour", "gender", "usage", "season")

# Target number of (query, item) cells processed at once: ~4M cells keeps every per-chunk
# temporary (int64 orders, float gains, ...) in the tens of MB even for N = 60,000.
_CELLS_PER_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------
# validation and low-level helpers
# --------------------------------------------------------------------------------------


def _as_dist(dist: np.ndarray) -> np.ndarray:
    """Validate ``(Q, N)`` distances; narrow small non-negative ints to uint16.

    uint16 matters for speed: numpy's stable sort is a radix sort for <= 16-bit integers,
    an order of magnitude faster than the timsort it uses for wider types.
    """
    d = np.asarray(dist)
    if d.ndim != 2:
        raise ValueError(f"dist must be 2-D (Q, N), got shape {d.shape}")
    if d.dtype == np.bool_:
        d = d.astype(np.uint8)
    if d.dtype.kind in "iu":
        if d.dtype.itemsize > 2 or d.dtype.kind == "i":
            if d.size and d.min() >= 0 and d.max() <= np.iinfo(np.uint16).max:
                d = d.astype(np.uint16)
    elif d.dtype.kind == "f":
        if np.isnan(d).any():
            raise ValueError("dist contains NaN")
    else:
        raise TypeError(f"dist must be numeric, got {d.dtype}")
    return d


def _as_rel(rel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    r = np.asarray(rel)
    if r.shape != shape:
        raise ValueError(f"relevance shape {r.shape} does not match dist shape {shape}")
    return r


def _binary(rel: np.ndarray) -> np.ndarray:
    return rel if rel.dtype == np.bool_ else rel > 0


def _row_chunks(n_rows: int, n_cols: int, chunk: int | None = None) -> Iterator[slice]:
    if chunk is None:
        chunk = max(1, _CELLS_PER_CHUNK // max(1, n_cols))
    for start in range(0, n_rows, chunk):
        yield slice(start, min(start + chunk, n_rows))


def _stable_argsort(d: np.ndarray) -> np.ndarray:
    """Full stable argsort of each row of a validated ``(C, N)`` block."""
    return np.argsort(d, axis=1, kind="stable")


def _topk_stable(d: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` columns of the stable argsort of ``d`` (C, N), for ``1 <= k < N``.

    Selection by partition: everything strictly below the k-th smallest value is in; of the
    items equal to it, the lowest-index ones fill the remaining slots (exactly what a stable
    sort would pick). Only the selected ``(C, k)`` block is then sorted.
    """
    n_rows = d.shape[0]
    kth = np.partition(d, k - 1, axis=1)[:, k - 1 : k]  # (C, 1)
    less = d < kth
    need = k - np.count_nonzero(less, axis=1)  # (C,) >= 1 slots for ties at the boundary
    lr, lc = np.nonzero(less)
    er, ec = np.nonzero(d == kth)  # row-major: ascending index within each row
    n_eq = np.bincount(er, minlength=n_rows)
    eq_pos = np.arange(er.size) - np.repeat(np.cumsum(n_eq) - n_eq, n_eq)
    keep = eq_pos < need[er]
    rows = np.concatenate([lr, er[keep]])
    cols = np.concatenate([lc, ec[keep]])
    cols = cols[np.lexsort((cols, rows))].reshape(n_rows, k)  # per row: ascending index
    vals = np.take_along_axis(d, cols, axis=1)
    return np.take_along_axis(cols, np.argsort(vals, axis=1, kind="stable"), axis=1)


def _rank_block(d: np.ndarray, k: int) -> np.ndarray:
    n = d.shape[1]
    # Radix sort on <=16-bit ints beats partition+sort even for small k; for floats the
    # partition route wins once k is well below N.
    if k >= n or 4 * k >= n or (d.dtype.kind in "iu" and d.dtype.itemsize <= 2):
        return _stable_argsort(d)[:, :k]
    return _topk_stable(d, k)


def _check_k(k: int, name: str = "k") -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def _discounts(k: int) -> np.ndarray:
    """``1 / log2(i + 1)`` for ranks ``i = 1..k``."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


# --------------------------------------------------------------------------------------
# per-query kernels (shared by the public metrics and evaluate_retrieval)
# --------------------------------------------------------------------------------------


def _ap_per_query(rel_sorted: np.ndarray, ks: Sequence[int | None]) -> dict[int | None, tuple]:
    """DeepHash AP for each cutoff in ``ks`` from a ranked relevance block ``(C, M)`` bool.

    Returns ``{k: (ap (C,), n_relevant_in_top_k (C,))}``. Works on the positions of the
    relevant items only: the j-th relevant item at 1-based rank p contributes P@p = j / p.
    """
    n_rows, m = rel_sorted.shape
    rows, cols = np.nonzero(rel_sorted)
    n_rel = np.bincount(rows, minlength=n_rows)
    j = np.arange(1, rows.size + 1) - np.repeat(np.cumsum(n_rel) - n_rel, n_rel)
    contrib = j / (cols + 1.0)
    out: dict[int | None, tuple] = {}
    for k in ks:
        if k is None or k >= m:
            r_k, s_k = n_rel, np.bincount(rows, weights=contrib, minlength=n_rows)
        else:
            sel = cols < k
            r_k = np.bincount(rows[sel], minlength=n_rows)
            s_k = np.bincount(rows[sel], weights=contrib[sel], minlength=n_rows)
        ap = np.divide(s_k, r_k, out=np.zeros(n_rows), where=r_k > 0)
        out[k] = (ap, r_k)
    return out


def _compare_to(key: tuple[np.ndarray, ...], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic comparison of every item's key with item ``idx[c]`` of its row.

    ``key`` is a tuple of ``(C, N)`` arrays (primary first); ``idx`` is ``(C, 1)``. Returns
    ``(less, equal)`` bool masks ``(C, N)``. A tuple key lets the re-ranked order
    (Hamming, asymmetric) be compared exactly without building a combined float key.
    """
    less = equal = None
    for comp in key:
        ref = np.take_along_axis(comp, idx, axis=1)
        lt, eq = comp < ref, comp == ref
        if less is None:
            less, equal = lt, eq
        else:
            less |= equal & lt
            equal &= eq
    return less, equal


def _top1_from_mask(at_min: np.ndarray, rel: np.ndarray) -> np.ndarray:
    if rel.dtype == np.bool_:
        hits = np.count_nonzero(at_min & rel, axis=1).astype(np.float64)
    else:
        hits = np.where(at_min, rel, 0).sum(axis=1, dtype=np.float64)
    return hits / np.count_nonzero(at_min, axis=1)


def _top1_per_query(d: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Mean relevance over the items tied at each row's minimum distance, ``(C,)``."""
    return _top1_from_mask(d == d.min(axis=1, keepdims=True), rel)


def _same_item_from_masks(less: np.ndarray, equal: np.ndarray, ks: Sequence[int]) -> dict:
    a = np.count_nonzero(less, axis=1)
    t = np.count_nonzero(equal, axis=1)  # >= 1: includes the true item
    return {k: np.clip((k - a) / t, 0.0, 1.0) for k in ks}


def _same_item_per_query(d: np.ndarray, true_index: np.ndarray, ks: Sequence[int]) -> dict:
    return _same_item_from_masks(*_compare_to((d,), true_index[:, None]), ks)


def _ndcg_per_query(gains_sorted: np.ndarray, idcg: np.ndarray) -> np.ndarray:
    k = gains_sorted.shape[1]
    dcg = gains_sorted.astype(np.float64) @ _discounts(k)
    return np.divide(dcg, idcg, out=np.zeros(dcg.shape), where=idcg > 0)


def _idcg(gains: np.ndarray, k: int) -> np.ndarray:
    """IDCG@k per row of ``gains`` (C, N): the k largest gains in decreasing order."""
    n = gains.shape[1]
    k = min(k, n)
    g = gains.astype(np.float32, copy=False) if gains.dtype == np.bool_ else gains
    if k <= 32 and k < n:
        # k row maxima, one at a time: partition degrades on rows of few distinct gains
        # (graded gains: 1,000 x 42,003 took 3.5 s against 0.2 s this way)
        work = g.astype(g.dtype if g.dtype.kind == "f" else np.float64, copy=True)
        rows = np.arange(g.shape[0])
        top = np.empty((g.shape[0], k), dtype=np.float64)
        for j in range(k):
            at = work.argmax(axis=1)
            top[:, j] = work[rows, at]
            work[rows, at] = -np.inf
        return top @ _discounts(k)
    # Partition so the k largest sit at the end (no negated copy of the whole block).
    top = np.partition(g, n - k, axis=1)[:, n - k :] if k < n else g
    top = np.sort(top, axis=1)[:, ::-1].astype(np.float64)
    return top @ _discounts(k)


def _idcg_binary(n_rel: np.ndarray, k: int) -> np.ndarray:
    """IDCG@k for 0/1 gains: the first ``min(R, k)`` discounts."""
    cum = np.concatenate([[0.0], np.cumsum(_discounts(k))])
    return cum[np.minimum(n_rel, k)]


def _radius_counts(d: np.ndarray, rel: np.ndarray, n_radii: int) -> tuple[np.ndarray, ...]:
    """Per query and radius r = 0..n_radii-1: (#retrieved with d <= r, #relevant among them),
    both ``(C, n_radii)``, plus #relevant overall ``(C,)``.

    ``d <= r`` for integer r is ``ceil(d) <= r``, so one histogram over ``ceil(d)`` bins
    (clipped into an overflow bin) serves every radius at once.
    """
    n_rows, _ = d.shape
    width = n_radii + 1
    # int32 bins are enough: C * width << 2**31 for any sane chunk and code length.
    idx_t = np.int64 if n_rows * width >= 2**31 else np.int32
    if d.dtype.kind == "f":
        b = np.clip(np.ceil(d), 0, n_radii).astype(idx_t)
    else:
        b = np.clip(d, 0, n_radii).astype(idx_t)
    flat = b + (np.arange(n_rows, dtype=idx_t) * width)[:, None]
    relb = _binary(rel)
    all_h = np.bincount(flat.ravel(), minlength=n_rows * width).reshape(n_rows, width)
    rel_h = np.bincount(flat[relb], minlength=n_rows * width).reshape(n_rows, width)
    retrieved = np.cumsum(all_h[:, :n_radii], axis=1)
    tp = np.cumsum(rel_h[:, :n_radii], axis=1)
    return retrieved, tp, rel_h.sum(axis=1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else 0.0


# --------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------


def rank(dist: np.ndarray, k: int | None = None) -> np.ndarray:
    """Stable ranking: ``(Q, N)`` distances -> ``(Q, k)`` int64 database indices.

    Row q is ``np.argsort(dist[q], kind="stable")[:k]`` exactly: ascending distance, ties
    (including ties straddling the k-th position) broken by ascending database index.
    ``k=None`` (or ``k >= N``) returns the full ranking ``(Q, N)``. For ``k << N`` on
    real-valued distances only the top k are sorted (partition first).
    """
    d = _as_dist(dist)
    q, n = d.shape
    k = n if k is None else min(_check_k(k), n)
    out = np.empty((q, k), dtype=np.int64)
    for s in _row_chunks(q, n):
        out[s] = _rank_block(d[s], k)
    return out


def mean_average_precision(
    dist: np.ndarray, rel: np.ndarray, k: int | None = None, *, exclude_empty: bool = False
) -> float:
    """mAP@k with the DeepHash definition (DeepHash / DPSH / HashNet evaluation code).

    For query q with stable ranking (module docstring) and binary relevance ``rel > 0``::

        AP_q = (1 / R_q) * sum_{i <= k, rel_i} P@i,    P@i = (#relevant in top i) / i

    where ``R_q`` is the number of relevant items *within the top k* (not in the whole
    database). ``mAP = mean_q AP_q``. ``k=None`` is mAP@all.

    A query with ``R_q = 0`` has AP 0 and counts in the mean (DPSH's ``CalcTopMap``);
    ``exclude_empty=True`` drops such queries instead (HashNet's ``mean_average_precision``),
    returning 0.0 if no query has a relevant item in its top k.

    Note: the reference implementations rank with an unstable sort, so their numbers can
    differ slightly from ours under ties; the stable order here is reproducible.
    """
    d = _as_dist(dist)
    r = _as_rel(rel, d.shape)
    q, n = d.shape
    kk = n if k is None else min(_check_k(k), n)
    aps, counts = [], []
    for s in _row_chunks(q, n):
        order = _rank_block(d[s], kk)
        ap, r_k = _ap_per_query(np.take_along_axis(_binary(r[s]), order, axis=1), [None])[None]
        aps.append(ap)
        counts.append(r_k)
    ap_all = np.concatenate(aps) if aps else np.zeros(0)
    if exclude_empty:
        ap_all = ap_all[np.concatenate(counts) > 0]
    return _mean(ap_all)


def precision_at_k(dist: np.ndarray, rel: np.ndarray, k: int) -> float:
    """Mean over queries of ``(#relevant in the top k of the stable ranking) / k``.

    Binary relevance ``rel > 0``. ``k`` larger than N is clipped to N.
    """
    d = _as_dist(dist)
    r = _as_rel(rel, d.shape)
    q, n = d.shape
    k = min(_check_k(k), n)
    hits = np.zeros(q)
    for s in _row_chunks(q, n):
        order = _rank_block(d[s], k)
        hits[s] = np.count_nonzero(np.take_along_axis(_binary(r[s]), order, axis=1), axis=1)
    return _mean(hits / k)


@overload
def precision_within_radius(
    dist: np.ndarray, rel: np.ndarray, radius: float = ..., *, return_coverage: Literal[False] = ...
) -> float: ...
@overload
def precision_within_radius(
    dist: np.ndarray, rel: np.ndarray, radius: float = ..., *, return_coverage: Literal[True]
) -> tuple[float, float]: ...
def precision_within_radius(
    dist: np.ndarray, rel: np.ndarray, radius: float = 2, *, return_coverage: bool = False
) -> float | tuple[float, float]:
    """Hash-lookup precision within a Hamming ball (P@H<=radius).

    For query q let ``S_q = {j : dist[q, j] <= radius}``. Then
    ``P_q = |S_q ∩ relevant| / |S_q|``, and **``P_q = 0`` when ``S_q`` is empty** (the query
    retrieved nothing, which is a failure of the lookup, not a skipped query). Returns
    ``mean_q P_q``; with ``return_coverage=True`` returns ``(precision, coverage)`` where
    ``coverage = mean_q [S_q non-empty]`` — report it alongside, because long codes can
    score well here by retrieving for only a few queries.
    """
    d = _as_dist(dist)
    r = _as_rel(rel, d.shape)
    q, n = d.shape
    prec = np.zeros(q)
    nonempty = np.zeros(q, dtype=bool)
    for s in _row_chunks(q, n):
        inside = d[s] <= radius
        retrieved = np.count_nonzero(inside, axis=1)
        tp = np.count_nonzero(inside & _binary(r[s]), axis=1)
        prec[s] = _safe_div(tp, retrieved)
        nonempty[s] = retrieved > 0
    if return_coverage:
        return _mean(prec), _mean(nonempty.astype(np.float64))
    return _mean(prec)


def pr_curve_by_radius(
    dist: np.ndarray, rel: np.ndarray, n_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of Hamming-ball lookups, radius r = 0..n_bits.

    Returns ``(precision, recall)``, each ``(n_bits + 1,)`` float64, macro-averaged:

    * ``precision[r] = mean_q P_q(r)``, ``P_q(r)`` as in :func:`precision_within_radius`
      (0 when nothing is within radius r) over **all** queries; so ``precision[r]`` equals
      ``precision_within_radius(dist, rel, r)``.
    * ``recall[r] = mean_q |S_q(r) ∩ relevant| / R_q`` over queries with ``R_q > 0``
      relevant items in the whole database (recall is undefined for the others; if no query
      has any relevant item, recall is all 0). With Hamming distances
      ``recall[n_bits] == 1``.
    """
    d = _as_dist(dist)
    r = _as_rel(rel, d.shape)
    n_radii = int(n_bits) + 1
    q, n = d.shape
    p_sum = np.zeros(n_radii)
    r_sum = np.zeros(n_radii)
    n_with_rel = 0
    for s in _row_chunks(q, n):
        retrieved, tp, n_rel = _radius_counts(d[s], r[s], n_radii)
        p_sum += _safe_div(tp, retrieved).sum(axis=0)
        has = n_rel > 0
        r_sum += (tp[has] / n_rel[has, None]).sum(axis=0)
        n_with_rel += int(has.sum())
    precision = p_sum / q if q else p_sum
    recall = r_sum / n_with_rel if n_with_rel else r_sum
    return precision, recall


def top1_expected(dist: np.ndarray, rel: np.ndarray) -> float:
    """Tie-aware "closest match" rate.

    For query q let ``T_q = {j : dist[q, j] = min_j' dist[q, j']}`` (all items at the
    smallest distance). ``top1_q = (1 / |T_q|) * sum_{j in T_q} rel[q, j]`` — the expected
    relevance of the top-1 result when ties are ordered uniformly at random. Returns
    ``mean_q top1_q``. Graded relevance is used as is (expected gain of the top-1).
    """
    d = _as_dist(dist)
    r = _as_rel(rel, d.shape)
    q, n = d.shape
    out = np.zeros(q)
    for s in _row_chunks(q, n):
        out[s] = _top1_per_query(d[s], r[s])
    return _mean(out)


def ndcg_at_k(
    dist: np.ndarray, gains: np.ndarray, k: int, *, exclude_empty: bool = False
) -> float:
    """nDCG@k with linear gains over the stable ranking.

    ``DCG@k_q = sum_{i=1..k} g_q(i) / log2(i + 1)`` where ``g_q(i)`` is the gain (``>= 0``)
    of the item at rank i; ``IDCG@k_q`` is the same sum over the k largest gains of query q
    in the whole database (sorted decreasingly). ``nDCG_q = DCG / IDCG``. A query with
    ``IDCG = 0`` (no item has positive gain) scores 0 and counts in the mean, consistent with
    :func:`mean_average_precision`; ``exclude_empty=True`` drops those queries instead.
    ``k`` larger than N is clipped to N.
    """
    d = _as_dist(dist)
    g = _as_rel(gains, d.shape)
    if g.dtype != np.bool_ and g.size and g.min() < 0:
        raise ValueError("gains must be >= 0")
    q, n = d.shape
    k = min(_check_k(k), n)
    out = np.zeros(q)
    ideal = np.zeros(q)
    for s in _row_chunks(q, n):
        order = _rank_block(d[s], k)
        idcg = _idcg(g[s], k)
        out[s] = _ndcg_per_query(np.take_along_axis(g[s], order, axis=1), idcg)
        ideal[s] = idcg
    if exclude_empty:
        out = out[ideal > 0]
    return _mean(out)


def same_item_topk(
    dist: np.ndarray, true_index: np.ndarray, ks: Sequence[int] = (1, 10)
) -> dict[int, float]:
    """Tie-aware exact-item retrieval rate (e.g. consumer-to-shop top-k accuracy).

    Each query q has exactly one true database item ``t_q = true_index[q]``. With
    ``a = #{j : dist[q, j] < dist[q, t_q]}`` and ``t = #{j : dist[q, j] = dist[q, t_q]}``
    (including ``t_q``), under a uniformly random order of ties::

        P(t_q in top k) = 0 if a >= k else min(1, (k - a) / t)

    Returns ``{k: mean_q P(t_q in top k)}``.
    """
    d = _as_dist(dist)
    ti = np.asarray(true_index, dtype=np.int64).reshape(-1)
    q, n = d.shape
    if ti.shape != (q,):
        raise ValueError(f"true_index must be ({q},), got {ti.shape}")
    if q and (ti.min() < 0 or ti.max() >= n):
        raise ValueError("true_index out of range")
    ks = [_check_k(k) for k in ks]
    acc = {k: np.zeros(q) for k in ks}
    for s in _row_chunks(q, n):
        for k, v in _same_item_per_query(d[s], ti[s], ks).items():
            acc[k][s] = v
    return {k: _mean(v) for k, v in acc.items()}


def tie_order(n: int, seed: int = 0) -> np.ndarray:
    """``(n,)`` a fixed pseudo-random permutation of ``n`` database positions: the order in
    which callers list a database before ranking it. The ranking metrics break distance ties
    by database index (module docstring), so a catalogue listed class by class (Fashion-MNIST's
    ids are) would let that order decide which class fills a query's tie group, which holds
    thousands of items for class-level codes: up to 36 points of P@10 and 1.6 of mAP@1000
    (``benchmarks/bench_tie_order.py``). A seeded order keeps the results reproducible."""
    return np.random.default_rng(seed).permutation(n)


def relevance_from_labels(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """Ground-truth relevance ``(Q, N)`` bool from class labels.

    * single-label ``(Q,)`` and ``(N,)`` (any comparable dtype): relevant iff equal labels;
    * multi-label ``(Q, L)`` and ``(N, L)`` 0/1 indicator arrays: relevant iff the two share
      at least one label (nonzero entries are labels), as in DeepHash / HashNet on NUS-WIDE.
    """
    ql = np.asarray(query_labels)
    dl = np.asarray(db_labels)
    if ql.ndim == 1 and dl.ndim == 1:
        return ql[:, None] == dl[None, :]
    if ql.ndim == 2 and dl.ndim == 2:
        if ql.shape[1] != dl.shape[1]:
            raise ValueError(f"label widths differ: {ql.shape[1]} vs {dl.shape[1]}")
        # float32 matmul counts shared labels exactly (counts << 2**24) and uses BLAS.
        shared = (ql != 0).astype(np.float32) @ (dl != 0).astype(np.float32).T
        return shared > 0
    raise ValueError(f"labels must be both 1-D or both 2-D, got {ql.shape} and {dl.shape}")


# --------------------------------------------------------------------------------------
# attribute gains
# --------------------------------------------------------------------------------------


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, (str, bytes)):
        return len(v) == 0
    if isinstance(v, (float, np.floating)):
        return bool(np.isnan(v))
    return False


def _encode_attrs(
    query_attrs: Mapping[str, Any], db_attrs: Mapping[str, Any], keys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer-code each attribute jointly over queries and database: ``(K, Q)``, ``(K, N)``.

    Missing values get -1 on the query side and -2 on the database side, so a plain ``==``
    on codes never matches them (not even missing vs missing).
    """
    missing = [k for k in keys if k not in query_attrs or k not in db_attrs]
    if missing:
        raise KeyError(f"attribute(s) {missing} missing from query_attrs or db_attrs")
    q_codes, d_codes = [], []
    for key in keys:
        qv = np.asarray(query_attrs[key], dtype=object).reshape(-1)
        dv = np.asarray(db_attrs[key], dtype=object).reshape(-1)
        vocab: dict[Any, int] = {}
        enc = []
        for vals, missing in ((qv, -1), (dv, -2)):
            out = np.empty(vals.size, dtype=np.int64)
            for i, v in enumerate(vals):
                out[i] = missing if _is_missing(v) else vocab.setdefault(v, len(vocab))
            enc.append(out)
        q_codes.append(enc[0])
        d_codes.append(enc[1])
    n_q = len(q_codes[0]) if q_codes else 0
    n_d = len(d_codes[0]) if d_codes else 0
    if any(len(c) != n_q for c in q_codes) or any(len(c) != n_d for c in d_codes):
        raise ValueError("attribute arrays have inconsistent lengths")
    return (
        np.array(q_codes, dtype=np.int64).reshape(len(keys), n_q),
        np.array(d_codes, dtype=np.int64).reshape(len(keys), n_d),
    )


def _gain_from_codes(q_codes: np.ndarray, d_codes: np.ndarray) -> np.ndarray:
    """``(K, C)`` x ``(K, N)`` attribute codes -> ``(C, N)`` float32 agreement fraction."""
    n_keys = q_codes.shape[0]
    out = _match_counts(q_codes, d_codes).astype(np.float32)
    if n_keys:
        out *= np.float32(1.0 / n_keys)
    return out


def _default_attr_keys(query_attrs: Mapping, db_attrs: Mapping) -> list[str]:
    return sorted(set(query_attrs) & set(db_attrs))


def attribute_gain(
    query_attrs: Mapping[str, Any],
    db_attrs: Mapping[str, Any],
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Graded relevance from attributes: ``(Q, N)`` float32 in [0, 1].

    ``gain[q, j] = (1 / |keys|) * sum_{a in keys} [query_attrs[a][q] == db_attrs[a][j]]``,
    where a missing value (None, empty string, NaN) never matches anything. ``query_attrs``
    maps attribute name -> ``(Q,)`` values, ``db_attrs`` name -> ``(N,)``. ``keys=None``
    uses every attribute present in both dicts (sorted). Values are compared via an integer
    vocabulary, so the only (Q, N) arrays are the float32 output and one bool temporary per
    row chunk (Q=1,000 x N=45,000: 180 MB output).
    """
    keys = _default_attr_keys(query_attrs, db_attrs) if keys is None else list(keys)
    if not keys:
        raise ValueError("no attribute keys to compare")
    qc, dc = _encode_attrs(query_attrs, db_attrs, keys)
    out = np.empty((qc.shape[1], dc.shape[1]), dtype=np.float32)
    for s in _row_chunks(qc.shape[1], dc.shape[1]):
        out[s] = _gain_from_codes(qc[:, s], dc)
    return out


def granularity_gains(
    true_index: np.ndarray,
    query_attrs: Mapping[str, Any],
    db_attrs: Mapping[str, Any],
    type_key: str,
    attr_keys: Sequence[str] = (),
) -> np.ndarray:
    """Gains of SGML's granularities for queries that each have one true item: ``(Q, N)``
    float32, 3 for the very product (``true_index[q]``), 2 for an item of the same type
    (``type_key``) whose every attribute in ``attr_keys`` matches too, 1 for the same type,
    0 otherwise (a missing value never matches)."""
    keys = [type_key, *[k for k in attr_keys if k != type_key]]
    qc, dc = _encode_attrs(query_attrs, db_attrs, keys)
    true_index = np.asarray(true_index, dtype=np.int64).reshape(-1)
    if true_index.shape != (qc.shape[1],):
        raise ValueError(f"true_index must be ({qc.shape[1]},), got {true_index.shape}")
    out = np.empty((qc.shape[1], dc.shape[1]), dtype=np.float32)
    for s in _row_chunks(qc.shape[1], dc.shape[1]):
        same_type = qc[0, s, None] == dc[0][None, :]
        all_attrs = _match_counts(qc[1:, s], dc[1:]) == len(keys) - 1
        out[s] = same_type.astype(np.float32) + (same_type & all_attrs)
    out[np.arange(len(true_index)), true_index] = 3.0
    return out


def ndcg_from_order(order: np.ndarray, gains: np.ndarray, k: int) -> float:
    """nDCG@k of given rankings: ``order (Q, >=k)`` gallery positions best first (-1 =
    nothing), ``gains (Q, N)``; the ideal is the k largest gains of each row (as
    :func:`ndcg_at_k`, for rankers that are not a distance matrix, e.g. two-stage search)."""
    g = np.asarray(gains, dtype=np.float64)
    k = min(_check_k(k), g.shape[1])
    order = np.asarray(order, dtype=np.int64)[:, :k]
    got = np.where(order >= 0, np.take_along_axis(g, np.maximum(order, 0), axis=1), 0.0)
    if got.shape[1] < k:
        got = np.pad(got, ((0, 0), (0, k - got.shape[1])))
    return _mean(_ndcg_per_query(got, _idcg(g, k)))


# --------------------------------------------------------------------------------------
# tie re-ranking
# --------------------------------------------------------------------------------------


def rerank_key(hamming: np.ndarray, secondary: np.ndarray, n_bits: int) -> np.ndarray:
    """Combined sort key ``(Q, N)`` float64: Hamming first, ``secondary`` within ties.

    ``key = hamming + clip(secondary, 0, n_bits) / (n_bits + 1)``. The added fraction is
    in ``[0, n_bits / (n_bits + 1)] ⊂ [0, 1)``, so different Hamming distances are never
    reordered; ``secondary`` is meant to be :func:`fashionhash.codes.asymmetric_distance`
    (which lies in ``[0, n_bits]``). Any distance metric here accepts this key as ``dist``.
    """
    frac = np.clip(np.asarray(secondary, dtype=np.float64), 0.0, float(n_bits))
    return np.asarray(hamming, dtype=np.float64) + frac / (n_bits + 1.0)


def _secondary_bits(secondary: np.ndarray) -> np.ndarray:
    """float32 ``>= 0`` -> uint32 bits whose unsigned order is the float order.

    ``+ 0.0`` folds -0.0 (bits 0x80000000) into +0.0 so equal floats get equal bits.
    """
    return (np.asarray(secondary, dtype=np.float32) + np.float32(0.0)).view(np.uint32)


def _lex_argsort(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Stable argsort of each row by ``(primary, secondary, index)``, exact.

    ``primary`` (C, N) uint16; ``secondary`` (C, N) float32 and ``>= 0``. When
    ``primary | secondary bits | index`` fits in 64 bits (any Hamming distance <= 65535 with
    N up to ~2**26 in practice), the keys are packed into unique uint64 values and sorted *as
    values*: no gathers, about 2x faster than the radix fallback and ~5x faster than a
    timsort of a float64 combined key.
    """
    n = primary.shape[1]
    idx_bits = max(1, int(n - 1).bit_length())
    prim_bits = max(1, int(primary.max()).bit_length()) if primary.size else 1
    if prim_bits + 31 + idx_bits > 64:
        return _lex_argsort_radix(primary, secondary)
    key = _secondary_bits(secondary).astype(np.uint64)  # sign bit is 0: 31 bits
    key <<= np.uint64(idx_bits)
    key |= np.arange(n, dtype=np.uint64)
    hi = primary.astype(np.uint64)
    hi <<= np.uint64(idx_bits + 31)
    key |= hi
    del hi
    key.sort(axis=1)  # unique keys: any sort is the stable order
    key &= np.uint64((1 << idx_bits) - 1)
    return key.view(np.int64)  # values < 2**idx_bits: reinterpreting is free and exact


def _lex_argsort_radix(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Same as :func:`_lex_argsort` for any sizes: an LSD radix sort built from numpy's
    16-bit radix argsort (low half of the secondary's bits, high half, then primary)."""
    bits = _secondary_bits(secondary)
    order = np.argsort((bits & np.uint32(0xFFFF)).astype(np.uint16), axis=1, kind="stable")
    for key in ((bits >> np.uint32(16)).astype(np.uint16), primary):
        k = np.take_along_axis(key, order, axis=1)
        order = np.take_along_axis(order, np.argsort(k, axis=1, kind="stable"), axis=1)
    return order


def _match_counts(q_codes: np.ndarray, d_codes: np.ndarray) -> np.ndarray:
    """``(K, C)`` x ``(K, N)`` attribute codes -> ``(C, N)`` uint8 number of agreements."""
    dtype = np.uint8 if q_codes.shape[0] < 256 else np.uint16
    out = np.zeros((q_codes.shape[1], d_codes.shape[1]), dtype=dtype)
    for i in range(q_codes.shape[0]):
        out += q_codes[i][:, None] == d_codes[i][None, :]
    return out


def _idcg_levels(counts: np.ndarray, n_levels: int, k: int, scale: float) -> np.ndarray:
    """IDCG@k when gains are ``counts * scale`` with integer counts in ``0..n_levels``.

    A per-row histogram of the levels gives the k largest gains without partitioning the
    (C, N) block (partition is slow on data with this many duplicates).
    """
    n_rows, n = counts.shape
    k = min(k, n)
    width = n_levels + 1
    flat = counts.astype(np.int32) + (np.arange(n_rows, dtype=np.int32) * width)[:, None]
    hist = np.bincount(flat.ravel(), minlength=n_rows * width).reshape(n_rows, width)
    from_top = np.cumsum(hist[:, ::-1], axis=1)  # (C, L+1): #items with level >= L - j
    ranks = np.arange(1, k + 1)
    # Level of the item at ideal rank i: top level minus #{j : from_top[j] < i}.
    level = n_levels - (from_top[:, :, None] < ranks[None, None, :]).sum(axis=1)
    # float32 product, exactly as the float32 gains themselves are formed.
    top = np.maximum(level, 0).astype(np.float32) * np.float32(scale)
    return top.astype(np.float64) @ _discounts(k)


# --------------------------------------------------------------------------------------
# the high-level call
# --------------------------------------------------------------------------------------


class _Ranked:
    """Accumulates per-query ranking metrics for one ordering (plain or re-ranked).

    Cutoffs are ``(name, k)`` pairs: ``name`` is the k the caller asked for (used in the
    result key), ``k`` the one actually applied (clipped to N).
    """

    def __init__(self, q: int, map_k: tuple[int, int], prec_k: Sequence[tuple[int, int]],
                 ndcg_k: tuple[int, int], same_ks: Sequence[int], with_labels: bool,
                 with_attrs: bool, with_true: bool) -> None:
        self.map_k, self.prec_k, self.ndcg_k, self.same_ks = map_k, list(prec_k), ndcg_k, same_ks
        self.with_labels, self.with_attrs, self.with_true = with_labels, with_attrs, with_true
        self.ap_all, self.ap_k, self.top1, self.ndcg = (np.zeros(q) for _ in range(4))
        self.top1_attr, self.ndcg_attr = np.zeros(q), np.zeros(q)
        self.prec = [np.zeros(q) for _ in self.prec_k]
        self.same = [np.zeros(q) for _ in same_ks]

    def add(self, s: slice, key: tuple[np.ndarray, ...], order: np.ndarray,
            rel: np.ndarray | None, gains: np.ndarray | None, idcg_attr: np.ndarray | None,
            true_index: np.ndarray | None) -> None:
        """One chunk of queries ``s``. ``order`` (C, N) is the stable sort of the
        lexicographic ``key`` (tuple of (C, N) arrays), which the tie-aware metrics use."""
        nk = self.ndcg_k[1]
        if self.with_labels or self.with_attrs:
            at_min = _compare_to(key, order[:, :1])[1]  # items tied with the first-ranked
        if self.with_labels:
            rel_sorted = np.take_along_axis(rel, order, axis=1)
            aps = _ap_per_query(rel_sorted, [None, self.map_k[1]])
            self.ap_all[s], n_rel = aps[None]
            self.ap_k[s] = aps[self.map_k[1]][0]
            for acc, (_, k) in zip(self.prec, self.prec_k):
                acc[s] = np.count_nonzero(rel_sorted[:, :k], axis=1) / k
            self.ndcg[s] = _ndcg_per_query(rel_sorted[:, :nk], _idcg_binary(n_rel, nk))
            self.top1[s] = _top1_from_mask(at_min, rel)
        if self.with_attrs:
            g_sorted = np.take_along_axis(gains, order[:, :nk], axis=1)
            self.ndcg_attr[s] = _ndcg_per_query(g_sorted, idcg_attr)
            self.top1_attr[s] = _top1_from_mask(at_min, gains)
        if self.with_true:
            masks = _compare_to(key, true_index[:, None])
            for acc, v in zip(self.same, _same_item_from_masks(*masks, self.same_ks).values()):
                acc[s] = v

    def result(self, suffix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        nk = self.ndcg_k[0]
        if self.with_labels:
            out["map"] = _mean(self.ap_all)
            out[f"map@{self.map_k[0]}"] = _mean(self.ap_k)
            for acc, (name, _) in zip(self.prec, self.prec_k):
                out[f"p@{name}"] = _mean(acc)
            out["top1"] = _mean(self.top1)
            # ndcg@k is the attribute-graded one when attributes are given
            out[f"ndcg_labels@{nk}" if self.with_attrs else f"ndcg@{nk}"] = _mean(self.ndcg)
        if self.with_attrs:
            out["top1_attr"] = _mean(self.top1_attr)
            out[f"ndcg@{nk}"] = _mean(self.ndcg_attr)
        if self.with_true:
            for acc, k in zip(self.same, self.same_ks):
                out[f"same_item_top{k}"] = _mean(acc)
        return {name + suffix: v for name, v in out.items()}


def evaluate_retrieval(
    query_packed: np.ndarray,
    db_packed: np.ndarray,
    n_bits: int,
    query_labels: np.ndarray | None,
    db_labels: np.ndarray | None,
    *,
    query_attrs: Mapping[str, Any] | None = None,
    db_attrs: Mapping[str, Any] | None = None,
    attr_keys: Sequence[str] | None = DEFAULT_ATTR_KEYS,
    query_real: np.ndarray | None = None,
    true_index: np.ndarray | None = None,
    same_item_ks: Sequence[int] = (1, 10),
    map_k: int = 1000,
    ndcg_k: int = 10,
    prec_k: Sequence[int] = (10, 100),
    radius: int = 2,
    chunk: int | None = None,
) -> dict[str, Any]:
    """Evaluate packed hash codes as a retrieval system; returns a JSON-serialisable dict.

    Distances are Hamming (:func:`fashionhash.codes.hamming`) between packed query codes
    ``(Q, B)`` and database codes ``(N, B)``. Queries are processed ``chunk`` at a time
    (default: about 4M query x item cells per chunk), so peak memory is a few hundred MB at
    most, independent of Q.

    Keys (``k`` values substituted; each float is a mean over queries, see the functions):

    * with labels (``query_labels``/``db_labels``, see :func:`relevance_from_labels`):
      ``map`` (mAP@all), ``map@{map_k}``, ``p@{k}`` for k in ``prec_k``,
      ``top1`` (:func:`top1_expected`), ``p@h{radius}`` and ``coverage@h{radius}``
      (:func:`precision_within_radius`), and ``pr_curve`` =
      ``{"radius": [0..n_bits], "precision": [...], "recall": [...]}``
      (:func:`pr_curve_by_radius`);
    * ``ndcg@{ndcg_k}`` (:func:`ndcg_at_k`) with :func:`attribute_gain` gains when
      ``query_attrs``/``db_attrs`` are given (over ``attr_keys``; default
      :data:`DEFAULT_ATTR_KEYS`, None: every key present in both dicts), else with 0/1 label
      gains; ``ndcg_gains`` says which (``"attributes"`` / ``"labels"``). With both labels
      and attributes, the label-gain version is ``ndcg_labels@{ndcg_k}``. Attributes also
      give ``top1_attr`` (:func:`top1_expected` with attribute gains);
    * with ``true_index`` ``(Q,)``: ``same_item_top{k}`` for k in ``same_item_ks``
      (:func:`same_item_topk`);
    * with ``query_real`` ``(Q, n_bits)`` (the continuous tanh codes of the queries, clipped
      to [-1, 1]): every ranking metric above again with suffix ``_rerank`` (``map_rerank``,
      ``top1_rerank``, ...), where the ranking is by Hamming distance, then by asymmetric
      distance (:func:`fashionhash.codes.asymmetric_distance`) within equal Hamming
      distance, then by index. This equals using :func:`rerank_key` as ``dist`` (up to
      float64 rounding of the key). Set-based metrics (``p@h{r}``, PR curve) are unchanged
      by re-ranking and are not repeated;
    * always: ``n_query``, ``n_database``, ``n_bits``.

    ``map@{map_k}``, ``p@{k}`` and ``ndcg@{k}`` clip their k to N, but keep the requested k
    in the key name.
    """
    qp = codes.check_packed(query_packed, n_bits)
    dp = codes.check_packed(db_packed, n_bits)
    q, n = qp.shape[0], dp.shape[0]
    if n == 0:
        raise ValueError("empty database")
    with_labels = query_labels is not None and db_labels is not None
    with_attrs = query_attrs is not None and db_attrs is not None
    with_true = true_index is not None
    with_rerank = query_real is not None
    if not (with_labels or with_attrs or with_true):
        raise ValueError("need labels, attributes or true_index to evaluate against")

    ql = dl = None
    if with_labels:
        ql, dl = np.asarray(query_labels), np.asarray(db_labels)
        if ql.shape[0] != q or dl.shape[0] != n:
            raise ValueError(f"labels {ql.shape}/{dl.shape} do not match codes ({q}, {n})")
    qa = da = None
    if with_attrs:
        keys = _default_attr_keys(query_attrs, db_attrs) if attr_keys is None else list(attr_keys)
        if not keys:
            raise ValueError("no attribute keys to compare")
        qa, da = _encode_attrs(query_attrs, db_attrs, keys)
        if qa.shape[1] != q or da.shape[1] != n:
            raise ValueError(f"attributes ({qa.shape[1]}, {da.shape[1]}) do not match ({q}, {n})")
    ti = None
    if with_true:
        ti = np.asarray(true_index, dtype=np.int64).reshape(-1)
        if ti.shape != (q,) or (q and (ti.min() < 0 or ti.max() >= n)):
            raise ValueError("true_index must be (Q,) indices into the database")
    qr = None
    if with_rerank:
        qr = np.clip(np.asarray(query_real, dtype=np.float32), -1.0, 1.0)
        if qr.shape != (q, n_bits):
            raise ValueError(f"query_real must be ({q}, {n_bits}), got {qr.shape}")

    if chunk is not None:
        chunk = _check_k(chunk, "chunk")
    map_kk = (int(map_k), min(_check_k(map_k, "map_k"), n))
    ndcg_kk = (int(ndcg_k), min(_check_k(ndcg_k, "ndcg_k"), n))
    # dict.fromkeys: drop repeated cutoffs, keep order (results are keyed by k)
    prec_kk = [(k, min(_check_k(k, "prec_k"), n)) for k in dict.fromkeys(map(int, prec_k))]
    same_ks = [_check_k(k, "same_item_ks") for k in dict.fromkeys(map(int, same_item_ks))]
    n_radii = n_bits + 1

    def new_acc() -> _Ranked:
        return _Ranked(q, map_kk, prec_kk, ndcg_kk, same_ks, with_labels, with_attrs, with_true)

    plain = new_acc()
    rer = new_acc() if with_rerank else None
    # Set-based accumulators (labels only).
    p_rad = np.zeros(q)
    cov = np.zeros(q)
    pr_p = np.zeros(n_radii)
    pr_r = np.zeros(n_radii)
    n_with_rel = 0

    for s in _row_chunks(q, n, chunk):
        ham = codes.hamming(qp[s], dp, chunk=max(1, s.stop - s.start))  # (C, N) uint16
        rel = relevance_from_labels(ql[s], dl) if with_labels else None
        gains = idcg_attr = None
        if with_attrs:
            n_keys = qa.shape[0]
            counts = _match_counts(qa[:, s], da)
            idcg_attr = _idcg_levels(counts, n_keys, ndcg_kk[1], 1.0 / n_keys)
            gains = counts.astype(np.float32) * np.float32(1.0 / n_keys)
            del counts
        ti_s = ti[s] if with_true else None

        order = _stable_argsort(ham)  # radix sort: uint16 keys
        plain.add(s, (ham,), order, rel, gains, idcg_attr, ti_s)
        del order
        if with_rerank:
            asym = codes.asymmetric_distance(qr[s], dp, n_bits)
            np.clip(asym, 0.0, float(n_bits), out=asym)  # as in rerank_key
            order = _lex_argsort(ham, asym)
            rer.add(s, (ham, asym), order, rel, gains, idcg_attr, ti_s)
            del order, asym

        if with_labels:
            retrieved, tp, n_rel = _radius_counts(ham, rel, n_radii)
            prec_r = _safe_div(tp, retrieved)  # (C, n_bits + 1)
            pr_p += prec_r.sum(axis=0)
            has = n_rel > 0
            pr_r += (tp[has] / n_rel[has, None]).sum(axis=0)
            n_with_rel += int(has.sum())
            inside = ham <= radius
            n_in = np.count_nonzero(inside, axis=1)
            p_rad[s] = _safe_div(np.count_nonzero(inside & rel, axis=1), n_in)
            cov[s] = n_in > 0

    out: dict[str, Any] = {"n_query": int(q), "n_database": int(n), "n_bits": int(n_bits)}
    out.update(plain.result(""))
    if with_labels or with_attrs:
        out["ndcg_gains"] = "attributes" if with_attrs else "labels"
    if with_labels:
        out[f"p@h{radius}"] = _mean(p_rad)
        out[f"coverage@h{radius}"] = _mean(cov)
        out["pr_curve"] = {
            "radius": list(range(n_radii)),
            "precision": [float(v) for v in (pr_p / max(q, 1))],
            "recall": [float(v) for v in (pr_r / n_with_rel if n_with_rel else pr_r)],
        }
    if with_rerank:
        out.update(rer.result("_rerank"))
    return out


# --------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------


def plot_pr_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | PathLike[str],
    title: str = "Precision-recall (Hamming radius)",
) -> None:
    """Plot ``{name: (precision, recall)}`` curves into one PNG at ``path``.

    Uses an explicit Agg canvas rather than ``matplotlib.use``, so it neither depends on nor
    changes the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (precision, recall) in curves.items():
        ax.plot(np.asarray(recall), np.asarray(precision), marker=".", markersize=3, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
