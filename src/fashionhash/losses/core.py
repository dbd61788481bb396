"""The loss terms of Singh, Sheet & Dasgupta (2019), arXiv:1907.00382.

The paper's encoder is "learned to (i) minimize error in classifying type of clothing,
(ii) minimize hamming distance between semantic neighbours and maximize distance between
semantically dissimilar images, (iii) maximally scramble a discriminator's ability to
identify the corresponding hash code-image pair when processing a semantically similar
query-gallery image pair". Term (i) is :class:`ClassificationLoss`, (ii) is
:class:`PairwiseHammingLoss`, (iii) is :class:`DiscriminatorLoss` (the discriminator's side)
against :class:`ConfusionLoss` (the encoder's side). :class:`QuantizationLoss` pulls the tanh
relaxation towards the binary codes used at search time.

Codes here are the relaxed codes ``h = tanh(z)`` of shape ``(B, K)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionhash.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


def relaxed_hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised relaxed Hamming distance ``(K - <a_i, b_j>) / (2K)`` in [0, 1].

    ``(B, K) x (M, K) -> (B, M)``; equals Hamming distance / K for +-1 codes.
    """
    k = a.shape[1]
    return (k - a @ b.T) / (2.0 * k)


@LOSSES.register("classification")
class ClassificationLoss(nn.Module):
    """Term (i): cross-entropy of the clothing-type classifier that reads the code.

    ``forward(logits (B, C), labels (B,)) -> scalar``. The classifier sits on the code, so
    this gradient reaches the encoder (the public implementation's classifier never did).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


@LOSSES.register("pairwise_hamming")
class PairwiseHammingLoss(nn.Module):
    """Term (ii): pull semantic neighbours together in Hamming space, push the others apart.

    With ``d_ij`` the normalised relaxed Hamming distance and a graded similarity
    ``s_ij`` in [0, 1] (1 = the same product, e.g. two views of one photo; ``class_sim`` for
    two items of the same clothing type, or an attribute-agreement grade; 0 = dissimilar):

        L = mean_{s_ij > 0} relu(d_ij - m_pos (1 - s_ij))  +  mean_{s_ij = 0} relu(m_neg - d_ij)
            + mean_{0 < s_ij < 1} relu(m_sep - d_ij)

    so the same product is pulled to distance 0, same-type items to within ``m_pos (1 - s)``
    (a band, not a point: collapsing a whole clothing type onto one code would make the very
    product unfindable), distinct products of the same type kept at least ``m_sep`` apart
(the lower edge of the band), and dissimilar items pushed beyond ``m_neg``. Positives and
    negatives are averaged separately, because negatives outnumber positives ~60:1.

    ``forward(codes (B, K), sim (B, B)) -> scalar``; the diagonal is ignored.
    """

    def __init__(self, m_pos: float = 0.2, m_neg: float = 0.45, m_sep: float = 0.0) -> None:
        super().__init__()
        if not 0 <= m_pos < m_neg <= 1 or not 0 <= m_sep <= m_pos:
            raise ValueError("need 0 <= m_pos < m_neg <= 1 and 0 <= m_sep <= m_pos")
        self.m_pos, self.m_neg, self.m_sep = m_pos, m_neg, m_sep

    def forward(self, codes: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        d = relaxed_hamming(codes, codes)
        off = ~torch.eye(len(codes), dtype=torch.bool, device=codes.device)
        pos = (sim > 0) & off
        neg = (sim <= 0) & off
        loss = codes.new_zeros(())
        if pos.any():
            loss = loss + F.relu(d[pos] - self.m_pos * (1 - sim[pos])).mean()
        near = pos & (sim < 1)
        if self.m_sep > 0 and near.any():
            # keep distinct products of one type apart, so the very product stays findable
            loss = loss + F.relu(self.m_sep - d[near]).mean()
        if neg.any():
            loss = loss + F.relu(self.m_neg - d[neg]).mean()
        return loss


@LOSSES.register("item_contrast")
class ItemContrastLoss(nn.Module):
    """Item-level term: each view must pick its partner view of the same photo out of the
    batch (an in-batch softmax over code inner products, as in NT-Xent):

        L = - mean_i log( exp(<h_i, h_p(i)> / (K tau)) / sum_{j != i} exp(<h_i, h_j> / (K tau)) )

    Class-level terms alone collapse an article type onto a few codes; this keeps distinct
    products of one type apart, so a shopper's photo of the very product comes first.
    ``forward(codes (B, K), item (B,)) -> scalar``; items without a partner are ignored.
    """

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, codes: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        k = codes.shape[1]
        logits = codes @ codes.T / (k * self.tau)
        eye = torch.eye(len(codes), dtype=torch.bool, device=codes.device)
        logits = logits.masked_fill(eye, float("-inf"))
        partner = (item[:, None] == item[None, :]) & ~eye
        has = partner.any(dim=1)
        if not has.any():
            return codes.new_zeros(())
        target = partner.float().argmax(dim=1)
        return F.cross_entropy(logits[has], target[has])


@LOSSES.register("quantization")
class QuantizationLoss(nn.Module):
    """Distance of the relaxed code from its sign: ``mean((|h| - 1)^2)``.

    ``forward(codes (B, K)) -> scalar``.
    """

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.abs() - 1).pow(2).mean()


@LOSSES.register("discriminator")
class DiscriminatorLoss(nn.Module):
    """Term (iii), the discriminator's side: tell the query's own code from its neighbour's.

    For a semantically similar (query, gallery) pair the discriminator sees the query image
    with its own code (target 1) and with the gallery item's code (target 0).
    ``forward(logit_own (P,), logit_swapped (P,)) -> scalar`` (binary cross-entropy).
    """

    def forward(self, logit_own: torch.Tensor, logit_swapped: torch.Tensor) -> torch.Tensor:
        return 0.5 * (
            F.binary_cross_entropy_with_logits(logit_own, torch.ones_like(logit_own))
            + F.binary_cross_entropy_with_logits(logit_swapped, torch.zeros_like(logit_swapped))
        )


@LOSSES.register("confusion")
class ConfusionLoss(nn.Module):
    """Term (iii), the encoder's side: "maximally scramble" the discriminator.

    An explicit confusion target: the encoder is trained so that the discriminator answers
    1/2 for both the own and the swapped code, i.e. the two codes of a similar pair are
    interchangeable for it. Unlike gradient reversal (which maximises the discriminator's
    error and can push it to the opposite, still informative, answer), the confusion target
    is bounded and its optimum is exactly "cannot tell". Shifted by ``log 2`` so that the
    optimum is 0. ``forward(logit_own (P,), logit_swapped (P,)) -> scalar``.
    """

    def forward(self, logit_own: torch.Tensor, logit_swapped: torch.Tensor) -> torch.Tensor:
        half = torch.full_like(logit_own, 0.5)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(logit_own, half)
            + F.binary_cross_entropy_with_logits(logit_swapped, half)
        ) - math.log(2.0)


class WeightedSum(nn.Module):
    """``sum_t w_t L_t`` over named parts; returns ``(total, {name: float})`` for logging.

    Parts whose weight is 0 are not computed by callers that check :meth:`active`.
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) != 0.0

    def forward(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = None
        logged = {}
        for name, value in parts.items():
            w = self.weights.get(name, 0.0)
            logged[name] = float(value.detach())
            if w:
                total = w * value if total is None else total + w * value
        if total is None:
            raise ValueError("no loss part has a non-zero weight")
        logged["total"] = float(total.detach())
        return total, logged
