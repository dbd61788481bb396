"""Loss modules: hand-computed values on toy batches, and the paper's three terms each
sending gradient into the encoder (the public implementation's bug was that two did not)."""
import math

import pytest
import torch

from fashionhash.losses import (
    LOSSES, ClassificationLoss, ConfusionLoss, DiscriminatorLoss, PairwiseHammingLoss,
    QuantizationLoss, WeightedSum, relaxed_hamming,
)
from fashionhash.methods import METHODS


def test_relaxed_hamming_equals_hamming_on_binary_codes():
    a = torch.tensor([[1., 1, -1, -1], [1, -1, 1, -1]])
    d = relaxed_hamming(a, a) * 4
    assert torch.equal(d, torch.tensor([[0., 2], [2, 0]]))


def test_pairwise_hamming_toy_value():
    # 3 codes, K=4: h0 = h1 (same item), h2 differs from both in 2 of 4 bits (d = 0.5)
    h = torch.tensor([[1., 1, 1, 1], [1, 1, 1, 1], [1, 1, -1, -1]])
    sim = torch.tensor([[1., 1, 0.5], [1, 1, 0.5], [0.5, 0.5, 1]])
    # positives: (0,1),(1,0) d=0 -> 0; (0,2),(2,0),(1,2),(2,1) d=0.5, m_pos(1-0.5)=0.1 -> 0.4 each
    # mean over 6 positive pairs = 4*0.4/6; no negative pairs
    loss = PairwiseHammingLoss(m_pos=0.2, m_neg=0.45)(h, sim)
    assert loss.item() == pytest.approx(4 * 0.4 / 6)
    # make item 2 dissimilar: negatives (0,2),(1,2),(2,0),(2,1) at d=0.5 > m_neg -> 0
    sim2 = torch.tensor([[1., 1, 0], [1, 1, 0], [0, 0, 1]])
    assert PairwiseHammingLoss(0.2, 0.45)(h, sim2).item() == pytest.approx(0.0)
    # with m_neg=0.75 each negative costs 0.25
    assert PairwiseHammingLoss(0.2, 0.75)(h, sim2).item() == pytest.approx(0.25)


def test_quantization_and_classification_toy_values():
    h = torch.tensor([[0.5, -1.0], [0.0, 1.0], [-0.5, 0.5]])
    # (|h|-1)^2: .25, 0, 1, 0, .25, .25 -> mean 1.75/6
    assert QuantizationLoss()(h).item() == pytest.approx(1.75 / 6)
    logits = torch.zeros(3, 4)
    assert ClassificationLoss()(logits, torch.tensor([0, 1, 2])).item() == pytest.approx(math.log(4))


def test_adversarial_losses_toy_values():
    zero = torch.zeros(3)
    # a discriminator answering 1/2 everywhere: BCE = log 2 on each side; confusion optimum = 0
    assert DiscriminatorLoss()(zero, zero).item() == pytest.approx(math.log(2))
    assert ConfusionLoss()(zero, zero).item() == pytest.approx(0.0, abs=1e-7)
    sure = torch.full((3,), 5.0)
    assert ConfusionLoss()(sure, -sure).item() > 1.0  # a confident discriminator costs the encoder
    assert DiscriminatorLoss()(sure, -sure).item() < 0.01


def test_weighted_sum_reports_parts_and_skips_zero_weights():
    ws = WeightedSum({"a": 2.0, "b": 0.0})
    total, logged = ws({"a": torch.tensor(1.5), "b": torch.tensor(100.0)})
    assert total.item() == 3.0 and logged == {"a": 1.5, "b": 100.0, "total": 3.0}


def test_losses_registered():
    assert {"classification", "pairwise_hamming", "quantization", "discriminator",
            "confusion"} <= set(LOSSES.names())


def _batch(n=16, feat=32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, feat, generator=g) + y[:, None].float()
    return {"x": x, "x_view": x + 0.1 * torch.randn(n, feat, generator=g), "y": y,
            "item": torch.arange(n), "attrs": torch.zeros(n, 2, dtype=torch.long)}


@pytest.mark.parametrize("term", ["cls", "pair", "adv"])
def test_each_paper_term_reaches_the_encoder(term):
    torch.manual_seed(0)
    method = METHODS.build("adversarial", 32, 8, 3, hidden=16, dropout=0.0)
    parts, disc, _ = method.loss_parts(_batch())
    enc = list(method.head.parameters())
    grads = torch.autograd.grad(parts[term], enc, allow_unused=True)
    assert all(g is not None for g in grads), f"{term} does not reach every encoder parameter"
    assert sum(g.abs().sum().item() for g in grads) > 0, f"{term} sends zero gradient to the encoder"
    # the discriminator's own loss must not train the encoder
    assert disc is not None
    d_grads = torch.autograd.grad(disc, enc, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in d_grads)


def test_item_contrast_toy_value():
    from fashionhash.losses import ItemContrastLoss

    # two photos, two views each, K=2, tau=0.5: logits = <h_i, h_j>, partner logit 1, others 0
    h = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    item = torch.tensor([0, 0, 1, 1])
    expected = math.log((math.e + 2) / math.e)
    assert ItemContrastLoss(tau=0.5)(h, item).item() == pytest.approx(expected)
    assert ItemContrastLoss()(h, torch.arange(4)).item() == 0.0  # no partners: no signal


def test_item_bits_split_the_code_between_the_terms():
    """``item_bits=m``: the paper's three terms shape only the first K - m bits, the item
    term only the last m (rows of the head's output layer)."""
    torch.manual_seed(0)
    method = METHODS.build("adversarial", 32, 8, 3, hidden=16, dropout=0.0, w_item=1.0, item_bits=3)
    parts, _, _ = method.loss_parts(_batch())
    out_w = method.head.net[-1].weight  # (K, hidden): one row per bit
    for term in ("cls", "pair", "adv", "item"):
        g = torch.autograd.grad(parts[term], out_w, retain_graph=True)[0].abs().sum(dim=1)
        sem, item = g[:5], g[5:]
        if term == "item":
            assert sem.sum() == 0 and (item > 0).all(), (term, g)
        else:
            assert (sem > 0).any() and item.sum() == 0, (term, g)
    with pytest.raises(ValueError, match="item_bits"):
        METHODS.build("adversarial", 32, 8, 3, item_bits=8)
