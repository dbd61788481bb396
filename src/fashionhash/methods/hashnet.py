"""HashNet: Cao, Long, Wang & Yu, "HashNet: deep learning to hash by continuation",
ICCV 2017.

Codes ``h = tanh(beta z)`` trained with the class-balanced pairwise likelihood; the
continuation grows ``beta`` during training so that ``tanh(beta z)`` approaches ``sign(z)``
(the paper's continuation method). ``beta`` follows ``beta_t = (1 + gamma t)^power`` in the
number of optimisation steps ``t``, increased every ``step_size`` steps. The step count
lives in a buffer, so it is saved in every checkpoint and a resumed run continues the same
schedule; no trainer hook is needed. Steps are counted by :meth:`objectives` in training
mode only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.pairwise import HashNetLoss
from fashionhash.methods._common import label_similarity, stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


@METHODS.register("hashnet")
class HashNet(HashingMethod):
    """HashNet: weighted pairwise likelihood (``alpha``, default ``10/K``) on
    ``tanh(beta z)`` with the continuation schedule ``(gamma, power, step_size)``."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None,
                 alpha: float | None = None, gamma: float = 0.005, power: float = 0.5,
                 step_size: int = 200, use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        if step_size < 1:
            raise ValueError("step_size must be >= 1")
        self.lik_loss = HashNetLoss(alpha)
        self.weights = WeightedSum({"lik": 1.0})
        self.gamma, self.power, self.step_size, self.use_views = gamma, power, step_size, use_views
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def beta(self) -> float:
        """The current continuation scale (1 at the start of training)."""
        t = (int(self.steps) // self.step_size) * self.step_size
        return float((1.0 + self.gamma * t) ** self.power)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * self.head(self.features(x)))

    def objectives(self, batch: dict):
        x, y, _, _ = stacked_batch(batch, self.use_views)
        h = torch.tanh(self.beta * self.head(self.features(x)))
        total, logged = self.weights({"lik": self.lik_loss(h, label_similarity(y))})
        logged["beta"] = self.beta
        if self.training:
            self.steps += 1
        return {"encoder": total}, logged
