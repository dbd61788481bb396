"""int8 descriptors stored beside a Hamming index, by item id: the second stage of search.

A :class:`DescriptorStore` keeps ``(N, d)`` int8 rows (see :mod:`fashionhash.descriptors`)
for the same ids as the index's codes, supports add / remove / lookup by id, and is saved
in the index's checksummed container format (:mod:`.persist`), so a truncated or altered
file is refused when the catalogue is opened.
"""
from __future__ import annotations

import os

import numpy as np

from .base import _as_ids
from .persist import IndexFormatError, read_container, write_container

KIND = "descriptors"


class DescriptorStore:
    """int8 descriptor rows addressed by int64 id (lookups by binary search on sorted ids)."""

    def __init__(self, dim: int) -> None:
        if int(dim) <= 0:
            raise ValueError(f"descriptor dimension must be positive, got {dim}")
        self.dim = int(dim)
        self._ids = np.zeros(0, np.int64)  # sorted
        self._rows = np.zeros((0, self.dim), np.int8)

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """Stored ids ``(N,)`` int64, ascending (read-only view)."""
        v = self._ids.view()
        v.flags.writeable = False
        return v

    @property
    def rows(self) -> np.ndarray:
        """Stored int8 rows ``(N, dim)`` in :attr:`ids` order (read-only view)."""
        v = self._rows.view()
        v.flags.writeable = False
        return v

    @property
    def nbytes(self) -> int:
        return int(self._rows.nbytes + self._ids.nbytes)

    def check_rows(self, rows, n: int) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.dtype != np.int8 or rows.shape != (n, self.dim):
            raise ValueError(f"descriptors must be int8 ({n}, {self.dim}), got {rows.dtype} {rows.shape}")
        return rows

    def add(self, ids, rows) -> None:
        """Add rows for new ids (an id already stored, or repeated, is refused)."""
        ids = _as_ids(ids)
        rows = self.check_rows(rows, ids.size)
        if np.unique(ids).size != ids.size or self.contains(ids).any():
            raise ValueError("descriptor ids must be new and distinct")
        all_ids = np.concatenate([self._ids, ids])
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._rows = np.concatenate([self._rows, rows])[order]

    def remove(self, ids) -> int:
        """Drop the rows of ``ids`` (unknown ids ignored); returns how many were removed."""
        drop = np.isin(self._ids, _as_ids(ids))
        n = int(drop.sum())
        if n:
            self._ids, self._rows = self._ids[~drop], self._rows[~drop]
        return n

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where absent."""
        if self._ids.size == 0:
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return np.where(self._ids[pos] == ids, pos, -1)

    def contains(self, ids) -> np.ndarray:
        return self._positions(_as_ids(ids)) >= 0

    def get(self, ids) -> np.ndarray:
        """int8 rows ``(len(ids), dim)`` of ``ids``; rows of ids < 0 (padding) are zero.
        KeyError for an id that is not stored."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = self._positions(ids)
        missing = (pos < 0) & (ids >= 0)
        if missing.any():
            raise KeyError(f"no descriptor for id {int(ids[missing][0])}")
        out = np.zeros((ids.size, self.dim), np.int8)
        out[pos >= 0] = self._rows[pos[pos >= 0]]
        return out

    def save(self, path: str | os.PathLike) -> None:
        write_container(path, {"kind": KIND, "dim": self.dim, "count": len(self)},
                        {"ids": self._ids, "rows": self._rows})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DescriptorStore":
        meta, arrays = read_container(path)
        if meta.get("kind") != KIND:
            raise IndexFormatError(f"{path}: not a descriptor file (kind {meta.get('kind')!r})")
        store = cls(int(meta["dim"]))
        ids, rows = arrays.get("ids"), arrays.get("rows")
        if ids is None or rows is None or rows.shape != (ids.size, store.dim) \
                or ids.size != int(meta["count"]) or (ids.size > 1 and (np.diff(ids) <= 0).any()):
            raise IndexFormatError(f"{path}: malformed descriptor arrays")
        store._ids, store._rows = ids.astype(np.int64).copy(), rows.astype(np.int8).copy()
        return store
