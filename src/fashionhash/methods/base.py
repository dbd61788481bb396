"""A hashing method = (optional) backbone + hash head + its own heads and losses.

The trainer only knows this interface:

* ``encode(x) -> (B, K)`` relaxed codes in [-1, 1] (``x``: cached backbone features
  ``(B, F)`` in frozen mode, images ``(B, C, H, W)`` in finetune mode);
* ``objectives(batch) -> ({group: loss}, {part: float})``: one scalar loss per optimiser
  group (``"encoder"``, and ``"discriminator"`` for adversarial methods), each minimised
  only over its own group's parameters, all computed at the same point (simultaneous
  updates), plus the loss parts for logging;
* ``param_groups() -> {group: [params]}``.

A batch is a dict: ``x`` ``(B, ...)``, ``y`` ``(B,)`` class indices, ``item`` ``(B,)``
item positions, optionally ``x_view`` ``(B, ...)`` an augmented view of the same items
(the closest semantic neighbours there are) and ``attrs`` ``(B, A)`` attribute indices.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from fashionhash.models.heads import HashHead
from fashionhash.registry import Registry

METHODS: Registry["HashingMethod"] = Registry("method")


class HashingMethod(nn.Module):
    """Base class: backbone (``None`` in frozen mode) + hash head."""

    uses_views: bool = True  # wants an augmented view of each item in the batch

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.feat_dim, self.n_bits, self.n_classes = feat_dim, n_bits, n_classes
        self.backbone = backbone
        self.head = HashHead(feat_dim, n_bits, hidden=hidden, dropout=dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs -> pooled features ``(B, F)`` (identity on cached features)."""
        return x if self.backbone is None else self.backbone.embed(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs -> relaxed codes ``(B, K)`` in [-1, 1]; binarise with :mod:`fashionhash.codes`."""
        return torch.tanh(self.head(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def head_modules(self) -> Iterator[nn.Module]:
        """Encoder-side modules besides the backbone (hash head, classifier...)."""
        yield self.head

    def param_groups(self) -> dict[str, list[dict]]:
        """Optimiser groups; the backbone gets its own (lower) learning rate entry."""
        heads = [p for m in self.head_modules() for p in m.parameters()]
        groups = [{"params": heads, "name": "heads"}]
        if self.backbone is not None:
            groups.append({"params": list(self.backbone.parameters()), "name": "backbone"})
        return {"encoder": groups}

    def objectives(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError


def pair_similarity(y: torch.Tensor, item: torch.Tensor, class_sim: float,
                    attrs: torch.Tensor | None = None) -> torch.Tensor:
    """Graded similarity ``(B, B)`` in [0, 1]: 1 for the same item (two views of one photo),
    ``class_sim`` for the same class (raised towards 1 by the fraction of other attributes
    that also agree, when ``attrs (B, A)`` is given), 0 otherwise."""
    same_class = (y[:, None] == y[None, :]).float()
    sim = same_class * class_sim
    if attrs is not None and attrs.shape[1] > 0:
        agree = (attrs[:, None, :] == attrs[None, :, :]).float().mean(dim=2)
        sim = same_class * (class_sim + (1 - class_sim) * 0.5 * agree)
    same_item = item[:, None] == item[None, :]
    return torch.where(same_item, torch.ones_like(sim), sim)
