"""CSQ: Yuan, Wang, Wen, Liu, Feng & Zhu, "Central similarity quantization for efficient
image and video retrieval", CVPR 2020.

Each class gets a fixed hash centre, far from the others in Hamming space (the paper's
hash-centre generation): rows of a Hadamard matrix ``H_K`` when there are at most ``K``
classes, rows of ``[H_K; -H_K]`` up to ``2K`` (both need ``K`` a power of two), otherwise
random Bernoulli(1/2) centres redrawn until every pair is at least ``min_dist`` bits apart.
Codes ``h = tanh(z)`` are pulled to their centre by the central-similarity cross-entropy
plus ``lam`` x the log-cosh quantisation (the paper's overall objective). The centres are a
buffer, deterministic given ``seed``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.metric import CentralSimilarityLoss, LogCoshQuantizationLoss
from fashionhash.methods._common import stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod

log = logging.getLogger(__name__)


def hadamard(k: int) -> torch.Tensor:
    """Sylvester's ``(k, k)`` Hadamard matrix of +-1 (``k`` a power of two): rows pairwise
    orthogonal, i.e. exactly ``k/2`` bits apart."""
    if k < 1 or k & (k - 1):
        raise ValueError(f"Hadamard matrices here need a power of two, not {k}")
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hash_centres(n_classes: int, n_bits: int, seed: int = 0, min_dist: int | None = None,
                 max_tries: int = 1000) -> torch.Tensor:
    """``(n_classes, n_bits)`` centres in {-1, +1} (CSQ's hash-centre generation).

    Random centres (more than ``2K`` classes, or ``K`` not a power of two) must be at least
    ``min_dist`` (default ``K/4``) bits from every earlier centre; when ``max_tries`` draws
    cannot satisfy that, the requirement is lowered by one bit (a short code cannot hold
    many classes far apart) and the drawing continues. Deterministic given ``seed``."""
    k = n_bits
    if k & (k - 1) == 0 and n_classes <= 2 * k:
        h = hadamard(k)
        return (h if n_classes <= k else torch.cat([h, -h]))[:n_classes].clone()
    g = torch.Generator().manual_seed(seed)
    need = k // 4 if min_dist is None else min_dist
    centres: list[torch.Tensor] = []
    while len(centres) < n_classes:
        for _ in range(max_tries):
            c = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
            if not centres or ((torch.stack(centres) != c).sum(dim=1) >= need).all():
                centres.append(c)
                break
        else:
            need -= 1
            log.debug("CSQ: %d centres of %d bits: minimum distance lowered to %d", n_classes, k, need)
    return torch.stack(centres)


@METHODS.register("csq")
class CSQ(HashingMethod):
    """CSQ: central similarity to the class's hash centre + ``lam`` x log-cosh quantisation."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, lam: float = 1e-4,
                 seed: int = 0, min_dist: int | None = None, use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.register_buffer("centres", hash_centres(n_classes, n_bits, seed, min_dist))
        self.center_loss, self.quant_loss = CentralSimilarityLoss(), LogCoshQuantizationLoss()
        self.weights = WeightedSum({"center": 1.0, "quant": lam})
        self.use_views = use_views

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        h = torch.tanh(self.head(self.features(x)))
        parts = {"center": self.center_loss(h, self.centres[y]), "quant": self.quant_loss(h)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
