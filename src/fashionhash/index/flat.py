"""``flat``: exact brute force over the code store (popcount on uint64 words)."""
from __future__ import annotations

import numpy as np

from . import _kernel
from .base import INDEXES, LocalIndex, RadiusResult


@INDEXES.register("flat")
class FlatIndex(LocalIndex):
    """Exact linear scan. The C kernel sweeps blocks of 32 queries over cache-sized row
    blocks with a bounded (distance, id) heap per query, so it needs no sort and keeps the
    tie order exact; the numpy fallback computes distance rows and partitions them."""

    name = "flat"

    def _knn(self, q: np.ndarray, k: int, mask: np.ndarray | None):
        return _kernel.scan_knn(self.words, self.row_ids, mask, q, k)

    def _radius(self, q: np.ndarray, radius: int, mask: np.ndarray | None) -> RadiusResult:
        qi, d, rows = _kernel.scan_radius(self.words, mask, q, radius)
        return _kernel.group_radius(q.shape[0], qi, d, rows, self.row_ids)
