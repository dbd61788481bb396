"""Helpers shared by the peer methods: batch stacking and label similarity."""
from __future__ import annotations

import torch


def stacked_batch(batch: dict, use_views: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None]:
    """``(x, y, item, attrs)`` with the augmented views appended as extra samples of the same
    class (and item) when the batch has them and ``use_views``: the peers see the same data
    as the paper's method, only through their own losses."""
    x, y, item, attrs = batch["x"], batch["y"], batch["item"], batch.get("attrs")
    view = batch.get("x_view")
    if use_views and view is not None:
        x, y, item = torch.cat([x, view]), torch.cat([y, y]), torch.cat([item, item])
        attrs = None if attrs is None else torch.cat([attrs, attrs])
    return x, y, item, attrs


def label_similarity(y: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` float: 1 for pairs of the same class, 0 otherwise (the pairwise label of
    DPSH, HashNet, DCH and DSH on single-label data)."""
    return (y[:, None] == y[None, :]).float()
