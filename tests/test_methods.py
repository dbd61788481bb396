"""Every registered method (the paper's and the peers): shapes and range of the codes, finite
losses and gradients, learning a tiny separable problem, one epoch through the CLI; each
peer loss against a hand-computed value; the naive L1 baseline against brute force."""
import json
import math

import numpy as np
import pytest
import torch

import fashionhash.methods  # noqa: F401  (registers the paper's method)
from fashionhash.losses import LOSSES
from fashionhash.losses.peers import (
    AttributeClassificationLoss, CauchyCrossEntropyLoss, CauchyQuantizationLoss,
    CentralSimilarityLoss, DPSHLikelihoodLoss, DSHContrastiveLoss, DSHRegularizer, HashNetLoss,
    LogCoshQuantizationLoss, SignQuantizationLoss, SoftBinomialDevianceLoss,
)
# the peers register themselves on import (methods/__init__ may not import them yet)
from fashionhash.methods import csq, dch, dlbhc, dpsh, dsh, hashnet, itq, lsh, sgml  # noqa: F401
from fashionhash.methods.base import METHODS
from fashionhash.models.heads import HashHead, set_precision

FEAT, BITS, CLASSES, HIDDEN = 24, 16, 4, 32
NAMES = METHODS.names()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra threads only contend with each other on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _build(name: str, **kw):
    torch.manual_seed(0)
    return METHODS.build(name, FEAT, BITS, CLASSES, hidden=HIDDEN, dropout=0.0, **kw)


def _is_shallow(name: str) -> bool:
    return hasattr(METHODS.get(name), "fit")


TRAINABLE = [n for n in NAMES if not _is_shallow(n)]
SHALLOW = [n for n in NAMES if _is_shallow(n)]


def _batch(n=32, seed=0, spread=3.0):
    """Classes ``y = i % 4`` with well separated means, an augmented view, two attributes
    (the second sometimes missing)."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(CLASSES, FEAT, generator=g)
    y = torch.arange(n) % CLASSES
    x = centres[y] + torch.randn(n, FEAT, generator=g)
    attrs = torch.stack([y % 2, torch.where(torch.arange(n) % 5 == 0, -1, y % 3)], 1)
    return {"x": x, "x_view": x + 0.1 * torch.randn(n, FEAT, generator=g), "y": y,
            "item": torch.arange(n), "attrs": attrs}


def _ready(name: str, batch: dict):
    m = _build(name)
    if _is_shallow(name):
        m.fit(batch["x"], batch["y"])
    return m


def _hamming_gap(codes: torch.Tensor, y: torch.Tensor) -> float:
    """Mean between-class minus mean within-class Hamming distance of the sign codes."""
    b = torch.where(codes >= 0, 1.0, -1.0)
    d = (codes.shape[1] - b @ b.T) / 2
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    return float(d[~same].mean() - d[same & off].mean())


# ---- every registered method -----------------------------------------------------------

def test_the_peers_are_registered():
    assert {"adversarial", "dch", "hashnet", "dpsh", "dsh", "csq", "dlbhc", "lsh", "itq",
            "sgml"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_encode_shape_and_range(name):
    batch = _batch()
    m = _ready(name, batch).eval()
    with torch.no_grad():
        h = m.encode(batch["x"])
    assert h.shape == (32, BITS)
    assert torch.isfinite(h).all() and h.abs().max() <= 1.0


@pytest.mark.parametrize("name", TRAINABLE)
def test_losses_and_gradients_finite(name):
    m = _build(name).train()
    losses, parts = m.objectives(_batch(seed=1))
    assert "encoder" in losses and all(math.isfinite(v) for v in parts.values())
    groups = m.param_groups()
    for group, loss in losses.items():
        assert torch.isfinite(loss), group
        params = [p for g in groups[group] for p in g["params"]]
        assert {g["name"] for g in groups[group]} <= {"heads", "backbone", "disc"}
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        got = [gr for gr in grads if gr is not None]
        assert got and all(torch.isfinite(gr).all() for gr in got), group
        assert any(gr.abs().sum() > 0 for gr in got), f"{group}: no gradient at all"


@pytest.mark.parametrize("name", TRAINABLE)
def test_bfloat16_heads_train_like_float32(name):
    """train.precision=bfloat16: the losses and gradients stay float32 and close to the
    float32 step's; evaluation is untouched (the same float32 codes)."""
    batch = _batch(seed=3)
    ref, low = _build(name).train(), _build(name).train()
    set_precision(low, "bfloat16")
    for group, params in ref.param_groups().items():
        torch.manual_seed(1)
        loss_ref = ref.objectives(batch)[0][group]
        torch.manual_seed(1)
        loss_low = low.objectives(batch)[0][group]
        assert loss_low.dtype == torch.float32 and torch.isfinite(loss_low)
        assert float(loss_low.detach()) == pytest.approx(float(loss_ref.detach()), rel=0.05, abs=1e-3), group
        p_ref = [p for g in params for p in g["params"]]
        p_low = [p for g in low.param_groups()[group] for p in g["params"]]
        g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss_ref, p_ref, allow_unused=True,
                                                                    materialize_grads=True)])
        g_low = torch.cat([g.flatten() for g in torch.autograd.grad(loss_low, p_low, allow_unused=True,
                                                                    materialize_grads=True)])
        assert torch.nn.functional.cosine_similarity(g_ref, g_low, dim=0) > 0.95, group
    if isinstance(low.head, HashHead):  # SGML's own embedding head stays float32
        out_ref, out_low = ref.head(batch["x"]), low.head(batch["x"])
        assert out_low.dtype == torch.float32 and not torch.equal(out_ref, out_low)  # bfloat16 inside
    with torch.no_grad():
        assert torch.equal(ref.eval().encode(batch["x"]), low.eval().encode(batch["x"]))
    with pytest.raises(ValueError, match="train.precision"):
        set_precision(low, "float16")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TRAINABLE)
def test_learns_a_tiny_separable_problem(name, precision):
    torch.manual_seed(0)
    m = _build(name).train()
    set_precision(m, precision)
    batch = _batch(seed=2)
    params = {k: [p for g in gs for p in g["params"]] for k, gs in m.param_groups().items()}
    optims = {k: torch.optim.Adam(ps, lr=3e-3) for k, ps in params.items()}
    first = None
    for _ in range(40):
        losses, _ = m.objectives(batch)
        if first is None:
            first = float(losses["encoder"].detach())
        # as the trainer does: every group's gradient at the same point, then the steps
        grads = {k: torch.autograd.grad(v, params[k], allow_unused=True) for k, v in losses.items()}
        for k, gs in grads.items():
            for p, gr in zip(params[k], gs):
                p.grad = gr
            optims[k].step()
    last = float(m.objectives(batch)[0]["encoder"].detach())
    assert last < first, (first, last)
    with torch.no_grad():
        assert _hamming_gap(m.eval().encode(batch["x"]), batch["y"]) > 1.0


@pytest.mark.parametrize("name", SHALLOW)
def test_shallow_fit_separates_classes_and_has_nothing_to_train(name):
    batch = _batch(n=64, seed=3, spread=4.0)
    m = _ready(name, batch)
    assert m.param_groups() == {} and not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert _hamming_gap(m.encode(batch["x"]), batch["y"]) > 2.0
    # the fitted state is all in buffers: a fresh instance loading it encodes identically
    again = _build(name)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.encode(batch["x"]), m.encode(batch["x"]))


def test_losses_registered():
    assert {"dpsh_likelihood", "sign_quantization", "hashnet_likelihood", "cauchy_cross_entropy",
            "cauchy_quantization", "dsh_contrastive", "dsh_regularizer", "central_similarity",
            "logcosh_quantization", "soft_binomial_deviance",
            "attribute_classification"} <= set(LOSSES.names())


# ---- the peer losses on 3-sample toy batches ---------------------------------------------

def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


SIM_001 = torch.tensor([[1., 1, 0], [1, 1, 0], [0, 0, 1]])  # items 0, 1 similar; 2 apart


def test_dpsh_toy_values():
    u = torch.tensor([[1., 0], [0, 1], [1, 1]])
    # Theta = u_i.u_j / 2: (0,1) 0, (0,2) 0.5, (1,2) 0.5
    # (0,1) similar: log(1+e^0) - 0 = log 2; (0,2), (1,2) dissimilar: log(1+e^0.5)
    # mean over the ordered pairs (each unordered pair twice) = (log 2 + 2 log(1+e^0.5)) / 3
    assert DPSHLikelihoodLoss()(u, SIM_001).item() == pytest.approx(
        (math.log(2) + 2 * _softplus(0.5)) / 3, rel=1e-6)
    # sign: [1,-1],[1,1],[-1,1]; (u - b)^2 = .25, 1, 1, 0, .5625, 0 -> 2.8125 / 6
    q = torch.tensor([[0.5, -2], [0, 1], [-0.25, 1]])
    assert SignQuantizationLoss()(q).item() == pytest.approx(2.8125 / 6)


def test_hashnet_toy_values():
    h = torch.tensor([[1., 1], [1, -1], [1, 1]])
    sim = torch.tensor([[1., 0, 1], [0, 1, 0], [1, 0, 1]])  # 0 and 2 similar
    # <h_i,h_j>: (0,1) 0, (0,2) 2, (1,2) 0. Default alpha = 10/K = 5.
    # similar (0,2): log(1+e^10) - 10 = log(1+e^-10); dissimilar (0,1), (1,2): log 2.
    # balanced: mean over similar + mean over dissimilar pairs
    assert HashNetLoss()(h, sim).item() == pytest.approx(math.log(2) + _softplus(-10), rel=1e-6)
    # alpha = 1: log(1+e^2) - 2 = log(1+e^-2) for the similar pair
    assert HashNetLoss(alpha=1.0)(h, sim).item() == pytest.approx(math.log(2) + _softplus(-2), rel=1e-6)


def test_dch_toy_values():
    h = torch.tensor([[1., 1], [1, -1], [-1, -1]])
    # d = K/2 (1 - cos), K = 2: (0,1) cos 0 -> d 1; (0,2) cos -1 -> d 2; (1,2) cos 0 -> d 1
    # gamma = 2. similar (0,1): log(1 + d/gamma) = log 1.5
    # dissimilar: (0,2) log(1 + 2/2) = log 2, (1,2) log(1 + 2/1) = log 3 -> mean (log 2 + log 3)/2
    expected = math.log(1.5) + (math.log(2) + math.log(3)) / 2
    assert CauchyCrossEntropyLoss(gamma=2.0, eps=0.0)(h, SIM_001).item() == pytest.approx(expected, rel=1e-6)
    assert CauchyCrossEntropyLoss(gamma=2.0)(h, SIM_001).item() == pytest.approx(expected, rel=1e-3)
    # max_cos = 0.5 caps every d at >= K/2 (1 - 0.5) = 0.5 (none of these pairs is that close)
    assert CauchyCrossEntropyLoss(gamma=2.0, eps=0.0, max_cos=0.5)(h, SIM_001).item() == pytest.approx(expected)
    # a dissimilar near-duplicate (cos 0.9999): capped at cos 0.99, d = 0.01: log(1 + 2/0.01)
    hd = torch.tensor([[1., 1], [1, 1.0002], [-1, -1]])
    sim_none = torch.zeros(3, 3)
    capped = CauchyCrossEntropyLoss(gamma=2.0, eps=0.0, max_cos=0.99)(hd, sim_none).item()
    assert capped == pytest.approx((2 * math.log1p(2 / 0.01) + 2 * math.log1p(2 / 2) + 2 * math.log1p(2 / 2)) / 6,
                                   rel=1e-4)
    assert CauchyCrossEntropyLoss(gamma=2.0, eps=0.0)(hd, sim_none).item() > capped + 1
    # quantisation, gamma = 1: d(|h|, 1) = K/2 (1 - cos(|h|, 1))
    # [1,-1]: |h| = [1,1], cos 1, d 0 -> 0; [1,0]: cos 1/sqrt 2 -> log(1 + 1 - 1/sqrt 2);
    # [.6,.8]: cos 1.4/sqrt 2 -> log(1 + 1 - 1.4/sqrt 2); mean of the three
    hq = torch.tensor([[1., -1], [1, 0], [0.6, 0.8]])
    expected = (0 + math.log1p(1 - 1 / math.sqrt(2)) + math.log1p(1 - 1.4 / math.sqrt(2))) / 3
    assert CauchyQuantizationLoss(gamma=1.0)(hq).item() == pytest.approx(expected, rel=1e-5)


def test_dsh_toy_values():
    u = torch.tensor([[1., 1], [1, -1], [-1, -1]])
    # squared distances: D01 = 4, D02 = 8, D12 = 4; margin 2K = 4
    # (0,1) similar: D/2 = 2; (0,2): max(4 - 8, 0)/2 = 0; (1,2): max(4 - 4, 0)/2 = 0
    # mean over ordered pairs: (2 + 0 + 0) * 2 / 6
    assert DSHContrastiveLoss()(u, SIM_001).item() == pytest.approx(2 / 3)
    # margin 6: (1,2) costs (6 - 4)/2 = 1 -> (2 + 0 + 1) / 3
    assert DSHContrastiveLoss(margin=6.0)(u, SIM_001).item() == pytest.approx(1.0)
    # || |u| - 1 ||_1 per item: [.5,-2] -> .5 + 1 = 1.5, [1,1] -> 0, [0,1] -> 1
    # Eq. 3 puts r_i + r_j on every pair: ordered-pair mean of (1.5, 2.5, 1) = 5/3 = 2 mean_i r_i
    r = torch.tensor([[0.5, -2], [1, 1], [0, 1]])
    assert DSHRegularizer()(r).item() == pytest.approx(5 / 3)


def test_csq_toy_values():
    h = torch.tensor([[0.5, -0.5], [0, 0], [-1, 1]])
    c = torch.tensor([[1., -1], [1, 1], [-1, 1]])
    # h' = (h+1)/2: [.75,.25], [.5,.5], [0,1]; c' = [1,0], [1,1], [0,1]
    # BCE: -log .75 twice, -log .5 twice, ~0 twice (saturated and right) -> mean over 6
    assert CentralSimilarityLoss()(h, c).item() == pytest.approx(
        (-2 * math.log(0.75) + 2 * math.log(2)) / 6, abs=1e-6)
    # log cosh(|h| - 1): [0,1] -> log cosh 1, 0; [.5,-2] -> log cosh .5, log cosh 1; mean of 4
    q = torch.tensor([[0., 1], [0.5, -2]])
    assert LogCoshQuantizationLoss()(q).item() == pytest.approx(
        (2 * math.log(math.cosh(1)) + math.log(math.cosh(0.5))) / 4, rel=1e-6)


def test_sgml_toy_values():
    e = torch.tensor([[1., 0], [0, 1], [2, 0]])  # cosines: S01 = 0, S02 = 1, S12 = 0
    g = torch.tensor([[1., .5, 1], [.5, 1, 0], [1, 0, 1]])
    # alpha 2, beta .5, C 1: z = 2 (S - .5): z01 = -1, z02 = 1, z12 = -1
    # pull: softplus(-z) = sp(1), sp(-1), sp(1) weighted by g = .5, 1, 0 -> (.5 sp(1) + sp(-1)) / 1.5
    # push: softplus(z) = sp(-1), sp(1), sp(-1) weighted by 1-g = .5, 0, 1 -> 1.5 sp(-1) / 1.5
    expected = (0.5 * _softplus(1) + _softplus(-1)) / 1.5 + _softplus(-1)
    assert SoftBinomialDevianceLoss(2.0, 0.5, 1.0)(e, g).item() == pytest.approx(expected, rel=1e-6)
    # attribute heads: uniform logits; head 0 (4 values) all known -> log 4; head 1 (3 values)
    # one known -> log 3; head 2 entirely missing -> left out; mean of the two
    logits = [torch.zeros(3, 4), torch.zeros(3, 3), torch.zeros(3, 2)]
    t = torch.tensor([[0, -1, -1], [1, 0, -1], [2, -1, -1]])
    assert AttributeClassificationLoss()(logits, t).item() == pytest.approx((math.log(4) + math.log(3)) / 2)
    # granularity over [y, attrs]: (0,1) agree on y and a0, a1 missing on 1 -> 2/3;
    # (0,2) only a1 -> 1/3; (1,2) nothing (missing agrees with nothing) -> 0; same item -> 1
    gr = sgml.attribute_granularity(torch.tensor([0, 0, 1]), torch.tensor([[0, 1], [0, -1], [1, 1]]),
                                    torch.arange(3))
    assert torch.allclose(gr, torch.tensor([[1., 2 / 3, 1 / 3], [2 / 3, 1, 0], [1 / 3, 0, 1]]))


# ---- method specifics ----------------------------------------------------------------------

def test_csq_centres():
    h = csq.hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    c = csq.hash_centres(20, 16)  # <= 2K: rows of [H; -H], at least K/2 apart
    d = (16 - c @ c.T) / 2
    assert d[~torch.eye(20, dtype=torch.bool)].min() >= 8
    many = csq.hash_centres(40, 16, seed=3)  # > 2K: random, checked, deterministic
    assert torch.equal(many, csq.hash_centres(40, 16, seed=3))
    assert not torch.equal(many, csq.hash_centres(40, 16, seed=4))
    d = (16 - many @ many.T) / 2
    assert d[~torch.eye(40, dtype=torch.bool)].min() >= 4  # K/4
    m = METHODS.build("csq", FEAT, 12, 30, hidden=0)  # 12 bits is no power of two: random
    assert m.centres.shape == (30, 12) and "centres" in m.state_dict()


def test_hashnet_continuation_counts_steps_and_resumes():
    m = _build("hashnet", step_size=2, gamma=0.5)
    batch = _batch()
    assert m.beta == 1.0
    for _ in range(4):
        m.objectives(batch)
    assert int(m.steps) == 4 and m.beta == pytest.approx((1 + 0.5 * 4) ** 0.5)
    m.eval()
    m.objectives(batch)  # evaluation does not advance the schedule
    again = _build("hashnet", step_size=2, gamma=0.5)
    again.load_state_dict(m.state_dict())  # the step count is in the checkpoint
    assert again.beta == m.beta


def test_dlbhc_code_thresholds_latent_at_half():
    batch = _batch()
    m = _build("dlbhc").eval()
    with torch.no_grad():
        assert torch.equal(m.encode(batch["x"]) >= 0, m.latent(batch["x"]) >= 0.5)


def test_sgml_embedding_and_attribute_heads():
    batch = _batch()
    m = _build("sgml", attr_sizes=[2, 3]).eval()
    assert len(m.attr_heads) == 3  # articleType + two attributes
    with torch.no_grad():
        e, h = m.embed(batch["x"]), m.encode(batch["x"])
    assert torch.allclose(e.norm(dim=1), torch.ones(32))
    assert torch.equal(e >= 0, h >= 0)
    m.train()
    for gran in ("labels", "predicted"):
        m.granularity = gran
        losses, parts = m.objectives(batch)
        assert torch.isfinite(losses["encoder"]) and parts["attr"] > 0
    with pytest.raises(ValueError, match="attribute"):
        _build("sgml", attr_sizes=[2, 3, 4]).objectives(batch)  # more heads than columns


def test_itq_reduces_quantisation_error():
    x = _batch(n=64, seed=4)["x"]
    one = METHODS.build("itq", FEAT, BITS, CLASSES, n_iter=1).fit(x)
    fifty = METHODS.build("itq", FEAT, BITS, CLASSES).fit(x)
    assert fifty.quantization_error < one.quantization_error
    assert torch.allclose(fifty.proj.T @ fifty.proj, torch.eye(BITS), atol=1e-4)  # PCA x rotation
    with pytest.raises(ValueError, match="n_bits"):
        METHODS.build("itq", 8, 16, CLASSES)


# ---- the naive baseline ----------------------------------------------------------------------

def test_naive_l1_matches_brute_force():
    from fashionhash.evaluation import metrics as M
    from fashionhash.evaluation.naive import l1_distances, l1_rank_metrics, pixel_vectors, rank_metrics

    rng = np.random.default_rng(0)
    q, db = rng.random((21, 70), dtype=np.float32), rng.random((300, 70), dtype=np.float32)
    full = np.abs(q[:, None, :] - db[None, :, :]).sum(axis=2)
    assert np.allclose(l1_distances(q, db), full, rtol=1e-5)
    ql, dl = rng.integers(0, 3, 21), rng.integers(0, 3, 300)
    qa = {"c": rng.integers(0, 4, 21).astype(str)}
    da = {"c": rng.integers(0, 4, 300).astype(str)}
    # chunked over queries (5 at a time, in 2 threads) == the metric functions on the full matrix
    got = l1_rank_metrics(q, db, ql, dl, query_attrs=qa, db_attrs=da, attr_keys=["c"],
                          true_index=300 + np.arange(21), db_extra=q + 0.001, chunk=5, workers=2)
    rel = M.relevance_from_labels(ql, dl)
    assert got["map"] == pytest.approx(M.mean_average_precision(full, rel))
    assert got["map@1000"] == pytest.approx(M.mean_average_precision(full, rel, k=1000))
    assert got["p@10"] == pytest.approx(M.precision_at_k(full, rel, 10))
    assert got["top1"] == pytest.approx(M.top1_expected(full, rel))
    assert got["ndcg@10"] == pytest.approx(M.ndcg_at_k(full, M.attribute_gain(qa, da, ["c"]), 10))
    assert got["same_item_top1"] == 1.0  # the near-copy of each query is its nearest item
    cos = rank_metrics(q, db, ql, dl, metric="cosine")
    assert 0 <= cos["map"] <= 1 and cos["distance"] == "cosine"
    pix, ok = pixel_vectors([np.full((28, 20), 255, np.uint8), "/nonexistent.jpg"], size=8)
    assert pix.shape == (2, 64) and ok.tolist() == [True, False] and np.allclose(pix[0], 1.0)


# ---- through the CLI ---------------------------------------------------------------------------

FM_ARGS = ["data.limit=300", "data.n_query=20", "data.n_val=20", "data.min_per_class=1", "data.n_damaged=0",
           "train.num_workers=0", "train.batch_size=64", "model.n_bits=16", "model.hidden=32",
           "train.epochs=1", "train.threads=1"]


@pytest.fixture()
def _repo_cwd(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.mark.parametrize("name", TRAINABLE)
def test_one_epoch_through_cli(name, synthetic_fmnist, tmp_path, _repo_cwd):
    from fashionhash.cli import main

    run = tmp_path / name
    rc = main(["train", "--config", "configs/fashion_mnist.yaml", "--run-dir", str(run), "--quiet",
               f"data.root={synthetic_fmnist}", f"method.name={name}", *FM_ARGS])
    assert rc == 0
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "epoch" and math.isfinite(record["train"]["total"])
    assert 0 <= record["val"]["map@1000"] <= 1


@pytest.mark.parametrize("name", SHALLOW)
def test_shallow_methods_refuse_finetune_mode(name, synthetic_fmnist, tmp_path, _repo_cwd, capsys):
    from fashionhash.cli import main

    rc = main(["train", "--config", "configs/fashion_mnist.yaml", "--run-dir", str(tmp_path / name),
               "--quiet", f"data.root={synthetic_fmnist}", f"method.name={name}", *FM_ARGS])
    assert rc == 2 and "model.mode=frozen" in capsys.readouterr().err


def _stub_features(sources, backbone, *, image_size, engine, augment_seed=None, augment_strength=1.0,
                   progress=None, num_workers=0, calibration=None):
    """Stand-in for ``models.features.extract_features`` on Fashion-MNIST-shaped arrays: a
    fixed random projection of the pixels to the small CNN's 256 dimensions (+ noise for
    augmented copies), so frozen mode runs without a pretrained backbone."""
    proj = np.random.default_rng(0).normal(size=(28 * 28, 256)).astype(np.float32) / 28
    x = np.stack([np.asarray(s, np.float32).reshape(-1) / 255 for s in sources]) @ proj
    if augment_seed is not None:
        x += 0.05 * np.random.default_rng(augment_seed).normal(size=x.shape).astype(np.float32)
    if progress:
        progress(len(sources))
    return x.astype(np.float32), np.ones(len(sources), bool)


@pytest.mark.parametrize("name", ["lsh", "itq", "sgml"])
def test_frozen_mode_with_stub_features(name, synthetic_fmnist, tmp_path, _repo_cwd, monkeypatch):
    """The trainer's frozen path for shallow methods (fit, no step, checkpoint) and for SGML,
    then evaluation from the checkpoint, on stub features."""
    import sys
    import types

    from fashionhash.cli import main

    from fashionhash.models import features as real

    stub = types.ModuleType("fashionhash.models.features")
    stub.extract_features = _stub_features
    stub.ENGINES = real.ENGINES  # what the pre-training checks read
    monkeypatch.setitem(sys.modules, "fashionhash.models.features", stub)
    monkeypatch.setenv("FASHIONHASH_CACHE", str(tmp_path / "cache"))  # stub features stay here
    run = tmp_path / name
    rc = main(["train", "--config", "configs/fashion_mnist.yaml", "--run-dir", str(run), "--quiet",
               "--evaluate", f"data.root={synthetic_fmnist}", f"method.name={name}", "model.mode=frozen",
               "data.n_views=1", *FM_ARGS])
    assert rc == 0
    lines = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r.get("event") == "epoch"]
    assert len(epochs) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["map"] > 0.2  # 10 classes: chance is ~0.1
    if name != "sgml":
        assert epochs[0]["train"] == {}  # fitted in closed form: no optimisation step


@pytest.mark.parametrize("name", ["itq", "sgml"])  # lsh takes the same path as itq
def test_frozen_mode_on_real_photos(name, tiny_kaggle, tmp_path, _repo_cwd):
    pytest.importorskip("fashionhash.models.features")
    from fashionhash.cli import main

    run = tmp_path / name
    rc = main(["train", "--config", "configs/demo.yaml", "--run-dir", str(run), "--evaluate", "--quiet",
               f"data.root={tiny_kaggle}", f"method.name={name}", "data.n_query=20", "data.n_val=12",
               "data.min_per_class=5", "data.n_damaged=10", "model.image_size=64", "model.n_bits=16",
               "model.hidden=32", "train.epochs=1", "train.batch_size=32", "train.num_workers=0",
               "descriptor.kind=none"])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["map"] <= 1 and metrics["method"] == name


def test_adversarial_on_csq_centres():
    """``w_centre``: CSQ's centre term on the paper's semantic bits, the pairwise term off;
    the codes move to their class's centre, and the paper's form keeps no centres buffer."""
    assert "centres" not in _build("adversarial").state_dict()
    m = _build("adversarial", w_centre=1.0, w_pair=0.0).train()
    batch = _batch(seed=4)
    parts, _, _ = m.loss_parts(batch)
    assert {"cls", "centre", "adv"} <= set(parts)
    centre = m.centres[batch["y"]]  # (B, K) the class's Hadamard row
    expected = CentralSimilarityLoss()(torch.tanh(m.head(m.features(batch["x"]))), centre)
    no_views = {k: v for k, v in batch.items() if k != "x_view"}
    assert m.loss_parts(no_views)[0]["centre"].item() == pytest.approx(expected.item(), rel=1e-5)
    params = [p for g in m.param_groups()["encoder"] for p in g["params"]]
    opt = torch.optim.Adam(params, lr=3e-3)
    before = float((torch.sign(m.encode(batch["x"])) == centre).float().mean())
    for _ in range(30):
        opt.zero_grad()
        m.objectives(batch)[0]["encoder"].backward()
        opt.step()
    after = float((torch.sign(m.eval().encode(batch["x"])) == centre).float().mean())
    assert after > max(before + 0.2, 0.7), (before, after)
