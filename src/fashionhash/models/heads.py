"""Heads on top of a backbone's pooled features: the hash encoder, the clothing-type
classifier (reading the code) and the pair discriminator of Singh et al. (2019)."""
from __future__ import annotations

import torch
import torch.nn as nn


class HashHead(nn.Module):
    """Pooled features ``(B, F)`` -> pre-activation ``(B, K)``; the code is ``tanh`` of it
    while training and its sign at evaluation and search."""

    def __init__(self, in_dim: int, n_bits: int, hidden: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                       nn.Linear(hidden, n_bits)]
        else:
            layers += [nn.Linear(in_dim, n_bits)]
        self.net = nn.Sequential(*layers)
        self.n_bits = n_bits

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


class Discriminator(nn.Module):
    """``(image representation (B, F), code (B, K)) -> logit (B,)``: does this code belong
    to this image? The representation is projected to a small width first so that the code
    is not drowned by 1,280 feature dimensions."""

    def __init__(self, feat_dim: int, n_bits: int, width: int = 256) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(feat_dim, width), nn.ReLU(inplace=True))
        self.code = nn.Sequential(nn.Linear(n_bits, width), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(inplace=True), nn.Linear(width, 1))

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The image side ``(B, F) -> (B, width)``, computed once when one image is judged
        against several codes (the costly half: F = 1,280 against K <= 128)."""
        return self.proj(feats)

    def judge(self, projected: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``(projected image (B, width), code (B, K)) -> logit (B,)``."""
        return self.out(torch.cat([projected, self.code(codes)], dim=1)).squeeze(1)

    def forward(self, feats: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.judge(self.project(feats), codes)
