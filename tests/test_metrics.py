"""Retrieval metrics: hand-worked toy cases, plain reference loops on tie-heavy random data,
and the chunked high-level evaluate_retrieval against the individual metrics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fashionhash import codes
from fashionhash.evaluation import metrics as M

SEEDS = [0, 1, 2, 3]

# --------------------------------------------------------------------------------------
# toy case, worked by hand
# --------------------------------------------------------------------------------------
# q0: dist [1, 0, 2, 1, 0], rel [1, 0, 1, 0, 1]
#     stable ranking (dist, then index): [1, 4, 0, 3, 2]; ranked relevance [0, 1, 1, 0, 1]
# q1: dist [3, 3, 3, 3, 3] (all tied), rel [0, 1, 0, 0, 0]
#     stable ranking [0, 1, 2, 3, 4]; ranked relevance [0, 1, 0, 0, 0]
TOY_DIST = np.array([[1, 0, 2, 1, 0], [3, 3, 3, 3, 3]], dtype=np.uint16)
TOY_REL = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 0, 0]], dtype=bool)


def test_toy_rank():
    np.testing.assert_array_equal(M.rank(TOY_DIST), [[1, 4, 0, 3, 2], [0, 1, 2, 3, 4]])
    # k=3 cuts through the tie {0, 3} at distance 1: the lower index (0) wins.
    np.testing.assert_array_equal(M.rank(TOY_DIST, 3), [[1, 4, 0], [0, 1, 2]])
    # Same on floats, through the partition path (4k < N needs a wider row).
    wide = np.concatenate([TOY_DIST, np.full((2, 20), 9, np.uint16)], axis=1).astype(float)
    np.testing.assert_array_equal(M.rank(wide, 3), [[1, 4, 0], [0, 1, 2]])


def test_toy_map():
    # q0, mAP@all: relevant at ranks 2, 3, 5 -> P@2 = 1/2, P@3 = 2/3, P@5 = 3/5, R = 3:
    #     AP = (1/2 + 2/3 + 3/5) / 3 = 0.588888...
    # q1: relevant at rank 2 -> AP = (1/2) / 1 = 0.5
    ap0 = (1 / 2 + 2 / 3 + 3 / 5) / 3
    assert M.mean_average_precision(TOY_DIST, TOY_REL) == pytest.approx((ap0 + 0.5) / 2)
    # mAP@3: q0 top 3 = [0, 1, 1], R_3 = 2 -> (1/2 + 2/3) / 2; q1 top 3 = [0, 1, 0] -> 1/2
    assert M.mean_average_precision(TOY_DIST, TOY_REL, k=3) == pytest.approx(
        ((1 / 2 + 2 / 3) / 2 + 0.5) / 2
    )
    # mAP@1: no query has a relevant top-1 -> both AP 0 and still counted -> 0
    assert M.mean_average_precision(TOY_DIST, TOY_REL, k=1) == 0.0
    assert M.mean_average_precision(TOY_DIST, TOY_REL, k=1, exclude_empty=True) == 0.0
    # q1 without relevant items: AP 0, counted -> ap0 / 2; excluded -> ap0
    rel = TOY_REL.copy()
    rel[1] = False
    assert M.mean_average_precision(TOY_DIST, rel) == pytest.approx(ap0 / 2)
    assert M.mean_average_precision(TOY_DIST, rel, exclude_empty=True) == pytest.approx(ap0)
    # graded relevance is binarised at > 0
    graded = TOY_REL * np.array([0.3, 2.0, 1.0, 0.0, 5.0])
    assert M.mean_average_precision(TOY_DIST, graded) == pytest.approx((ap0 + 0.5) / 2)


def test_toy_precision():
    # P@1: q0 [0], q1 [0] -> 0;  P@2: q0 [0, 1], q1 [0, 1] -> 1/2;  P@3: (2/3 + 1/3) / 2
    assert M.precision_at_k(TOY_DIST, TOY_REL, 1) == 0.0
    assert M.precision_at_k(TOY_DIST, TOY_REL, 2) == pytest.approx(0.5)
    assert M.precision_at_k(TOY_DIST, TOY_REL, 3) == pytest.approx(0.5)
    # k > N is clipped to N = 5: (3/5 + 1/5) / 2
    assert M.precision_at_k(TOY_DIST, TOY_REL, 50) == pytest.approx(0.4)


def test_toy_precision_within_radius():
    # r=2: q0 retrieves all 5, 3 relevant -> 3/5; q1 retrieves nothing -> 0 (counted)
    p, cov = M.precision_within_radius(TOY_DIST, TOY_REL, 2, return_coverage=True)
    assert p == pytest.approx(0.3) and cov == pytest.approx(0.5)
    assert M.precision_within_radius(TOY_DIST, TOY_REL, 2) == pytest.approx(0.3)
    # r=0: q0 retrieves {1, 4}, relevant {4} -> 1/2; q1 nothing -> 0
    assert M.precision_within_radius(TOY_DIST, TOY_REL, 0) == pytest.approx(0.25)


def test_toy_pr_curve():
    # n_bits = 3, radius 0..3
    # q0 (R=3): retrieved 2, 4, 5, 5; tp 1, 2, 3, 3 -> P .5 .5 .6 .6, R 1/3 2/3 1 1
    # q1 (R=1): retrieved 0, 0, 0, 5; tp 0, 0, 0, 1 -> P 0 0 0 .2,   R 0 0 0 1
    p, r = M.pr_curve_by_radius(TOY_DIST, TOY_REL, 3)
    np.testing.assert_allclose(p, [0.25, 0.25, 0.3, 0.4])
    np.testing.assert_allclose(r, [1 / 6, 1 / 3, 0.5, 1.0])
    # a query without relevant items is left out of recall, kept in precision (as 0 here)
    rel = TOY_REL.copy()
    rel[1] = False
    p, r = M.pr_curve_by_radius(TOY_DIST, rel, 3)
    np.testing.assert_allclose(p, [0.25, 0.25, 0.3, 0.3])
    np.testing.assert_allclose(r, [1 / 3, 2 / 3, 1.0, 1.0])


def test_toy_top1_expected():
    # q0: items at min distance 0 are {1, 4} with rel 0, 1 -> 1/2
    # q1: all 5 tied, one relevant -> 1/5
    assert M.top1_expected(TOY_DIST, TOY_REL) == pytest.approx((0.5 + 0.2) / 2)
    gains = np.array([[0, 0.4, 0, 0, 1.0], [1, 1, 1, 1, 0.5]])
    # graded: q0 (0.4 + 1.0) / 2 = 0.7; q1 (4 + 0.5) / 5 = 0.9
    assert M.top1_expected(TOY_DIST, gains) == pytest.approx((0.7 + 0.9) / 2)


def test_toy_ndcg():
    # q0 gains [1, 0, 2, 0, .5], ranking [1, 4, 0, 3, 2] -> ranked gains [0, .5, 1, 0, 2]
    #   DCG@3 = 0/log2(2) + .5/log2(3) + 1/log2(4);  IDCG@3 = 2/1 + 1/log2(3) + .5/log2(4)
    # q1 all-zero gains: IDCG = 0 -> nDCG 0, counted (or excluded)
    gains = np.array([[1, 0, 2, 0, 0.5], [0, 0, 0, 0, 0]])
    n0 = (0.5 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3) + 0.5 / 2)
    assert M.ndcg_at_k(TOY_DIST, gains, 3) == pytest.approx(n0 / 2)
    assert M.ndcg_at_k(TOY_DIST, gains, 3, exclude_empty=True) == pytest.approx(n0)
    # binary: q0 ranked rel [0, 1, 1] -> (1/log2 3 + 1/2) / (1 + 1/log2 3 + 1/2)
    #         q1 ranked rel [0, 1, 0] -> (1/log2 3) / 1
    b0 = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3) + 0.5)
    assert M.ndcg_at_k(TOY_DIST, TOY_REL, 3) == pytest.approx((b0 + 1 / math.log2(3)) / 2)


def test_toy_same_item():
    # q0 true item 3 at distance 1: a = 2 closer ({1, 4}), t = 2 tied ({0, 3})
    #   k=1: a >= k -> 0;  k=3: (3-2)/2 = .5;  k=4: min(1, 2/2) = 1
    # q1 true item 2, all tied: a = 0, t = 5 -> k/5: .2, .6, .8
    out = M.same_item_topk(TOY_DIST, np.array([3, 2]), ks=(1, 3, 4))
    assert out == pytest.approx({1: 0.1, 3: 0.55, 4: 0.9})


def test_toy_relevance_from_labels():
    np.testing.assert_array_equal(
        M.relevance_from_labels(np.array([0, 1]), np.array([0, 0, 1, 2])),
        [[True, True, False, False], [False, False, True, False]],
    )
    np.testing.assert_array_equal(
        M.relevance_from_labels(np.array(["a", "b"]), np.array(["b", "c"])),
        [[False, False], [True, False]],
    )
    ql = np.array([[1, 0, 1], [0, 0, 0]])
    dl = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(
        M.relevance_from_labels(ql, dl), [[True, False, True], [False, False, False]]
    )


def test_toy_attribute_gain():
    # q0 (red, top):  db0 (red, top) 1;  db1 (red, skirt) .5;  db2 ("", top) .5;
    #                 db3 (blue, None) 0;  db4 ("", "") 0
    # q1 ("", None): missing values never match, not even each other -> all 0
    qa = {"color": ["red", ""], "cat": ["top", None]}
    da = {"color": ["red", "red", "", "blue", ""], "cat": ["top", "skirt", "top", None, ""]}
    g = M.attribute_gain(qa, da, ["color", "cat"])
    assert g.dtype == np.float32 and g.shape == (2, 5)
    np.testing.assert_allclose(g, [[1, 0.5, 0.5, 0, 0], [0, 0, 0, 0, 0]])
    # numbers and NaN (pandas-style missing) work too
    g = M.attribute_gain({"y": np.array([2012.0, np.nan])}, {"y": np.array([2012.0, np.nan])})
    np.testing.assert_allclose(g, [[1, 0], [0, 0]])
    with pytest.raises(KeyError):
        M.attribute_gain(qa, da, ["color", "size"])


def test_default_attr_keys_match_catalogue():
    from fashionhash.data.catalogue import GRADED_ATTRIBUTES

    assert tuple(M.DEFAULT_ATTR_KEYS) == tuple(GRADED_ATTRIBUTES)


# --------------------------------------------------------------------------------------
# plain reference loops on random, tie-heavy data
# --------------------------------------------------------------------------------------


def _random_case(seed: int, q: int = 7, n: int = 60, levels: int = 4):
    """Few distinct distances (heavy ties); one query with no relevant item."""
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, levels, size=(q, n))
    rel = rng.random((q, n)) < 0.3
    rel[0] = False
    gains = np.round(rng.random((q, n)) * 3) / 3 * (rng.random((q, n)) < 0.5)
    gains[1] = 0.0
    return rng, dist, rel, gains


def _ref_order(row):
    return sorted(range(len(row)), key=lambda j: (row[j], j))


def _ref_ap(row, rel_row, k=None):
    order = _ref_order(row)[: len(row) if k is None else k]
    hits, total = 0, 0.0
    for i, j in enumerate(order, start=1):
        if rel_row[j]:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def _ref_ndcg(row, g_row, k):
    order = _ref_order(row)[:k]
    dcg = sum(g_row[j] / math.log2(i + 1) for i, j in enumerate(order, start=1))
    ideal = sorted(g_row, reverse=True)[:k]
    idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_rank_matches_stable_argsort(seed):
    rng, dist, _, _ = _random_case(seed, q=5, n=200)
    for d in (dist, dist.astype(np.uint16), dist.astype(np.float64) - 1.5, dist.astype(np.int8)):
        full = np.argsort(d, axis=1, kind="stable")
        np.testing.assert_array_equal(M.rank(d), full)
        for k in (1, 2, 7, 49, 50, 51, 199, 200, 500):
            np.testing.assert_array_equal(M.rank(d, k), full[:, :k])
    # -0.0 and 0.0 compare equal, so they tie and are ordered by index
    z = np.where(rng.random((3, 100)) < 0.5, -0.0, 0.0)
    z[:, ::7] = 1.0
    np.testing.assert_array_equal(M.rank(z, 5), np.argsort(z, axis=1, kind="stable")[:, :5])


@pytest.mark.parametrize("seed", SEEDS)
def test_map_and_precision_against_reference(seed):
    _, dist, rel, _ = _random_case(seed)
    q, n = dist.shape
    for k in (None, 1, 5, 17, n):
        aps = [_ref_ap(dist[i], rel[i], k) for i in range(q)]
        assert M.mean_average_precision(dist, rel, k) == pytest.approx(np.mean(aps))
        kk = n if k is None else k
        nonempty = [ap for i, ap in enumerate(aps) if rel[i, _ref_order(dist[i])[:kk]].any()]
        expect = np.mean(nonempty) if nonempty else 0.0
        assert M.mean_average_precision(dist, rel, k, exclude_empty=True) == pytest.approx(expect)
    for k in (1, 3, 10, n):
        ref = np.mean([sum(rel[i, j] for j in _ref_order(dist[i])[:k]) / k for i in range(q)])
        assert M.precision_at_k(dist, rel, k) == pytest.approx(ref)


@pytest.mark.parametrize("seed", SEEDS)
def test_radius_metrics_against_reference(seed):
    _, dist, rel, _ = _random_case(seed, levels=6)
    q, n = dist.shape
    n_bits = 5
    ref_p = np.zeros(n_bits + 1)
    ref_r, n_rel_q = np.zeros(n_bits + 1), 0
    for i in range(q):
        n_rel = sum(rel[i])
        n_rel_q += n_rel > 0
        for r in range(n_bits + 1):
            got = [j for j in range(n) if dist[i, j] <= r]
            tp = sum(rel[i, j] for j in got)
            ref_p[r] += (tp / len(got) if got else 0.0) / q
            if n_rel:
                ref_r[r] += tp / n_rel
    ref_r /= n_rel_q
    p, r = M.pr_curve_by_radius(dist, rel, n_bits)
    np.testing.assert_allclose(p, ref_p)
    np.testing.assert_allclose(r, ref_r)
    for radius in range(n_bits + 1):
        assert M.precision_within_radius(dist, rel, radius) == pytest.approx(ref_p[radius])
        _, cov = M.precision_within_radius(dist, rel, radius, return_coverage=True)
        assert cov == pytest.approx(np.mean([(dist[i] <= radius).any() for i in range(q)]))
    # float distances: d <= r on the raw values
    fd = dist + 0.5
    p, _ = M.pr_curve_by_radius(fd, rel, n_bits)
    for radius in range(n_bits + 1):
        assert p[radius] == pytest.approx(M.precision_within_radius(fd, rel, radius))


@pytest.mark.parametrize("seed", SEEDS)
def test_tie_aware_metrics_against_reference(seed):
    rng, dist, rel, gains = _random_case(seed)
    q, n = dist.shape
    for r in (rel, gains):
        ref = []
        for i in range(q):
            m = min(dist[i])
            tied = [j for j in range(n) if dist[i, j] == m]
            ref.append(sum(float(r[i, j]) for j in tied) / len(tied))
        assert M.top1_expected(dist, r) == pytest.approx(np.mean(ref))
    true_index = rng.integers(0, n, q)
    ks = (1, 2, 5, 20, n)
    ref = {k: 0.0 for k in ks}
    for i in range(q):
        # the true item lands uniformly on one of the positions its tie group occupies
        row, t_i = dist[i], true_index[i]
        a = sum(row[j] < row[t_i] for j in range(n))
        positions = range(a + 1, a + sum(row[j] == row[t_i] for j in range(n)) + 1)
        for k in ks:
            ref[k] += sum(p <= k for p in positions) / len(positions) / q
    assert M.same_item_topk(dist, true_index, ks) == pytest.approx(ref)


@pytest.mark.parametrize("seed", SEEDS)
def test_ndcg_against_reference(seed):
    _, dist, rel, gains = _random_case(seed)
    q, n = dist.shape
    # float, 0/1, boolean and few integer levels (many ties among the gains)
    for g in (gains, rel.astype(float), rel, np.round(gains * 3).astype(np.int64)):
        for k in (1, 3, 10, n, 2 * n):
            vals = [_ref_ndcg(dist[i], g[i].astype(float), min(k, n)) for i in range(q)]
            assert M.ndcg_at_k(dist, g, k) == pytest.approx(np.mean(vals))
            has = [v for i, v in enumerate(vals) if g[i].max() > 0]
            assert M.ndcg_at_k(dist, g, k, exclude_empty=True) == pytest.approx(np.mean(has))


@pytest.mark.parametrize("seed", SEEDS)
def test_attribute_gain_against_reference(seed):
    rng = np.random.default_rng(seed)
    vocab = np.array(["a", "b", "", None, "c"], dtype=object)
    keys = ["k0", "k1", "k2"]
    qa = {k: rng.choice(vocab, 6) for k in keys}
    da = {k: rng.choice(vocab, 30) for k in keys}
    g = M.attribute_gain(qa, da, keys)
    for i in range(6):
        for j in range(30):
            agree = sum(qa[k][i] == da[k][j] and qa[k][i] not in ("", None) for k in keys)
            assert g[i, j] == pytest.approx(agree / 3)


# --------------------------------------------------------------------------------------
# tie re-ranking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_rerank_order_keeps_hamming_order(seed):
    rng = np.random.default_rng(seed)
    n_bits = 16
    db = codes.pack(rng.normal(size=(300, n_bits)))
    q_real = np.tanh(rng.normal(size=(5, n_bits)))
    ham = codes.hamming(codes.pack(q_real), db)
    asym = np.clip(codes.asymmetric_distance(q_real, db, n_bits), 0, n_bits)
    asym[:, ::5] = asym[:, 1::5][:, : asym[:, ::5].shape[1]]  # force some exact asym ties
    order = M._lex_argsort(ham, asym)
    np.testing.assert_array_equal(order, M._lex_argsort_radix(ham, asym))  # both paths agree
    for i in range(ham.shape[0]):
        h, a = ham[i, order[i]], asym[i, order[i]]
        assert np.all(np.diff(h.astype(int)) >= 0)  # Hamming order is never broken
        same = np.diff(h.astype(int)) == 0
        assert np.all(np.diff(a)[same] >= 0)  # asymmetric order inside a Hamming tie
        # full tie: (hamming, asym, index) lexicographic
        np.testing.assert_array_equal(order[i], np.lexsort((np.arange(300), asym[i], ham[i])))
    key = M.rerank_key(ham, asym, n_bits)
    np.testing.assert_array_equal(order, np.argsort(key, axis=1, kind="stable"))
    np.testing.assert_array_equal(np.floor(key), ham)  # fraction < 1


# --------------------------------------------------------------------------------------
# evaluate_retrieval
# --------------------------------------------------------------------------------------


def _codes_case(seed, n_bits, q=23, n=150, multilabel=False):
    rng = np.random.default_rng(seed)
    n_cls = 4
    proto = rng.choice([-1.0, 1.0], size=(n_cls, n_bits))
    dl = rng.integers(0, n_cls, n)
    ql = rng.integers(0, n_cls, q)
    db_real = proto[dl] * np.where(rng.random((n, n_bits)) < 0.3, -1, 1)
    q_real = np.tanh(proto[ql] + rng.normal(0, 1.0, (q, n_bits)))
    if multilabel:
        dl = np.eye(n_cls, dtype=int)[dl] | (rng.random((n, n_cls)) < 0.2)
        ql = np.eye(n_cls, dtype=int)[ql]
    vocab = np.array(["x", "y", "z", ""], dtype=object)
    qa = {k: rng.choice(vocab, q) for k in M.DEFAULT_ATTR_KEYS}
    da = {k: rng.choice(vocab, n) for k in M.DEFAULT_ATTR_KEYS}
    return rng, codes.pack(q_real), codes.pack(db_real), q_real, ql, dl, qa, da


@pytest.mark.parametrize("seed,n_bits,multilabel", [(0, 16, False), (1, 12, True), (2, 64, False)])
def test_evaluate_retrieval_matches_individual_metrics(seed, n_bits, multilabel):
    rng, qp, dp, q_real, ql, dl, qa, da = _codes_case(seed, n_bits, multilabel=multilabel)
    n = dp.shape[0]
    true_index = rng.integers(0, n, qp.shape[0])
    out = M.evaluate_retrieval(
        qp, dp, n_bits, ql, dl, query_attrs=qa, db_attrs=da, query_real=q_real,
        true_index=true_index, map_k=40, ndcg_k=10, prec_k=(5, 1000), chunk=5,
    )
    json.dumps(out)  # plain Python types only
    ham = codes.hamming(qp, dp)
    rel = M.relevance_from_labels(ql, dl)
    gains = M.attribute_gain(qa, da, M.DEFAULT_ATTR_KEYS)
    asym = codes.asymmetric_distance(q_real, dp, n_bits)
    key = M.rerank_key(ham, asym, n_bits)
    for dist, sfx in ((ham, ""), (key, "_rerank")):
        expect = {
            "map": M.mean_average_precision(dist, rel),
            "map@40": M.mean_average_precision(dist, rel, 40),
            "p@5": M.precision_at_k(dist, rel, 5),
            "p@1000": M.precision_at_k(dist, rel, 1000),  # clipped to N, named as asked
            "top1": M.top1_expected(dist, rel),
            "ndcg_labels@10": M.ndcg_at_k(dist, rel, 10),
            "ndcg@10": M.ndcg_at_k(dist, gains, 10),  # attribute gains when attrs are given
            "top1_attr": M.top1_expected(dist, gains),
            **{f"same_item_top{k}": v for k, v in M.same_item_topk(dist, true_index).items()},
        }
        for name, v in expect.items():
            assert out[name + sfx] == pytest.approx(v, abs=1e-9), name + sfx
    assert out["ndcg_gains"] == "attributes"
    assert out["n_query"] == qp.shape[0] and out["n_database"] == n and out["n_bits"] == n_bits
    p, cov = M.precision_within_radius(ham, rel, 2, return_coverage=True)
    assert out["p@h2"] == pytest.approx(p) and out["coverage@h2"] == pytest.approx(cov)
    pr_p, pr_r = M.pr_curve_by_radius(ham, rel, n_bits)
    np.testing.assert_allclose(out["pr_curve"]["precision"], pr_p)
    np.testing.assert_allclose(out["pr_curve"]["recall"], pr_r)
    assert out["pr_curve"]["radius"] == list(range(n_bits + 1))
    assert out["pr_curve"]["recall"][-1] == pytest.approx(1.0)
    for name, v in out.items():
        if isinstance(v, float):
            assert math.isfinite(v) and 0.0 <= v <= 1.0, name
    for curve in (out["pr_curve"]["precision"], out["pr_curve"]["recall"]):
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in curve)
    # p@1000 is clipped to p@N: the whole database, which no re-ranking can change
    assert out["p@1000_rerank"] == pytest.approx(out["p@1000"])


def test_rerank_with_binary_queries_changes_nothing():
    # For a binary query the asymmetric distance equals the Hamming distance, so the
    # re-ranked order is the plain stable order and every *_rerank metric equals its twin.
    rng, qp, dp, _, ql, dl, _, _ = _codes_case(7, 16)
    q_bin = codes.unpack(qp, 16)
    out = M.evaluate_retrieval(qp, dp, 16, ql, dl, query_real=q_bin,
                               true_index=rng.integers(0, dp.shape[0], qp.shape[0]))
    for name, v in out.items():
        if name.endswith("_rerank"):
            assert v == pytest.approx(out[name[: -len("_rerank")]]), name


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_internal_row_chunking_changes_nothing(seed, monkeypatch):
    rng, dist, rel, gains = _random_case(seed, q=9, n=80)
    true_index = rng.integers(0, 80, 9)

    def run():
        return [
            M.rank(dist, 11), M.rank(dist.astype(float), 5),
            M.mean_average_precision(dist, rel), M.mean_average_precision(dist, rel, 7),
            M.precision_at_k(dist, rel, 4), M.precision_within_radius(dist, rel, 1),
            *M.pr_curve_by_radius(dist, rel, 3), M.top1_expected(dist, gains),
            M.ndcg_at_k(dist, gains, 6), M.same_item_topk(dist, true_index, (1, 5)),
        ]

    whole = run()
    monkeypatch.setattr(M, "_CELLS_PER_CHUNK", 200)  # 2 rows per chunk, ragged last chunk
    for a, b in zip(whole, run()):
        if isinstance(a, dict):
            assert a == pytest.approx(b)
        else:
            np.testing.assert_allclose(a, b)


def test_evaluate_retrieval_chunking_and_options():
    _, qp, dp, q_real, ql, dl, qa, da = _codes_case(5, 24, q=11, n=90)
    a = M.evaluate_retrieval(qp, dp, 24, ql, dl, chunk=3)
    b = M.evaluate_retrieval(qp, dp, 24, ql, dl)
    assert a.keys() == b.keys()
    for name in a:  # chunking changes nothing (up to float summation order)
        if isinstance(a[name], dict):
            for sub in a[name]:
                np.testing.assert_allclose(a[name][sub], b[name][sub], rtol=1e-12)
        elif not isinstance(a[name], str):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-12, err_msg=name)
    assert not any(k.endswith("_rerank") for k in a)
    assert "top1_attr" not in a and "same_item_top1" not in a and "ndcg_labels@10" not in a
    # without attributes, ndcg@10 uses the 0/1 label gains
    assert a["ndcg_gains"] == "labels"
    ham = codes.hamming(qp, dp)
    assert a["ndcg@10"] == pytest.approx(M.ndcg_at_k(ham, M.relevance_from_labels(ql, dl), 10))
    # attributes only, no labels
    c = M.evaluate_retrieval(qp, dp, 24, None, None, query_attrs=qa, db_attrs=da,
                             attr_keys=["gender", "usage"])
    assert set(c) == {"n_query", "n_database", "n_bits", "top1_attr", "ndcg@10", "ndcg_gains"}
    # repeated cutoffs are reported once, with the right values
    d = M.evaluate_retrieval(qp, dp, 24, ql, dl, true_index=np.arange(11), prec_k=(5, 5, 3),
                             same_item_ks=(10, 1, 10))
    assert d["p@5"] == pytest.approx(M.precision_at_k(ham, M.relevance_from_labels(ql, dl), 5))
    assert d["same_item_top1"] == pytest.approx(M.same_item_topk(ham, np.arange(11), (1,))[1])
    assert d["same_item_top10"] == pytest.approx(M.same_item_topk(ham, np.arange(11), (10,))[10])
    assert d["p@3"] == pytest.approx(M.precision_at_k(ham, M.relevance_from_labels(ql, dl), 3))
    with pytest.raises(ValueError):
        M.evaluate_retrieval(qp, dp, 24, None, None)
    with pytest.raises(ValueError):
        M.evaluate_retrieval(qp, dp, 24, ql, dl, query_real=q_real[:, :5])


def test_plot_pr_curves(tmp_path):
    p, r = M.pr_curve_by_radius(TOY_DIST, TOY_REL, 3)
    path = tmp_path / "pr.png"
    M.plot_pr_curves({"toy": (p, r), "other": (p[::-1], r)}, path, "toy curves")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_bits", [8, 24, 64, 128, 192])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_hamming_matches_bit_by_bit(n_bits, chunk):
    """codes.hamming (word-wise, blocks of query rows) against counting differing bits."""
    rng = np.random.default_rng(n_bits)
    a = np.where(rng.random((13, n_bits)) < 0.5, -1.0, 1.0)
    b = np.where(rng.random((29, n_bits)) < 0.5, -1.0, 1.0)
    slow = (a[:, None, :] != b[None, :, :]).sum(axis=2)
    got = codes.hamming(codes.pack(a), codes.pack(b), chunk=chunk)
    assert got.dtype == np.uint16 and np.array_equal(got, slow)
