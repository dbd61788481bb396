"""Second stage of search: whitening, int8 storage and re-ranking against slow references,
the descriptor store and two-stage search in the index, the descriptor network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fashionhash import codes as C
from fashionhash.descriptors import (Whitening, dequantize, l2_normalise, quantize, rerank, rerank_reference,
                                     rerank_rows, sign_codes, squared_norms)
from fashionhash.evaluation.two_stage import choose_shortlist, descriptor_only_hits, two_stage_hits
from fashionhash.index import HashIndex, IndexFormatError
from fashionhash.index import _kernel as K
from fashionhash.index.descriptor_store import DescriptorStore
from fashionhash.index.persist import write_container

from test_index import LOCAL_BACKENDS  # noqa: E402


def _unit(rng, n, d):
    return l2_normalise(rng.normal(size=(n, d)).astype(np.float32))


def test_whitening_decorrelates_and_keeps_the_top_axes():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    x = rng.normal(size=(4000, 12)) * np.linspace(5, 0.1, 12) @ mix + 3.0
    w = Whitening.fit(x, 6)
    y = (x - w.mean) @ w.proj
    assert np.allclose(np.cov(y, rowvar=False, bias=True), np.eye(6), atol=1e-3)
    assert np.allclose(np.linalg.norm(w(x), axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="whitening to 13"):
        Whitening.fit(x, 13)
    with pytest.raises(ValueError, match="width 12"):
        w(x[:, :5])


def test_whitening_saves_and_loads(tmp_path):
    w = Whitening.fit(np.random.default_rng(1).normal(size=(50, 8)), 4)
    w.save(tmp_path / "w.npz")
    back = Whitening.load(tmp_path / "w.npz")
    assert back.digest() == w.digest() and np.array_equal(back.proj, w.proj)
    assert Whitening.fit(np.random.default_rng(2).normal(size=(50, 8)), 4).digest() != w.digest()


def test_int8_keeps_the_direction():
    x = _unit(np.random.default_rng(0), 200, 512)
    q = quantize(x)
    assert q.dtype == np.int8 and np.abs(q).max(axis=1).min() == 127
    assert (np.sum(dequantize(q) * x, axis=1) > 0.999).all()


@pytest.mark.parametrize("seed", range(5))
def test_rerank_matches_the_slow_reference(seed):
    rng = np.random.default_rng(seed)
    r, d = 40, 16
    rows = quantize(_unit(rng, r, d))
    rows[5] = rows[9]  # equal cosines: the shortlist order decides
    cand = rng.permutation(1000)[:r].astype(np.int64)
    cand[[3, 17]] = -1  # padding
    query = rng.normal(size=d).astype(np.float32)
    for k in (1, 7, r):
        got, ref = rerank(query, cand, rows, k), rerank_reference(query, cand, rows, k)
        assert np.array_equal(got[1], ref[1])
        assert np.allclose(got[0], ref[0], atol=1e-5)
    assert rerank(query, np.full(3, -1), rows[:3], 5)[1].size == 0


@pytest.mark.parametrize("kernel", ["c", "numpy"])
@pytest.mark.parametrize("d", [16, 37, 512])
def test_batched_rerank_matches_the_slow_reference(kernel, d):
    """Many shortlists at once over a shared store (the index's path): the C kernel and its
    numpy twin give the reference's ids in its order, ties (identical rows, one row listed
    twice) in shortlist order, padding dropped, k beyond the valid candidates padded."""
    if kernel == "c" and K.kernel_name() != "c":
        pytest.skip("no C compiler")
    rng = np.random.default_rng(d)
    n, q, r = 500, 12, 60
    rows = quantize(_unit(rng, n, d))
    rows[[7, 8]] = rows[3]
    rows[9] = 0  # a zero row: cosine 0, as in the reference
    cand = rng.integers(0, n, (q, r))
    cand[:, [4, 30, 50]] = [8, 3, 7]
    cand[:, 20] = cand[:, 40]
    cand[2, ::2] = -1
    cand[5, :] = -1
    cand[6, 11] = 9
    queries = rng.normal(size=(q, d)).astype(np.float32)
    queries[:4] = dequantize(rows[3:4])  # the tied rows come first
    sq = squared_norms(rows)
    assert np.array_equal(sq, (rows.astype(np.int64) ** 2).sum(1))
    for k in (1, 5, r, r + 7):
        with K.use_kernel(kernel):
            scores, pos = K.rerank_int8(queries, rows, sq, cand, k)
        assert scores.shape == pos.shape == (q, k)
        for i in range(q):
            ref_s, ref_i = rerank_reference(queries[i], cand[i], rows[np.maximum(cand[i], 0)], k)
            n_ok = ref_i.size
            assert np.array_equal(cand[i][pos[i, :n_ok]], ref_i) and (pos[i, n_ok:] == -1).all()
            assert np.allclose(scores[i, :n_ok], ref_s, atol=1e-6) and (scores[i, n_ok:] == 0).all()
    # the numpy twin is the kernel's specification: same positions
    assert np.array_equal(rerank_rows(queries, rows, sq, cand, 9)[1], K.rerank_int8(queries, rows, sq, cand, 9)[1])


def _two_stage_reference(q_packed, q_desc, g_packed, g_desc, g_ids, true, r, ks):
    """Loops: Hamming top-r by (distance, id), then re-rank by cosine, find the true item."""
    hits = {k: 0 for k in ks}
    for q in range(len(q_packed)):
        dist = C.hamming(q_packed[q:q + 1], g_packed)[0]
        order = sorted(range(len(g_ids)), key=lambda j: (int(dist[j]), int(g_ids[j])))[:r]
        _, ids = rerank_reference(q_desc[q], np.asarray(g_ids)[order], g_desc[order], len(order))
        pos = [int(i) for i in ids].index(int(g_ids[true[q]])) if int(g_ids[true[q]]) in ids else None
        for k in ks:
            hits[k] += pos is not None and pos < k
    return {k: v / len(q_packed) for k, v in hits.items()}


def test_two_stage_hits_match_the_slow_reference():
    rng = np.random.default_rng(3)
    n, q, d, bits = 300, 25, 8, 16
    g_packed = C.pack(rng.choice([-1.0, 1.0], size=(n, bits)))
    g_packed[::3] = g_packed[0]  # many shared codes: ties at the shortlist's edge
    g_desc = quantize(_unit(rng, n, d))
    g_ids = rng.permutation(5000)[:n]
    true = rng.choice(n, q, replace=False)
    noisy = g_packed[true].copy()
    noisy[:, 0] ^= 0b101
    q_desc = l2_normalise(dequantize(g_desc[true]) + 0.4 * rng.normal(size=(q, d)))
    got = two_stage_hits(noisy, q_desc, g_packed, g_desc, g_ids, true, [10, 50, 400], ks=(1, 5))
    for r in (10, 50, 400):
        assert got[r] == pytest.approx(_two_stage_reference(noisy, q_desc, g_packed, g_desc, g_ids, true, r, (1, 5)))
    # a shortlist of the whole gallery re-ranked is ranking by the descriptor alone
    assert got[400][1] == pytest.approx(descriptor_only_hits(q_desc, g_desc, true, (1,))[1], abs=1e-9)



def test_choose_shortlist_prefers_short_lists_and_narrow_codes_within_the_tolerance():
    hits = {0: {10: {1: 0.5, 10: 0.6}, 50: {1: 0.5, 10: 0.7}, 400: {1: 0.6, 10: 0.9}},
            64: {10: {1: 0.6, 10: 0.7}, 50: {1: 0.6, 10: 0.895}, 400: {1: 0.6, 10: 0.9}},
            128: {10: {1: 0.6, 10: 0.7}, 50: {1: 0.6, 10: 0.9}, 400: {1: 0.6, 10: 0.9}}}
    assert choose_shortlist(hits, tolerance=0.01) == (64, 50)  # 0.005 below the best, 8x shorter
    assert choose_shortlist(hits, tolerance=0.0) == (128, 50)
    assert choose_shortlist({0: hits[0]}, tolerance=0.0) == (0, 400)


def test_pca_ordered_map_keeps_cosines_and_sign_codes_follow_the_leading_components():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(300, 24)) * np.linspace(0.2, 3, 24)  # unequal variances
    w = Whitening.fit(raw, 16)
    w.proj = w.proj[:, rng.permutation(16)]  # as a learned map: outputs in no useful order
    o = w.pca_ordered(raw)
    a, b = w(raw), o(raw)
    np.testing.assert_allclose(a @ a[:5].T, b @ b[:5].T, atol=1e-5)  # the same cosines
    var = b.var(axis=0)
    assert np.all(np.diff(var) <= 1e-6)  # leading components carry the most
    s = o.with_sign_code(raw, 8)
    assert s.sign_bits == 8 and s.digest() != o.digest()
    codes = sign_codes(b, s.sign_mean)
    np.testing.assert_array_equal(codes, C.pack(b[:, :8] - s.sign_mean))
    # the stored int8 rows give the codes of their float rows, up to rounding at the mean
    agree = (np.unpackbits(sign_codes(quantize(b), s.sign_mean)) == np.unpackbits(codes)).mean()
    assert agree > 0.97
    with pytest.raises(ValueError, match="multiple of 8"):
        o.with_sign_code(raw, 12)


def test_descriptor_store_add_get_remove_persist(tmp_path):
    rng = np.random.default_rng(0)
    store = DescriptorStore(8)
    rows = quantize(_unit(rng, 6, 8))
    store.add([30, 10, 20, 60, 50, 40], rows)
    assert np.array_equal(store.get([10, 60, -1]), np.stack([rows[1], rows[3], np.zeros(8, np.int8)]))
    with pytest.raises(KeyError, match="77"):
        store.get([77])
    with pytest.raises(ValueError, match="new and distinct"):
        store.add([10], rows[:1])
    with pytest.raises(ValueError, match="int8"):
        store.add([99], rows[:1].astype(np.int16))
    assert store.remove([20, 999]) == 1 and len(store) == 5
    store.save(tmp_path / "d.fhd")
    back = DescriptorStore.load(tmp_path / "d.fhd")
    assert np.array_equal(back.get([30, 50]), store.get([30, 50])) and not back.contains([20])[0]
    raw = bytearray((tmp_path / "d.fhd").read_bytes())
    raw[-3] ^= 1
    (tmp_path / "bad.fhd").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum"):
        DescriptorStore.load(tmp_path / "bad.fhd")


@pytest.mark.parametrize("ids", ["compact", "sparse"])
def test_descriptor_store_keeps_norms_and_reads_format_1(ids, tmp_path):
    """Squared norms are saved (format 2) and computed when reading a format-1 file; rows are
    found by the id -> row table (compact ids) or by binary search (sparse ids) alike."""
    rng = np.random.default_rng(1)
    id_list = np.arange(50) * (1 if ids == "compact" else 1_000_003)
    rows = quantize(_unit(rng, 50, 8))
    store = DescriptorStore(8)
    store.add(id_list[::-1], rows[::-1])
    assert (store._table is not None) == (ids == "compact")
    assert np.array_equal(store.rows_of(np.stack([id_list[[3, 0]], [-1, id_list[49]]])), [[3, 0], [-1, 49]])
    with pytest.raises(KeyError):
        store.rows_of([id_list[-1] + 1])
    store.remove(id_list[:2])
    assert np.array_equal(store.get(id_list[[2, 49]]), rows[[2, 49]])
    store.save(tmp_path / "v2.fhd")
    write_container(tmp_path / "v1.fhd", {"kind": "descriptors", "dim": 8, "count": 48},
                    {"ids": id_list[2:], "rows": rows[2:]})  # what format 1 wrote
    for name in ("v2.fhd", "v1.fhd"):
        back = DescriptorStore.load(tmp_path / name)
        assert np.array_equal(back._sqnorms, (rows[2:].astype(np.int64) ** 2).sum(1))
        assert np.array_equal(back.get(id_list[[2, 49]]), rows[[2, 49]])
    write_container(tmp_path / "v9.fhd", {"kind": "descriptors", "version": 9, "dim": 8, "count": 48},
                    {"ids": id_list[2:], "rows": rows[2:]})
    with pytest.raises(IndexFormatError, match="format 9"):
        DescriptorStore.load(tmp_path / "v9.fhd")


@pytest.mark.parametrize("kernel", ["c", "numpy"])
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_index_two_stage_search_matches_the_reference(backend, kernel, tmp_path):
    if backend == "faiss":
        pytest.importorskip("faiss")
    if kernel == "c" and K.kernel_name() != "c":
        pytest.skip("no C compiler")
    rng = np.random.default_rng(7)
    n, bits, d = 400, 32, 12
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    codes = C.pack(rng.choice([-1.0, 1.0], size=(n, bits)))
    codes[1::4] = codes[0]
    desc = quantize(_unit(rng, n, d))
    meta = [{"colour": "red" if i % 2 else "blue"} for i in range(n)]
    index = HashIndex(backend, bits, tmp_path / "idx", descriptor_dim=d)
    with pytest.raises(ValueError, match="pass them"):
        index.add(ids[:1], codes[:1], meta[:1])
    index.add(ids, codes, meta, descriptors=desc)
    index.remove(ids[:10])
    index.save()
    index.close()
    index = HashIndex.open(tmp_path / "idx")
    assert index.descriptor_dim == d and len(index) == n - 10
    q_codes, q_desc = codes[[20, 21, 0]], rng.normal(size=(3, d)).astype(np.float32)
    for filters in (None, {"colour": "red"}):
        with K.use_kernel(kernel):
            scores, dist, got = index.search_two_stage(q_codes, q_desc, 5, 60, filters)
        hd, cand = index.search(q_codes, 60, filters)
        for q in range(3):
            rows = np.stack([desc[np.flatnonzero(ids == c)[0]] for c in cand[q] if c >= 0])
            ref = rerank_reference(q_desc[q], cand[q][cand[q] >= 0], rows, 5)
            assert np.array_equal(got[q], ref[1]) and np.allclose(scores[q], ref[0], atol=1e-5)
            assert [int(hd[q][list(cand[q]).index(i)]) for i in got[q]] == dist[q].tolist()
            if filters:
                assert all(index.get(int(i))["colour"] == "red" for i in got[q])
    with pytest.raises(ValueError, match=r"\(Q, 12\)"):
        index.search_two_stage(q_codes, q_desc[:, :4], 5, 60)
    index.close()
    plain = HashIndex(backend, bits)
    plain.add(ids[:3], codes[:3])
    with pytest.raises(ValueError, match="no descriptors"):
        plain.search_two_stage(q_codes, q_desc, 5, 60)


@pytest.mark.parametrize("backend", ["flat", "mih"])
def test_index_sign_code_shortlist_matches_the_reference(backend, tmp_path):
    """With a sign code the shortlist is the descriptors' sign-code neighbours (rebuilt on
    open, kept through add / remove / rollback), the distances shown stay the hash code's."""
    rng = np.random.default_rng(3)
    n, bits, d, b = 300, 32, 16, 8
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    codes = C.pack(rng.choice([-1.0, 1.0], size=(n, bits)))
    desc = quantize(_unit(rng, n, d))
    mean = dequantize(desc)[:, :b].mean(axis=0)
    meta = [{"colour": "red" if i % 2 else "blue"} for i in range(n)]
    index = HashIndex(backend, bits, tmp_path / "idx", descriptor_dim=d, sign_mean=mean)
    index.add(ids, codes, meta, descriptors=desc)
    index.save()
    index.remove(ids[:10])  # unsaved: gone after the rollback below
    index.rollback()
    index.remove(ids[10:20])
    index.save()
    index.close()
    index = HashIndex.open(tmp_path / "idx")
    assert index.sign_bits == b and len(index.sign_index) == n - 10
    live = np.ones(n, bool)
    live[10:20] = False
    q_codes, q_desc = codes[[30, 31]], _unit(rng, 2, d)
    q_sign = sign_codes(q_desc, mean)
    np.testing.assert_array_equal(index.sign_code(q_desc), q_sign)
    for filters in (None, {"colour": "red"}):
        scores, dist, got = index.search_two_stage(q_codes, q_desc, 5, 40, filters)
        for q in range(2):
            ok = live & (np.array([m["colour"] == "red" for m in meta]) if filters else True)
            hd = C.hamming(q_sign[q:q + 1], sign_codes(desc, mean))[0]
            rows = np.flatnonzero(ok)
            cand = rows[np.lexsort((ids[rows], hd[rows]))][:40]  # (distance, id) order
            ref = rerank_reference(q_desc[q], ids[cand], desc[cand], 5)
            assert np.array_equal(got[q], ref[1]) and np.allclose(scores[q], ref[0], atol=1e-5)
            pos = [int(np.flatnonzero(ids == i)[0]) for i in got[q]]
            assert dist[q].tolist() == C.hamming(q_codes[q:q + 1], codes[pos])[0].tolist()
    index.close()


def test_descriptor_net_pooled_part_is_the_backbone_features():
    from fashionhash.models.backbones import build_backbone
    from fashionhash.models.descriptor import DescriptorNet, descriptor_dim

    backbone = build_backbone("efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        both = DescriptorNet(backbone, pooled=True).eval().embed(x)
        alone = DescriptorNet(backbone).eval().embed(x)
        feats = backbone.embed(x)
    assert both.shape == (2, 1280 + descriptor_dim(backbone)) and descriptor_dim(backbone) == 1280 + 320
    assert torch.allclose(both[:, :1280], feats, atol=1e-5)
    assert torch.allclose(both[:, 1280:], alone, atol=1e-5)
    # two L2-normalised parts: GeM of the head map, GeM of the last block
    assert torch.allclose(alone[:, :1280].norm(dim=1), torch.ones(2), atol=1e-4)
    assert torch.allclose(alone[:, 1280:].norm(dim=1), torch.ones(2), atol=1e-4)
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        DescriptorNet(build_backbone("small_cnn"))


def test_granularity_gains_hand_worked():
    from fashionhash.evaluation.metrics import granularity_gains

    q = {"type": ["shoe", "bag"], "colour": ["red", ""]}
    g = {"type": ["shoe", "shoe", "bag", "bag"], "colour": ["red", "blue", "", "red"]}
    gains = granularity_gains([1, 2], q, g, "type", ["colour"])
    # query 0: item 1 is its product (3); item 0 same type + colour (2); bags 0
    # query 1: item 2 is its product; item 3 same type, colour missing on the query: never matches
    assert gains.tolist() == [[2, 3, 0, 0], [0, 0, 3, 1]]


def test_ndcg_from_order_equals_ndcg_of_the_distance_ranking():
    from fashionhash.evaluation.metrics import ndcg_at_k, ndcg_from_order

    rng = np.random.default_rng(0)
    dist = rng.integers(0, 6, size=(20, 50))
    gains = rng.integers(0, 4, size=(20, 50)).astype(np.float32)
    order = np.argsort(dist, axis=1, kind="stable")
    assert ndcg_from_order(order, gains, 10) == pytest.approx(ndcg_at_k(dist, gains, 10))
    worst = np.argsort(gains, axis=1, kind="stable")
    assert ndcg_from_order(worst, gains, 10) < ndcg_from_order(np.argsort(-gains, axis=1), gains, 10) == 1.0


def _views_with_nuisance(seed: int, n: int = 300, d: int = 24, n_views: int = 3, noise_seed: int | None = None):
    """Items in the first 8 dimensions, large per-view nuisance in the other 16: whitening
    keeps the nuisance (it has the variance), a learned projection should drop it."""
    items = np.zeros((n, d), np.float32)
    items[:, :8] = np.random.default_rng(seed).normal(size=(n, 8))
    rng = np.random.default_rng(seed + 1 if noise_seed is None else noise_seed)
    return [items + np.concatenate([0.05 * rng.normal(size=(n, 8)), 3.0 * rng.normal(size=(n, d - 8))], 1)
            .astype(np.float32) for _ in range(n_views)]


@pytest.mark.parametrize("loss", ["item", "sgml"])
def test_learned_projection_finds_the_views_of_an_item_better_than_whitening(loss):
    from fashionhash.training.descriptor import learn_projection

    views = _views_with_nuisance(0)
    # sgml: every item its own class (the synthetic attributes would carry no geometry), one
    # missing attribute: the granularity is then 1 for two views of an item, else 0
    labels = np.stack([np.arange(300), np.full(300, -1)], 1)
    start = Whitening.fit(np.concatenate(views), 12)
    learned = learn_projection(start, views, epochs=40, lr=0.02, batch=128, loss=loss, labels=labels)
    fresh = _views_with_nuisance(0, n_views=2, noise_seed=99)  # the same items, views not trained on
    query, gallery, true = fresh[1][:100], fresh[0], np.arange(100)

    def hits(m):
        return descriptor_only_hits(m(query), quantize(m(gallery)), true)[1]

    assert hits(learned) > hits(start) + 0.2


def test_learned_projection_refuses_bad_settings():
    from fashionhash.training.descriptor import learn_projection

    views = _views_with_nuisance(1, n=20)
    start = Whitening.fit(np.concatenate(views), 4)
    with pytest.raises(ValueError, match="one of item, sgml"):
        learn_projection(start, views, epochs=1, loss="arcface")
    with pytest.raises(ValueError, match="needs labels"):
        learn_projection(start, views, epochs=1, loss="sgml")
