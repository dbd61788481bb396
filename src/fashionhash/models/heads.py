"""Heads on top of a backbone's pooled features: the hash encoder, the clothing-type
classifier (reading the code) and the pair discriminator of Singh et al. (2019)."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

#: ``train.precision`` values. bfloat16 runs the heads' matrix products in bfloat16 while
#: training (AVX-512 BF16 CPUs and GPUs do them in about half the time; ``benchmarks/
#: bench_precision.py``); their outputs are float32, so that the losses' inner products of
#: codes (values up to K, which bfloat16's 8-bit mantissa would round) stay exact.
#: Validation, evaluation and export always run in float32. (SGML's own embedding head is
#: not a HashHead: it stays float32.)
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Refuse an unknown ``train.precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")


def set_precision(module: nn.Module, precision: str) -> None:
    """Make every head inside ``module`` train in ``precision`` (see :data:`PRECISIONS`)."""
    check_precision(precision)
    for m in module.modules():
        if isinstance(m, (HashHead, Discriminator)):
            m.low_precision = precision == "bfloat16"


def _autocast(module: nn.Module, x: torch.Tensor):
    """bfloat16 autocast while a low-precision head trains; nothing otherwise."""
    if getattr(module, "low_precision", False) and module.training and torch.is_grad_enabled():
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return nullcontext()


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

    low_precision = False  # see set_precision

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with _autocast(self, feats):
            return self.net(feats).float()


class Discriminator(nn.Module):
    """``(image representation (B, F), code (B, K)) -> logit (B,)``: does this code belong
    to this image? The representation is projected to a small width first so that the code
    is not drowned by 1,280 feature dimensions."""

    def __init__(self, feat_dim: int, n_bits: int, width: int = 256) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(feat_dim, width), nn.ReLU(inplace=True))
        self.code = nn.Sequential(nn.Linear(n_bits, width), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(inplace=True), nn.Linear(width, 1))

    low_precision = False  # see set_precision

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The image side ``(B, F) -> (B, width)``, computed once when one image is judged
        against several codes (the costly half: F = 1,280 against K <= 128)."""
        with _autocast(self, feats):
            return self.proj(feats).float()

    def judge(self, projected: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``(projected image (B, width), code (B, K)) -> logit (B,)``."""
        return self.out(torch.cat([projected, self.code(codes)], dim=1)).squeeze(1)

    def forward(self, feats: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.judge(self.project(feats), codes)
