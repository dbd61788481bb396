"""Same-product evaluation of two-stage search: a Hamming shortlist re-ranked by descriptors.

For each damaged query copy: the ``R`` gallery items nearest in Hamming distance (ties in id
order, as the index returns them) are re-ranked by the cosine between the query's float
descriptor and the items' int8 descriptors; the hit rate is how often the one true item
ends in the top k. The shortlist comes from the hash code or from the descriptors' own sign
code (:func:`shortlist_codes`); which one and ``R`` are chosen on the validation split
(:func:`choose_shortlist`), then the test queries are reported once with that choice.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fashionhash import codes as C
from fashionhash.descriptors import Whitening, dequantize, sign_codes
from fashionhash.evaluation.metrics import granularity_gains, same_item_topk

#: attributes that make two items of one type "the same design" for the graded score
DESIGN_ATTRIBUTES = ("baseColour", "gender", "usage", "season")

#: shortlist sizes tried on the validation split
SHORTLISTS = (100, 250, 500, 1000, 2000, 5000, 10000)

#: sign-code widths tried on the validation split (0: the shortlist comes from the hash code)
SIGN_BITS = (0, 64, 128)

#: a smaller shortlist (then a narrower code) is chosen when its top-1 + top-10 on val is
#: within this of the best: a shortlist 10x longer for 0.1 point is not worth its latency
SHORTLIST_TOLERANCE = 0.01


def catalogue_gains(cat, q_pos: np.ndarray, g_pos: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """Graded gains ``(Q, N)`` of damaged copies of catalogue items ``q_pos`` against gallery
    items ``g_pos`` (true item at ``true_index``): 3 the very product, 2 the same type and
    the same :data:`DESIGN_ATTRIBUTES` (those the catalogue has), 1 the same type, else 0."""
    keys = [k for k in DESIGN_ATTRIBUTES if k in cat.attrs and k != cat.label_key]
    q_attrs = {"__type": cat.labels[q_pos], **{k: cat.attrs[k][q_pos] for k in keys}}
    g_attrs = {"__type": cat.labels[g_pos], **{k: cat.attrs[k][g_pos] for k in keys}}
    return granularity_gains(true_index, q_attrs, g_attrs, "__type", keys)


def shortlist_codes(mapping: Whitening, hash_codes: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """The packed codes whose Hamming distance makes the shortlist: the hash codes ``(N, B)``
    or, for a mapping with a sign code, the sign codes of ``descriptors`` ``(N, d)`` (float
    unit rows or int8)."""
    return hash_codes if mapping.sign_bits == 0 else sign_codes(descriptors, mapping.sign_mean)


def _shortlists(q_packed: np.ndarray, g_packed: np.ndarray, g_ids: np.ndarray, r: int) -> np.ndarray:
    """Gallery positions ``(Q, r)`` of each query's ``r`` nearest codes, by (distance, id)."""
    n = g_packed.shape[0]
    r = min(r, n)
    id_rank = np.empty(n, np.int64)
    id_rank[np.argsort(g_ids, kind="stable")] = np.arange(n)
    key = C.hamming(q_packed, g_packed).astype(np.int64) * n + id_rank
    part = np.argpartition(key, r - 1, axis=1)[:, :r] if r < n else np.tile(np.arange(n), (len(key), 1))
    order = np.argsort(np.take_along_axis(key, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def _reranked_chunks(q_packed, q_desc, g_packed, g_desc, g_ids, r: int, chunk: int):
    """Per chunk of queries: ``(start, shortlist positions (c, r), cosines (c, r))``."""
    g_unit = dequantize(g_desc)
    q_desc = np.asarray(q_desc, np.float32)
    for s in range(0, len(q_packed), chunk):
        cand = _shortlists(q_packed[s:s + chunk], g_packed, g_ids, r)
        yield s, cand, np.einsum("qrd,qd->qr", g_unit[cand], q_desc[s:s + chunk])


def two_stage_hits(q_packed: np.ndarray, q_desc: np.ndarray, g_packed: np.ndarray, g_desc: np.ndarray,
                   g_ids: np.ndarray, true_index: np.ndarray, shortlists: Sequence[int],
                   ks: Sequence[int] = (1, 10), chunk: int = 32) -> dict[int, dict[int, float]]:
    """Hit rates ``{R: {k: rate}}`` of the true item after re-ranking each query's Hamming
    top-``R`` by descriptor cosine.

    ``q_packed (Q, B)`` uint8 codes and ``q_desc (Q, d)`` float descriptors of the queries;
    ``g_packed (N, B)``, ``g_desc (N, d)`` int8 and ``g_ids (N,)`` of the gallery;
    ``true_index (Q,)``: gallery position of each query's item. Equal cosines keep the
    Hamming order (the index's order).
    """
    shortlists = sorted({int(r) for r in shortlists})
    r_max = min(shortlists[-1], len(g_packed))
    true_index = np.asarray(true_index, np.int64)
    hits = {r: {k: 0.0 for k in ks} for r in shortlists}
    for s, cand, cos in _reranked_chunks(q_packed, q_desc, g_packed, g_desc, g_ids, r_max, chunk):
        for row, true in zip(range(len(cand)), true_index[s:s + chunk]):
            where = np.flatnonzero(cand[row] == true)
            if not where.size:
                continue
            p = int(where[0])
            c = cos[row]
            for r in shortlists:
                if p >= r:
                    continue
                rank = int((c[:r] > c[p]).sum() + (c[:p] == c[p]).sum())
                for k in ks:
                    hits[r][k] += rank < k
    n = max(len(q_packed), 1)
    return {r: {k: v / n for k, v in per.items()} for r, per in hits.items()}


def two_stage_topk(q_packed: np.ndarray, q_desc: np.ndarray, g_packed: np.ndarray, g_desc: np.ndarray,
                   g_ids: np.ndarray, shortlist: int, k: int, chunk: int = 32) -> np.ndarray:
    """Gallery positions ``(Q, k)`` that two-stage search returns, best first (-1 pads a
    shortlist shorter than k); arguments as :func:`two_stage_hits`."""
    out = np.full((len(q_packed), k), -1, np.int64)
    for s, cand, cos in _reranked_chunks(q_packed, q_desc, g_packed, g_desc, g_ids, shortlist, chunk):
        order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        out[s:s + len(cand), :order.shape[1]] = np.take_along_axis(cand, order, 1)
    return out


def choose_shortlist(val_hits: dict[int, dict[int, dict[int, float]]],
                     tolerance: float = SHORTLIST_TOLERANCE) -> tuple[int, int]:
    """``(sign bits, R)`` from validation hit rates ``{bits: {R: {k: rate}}}``: the smallest
    ``R`` (then the fewest bits) whose top-1 + top-10 is within ``tolerance`` of the best."""
    score = {(b, r): h.get(1, 0.0) + h.get(10, 0.0) for b, per in val_hits.items() for r, h in per.items()}
    best = max(score.values())
    return min((b_r for b_r, v in score.items() if v >= best - tolerance), key=lambda b_r: (b_r[1], b_r[0]))


def descriptor_only_hits(q_desc: np.ndarray, g_desc: np.ndarray, true_index: np.ndarray,
                         ks: Sequence[int] = (1, 10)) -> dict[int, float]:
    """Tie-aware hit rates of ranking the whole gallery by descriptor cosine alone (the
    ceiling of the re-ranking stage, at one float dot product per item)."""
    dist = -(np.asarray(q_desc, np.float32) @ dequantize(g_desc).T)
    return same_item_topk(dist, true_index, ks)
