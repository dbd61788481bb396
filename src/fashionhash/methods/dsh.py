"""DSH: Liu, Wang, Shan & Chen, "Deep supervised hashing for fast image retrieval",
CVPR 2016.

Real-valued outputs ``u`` trained with the contrastive loss with margin ``m = 2K`` and the
``alpha || |u| - 1 ||_1`` regulariser (the paper's relaxed loss); the code is ``sign(u)``
(``encode`` returns ``tanh(u)``, same sign).
"""
from __future__ import annotations

import torch.nn as nn

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.pairwise import DSHContrastiveLoss, DSHRegularizer
from fashionhash.methods._common import label_similarity, stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


@METHODS.register("dsh")
class DSH(HashingMethod):
    """DSH: contrastive pair loss (margin ``2K`` unless ``margin`` is given) + ``alpha`` x
    regulariser (``alpha = 0.01``, the paper's setting)."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, alpha: float = 0.01,
                 margin: float | None = None, use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.pair_loss, self.reg = DSHContrastiveLoss(margin), DSHRegularizer()
        self.weights = WeightedSum({"pair": 1.0, "reg": alpha})
        self.use_views = use_views

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        u = self.head(self.features(x))
        parts = {"pair": self.pair_loss(u, label_similarity(y)), "reg": self.reg(u)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
