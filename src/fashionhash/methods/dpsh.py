"""DPSH: Li, Wang & Kang, "Feature learning based deep supervised hashing with pairwise
labels", IJCAI 2016.

The hash layer's real-valued outputs ``u`` are trained with the pairwise likelihood on
``Theta_ij = 1/2 u_i . u_j`` plus ``eta ||sign(u) - u||^2`` (the paper's relaxed
objective); the code is ``sign(u)`` (``encode`` returns ``tanh(u)``, which has the same
sign).
"""
from __future__ import annotations

import torch.nn as nn

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.pairwise import DPSHLikelihoodLoss, SignQuantizationLoss
from fashionhash.methods._common import label_similarity, stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


@METHODS.register("dpsh")
class DPSH(HashingMethod):
    """DPSH: pairwise likelihood + ``eta`` x quantisation (``eta`` weighs the per-element mean
    of ``(u - sign u)^2`` against the per-pair mean likelihood)."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, eta: float = 0.1,
                 use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.lik_loss, self.quant_loss = DPSHLikelihoodLoss(), SignQuantizationLoss()
        self.weights = WeightedSum({"lik": 1.0, "quant": eta})
        self.use_views = use_views

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        u = self.head(self.features(x))
        parts = {"lik": self.lik_loss(u, label_similarity(y)), "quant": self.quant_loss(u)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
