"""DCH: Cao, Long, Liu & Wang, "Deep Cauchy hashing for Hamming space retrieval", CVPR 2018.

Relaxed codes ``h = tanh(z)`` trained with the class-balanced Cauchy cross-entropy on the
normalised distance ``d = K/2 (1 - cos(h_i, h_j))`` plus ``lambda`` x the Cauchy
quantisation loss (the paper's overall objective). The heavy-tailed Cauchy probability
keeps pulling similar pairs whose distance is already small, which concentrates them within
a small Hamming radius.

``squash=False`` and ``max_cos=0.99`` give the published PyTorch port's form (raw head outputs,
cosines capped); measured below the paper's form on the product photos (docs/results.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.pairwise import CauchyCrossEntropyLoss, CauchyQuantizationLoss
from fashionhash.methods._common import label_similarity, stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


@METHODS.register("dch")
class DCH(HashingMethod):
    """DCH: Cauchy cross-entropy (``gamma``) + ``lam`` x Cauchy quantisation."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, gamma: float = 20.0,
                 lam: float = 0.1, max_cos: float = 1.0, squash: bool = True, use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.ce_loss = CauchyCrossEntropyLoss(gamma, max_cos=max_cos)
        self.quant_loss = CauchyQuantizationLoss(gamma)
        # squash=False: the loss sees the head's raw outputs (it is scale-invariant: cosines),
        # as in the published PyTorch port; tanh saturates and slows large outputs
        self.squash = squash
        self.weights = WeightedSum({"cauchy": 1.0, "quant": lam})
        self.use_views = use_views

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        z = self.head(self.features(x))
        h = torch.tanh(z) if self.squash else z
        parts = {"cauchy": self.ce_loss(h, label_similarity(y)), "quant": self.quant_loss(h)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
