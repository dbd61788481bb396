"""DLBHC: Lin, Yang, Hsiao & Chen, "Deep learning of binary hash codes for fast image
retrieval", CVPR Workshops 2015.

A latent layer of ``K`` sigmoid units sits between the image features and the classifier
and is trained by classification alone; an item's code thresholds the latent activations at
0.5. ``encode`` returns ``2 sigmoid(z) - 1`` in (-1, 1): its sign is exactly that code
(``sigmoid(z) >= 0.5  <=>  z >= 0``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fashionhash.losses.core import ClassificationLoss, WeightedSum
from fashionhash.methods._common import stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


@METHODS.register("dlbhc")
class DLBHC(HashingMethod):
    """DLBHC: features -> latent sigmoid layer ``H`` (K units) -> softmax classifier."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None,
                 use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.classifier = nn.Linear(n_bits, n_classes)
        self.cls_loss = ClassificationLoss()
        self.weights = WeightedSum({"cls": 1.0})
        self.use_views = use_views

    def head_modules(self):
        yield self.head
        yield self.classifier

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent layer's activations ``(B, K)`` in (0, 1)."""
        return torch.sigmoid(self.head(self.features(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.latent(x) - 1.0

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        parts = {"cls": self.cls_loss(self.classifier(self.latent(x)), y)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
