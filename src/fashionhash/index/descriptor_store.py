"""int8 descriptors stored beside a Hamming index, by item id: the second stage of search.

A :class:`DescriptorStore` keeps ``(N, d)`` int8 rows (see :mod:`fashionhash.descriptors`)
for the same ids as the index's codes, supports add / remove / lookup by id, and is saved
in the index's checksummed container format (:mod:`.persist`), so a truncated or altered
file is refused when the catalogue is opened.

The store also keeps each row's exact squared norm (computed once, saved since format 2;
format 1 files are read and their norms computed) and, when ids are compact, an id -> row
table, so re-ranking a shortlist (:meth:`DescriptorStore.rerank`) reads the rows where they
lie, with no per-candidate copy, norm or binary search.
"""
from __future__ import annotations

import os

import numpy as np

from fashionhash.descriptors import squared_norms

from ._kernel import rerank_int8
from .base import _as_ids
from .persist import IndexFormatError, read_container, write_container

KIND = "descriptors"
VERSION = 2  # 1: ids, rows; 2: + sqnorms
#: an id -> row table is kept while it needs at most this many slots per stored row
DENSE_SLOTS_PER_ROW = 2


class DescriptorStore:
    """int8 descriptor rows addressed by int64 id (lookups by binary search on sorted ids)."""

    def __init__(self, dim: int) -> None:
        if int(dim) <= 0:
            raise ValueError(f"descriptor dimension must be positive, got {dim}")
        self.dim = int(dim)
        self._ids = np.zeros(0, np.int64)  # sorted
        self._rows = np.zeros((0, self.dim), np.int8)
        self._sqnorms = np.zeros(0, np.int64)  # exact squared norm of each row
        self._table: np.ndarray | None = None  # id -> row (-1: absent) while ids are compact

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
        table = 0 if self._table is None else self._table.nbytes
        return int(self._rows.nbytes + self._ids.nbytes + self._sqnorms.nbytes + table)

    def _set(self, ids: np.ndarray, rows: np.ndarray, sqnorms: np.ndarray) -> None:
        """Replace the contents (ids sorted) and rebuild the id -> row table."""
        self._ids, self._rows, self._sqnorms = ids, rows, sqnorms
        top = int(ids[-1]) + 1 if ids.size else 0
        self._table = None
        if ids.size and top <= DENSE_SLOTS_PER_ROW * ids.size:
            # ids are >= 0 (the index refuses others); int32 rows halve the table
            table = np.full(top, -1, np.int32 if ids.size < 2**31 else np.int64)
            table[ids] = np.arange(ids.size)
            self._table = table

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
        self._set(all_ids[order], np.concatenate([self._rows, rows])[order],
                  np.concatenate([self._sqnorms, squared_norms(rows)])[order])

    def remove(self, ids) -> int:
        """Drop the rows of ``ids`` (unknown ids ignored); returns how many were removed."""
        drop = np.isin(self._ids, _as_ids(ids))
        n = int(drop.sum())
        if n:
            self._set(self._ids[~drop], self._rows[~drop], self._sqnorms[~drop])
        return n

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (any shape), -1 where absent."""
        if self._ids.size == 0:
            return np.full(ids.shape, -1, np.int64)
        if self._table is not None:
            inside = (ids >= 0) & (ids < self._table.size)
            return np.where(inside, self._table[np.where(inside, ids, 0)], -1).astype(np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return np.where(self._ids[pos] == ids, pos, -1)

    def rows_of(self, ids) -> np.ndarray:
        """Store rows of ``ids`` (any shape, int64): -1 where the id is < 0 (padding).
        KeyError for an id that is not stored."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._positions(ids)
        missing = (pos < 0) & (ids >= 0)
        if missing.any():
            raise KeyError(f"no descriptor for id {int(ids[missing][0])}")
        return pos

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Order shortlists by cosine: ``queries (Q, d)`` float, ``candidates (Q, R)`` ids
        (-1: padding) -> (cosines ``(Q, k)`` float32, shortlist positions ``(Q, k)`` int64),
        best first, equal cosines in shortlist order, padded with (0, -1); the answer of
        :func:`fashionhash.descriptors.rerank_reference` per query. KeyError for an unknown id."""
        queries = np.asarray(queries, np.float32)
        candidates = np.asarray(candidates, np.int64)
        if queries.ndim != 2 or queries.shape[1] != self.dim or candidates.ndim != 2 \
                or candidates.shape[0] != queries.shape[0]:
            raise ValueError(f"queries (Q, {self.dim}) and candidates (Q, R) expected, got "
                             f"{queries.shape} and {candidates.shape}")
        return rerank_int8(queries, self._rows, self._sqnorms, self.rows_of(candidates), k)

    def contains(self, ids) -> np.ndarray:
        return self._positions(_as_ids(ids)) >= 0

    def get(self, ids) -> np.ndarray:
        """int8 rows ``(len(ids), dim)`` of ``ids``; rows of ids < 0 (padding) are zero.
        KeyError for an id that is not stored."""
        pos = self.rows_of(np.asarray(ids, dtype=np.int64).reshape(-1))
        out = np.zeros((pos.size, self.dim), np.int8)
        out[pos >= 0] = self._rows[pos[pos >= 0]]
        return out

    def save(self, path: str | os.PathLike) -> None:
        write_container(path, {"kind": KIND, "version": VERSION, "dim": self.dim, "count": len(self)},
                        {"ids": self._ids, "rows": self._rows, "sqnorms": self._sqnorms})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DescriptorStore":
        meta, arrays = read_container(path)
        if meta.get("kind") != KIND:
            raise IndexFormatError(f"{path}: not a descriptor file (kind {meta.get('kind')!r})")
        version = int(meta.get("version", 1))  # format 1 wrote no version
        if version > VERSION:
            raise IndexFormatError(f"{path}: descriptor format {version} (this build reads <= {VERSION})")
        store = cls(int(meta["dim"]))
        ids, rows = arrays.get("ids"), arrays.get("rows")
        sqnorms = arrays.get("sqnorms") if version >= 2 else None
        if ids is None or rows is None or rows.shape != (ids.size, store.dim) \
                or ids.size != int(meta["count"]) or (ids.size > 1 and (np.diff(ids) <= 0).any()) \
                or (version >= 2 and (sqnorms is None or sqnorms.shape != ids.shape)):
            raise IndexFormatError(f"{path}: malformed descriptor arrays")
        rows = rows.astype(np.int8).copy()
        store._set(ids.astype(np.int64).copy(), rows,
                   squared_norms(rows) if sqnorms is None else sqnorms.astype(np.int64).copy())
        return store
