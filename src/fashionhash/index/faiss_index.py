"""``faiss``: faiss-cpu binary indexes behind the common interface.

``kind="flat"`` (IndexBinaryFlat) is exact, and made to match the (distance, id) tie order:
faiss breaks ties at the k-th distance arbitrarily, so we fetch a few extra neighbours and,
for the queries where the k-th distance is still tied at the end of the list, fetch every
item within that distance with a range search, then sort by (distance, id).
``kind="hash"`` (IndexBinaryHash) and ``kind="multihash"`` (IndexBinaryMultiHash) are
approximate: they only look at buckets within ``nflip`` bits of the query on a
``hash_bits``-bit prefix (multihash: on each of ``nhash`` substrings), so they can miss
neighbours; results are still true distances in (distance, id) order.

faiss labels are positions in our code store (faiss' own id map is not used); ids come
from the store. faiss is imported lazily.
"""
from __future__ import annotations

import logging

import numpy as np

from ._kernel import PAD_DISTANCE, group_radius
from .base import INDEXES, LocalIndex, RadiusResult

log = logging.getLogger(__name__)

KINDS = ("flat", "hash", "multihash")


def import_faiss():
    """Import faiss or explain how to get it."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "the 'faiss' index backend needs faiss-cpu: pip install 'fashionhash[faiss]'"
        ) from exc
    return faiss


@INDEXES.register("faiss")
class FaissIndex(LocalIndex):
    """faiss binary index (flat: exact; hash / multihash: approximate).

    Options: ``kind`` in {"flat", "hash", "multihash"}; ``hash_bits`` (b, bits hashed per
    table), ``nhash`` (multihash tables), ``nflip`` (bits flipped when probing).
    """

    name = "faiss"
    # faiss flat needs no help from us for small filters: a bitmap selector is exact
    _SUBSET_FRACTION = 0.0

    def __init__(self, n_bits: int, kind: str = "flat", hash_bits: int = 16, nhash: int = 4, nflip: int = 2):
        super().__init__(n_bits)
        self._faiss = import_faiss()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        d = 8 * self.n_bytes
        if kind != "flat" and not 1 <= hash_bits <= min(d, 64):
            raise ValueError(f"hash_bits must be in [1, {min(d, 64)}], got {hash_bits}")
        if kind == "multihash" and nhash * hash_bits > d:
            raise ValueError(f"nhash * hash_bits = {nhash * hash_bits} exceeds the {d} code bits")
        self._kind = kind
        self._hash_bits = int(hash_bits)
        self._nhash = int(nhash)
        self._nflip = int(nflip)
        self._index = None  # mirrors store rows [0, ntotal): faiss label == row

    @property
    def exact(self) -> bool:
        return self._kind == "flat"

    def options(self):
        return {"kind": self._kind, "hash_bits": self._hash_bits, "nhash": self._nhash, "nflip": self._nflip}

    def _make(self):
        faiss, d = self._faiss, 8 * self.n_bytes
        if self._kind == "flat":
            return faiss.IndexBinaryFlat(d)
        if self._kind == "hash":
            index = faiss.IndexBinaryHash(d, self._hash_bits)
        else:
            index = faiss.IndexBinaryMultiHash(d, self._nhash, self._hash_bits)
        index.nflip = self._nflip
        return index

    def _bytes(self, words: np.ndarray) -> np.ndarray:
        # faiss wants d / 8 bytes per code; our words are zero padded to 8-byte multiples
        return np.ascontiguousarray(words.view(np.uint8)[:, : self.n_bytes])

    def _on_reorder(self) -> None:
        self._index = None

    def _prepare_search(self) -> None:
        if self._alive is not None:
            self._consolidate()  # faiss labels are rows: keep them dense and all alive
        if self._index is None:
            self._index = self._make()
        if self._index.ntotal < self._n:
            self._index.add(self._bytes(self.words[self._index.ntotal : self._n]))

    def build(self) -> None:
        with self._lock:
            self._prepare_search()

    # -- search ----------------------------------------------------------------------

    def _selector(self, mask: np.ndarray | None):
        if mask is None:
            return None
        bitmap = np.packbits(mask, bitorder="little")
        return self._faiss.SearchParameters(sel=self._faiss.IDSelectorBitmap(bitmap))

    def _subset_flat(self, mask: np.ndarray):
        """Exact temporary flat index over the allowed rows (hash kinds cannot filter)."""
        rows = np.flatnonzero(mask)
        index = self._faiss.IndexBinaryFlat(8 * self.n_bytes)
        index.add(self._bytes(self.words[rows]))
        return index, rows

    def _knn(self, q: np.ndarray, k: int, mask: np.ndarray | None):
        qb = self._bytes(q)
        if mask is not None and self._kind != "flat":
            index, rows = self._subset_flat(mask)
            return self._exact_knn(index, None, qb, k, rows.size, rows)
        if self._kind == "flat":
            n_allowed = self._n if mask is None else int(mask.sum())
            return self._exact_knn(self._index, self._selector(mask), qb, k, n_allowed, None)
        dist, pos = self._index.search(qb, k)
        return self._finish(dist, pos, k, None)

    def _exact_knn(self, index, params, qb: np.ndarray, k: int, n_allowed: int, rows: np.ndarray | None):
        kk = min(n_allowed, k + max(16, k))
        dist, pos = index.search(qb, kk, params=params) if params is not None else index.search(qb, kk)
        out_d, out_i = self._finish(dist, pos, k, rows)
        if kk >= n_allowed:
            return out_d, out_i  # every allowed item was returned
        # The k-th distance is settled only where the list runs past it; elsewhere fetch
        # everything within that distance and let the id break the tie.
        kth = dist[:, k - 1]
        tied = dist[:, kk - 1] <= kth
        for radius in np.unique(kth[tied]):
            sel = np.flatnonzero(tied & (kth == radius))
            for j, (d, i) in zip(sel, self._range(index, params, qb[sel], int(radius), rows)):
                out_d[j], out_i[j] = d[:k], i[:k]
        return out_d, out_i

    def _finish(self, dist: np.ndarray, pos: np.ndarray, k: int, rows: np.ndarray | None):
        """faiss (distances, positions) -> our padded, (distance, id)-sorted (Q, k) arrays."""
        valid = pos >= 0
        rowpos = np.where(valid, pos, 0)
        if rows is not None:
            rowpos = rows[rowpos]
        ids = np.where(valid, self.row_ids[rowpos], np.iinfo(np.int64).max)
        d = np.where(valid, dist, PAD_DISTANCE)
        order = np.lexsort((ids, d), axis=-1)[:, :k]
        valid = np.take_along_axis(valid, order, axis=1)
        out_d = np.full((dist.shape[0], k), PAD_DISTANCE, np.int32)
        out_i = np.full((dist.shape[0], k), -1, np.int64)
        out_d[:, : order.shape[1]] = np.where(valid, np.take_along_axis(d, order, axis=1), PAD_DISTANCE)
        out_i[:, : order.shape[1]] = np.where(valid, np.take_along_axis(ids, order, axis=1), -1)
        return out_d, out_i

    def _range(self, index, params, qb: np.ndarray, radius: int, rows: np.ndarray | None) -> RadiusResult:
        # faiss binary range search keeps distances < radius: ask for radius + 1
        if params is not None:
            lims, dist, pos = index.range_search(qb, radius + 1, params=params)
        else:
            lims, dist, pos = index.range_search(qb, radius + 1)
        qidx = np.repeat(np.arange(qb.shape[0]), np.diff(lims.astype(np.int64)))
        pos = pos.astype(np.int64)
        if rows is not None:
            pos = rows[pos]
        return group_radius(qb.shape[0], qidx, dist.astype(np.int32), pos, self.row_ids)

    def _radius(self, q: np.ndarray, radius: int, mask: np.ndarray | None) -> RadiusResult:
        qb = self._bytes(q)
        if mask is not None and self._kind != "flat":
            index, rows = self._subset_flat(mask)
            return self._range(index, None, qb, radius, rows)
        return self._range(self._index, self._selector(mask), qb, radius, None)

    def memory_usage(self) -> dict[str, int]:
        out = super().memory_usage()
        out["faiss"] = 0 if self._index is None else int(self._index.ntotal) * self.n_bytes
        return out
