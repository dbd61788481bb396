"""Losses of the centre- and metric-learning peers: CSQ (hash centres) and SGML (soft
binomial deviance with attribute granularity, plus its multitask attribute heads)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionhash.losses.core import LOSSES


@LOSSES.register("central_similarity")
class CentralSimilarityLoss(nn.Module):
    """CSQ central similarity (Yuan et al., "Central similarity quantization for efficient
    image and video retrieval", CVPR 2020; the central similarity loss): binary
    cross-entropy between the code and its class's hash centre, both mapped from {-1, 1}
    to {0, 1}:

        L_C = mean_i (1/K) sum_k -[ c'_ik log h'_ik + (1 - c'_ik) log(1 - h'_ik) ],
        h' = (h + 1)/2,  c' = (c + 1)/2

    ``forward(h (B, K) in (-1, 1), centres (B, K) in {-1, 1}) -> scalar``; ``h'`` is clamped
    to ``[eps, 1 - eps]`` so a saturated tanh does not give ``log 0``.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, h: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        hp = ((h + 1) / 2).clamp(self.eps, 1 - self.eps)
        return F.binary_cross_entropy(hp, (centres + 1) / 2)


@LOSSES.register("logcosh_quantization")
class LogCoshQuantizationLoss(nn.Module):
    """CSQ quantisation (Yuan et al., CVPR 2020; quantisation loss): ``sum_k log cosh(|h_k| - 1)``,
    a smooth stand-in for ``| |h_k| - 1 |``, as the mean over items and bits.
    ``forward(h (B, K)) -> scalar``.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.abs() - 1.0
        # log cosh x = |x| + log1p(e^{-2|x|}) - log 2, without overflow for large |x|
        ax = x.abs()
        return (ax + torch.log1p(torch.exp(-2.0 * ax)) - math.log(2.0)).mean()


@LOSSES.register("soft_binomial_deviance")
class SoftBinomialDevianceLoss(nn.Module):
    """SGML's soft-binomial deviance (Manandhar, Bastan & Yap, "Semantic granularity metric
    learning for visual search", arXiv:1911.06047, 2019), built on the binomial deviance of
    Yi et al. (2014) on cosine similarities ``S_ij = cos(e_i, e_j)``:

        l+_ij = log(1 + exp(-alpha (S_ij - beta)))        (pull together)
        l-_ij = log(1 + exp(C alpha (S_ij - beta)))       (push apart; C = neg_cost)

    The hard version averages ``l+`` over the positive and ``l-`` over the negative pairs.
    SGML replaces the binary pair label by a granularity similarity ``g_ij`` in [0, 1]
    computed in attribute space (1 = same product, the fraction of shared attributes
    otherwise), so that every pair carries both terms, weighted by how similar it is:

        L = sum_{i != j} g_ij l+_ij / sum g_ij  +  sum_{i != j} (1 - g_ij) l-_ij / sum (1 - g_ij)

    This is our reading of the paper's "soft" weighting: the optimum cosine of a pair grows
    with ``g``, so pairs that share more attributes end up closer (several granularities in
    one embedding); with 0/1 ``g`` it is exactly the binomial deviance.
    ``forward(emb (B, D), g (B, B)) -> scalar`` (``emb`` need not be normalised).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 0.5, neg_cost: float = 25.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.neg_cost = alpha, beta, neg_cost

    def forward(self, emb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb, dim=1)
        s = e @ e.T
        off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        s, g = s[off], g[off].to(s.dtype)
        z = self.alpha * (s - self.beta)
        out = s.new_zeros(())
        wp, wn = g, 1.0 - g
        if wp.sum() > 0:
            out = out + (wp * F.softplus(-z)).sum() / wp.sum()
        if wn.sum() > 0:
            out = out + (wn * F.softplus(self.neg_cost * z)).sum() / wn.sum()
        return out


@LOSSES.register("attribute_classification")
class AttributeClassificationLoss(nn.Module):
    """SGML's multitask attribute term: the mean over attribute heads of the cross-entropy of
    each head, ignoring missing values (index -1); heads whose batch column is entirely
    missing are left out. ``forward([logits (B, V_a)], targets (B, A)) -> scalar``.
    """

    def forward(self, logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        terms = [F.cross_entropy(lg, targets[:, a], ignore_index=-1)
                 for a, lg in enumerate(logits) if (targets[:, a] >= 0).any()]
        if not terms:
            return logits[0].new_zeros(()) if len(logits) else targets.new_zeros((), dtype=torch.float32)
        return torch.stack(terms).mean()
