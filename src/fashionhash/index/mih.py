"""``mih``: multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with
multi-index hashing", CVPR 2012), exact k-NN and radius search.

Codes are cut into ``m`` disjoint substrings, each indexed by its own hash table. If two
codes are within distance ``r`` then, by pigeonhole, they agree within ``floor(r / m)`` bits
on at least one substring, so probing each table at substring radius 0, 1, 2, ... finds
every neighbour while touching only a few buckets when neighbours are near. After probing
substring radius ``s`` on tables ``0..i`` (and ``s - 1`` on the rest) every code within
``m*s + i`` of the query has been seen, which gives the exact stopping rule for k-NN (stop
once the k-th best distance is within that bound) and for radius search.

The tables hold *distinct codes*, not items: a trained model gives thousands of items one
code (each clothing type collapses onto a few codes), and probing a bucket then costs one
distance per code. Each code keeps its rows in ascending order (= id order), so k-NN reads
a shared code's rows only until the heap refuses one (ties are ordered by id), and radius
search emits them already sorted (a bitmap pass merges a level's codes), with no sort of
the whole answer. Tables are CSR arrays (codes grouped by substring value, one offsets
array per table), not Python dicts: 4 bytes per distinct code per table plus the offsets,
and, when codes repeat, the distinct codes (8 B each) and a row list (4 B per item). Rows
added since the last build are scanned linearly until the next rebuild.

Each query carries a work budget (in units of one row of a linear scan). Far-away queries,
e.g. on uniformly random codes, would need to enumerate huge numbers of buckets; when the
next round would overrun the budget the query is answered by the linear scan instead, so
the worst case stays close to brute force.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from . import _kernel
from .base import INDEXES, LocalIndex, RadiusResult

log = logging.getLogger(__name__)


@INDEXES.register("mih")
class MIHIndex(LocalIndex):
    """Exact Hamming search with multi-index hashing, falling back to a scan per query.

    Options:
        m: number of substrings (tables); default ``round(n_bits / log2(N))`` at build time,
            N the number of distinct codes, the choice the MIH paper recommends (substrings
            about ``log2 N`` bits long).
        budget: per-query work limit as a fraction of a full scan before falling back
            (``float("inf")`` never falls back).
        probe_cost, cand_cost: cost of a bucket probe (random access) and of checking one
            candidate code (read in sequence from the table), in units of one scanned row.
    """

    name = "mih"
    #: rebuild the tables when rows added since exceed this fraction of the indexed rows
    _DELTA_FRACTION = 1 / 16
    _DELTA_MIN = 256

    def __init__(
        self,
        n_bits: int,
        m: int | None = None,
        budget: float = 0.5,
        probe_cost: float = 30.0,
        cand_cost: float = 2.0,
    ) -> None:
        super().__init__(n_bits)
        if m is not None:
            max_m = min(64, 8 * self.n_bytes)
            if not isinstance(m, (int, np.integer)) or not math.ceil(8 * self.n_bytes / 32) <= m <= max_m:
                raise ValueError(f"m must be an integer in [{math.ceil(8 * self.n_bytes / 32)}, {max_m}], got {m!r}")
        if not budget > 0:
            raise ValueError(f"budget must be > 0, got {budget!r}")
        self._m = None if m is None else int(m)
        self._budget = float(budget)
        self._probe_cost = float(probe_cost)
        self._cand_cost = float(cand_cost)
        self._tables: _kernel.MIHTables | None = None
        self.last_stats: dict[str, int] = {}

    def options(self):
        return {
            "m": self._m,
            "budget": self._budget,
            "probe_cost": self._probe_cost,
            "cand_cost": self._cand_cost,
        }

    def auto_m(self, n: int) -> int:
        """Substrings of about log2(n) bits (at least 1 table, at most 32 bits each)."""
        bits = 8 * self.n_bytes
        m = round(self.n_bits / max(math.log2(max(n, 2)), 1.0))
        return int(min(max(m, math.ceil(bits / 32), 1), min(64, bits)))

    @property
    def m(self) -> int | None:
        """Tables in use (None until the first search builds them)."""
        return None if self._tables is None else self._tables.m

    # -- table maintenance -----------------------------------------------------------

    def _on_reorder(self) -> None:
        self._tables = None

    def _prepare_search(self) -> None:
        delta = self._n - self._n_main
        if delta > max(self._DELTA_MIN, self._DELTA_FRACTION * self._n_main):
            self._consolidate()  # resets the tables
        if self._tables is None:
            codes, groups = _kernel.group_codes(self.words, self._n_main)
            m = self._m or self.auto_m(groups.n)
            self._tables = _kernel.build_tables(codes, groups, self.n_bytes, m)
            log.debug("built %d MIH tables over %d distinct codes of %d rows", m, groups.n, self._n_main)

    def build(self) -> None:
        """Build the tables now (otherwise the first search does)."""
        with self._lock:
            self._prepare_search()

    def _cost(self) -> _kernel.MIHCost:
        return _kernel.MIHCost(
            budget=max(64.0, self._budget * self._n), probe_cost=self._probe_cost, cand_cost=self._cand_cost
        )

    def _record(self, nq: int, stats: np.ndarray) -> None:
        self.last_stats = {
            "queries": int(nq),
            "candidates": int(stats[0]),
            "probes": int(stats[1]),
            "fallbacks": int(stats[2]),
        }

    # -- search ----------------------------------------------------------------------

    def _knn(self, q: np.ndarray, k: int, mask: np.ndarray | None):
        d, i, fallback, stats = _kernel.mih_knn(
            self._tables, self.words, self.row_ids, mask, self._n, q, k, self._cost()
        )
        self._record(q.shape[0], stats)
        if fallback.any():
            d[fallback], i[fallback] = _kernel.scan_knn(self.words, self.row_ids, mask, q[fallback], k)
        return d, i

    def _radius(self, q: np.ndarray, radius: int, mask: np.ndarray | None) -> RadiusResult:
        out, fallback, stats = _kernel.mih_radius(
            self._tables, self.words, self.row_ids, mask, self._n, q, radius, self._cost()
        )
        self._record(q.shape[0], stats)
        if fallback.any():
            fb = np.flatnonzero(fallback)
            qi, d, rows = _kernel.scan_radius(self.words, mask, q[fb], radius)
            for j, res in zip(fb, _kernel.group_radius(fb.shape[0], qi, d, rows, self.row_ids)):
                out[j] = res
        return out

    def memory_usage(self) -> dict[str, int]:
        out = super().memory_usage()
        out["tables"] = 0 if self._tables is None else self._tables.nbytes
        return out
