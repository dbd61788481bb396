"""The Hamming index interface, the backend registry, and the shared in-memory code store.

Every backend answers with the same arrays and the same tie order:

* ``search(codes (Q, B), k) -> (distances (Q, k) int32, ids (Q, k) int64)``, each row
  sorted by (distance, id) ascending and padded with ``(PAD_DISTANCE, -1)`` when fewer
  than ``k`` items qualify;
* ``radius_search(codes (Q, B), r) -> [(distances (n_q,) int32, ids (n_q,) int64)] * Q``,
  all items within distance ``r`` (inclusive), same order.

Ids are non-negative int64 labels chosen by the caller (``-1`` is the padding id). Adding an
id that is already present raises ``ValueError`` (no upsert: call ``remove`` first).
"""
from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable

import numpy as np

from ..codes import check_packed, n_bytes
from ..registry import Registry
from . import _kernel
from ._kernel import PAD_DISTANCE, group_radius, to_words
from .persist import IndexFormatError, read_container, write_container

log = logging.getLogger(__name__)

INDEXES: Registry = Registry("index backend")
"""Backend name -> class; ``INDEXES.build("mih", n_bits=64)`` makes an empty index."""

RadiusResult = list[tuple[np.ndarray, np.ndarray]]


def _as_ids(ids, n: int | None = None, what: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what} exceed the int64 range")
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} {what} for {n} codes")
    return arr


class BinaryIndex(ABC):
    """A searchable set of ``(id, packed code)`` pairs. See the module docstring for the
    result conventions; subclasses are registered in :data:`INDEXES`."""

    name: ClassVar[str] = ""
    external: ClassVar[bool] = False
    """True when the data lives in an outside service (tested separately, not in-process)."""

    def __init__(self, n_bits: int) -> None:
        if not isinstance(n_bits, (int, np.integer)) or n_bits <= 0:
            raise ValueError(f"n_bits must be a positive integer, got {n_bits!r}")
        self._n_bits = int(n_bits)
        self._n_bytes = n_bytes(self._n_bits)
        self._lock = threading.RLock()

    # -- properties ------------------------------------------------------------------

    @property
    def n_bits(self) -> int:
        return self._n_bits

    @property
    def n_bytes(self) -> int:
        return self._n_bytes

    @property
    def exact(self) -> bool:
        """Whether results equal brute force exactly (including the tie order)."""
        return True

    def options(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able) that recreate this configuration."""
        return {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(n_bits={self.n_bits}{opts}) with {len(self)} items"

    # -- validation shared by backends -----------------------------------------------

    def check_codes(self, codes) -> np.ndarray:
        """Validate packed codes for this index -> C-contiguous ``(N, B)`` uint8.

        Raises TypeError for a wrong dtype and ValueError for a wrong width or set padding
        bits (which would silently corrupt distances).
        """
        packed = check_packed(codes, self.n_bits)
        tail = self.n_bits % 8
        if tail and packed.shape[0] and np.any(packed[:, -1] & np.uint8((1 << (8 - tail)) - 1)):
            raise ValueError(f"packed codes have padding bits set (n_bits={self.n_bits} is not a multiple of 8)")
        return packed

    @staticmethod
    def check_k(k) -> int:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        return int(k)

    @staticmethod
    def check_radius(r) -> int:
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 0:
            raise ValueError(f"radius must be a non-negative integer, got {r!r}")
        return int(r)

    def _new_ids(self, ids, n: int) -> np.ndarray:
        ids = _as_ids(ids, n)
        if ids.size and ids.min() < 0:
            raise ValueError("ids must be non-negative (-1 marks padding in results)")
        if ids.size > 1:
            s = np.sort(ids)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                raise ValueError(f"duplicate ids in the batch: {dup[:5].tolist()}")
        return ids

    # -- the interface ---------------------------------------------------------------

    @abstractmethod
    def add(self, ids, codes) -> None:
        """Add items: ids ``(N,)`` int, codes ``(N, B)`` uint8. Existing ids are refused."""

    @abstractmethod
    def remove(self, ids) -> int:
        """Remove items by id (unknown ids are ignored); returns how many were removed."""

    @abstractmethod
    def search(self, codes, k: int, filter_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest: codes ``(Q, B)`` -> (distances ``(Q, k)`` int32, ids ``(Q, k)`` int64).

        ``filter_ids`` (iterable of ids) restricts the search to those items; the result is
        still exactly the k nearest among them.
        """

    @abstractmethod
    def radius_search(self, codes, radius: int, filter_ids=None) -> RadiusResult:
        """All items within ``radius`` of each query -> per query (distances, ids)."""

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (see :mod:`.persist`)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def ids(self) -> np.ndarray:
        """All stored ids, ascending ``(N,)`` int64."""

    def __contains__(self, item_id) -> bool:
        return bool(self.contains([item_id])[0])

    def contains(self, ids) -> np.ndarray:
        """``(N,)`` bool: which of ``ids`` are stored."""
        return np.isin(_as_ids(ids), self.ids())

    def memory_usage(self) -> dict[str, int]:
        """Bytes held in this process, by component."""
        return {}

    # -- persistence -----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, **options) -> "BinaryIndex":
        """Open a saved index. On the base class the saved backend is used; on a subclass
        the file is loaded into that backend (local backends share one payload, so a flat
        file can be reopened as ``mih`` and vice versa). ``options`` override saved ones."""
        meta, arrays = read_container(path)
        try:
            saved = meta["backend"]
            n_bits = int(meta["n_bits"])
            saved_opts = dict(meta.get("options") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{path}: malformed index metadata: {exc}") from exc
        target = INDEXES.get(saved) if cls is BinaryIndex or cls.name == "" else cls
        opts = {**(saved_opts if target.name == saved else {}), **options}
        return target._restore(path, meta, arrays, n_bits, opts)

    @classmethod
    @abstractmethod
    def _restore(cls, path, meta: dict, arrays: dict, n_bits: int, options: dict) -> "BinaryIndex":
        """Rebuild from a verified container."""


def open_index(path: str | os.PathLike, **options) -> BinaryIndex:
    """Open any saved index file with the backend recorded in it."""
    return BinaryIndex.load(path, **options)


class LocalIndex(BinaryIndex):
    """An index whose codes live in this process, in one compact store.

    Store layout: ``(n, W)`` uint64 words (8 bytes per 64-bit code) and ``(n,)`` int64 ids.
    Rows ``[0, n_main)`` are sorted by id, so the id array is its own lookup table (no
    separate id map); rows added since the last consolidation form a short unsorted tail.
    Removed rows are tombstoned in a bool mask. Consolidation (merging the tail, dropping
    tombstones) runs when the tail or the tombstones exceed a fraction of the store, which
    keeps adds and removes amortised O(1)-ish per item while searches see a simple array.
    Subclasses implement the search over rows; they are told when rows move.
    """

    #: consolidate when the tail holds more than this fraction of the store (and > _TAIL_MIN)
    _TAIL_FRACTION = 0.125
    _TAIL_MIN = 4096
    #: consolidate when more than this fraction of rows are tombstones
    _DEAD_FRACTION = 0.25
    #: a filter selecting at most this fraction of items is answered by scanning just them
    _SUBSET_FRACTION = 0.05

    def __init__(self, n_bits: int) -> None:
        super().__init__(n_bits)
        self._W = (self._n_bytes + 7) // 8
        self._words = np.zeros((0, self._W), dtype=np.uint64)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._n_main = 0
        self._alive: np.ndarray | None = None  # None: no tombstones
        self._n_dead = 0
        self._tail_order = np.zeros(0, dtype=np.int64)  # tail rows (relative) sorted by id

    # -- store ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n - self._n_dead

    @property
    def words(self) -> np.ndarray:
        """``(n_rows, W)`` uint64 view of the store (includes tombstoned rows)."""
        return self._words[: self._n]

    @property
    def row_ids(self) -> np.ndarray:
        """``(n_rows,)`` int64 ids by row (includes tombstoned rows)."""
        return self._ids[: self._n]

    def alive_mask(self) -> np.ndarray | None:
        """``(n_rows,)`` bool, or None when every row is alive."""
        return None if self._alive is None else self._alive[: self._n]

    def ids(self) -> np.ndarray:
        ids = self.row_ids if self._alive is None else self.row_ids[self._alive[: self._n]]
        return np.sort(ids)

    def _lookup(self, ids: np.ndarray, include_dead: bool = False) -> np.ndarray:
        """Row of each id, -1 when absent."""
        rows = np.full(ids.shape[0], -1, dtype=np.int64)
        if ids.size == 0 or self._n == 0:
            return rows
        main = self._ids[: self._n_main]
        if main.size:
            pos = np.minimum(np.searchsorted(main, ids), main.size - 1)
            hit = main[pos] == ids
            rows[hit] = pos[hit]
        if self._n > self._n_main:
            tail_sorted = self._ids[self._n_main + self._tail_order]
            pos = np.minimum(np.searchsorted(tail_sorted, ids), tail_sorted.size - 1)
            hit = (tail_sorted[pos] == ids) & (rows < 0)
            rows[hit] = self._n_main + self._tail_order[pos[hit]]
        if not include_dead and self._alive is not None:
            found = rows >= 0
            rows[found] = np.where(self._alive[rows[found]], rows[found], -1)
        return rows

    def contains(self, ids) -> np.ndarray:
        return self._lookup(_as_ids(ids)) >= 0

    def get_codes(self, ids) -> np.ndarray:
        """Packed codes ``(N, B)`` of the given ids; KeyError if any is missing."""
        ids = _as_ids(ids)
        rows = self._lookup(ids)
        if np.any(rows < 0):
            raise KeyError(f"ids not in the index: {ids[rows < 0][:5].tolist()}")
        return np.ascontiguousarray(self._words[rows].view(np.uint8)[:, : self._n_bytes])

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        cap = self._words.shape[0]
        if need <= cap:
            return
        new_cap = max(need, int(cap * 1.5))
        words = np.zeros((new_cap, self._W), dtype=np.uint64)
        words[: self._n] = self._words[: self._n]
        ids = np.zeros(new_cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        if self._alive is not None:
            alive = np.ones(new_cap, dtype=bool)
            alive[: self._n] = self._alive[: self._n]
            self._alive = alive
        self._words, self._ids = words, ids

    def add(self, ids, codes) -> None:
        packed = self.check_codes(codes)
        ids = self._new_ids(ids, packed.shape[0])
        if ids.size == 0:
            return
        with self._lock:
            rows = self._lookup(ids, include_dead=True)
            if np.any(rows >= 0):
                live = rows >= 0
                if self._alive is not None:
                    live &= self._alive[np.maximum(rows, 0)]
                if np.any(live):
                    raise ValueError(f"ids already in the index: {ids[live][:5].tolist()} (remove them first)")
                self._consolidate()  # an id coming back: drop its tombstone first
            words = to_words(packed)
            self._reserve(ids.shape[0])
            start = self._n
            self._words[start : start + ids.shape[0]] = words
            self._ids[start : start + ids.shape[0]] = ids
            if self._alive is not None:
                self._alive[start : start + ids.shape[0]] = True
            self._n += ids.shape[0]
            tail = self._n - self._n_main
            if tail > max(self._TAIL_MIN, self._TAIL_FRACTION * self._n_main):
                self._consolidate()
            else:
                self._tail_order = np.argsort(self._ids[self._n_main : self._n], kind="stable")
                self._on_add(start, self._n)

    def remove(self, ids) -> int:
        ids = np.unique(_as_ids(ids))
        with self._lock:
            rows = self._lookup(ids)
            rows = rows[rows >= 0]
            if rows.size == 0:
                return 0
            if self._alive is None:
                self._alive = np.ones(self._words.shape[0], dtype=bool)
            self._alive[rows] = False
            self._n_dead += rows.size
            if self._n_dead > self._DEAD_FRACTION * self._n or self._n_dead == self._n:
                self._consolidate()
            else:
                self._on_remove(rows)
            return int(rows.size)

    def _consolidate(self) -> None:
        """Sort all live rows by id into the main part and drop tombstones."""
        n, n_main = self._n, self._n_main
        ids = self._ids[:n]
        if n > n_main:
            tail_sorted = n_main + np.argsort(ids[n_main:], kind="stable")
            if n_main and ids[tail_sorted[0]] > ids[n_main - 1]:
                perm = np.concatenate([np.arange(n_main), tail_sorted])
            else:
                ins = np.searchsorted(ids[:n_main], ids[tail_sorted])
                perm = np.insert(np.arange(n_main), ins, tail_sorted)
        else:
            perm = None
        if self._alive is not None:
            keep = self._alive[:n] if perm is None else self._alive[perm]
            perm = np.flatnonzero(keep) if perm is None else perm[keep]
        if perm is not None:
            if not (perm.size == n and np.all(perm[1:] > perm[:-1])):
                self._words = np.ascontiguousarray(self._words[perm])
                self._ids = np.ascontiguousarray(self._ids[perm])
            self._n = perm.size
        self._n_main = self._n
        self._alive = None
        self._n_dead = 0
        self._tail_order = np.zeros(0, dtype=np.int64)
        self._on_reorder()

    def _rows_for(self, filter_ids) -> np.ndarray:
        """Live rows of the ids in ``filter_ids``, ascending."""
        if isinstance(filter_ids, (set, frozenset)):
            filter_ids = np.fromiter(filter_ids, dtype=np.int64, count=len(filter_ids))
        ids = _as_ids(filter_ids, what="filter_ids")
        # filters usually arrive sorted and unique (SQLite ORDER BY): skip the O(n log n) unique
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            ids = np.unique(ids)
        rows = self._lookup(ids)
        rows = rows[rows >= 0]
        return rows if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])) else np.sort(rows)

    # -- hooks for subclasses ----------------------------------------------------------

    def _on_add(self, start: int, stop: int) -> None:
        """Rows [start, stop) were appended to the tail."""

    def _on_remove(self, rows: np.ndarray) -> None:
        """Rows were tombstoned (still present, masked out)."""

    def _on_reorder(self) -> None:
        """Rows were renumbered (consolidation): derived structures are stale."""

    def _prepare_search(self) -> None:
        """Called under the lock before row masks are computed: last chance to reorganise."""

    # -- search ----------------------------------------------------------------------

    def _queries(self, codes) -> np.ndarray:
        return to_words(self.check_codes(codes))

    def search(self, codes, k: int, filter_ids=None) -> tuple[np.ndarray, np.ndarray]:
        q = self._queries(codes)
        k = self.check_k(k)
        empty = (np.full((q.shape[0], k), PAD_DISTANCE, np.int32), np.full((q.shape[0], k), -1, np.int64))
        with self._lock:
            self._prepare_search()
            if len(self) == 0 or k == 0 or q.shape[0] == 0:
                return empty
            if filter_ids is None:
                return self._knn(q, k, self.alive_mask())
            rows = self._rows_for(filter_ids)
            if rows.size == 0:
                return empty
            if rows.size <= self._SUBSET_FRACTION * len(self):
                return self._knn_subset(q, k, rows)
            mask = np.zeros(self._n, dtype=bool)
            mask[rows] = True
            return self._knn(q, k, mask)

    def radius_search(self, codes, radius: int, filter_ids=None) -> RadiusResult:
        q = self._queries(codes)
        radius = self.check_radius(radius)
        with self._lock:
            self._prepare_search()
            if len(self) == 0 or q.shape[0] == 0:
                return [(np.empty(0, np.int32), np.empty(0, np.int64)) for _ in range(q.shape[0])]
            if filter_ids is None:
                return self._radius(q, radius, self.alive_mask())
            rows = self._rows_for(filter_ids)
            if rows.size <= self._SUBSET_FRACTION * len(self):
                qi, d, sub = _kernel.scan_radius(np.ascontiguousarray(self.words[rows]), None, q, radius)
                return group_radius(q.shape[0], qi, d, rows[sub], self.row_ids)
            mask = np.zeros(self._n, dtype=bool)
            mask[rows] = True
            return self._radius(q, radius, mask)

    def _knn_subset(self, q: np.ndarray, k: int, rows: np.ndarray):
        """Exact k-NN over a few rows by gathering them and scanning."""
        return _kernel.scan_knn(np.ascontiguousarray(self.words[rows]), self.row_ids[rows], None, q, k)

    @abstractmethod
    def _knn(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN over rows allowed by ``mask`` (``(n_rows,)`` bool or None = all rows)."""

    @abstractmethod
    def _radius(self, q: np.ndarray, radius: int, mask: np.ndarray | None) -> RadiusResult:
        """Radius search over rows allowed by ``mask``."""

    # -- persistence -----------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        with self._lock:
            if self._n > self._n_main or self._alive is not None:
                self._consolidate()
            meta = {
                "backend": self.name,
                "n_bits": self.n_bits,
                "options": self.options(),
                "count": len(self),
            }
            codes = self.words.view(np.uint8)[:, : self._n_bytes]
            write_container(path, meta, {"ids": self.row_ids, "codes": codes})
        log.debug("saved %d items to %s", len(self), path)

    @classmethod
    def _restore(cls, path, meta, arrays, n_bits, options) -> "LocalIndex":
        try:
            ids, codes = arrays["ids"], arrays["codes"]
            count = int(meta["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{path}: not a local index payload ({exc})") from exc
        if ids.shape != (count,) or codes.shape != (count, n_bytes(n_bits)) or codes.dtype != np.uint8:
            raise IndexFormatError(f"{path}: arrays do not match the header (count={count}, n_bits={n_bits})")
        index = cls(n_bits=n_bits, **options)
        index.add(ids, codes)
        return index

    def memory_usage(self) -> dict[str, int]:
        out = {
            "codes": int(self._n * self._W * 8),
            "ids": int(self._n * 8 + self._tail_order.nbytes),
        }
        if self._alive is not None:
            out["tombstones"] = int(self._n)
        return out


def check_filter_keys(keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise ValueError naming unknown attribute filter keys."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ValueError(f"unknown filter keys {unknown}; known: {sorted(known)}")
