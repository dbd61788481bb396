"""LSH: random-hyperplane hashing (Charikar, "Similarity estimation techniques from
rounding algorithms", STOC 2002): bit ``k`` is ``sign(w_k . (x - mean))`` with Gaussian
``w_k``, so the expected Hamming distance of two items is ``K theta / pi`` for the angle
``theta`` between their centred features. Data-independent apart from the centring.

A shallow method: no trainable parameter, fitted once on the frozen training features
(the trainer calls :meth:`fit`). ``encode`` returns ``tanh(p / std(p))`` of the projection
``p``: same sign as the code, and a per-bit confidence for tie re-ranking.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fashionhash.methods.base import METHODS, HashingMethod


class ShallowHashing(HashingMethod):
    """Base of the closed-form methods: codes ``sign((x - mean) @ proj)``, everything held in
    buffers (saved in checkpoints), no trainable parameter, ``param_groups() == {}``."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None) -> None:
        if backbone is not None:
            raise ValueError(f"{type(self).__name__} is fitted on cached features: use model.mode=frozen")
        super().__init__(feat_dim, n_bits, n_classes, hidden=0, dropout=0.0, backbone=None)
        self.head = None  # nothing to train: the trainer then runs no optimisation step
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("proj", torch.zeros(feat_dim, n_bits))
        self.register_buffer("scale", torch.ones(n_bits))

    def head_modules(self):
        return iter(())

    def param_groups(self) -> dict[str, list[dict]]:
        return {}

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Centred projections ``(B, K)``, the code's sign before squashing."""
        return (x.float() - self.mean) @ self.proj

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.project(x) / self.scale)

    def _set_scale(self, x: torch.Tensor) -> None:
        self.scale.copy_(self.project(x).std(dim=0).clamp_min(1e-6))

    def fit(self, feats: torch.Tensor, y: torch.Tensor | None = None) -> "ShallowHashing":
        raise NotImplementedError

    def objectives(self, batch: dict):
        raise RuntimeError(f"{type(self).__name__} has no training objective: call fit()")


@METHODS.register("lsh")
class LSH(ShallowHashing):
    """Sign of Gaussian random projections of the centred features (``seed`` fixes them)."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, seed: int = 0) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        g = torch.Generator().manual_seed(seed)
        self.proj.copy_(torch.randn(feat_dim, n_bits, generator=g))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, y: torch.Tensor | None = None) -> "LSH":
        """Centre on the training mean; labels are not used."""
        x = feats.float()
        self.mean.copy_(x.mean(dim=0))
        self._set_scale(x)
        return self
