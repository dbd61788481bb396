"""SGML: Manandhar, Bastan & Yap, "Semantic granularity metric learning for visual search",
arXiv:1911.06047, 2019.

A multitask network: a shared trunk on the image features, attribute classification heads
(articleType from ``y``, then one head per further attribute in ``attrs``) and an
embedding head. The embedding is trained with the soft-binomial deviance
(:class:`~fashionhash.losses.metric.SoftBinomialDevianceLoss`), whose pair weights are the
pairs' semantic granularity similarity in attribute space, so that pairs sharing more
attributes end up closer; the attribute heads are trained jointly (``w_attr``).

Granularity ``g_ij`` (``granularity=``):

* ``"labels"`` (default): 1 for the same item (two views of one photo), else the fraction of
  the attributes (articleType + ``attrs``) on which the two items agree, a missing value
  (-1) agreeing with nothing, the same grading as the evaluation's attribute gain;
* ``"predicted"``: the paper's on-the-fly mapping from the attribute predictions: the mean
  over heads of ``p_i . p_j``, the predicted probability that the two items share the value
  (detached; 1 for the same item).

SGML is a real-valued embedding method: :meth:`embed` gives the L2-normalised embedding
for cosine ranking, and :meth:`encode` its ``K``-bit binarisation (``tanh`` of the scaled
normalised embedding, whose sign is the sign of each embedding coordinate), so the method
also fits the hashing table.

The number of values of each further attribute comes from the catalogue: ``attr_sizes``
(one int per column of ``attrs``, in order; ``None`` = no further attribute heads, the
granularity still uses ``attrs``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionhash.losses.core import WeightedSum
from fashionhash.losses.metric import AttributeClassificationLoss, SoftBinomialDevianceLoss
from fashionhash.methods._common import stacked_batch
from fashionhash.methods.base import METHODS, HashingMethod


def attribute_granularity(y: torch.Tensor, attrs: torch.Tensor | None, item: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """``(B, B)`` in [0, 1]: fraction of agreeing attributes over ``[y, attrs...]`` (a
    missing value, -1, agrees with nothing), 1 for the same ``item``."""
    cols = y[:, None] if attrs is None or attrs.shape[1] == 0 else torch.cat([y[:, None], attrs], 1)
    agree = (cols[:, None, :] == cols[None, :, :]) & (cols[:, None, :] >= 0)
    g = agree.float().mean(dim=2)
    if item is not None:
        g = torch.where(item[:, None] == item[None, :], torch.ones_like(g), g)
    return g


@METHODS.register("sgml")
class SGML(HashingMethod):
    """SGML: trunk -> (embedding, attribute heads); soft-binomial deviance on the embedding
    with attribute-granularity weights + ``w_attr`` x attribute cross-entropy."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None,
                 attr_sizes: Sequence[int] | None = None, w_attr: float = 1.0,
                 alpha: float = 2.0, beta: float = 0.5, neg_cost: float = 25.0,
                 granularity: str = "labels", use_views: bool = True) -> None:
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        if granularity not in ("labels", "predicted"):
            raise ValueError("granularity is labels or predicted")
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden:
            layers += [nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(dropout)] if dropout else []
        width = hidden or feat_dim
        # head = trunk + embedding layer, so head(features) is the embedding
        self.head = nn.Sequential(nn.Sequential(*layers), nn.Linear(width, n_bits))
        self.attr_sizes = [int(n) for n in (attr_sizes or [])]
        self.attr_heads = nn.ModuleList([nn.Linear(width, n) for n in [n_classes, *self.attr_sizes]])
        self.metric_loss = SoftBinomialDevianceLoss(alpha, beta, neg_cost)
        self.attr_loss = AttributeClassificationLoss()
        self.weights = WeightedSum({"sbd": 1.0, "attr": w_attr})
        self.granularity, self.use_views = granularity, use_views

    @property
    def trunk(self) -> nn.Module:
        """The shared layers under the embedding and the attribute heads."""
        return self.head[0]

    def head_modules(self):
        yield self.head  # includes the trunk
        yield self.attr_heads

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Real-valued L2-normalised embedding ``(B, K)`` for cosine ranking."""
        return F.normalize(self.head(self.features(x)), dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # scaled so that coordinates are O(1): tanh then carries a usable per-bit confidence
        return torch.tanh(math.sqrt(self.n_bits) * self.embed(x))

    def objectives(self, batch: dict):
        x, y, item, attrs = stacked_batch(batch, self.use_views)
        t = self.trunk(self.features(x))
        emb = self.head[1](t)
        logits = [h(t) for h in self.attr_heads]
        n_heads = len(logits)
        targets = y[:, None]
        if n_heads > 1:
            if attrs is None or attrs.shape[1] < n_heads - 1:
                raise ValueError(f"sgml has {n_heads - 1} attribute heads (attr_sizes) but the batch "
                                 f"carries {0 if attrs is None else attrs.shape[1]} attribute columns")
            targets = torch.cat([targets, attrs[:, :n_heads - 1]], 1)
        if self.granularity == "labels":
            g = attribute_granularity(y, attrs, item)
        else:
            with torch.no_grad():
                probs = [F.softmax(lg, dim=1) for lg in logits]
                g = torch.stack([p @ p.T for p in probs]).mean(dim=0)
                g = torch.where(item[:, None] == item[None, :], torch.ones_like(g), g)
        parts = {"sbd": self.metric_loss(emb, g), "attr": self.attr_loss(logits, targets)}
        total, logged = self.weights(parts)
        return {"encoder": total}, logged
