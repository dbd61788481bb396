"""Pairwise losses of the deep supervised hashing peers: DPSH, HashNet, DCH and DSH.

Shared conventions: ``codes`` / ``u`` are ``(B, K)`` per-item outputs of a hash layer (the
relaxed codes, or the raw pre-activations where the paper uses those), ``sim`` is a ``(B, B)``
pair-similarity matrix with ``s_ij = 1`` for similar pairs (same class) and 0 otherwise.
Each loss averages over the ordered pairs ``i != j`` of the batch (the diagonal, an item
with itself, carries no information).

Where a paper writes a sum over pairs and a sum over items, the sums are replaced by means
so that the losses do not scale with the batch size; the hyper-parameter that weighs the two
terms then multiplies the mean, and its default says so.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionhash.losses.core import LOSSES


def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _balanced_mean(values: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``(1/|S|) sum_ij w_ij v_ij`` with ``w = |S|/|S1|`` on similar and ``|S|/|S0|`` on
    dissimilar pairs, i.e. ``mean_{S1} v + mean_{S0} v`` (either term dropped when its set is
    empty); ``S`` = the off-diagonal pairs. The class-balance weights of HashNet and DCH."""
    off = _off_diagonal(len(sim), sim.device)
    pos, neg = (sim > 0) & off, (sim <= 0) & off
    out = values.new_zeros(())
    if pos.any():
        out = out + values[pos].mean()
    if neg.any():
        out = out + values[neg].mean()
    return out


def _likelihood(theta: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``s`` under ``P(s=1) = sigmoid(theta)``, elementwise:
    ``log(1 + e^theta) - s theta`` (softplus: no overflow for large ``theta``)."""
    return F.softplus(theta) - sim * theta


@LOSSES.register("dpsh_likelihood")
class DPSHLikelihoodLoss(nn.Module):
    """DPSH pairwise likelihood (Li, Wang & Kang, "Feature learning based deep supervised
    hashing with pairwise labels", IJCAI 2016; the likelihood term of its objective):

        Theta_ij = 1/2 u_i . u_j,    L = mean_{i != j} [ log(1 + e^Theta_ij) - s_ij Theta_ij ]

    on the real-valued outputs ``u`` of the hash layer (no tanh). ``forward(u (B, K),
    sim (B, B)) -> scalar``.
    """

    def forward(self, u: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        theta = 0.5 * (u @ u.T)
        off = _off_diagonal(len(u), u.device)
        return _likelihood(theta, sim)[off].mean()


@LOSSES.register("sign_quantization")
class SignQuantizationLoss(nn.Module):
    """DPSH quantisation term (Li et al., IJCAI 2016; the objective's second term, without eta):
    ``||b_i - u_i||^2`` with ``b_i = sign(u_i)``, as ``mean_{i,k} (u_ik - sign(u_ik))^2``.
    ``forward(u (B, K)) -> scalar``; ``sign(0) = +1`` as in :mod:`fashionhash.codes`.
    """

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b = torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
        return (u - b).pow(2).mean()


@LOSSES.register("hashnet_likelihood")
class HashNetLoss(nn.Module):
    """HashNet weighted maximum likelihood (Cao, Long, Wang & Yu, "HashNet: deep learning to
    hash by continuation", ICCV 2017; weighted maximum likelihood):

        L = (1/|S|) sum_{s_ij in S} w_ij [ log(1 + exp(alpha <h_i, h_j>)) - alpha s_ij <h_i, h_j> ]

    with ``w_ij = |S|/|S1|`` for similar and ``|S|/|S0|`` for dissimilar pairs (single labels:
    ``c_ij = 1``), i.e. the similar-pair mean plus the dissimilar-pair mean. ``h`` is
    the continuation code ``tanh(beta z)`` (the method grows ``beta``); ``alpha`` is the
    bandwidth of the adaptive sigmoid, by default ``10 / K`` so that ``alpha <h_i, h_j>``
    spans [-10, 10] at any code length. ``forward(h (B, K), sim (B, B)) -> scalar``.
    """

    def __init__(self, alpha: float | None = None) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, h: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        alpha = 10.0 / h.shape[1] if self.alpha is None else self.alpha
        return _balanced_mean(_likelihood(alpha * (h @ h.T), sim), sim)


def cauchy_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DCH's normalised Euclidean distance, an exact stand-in for Hamming distance on
    binary codes: ``d(a_i, b_j) = K/2 (1 - cos(a_i, b_j))``, ``(B, K) x (M, K) -> (B, M)``."""
    k = a.shape[1]
    cos = F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).T
    return 0.5 * k * (1.0 - cos)


@LOSSES.register("cauchy_cross_entropy")
class CauchyCrossEntropyLoss(nn.Module):
    """DCH Cauchy cross-entropy (Cao, Long, Liu & Wang, "Deep Cauchy hashing for Hamming
    space retrieval", CVPR 2018; Cauchy cross-entropy). With the Cauchy probability
    ``sigma(d) = gamma / (gamma + d)`` on ``d_ij = K/2 (1 - cos(h_i, h_j))``:

        L = (1/|S|) sum_ij w_ij [ s_ij log(d_ij / gamma) + log(1 + gamma / d_ij) ]

    with the class-balance weights ``w_ij = |S|/|S1|`` (similar) and ``|S|/|S0|``
    (dissimilar). Per pair this is ``log(1 + d/gamma)`` when similar and ``log(1 + gamma/d)``
    when dissimilar (the same expression simplified). ``log(1 + gamma/d)`` and its gradient
    grow without bound as a dissimilar pair's codes coincide (``d -> 0``, e.g. duplicate
    photos filed under two types), so ``d`` is offset by ``eps`` (a thousandth of a bit) there.
    ``max_cos`` < 1 caps every pair's cosine (the published PyTorch port caps it at 0.99):
    ``d >= K/2 (1 - max_cos)``, so pairs already that close stop pulling and dissimilar
    duplicates stop pushing. ``forward(h (B, K), sim (B, B)) -> scalar``.
    """

    def __init__(self, gamma: float = 20.0, eps: float = 1e-3, max_cos: float = 1.0) -> None:
        super().__init__()
        if gamma <= 0 or not 0 < max_cos <= 1:
            raise ValueError("gamma must be positive and max_cos in (0, 1]")
        self.gamma, self.eps, self.max_cos = gamma, eps, max_cos

    def forward(self, h: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        k = h.shape[1]
        d = cauchy_distance(h, h).clamp_min(0.5 * k * (1.0 - self.max_cos))
        per_pair = sim * torch.log1p(d / self.gamma) + (1 - sim) * torch.log1p(self.gamma / (d + self.eps))
        return _balanced_mean(per_pair, sim)


@LOSSES.register("cauchy_quantization")
class CauchyQuantizationLoss(nn.Module):
    """DCH Cauchy quantisation loss (Cao et al., CVPR 2018):
    ``Q = mean_i log(1 + d(|h_i|, 1) / gamma)`` with ``d`` the normalised distance of
    :func:`cauchy_distance` to the all-ones vector. ``forward(h (B, K)) -> scalar``.
    """

    def __init__(self, gamma: float = 20.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma, self.eps = gamma, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        k = h.shape[1]
        a = h.abs()
        cos = a.sum(dim=1) / (a.norm(dim=1).clamp_min(self.eps) * math.sqrt(k))
        d = 0.5 * k * (1.0 - cos)
        return torch.log1p(d.clamp_min(0.0) / self.gamma).mean()


@LOSSES.register("dsh_contrastive")
class DSHContrastiveLoss(nn.Module):
    """DSH pair loss (Liu, Wang, Shan & Chen, "Deep supervised hashing for fast image
    retrieval", CVPR 2016; the relaxed pair loss without its regulariser). With ``y_ij = 1 - s_ij``
    (DSH's y is 1 for dissimilar pairs) and squared distance ``D = ||u_i - u_j||^2``:

        L = mean_{i != j} [ 1/2 (1 - y_ij) D_ij + 1/2 y_ij max(m - D_ij, 0) ]

    with margin ``m = 2K`` by default (the paper's choice). ``forward(u (B, K), sim (B, B))``.
    """

    def __init__(self, margin: float | None = None) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, u: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        m = 2.0 * u.shape[1] if self.margin is None else self.margin
        sq = u.pow(2).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * (u @ u.T)).clamp_min(0.0)
        per_pair = 0.5 * sim * dist + 0.5 * (1 - sim) * F.relu(m - dist)
        return per_pair[_off_diagonal(len(u), u.device)].mean()


@LOSSES.register("dsh_regularizer")
class DSHRegularizer(nn.Module):
    """DSH regulariser towards binary outputs (Liu et al., CVPR 2016; the alpha term of the
    relaxed loss): ``r_i = || |u_i| - 1 ||_1`` per item. In the relaxed pair loss every pair
    carries ``alpha (r_i + r_j)``; over all ordered pairs ``i != j`` that averages to
    ``2 mean_i r_i``, which is what this returns (so ``total = contrastive + alpha *
    regulariser`` is exactly the per-pair mean of that loss).
    ``forward(u (B, K)) -> scalar``.
    """

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return 2.0 * (u.abs() - 1.0).abs().sum(dim=1).mean()
