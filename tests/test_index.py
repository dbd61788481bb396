"""Hamming index backends against a slow, obvious numpy reference.

Every in-process backend in the registry is checked (external services such as Milvus
have their own file), so a newly registered backend is covered without edits here.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fashionhash.index import (
    INDEXES,
    PAD_DISTANCE,
    BinaryIndex,
    HashIndex,
    IndexFormatError,
    MIHIndex,
    open_index,
    use_kernel,
)
from fashionhash.index import _kernel
from fashionhash.index._kernel import to_words
from fashionhash.index.persist import MAGIC

LOCAL_BACKENDS = [n for n in INDEXES.names() if not INDEXES.get(n).external]
# Extra configurations worth the whole suite: MIH with an unlimited budget never falls
# back to its scan, so every query goes through the hash tables even on tiny test sets.
VARIANTS = {"mih-tables": ("mih", {"budget": float("inf")})}
CONFIGS = LOCAL_BACKENDS + list(VARIANTS)


def make(name: str, n_bits: int, **options) -> BinaryIndex:
    name, defaults = VARIANTS.get(name, (name, {}))
    if name == "faiss":
        pytest.importorskip("faiss")
    return INDEXES.build(name, n_bits=n_bits, **{**defaults, **options})


# ---------------------------------------------------------------------------------------
# data and the reference


def random_codes(rng, n: int, n_bits: int) -> np.ndarray:
    return np.packbits(rng.integers(0, 2, (n, n_bits)).astype(bool), axis=1)


def clustered_codes(rng, n: int, n_bits: int, n_centres: int = 12, max_flips: int = 4) -> np.ndarray:
    centres = rng.integers(0, 2, (n_centres, n_bits)).astype(bool)
    bits = centres[rng.integers(0, n_centres, n)]
    for row in bits:
        flips = rng.choice(n_bits, rng.integers(0, max_flips + 1), replace=False)
        row[flips] ^= True
    return np.packbits(bits, axis=1)


def near(rng, codes: np.ndarray, n_bits: int, n: int, flips: int = 2) -> np.ndarray:
    bits = np.unpackbits(codes[rng.integers(0, codes.shape[0], n)], axis=1, count=n_bits).astype(bool)
    for row in bits:
        row[rng.choice(n_bits, flips, replace=False)] ^= True
    return np.packbits(bits, axis=1)


def ref_distances(q: np.ndarray, db: np.ndarray, n_bits: int) -> np.ndarray:
    qb = np.unpackbits(q, axis=1, count=n_bits)
    dbb = np.unpackbits(db, axis=1, count=n_bits)
    return (qb[:, None, :] != dbb[None, :, :]).sum(axis=2)


def ref_knn(ids, db, q, k, n_bits):
    """k nearest by (distance, id), padded: the behaviour every backend must reproduce."""
    dist = ref_distances(q, db, n_bits) if len(ids) else np.zeros((len(q), 0), int)
    out_d = np.full((len(q), k), PAD_DISTANCE, np.int64)
    out_i = np.full((len(q), k), -1, np.int64)
    for j in range(len(q)):
        best = sorted(zip(dist[j].tolist(), np.asarray(ids).tolist()))[:k]
        for c, (d, i) in enumerate(best):
            out_d[j, c], out_i[j, c] = d, i
    return out_d, out_i


def ref_radius(ids, db, q, r, n_bits):
    dist = ref_distances(q, db, n_bits) if len(ids) else np.zeros((len(q), 0), int)
    out = []
    for j in range(len(q)):
        hits = sorted((d, i) for d, i in zip(dist[j].tolist(), np.asarray(ids).tolist()) if d <= r)
        out.append(([d for d, _ in hits], [i for _, i in hits]))
    return out


def assert_knn(index, ids, db, q, k, n_bits, filter_ids=None):
    d, i = index.search(q, k, filter_ids=filter_ids)
    assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == i.shape == (len(q), k)
    if filter_ids is not None:
        keep = np.isin(ids, np.asarray(list(filter_ids), dtype=np.int64))
        ids, db = np.asarray(ids)[keep], db[keep]
    rd, ri = ref_knn(ids, db, q, k, n_bits)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(d, rd)


def assert_radius(index, ids, db, q, r, n_bits, filter_ids=None):
    got = index.radius_search(q, r, filter_ids=filter_ids)
    if filter_ids is not None:
        keep = np.isin(ids, np.asarray(list(filter_ids), dtype=np.int64))
        ids, db = np.asarray(ids)[keep], db[keep]
    want = ref_radius(ids, db, q, r, n_bits)
    assert len(got) == len(q)
    for (gd, gi), (wd, wi) in zip(got, want):
        assert gd.dtype == np.int32 and gi.dtype == np.int64
        assert gi.tolist() == wi and gd.tolist() == wd


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("backend", CONFIGS)
@pytest.mark.parametrize("n_bits", [16, 32, 64, 128])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_matches_reference(backend, n_bits, data, rng):
    n = 700
    db = random_codes(rng, n, n_bits) if data == "random" else clustered_codes(rng, n, n_bits)
    ids = rng.choice(10 * n, n, replace=False)
    q = np.concatenate([near(rng, db, n_bits, 10, flips=1), db[:5], random_codes(rng, 5, n_bits)])
    index = make(backend, n_bits)
    index.add(ids, db)
    assert len(index) == n
    for k in (1, 7, 60):
        assert_knn(index, ids, db, q, k, n_bits)
    assert_radius(index, ids, db, q, max(2, n_bits // 8), n_bits)
    assert_radius(index, ids, db, q, 0, n_bits)
    assert_radius(index, ids, db, q, n_bits, n_bits)  # everything: output buffers must grow


@pytest.mark.parametrize("backend", CONFIGS)
def test_adversarial_cases(backend, rng):
    n_bits = 64
    # all codes equal: the order is decided by ids alone
    same = np.repeat(random_codes(rng, 1, n_bits), 80, axis=0)
    ids = rng.choice(1000, 80, replace=False)
    index = make(backend, n_bits)
    index.add(ids, same)
    assert_knn(index, ids, same, same[:3], 10, n_bits)
    assert_radius(index, ids, same, same[:2], 0, n_bits)
    # k larger than the index: padded with (PAD_DISTANCE, -1)
    d, i = index.search(same[:2], 100)
    assert (i[:, 80:] == -1).all() and (d[:, 80:] == PAD_DISTANCE).all()
    assert_knn(index, ids, same, random_codes(rng, 3, n_bits), 100, n_bits)
    # duplicate codes in pairs
    base = random_codes(rng, 40, n_bits)
    dup = np.concatenate([base, base])
    dup_ids = np.arange(80)[::-1].copy()
    index = make(backend, n_bits)
    index.add(dup_ids, dup)
    assert_knn(index, dup_ids, dup, base[:5], 3, n_bits)
    # k = 0
    d, i = index.search(base[:2], 0)
    assert d.shape == i.shape == (2, 0)


@pytest.mark.parametrize("backend", CONFIGS)
def test_empty_index(backend, rng):
    index = make(backend, 32)
    q = random_codes(rng, 3, 32)
    d, i = index.search(q, 5)
    assert (i == -1).all() and (d == PAD_DISTANCE).all()
    assert [r[1].size for r in index.radius_search(q, 32)] == [0, 0, 0]
    assert len(index) == 0 and index.ids().size == 0
    # emptied by removals
    index.add([3, 4], q[:2])
    assert index.remove([3, 4, 99]) == 2
    d, i = index.search(q, 5)
    assert (i == -1).all() and len(index) == 0


@pytest.mark.parametrize("backend", CONFIGS)
def test_removed_ids_never_returned(backend, rng):
    n_bits, n = 64, 600
    db = clustered_codes(rng, n, n_bits)
    ids = np.arange(n) * 3 + 1
    index = make(backend, n_bits)
    index.add(ids, db)
    q = np.concatenate([db[:10], near(rng, db, n_bits, 10)])
    index.search(q, 5)  # build derived structures before removing
    gone = ids[rng.choice(n, 40, replace=False)]  # few: tombstones
    assert index.remove(gone) == 40
    assert index.remove(gone) == 0
    keep = ~np.isin(ids, gone)
    assert len(index) == keep.sum()
    assert_knn(index, ids[keep], db[keep], q, 10, n_bits)
    assert_radius(index, ids[keep], db[keep], q, 6, n_bits)
    more = ids[keep][: n // 2]  # many: forces consolidation
    index.remove(more)
    keep &= ~np.isin(ids, more)
    assert_knn(index, ids[keep], db[keep], q, 10, n_bits)
    # a removed id can come back with a new code
    index.add([gone[0]], db[:1])
    ids2, db2 = np.append(ids[keep], gone[0]), np.concatenate([db[keep], db[:1]])
    assert_knn(index, ids2, db2, q, 10, n_bits)
    np.testing.assert_array_equal(index.ids(), np.sort(ids2))


@pytest.mark.parametrize("backend", CONFIGS)
def test_incremental_adds_match_bulk(backend, rng):
    n_bits = 32
    db = clustered_codes(rng, 900, n_bits)
    ids = rng.choice(100000, 900, replace=False)
    q = near(rng, db, n_bits, 12)
    index = make(backend, n_bits)
    index.add(ids[:600], db[:600])
    assert_knn(index, ids[:600], db[:600], q, 9, n_bits)
    for a in range(600, 900, 50):  # small batches land in the unsorted tail
        index.add(ids[a : a + 50], db[a : a + 50])
        assert_knn(index, ids[: a + 50], db[: a + 50], q, 9, n_bits)
    assert_radius(index, ids, db, q, 3, n_bits)


def test_non_byte_aligned_bits(rng):
    for backend in CONFIGS:
        index = make(backend, 12)
        db = random_codes(rng, 300, 12)
        index.add(np.arange(300), db)
        assert_knn(index, np.arange(300), db, db[:6], 8, 12)
        assert_radius(index, np.arange(300), db, db[:6], 2, 12)


# ---------------------------------------------------------------------------------------
# MIH specifics


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_mih_table_counts(m, rng):
    """Exact for any number of substrings, including the table-only path (no fallback)."""
    n_bits = 32 if m == 1 else 64
    db = clustered_codes(rng, 1500, n_bits, n_centres=20)
    ids = rng.choice(10**6, 1500, replace=False)
    q = np.concatenate([near(rng, db, n_bits, 15), random_codes(rng, 5, n_bits)])
    index = MIHIndex(n_bits, m=m, budget=float("inf"))
    index.add(ids, db)
    assert_knn(index, ids, db, q, 1, n_bits)
    assert_knn(index, ids, db, q, 25, n_bits)
    assert index.m == m and index.last_stats["probes"] > 0
    assert_radius(index, ids, db, q, 5, n_bits)
    # rows added after the tables were built are searched too, merged by (distance, id)
    extra = near(rng, db, n_bits, 100, flips=1)
    extra_ids = 10**6 + np.arange(100)
    index.add(extra_ids, extra)
    all_ids, all_db = np.concatenate([ids, extra_ids]), np.concatenate([db, extra])
    assert_knn(index, all_ids, all_db, q, 25, n_bits)
    assert_radius(index, all_ids, all_db, q, 4, n_bits)


@pytest.mark.parametrize("backend", ["flat", "mih-tables"])
def test_radius_with_huge_result_sets(backend, rng):
    """More hits than the kernels' first output buffer, for one query and for many."""
    db = np.repeat(random_codes(rng, 2, 32), 3000, axis=0)
    ids = rng.choice(10**6, 6000, replace=False)
    index = make(backend, 32)
    index.add(ids, db)
    assert_radius(index, ids, db, db[[0, 3000, 1]], 0, 32)
    assert_radius(index, ids, db, np.repeat(db[:1], 40, axis=0), 1, 32)


def test_mih_falls_back_on_random_codes(rng):
    n_bits = 64
    db = random_codes(rng, 3000, n_bits)
    index = MIHIndex(n_bits, m=2)
    index.add(np.arange(3000), db)
    q = random_codes(rng, 10, n_bits)
    assert_knn(index, np.arange(3000), db, q, 20, n_bits)
    assert index.last_stats["fallbacks"] == 10  # far neighbours: scanning is cheaper
    assert_radius(index, np.arange(3000), db, q, 20, n_bits)
    # near queries stay in the tables
    assert_knn(index, np.arange(3000), db, db[:10], 1, n_bits)
    assert index.last_stats["fallbacks"] == 0


@pytest.mark.parametrize("backend", ["flat", "mih"])
def test_numpy_kernels_agree(backend, rng):
    """The pure-numpy fallback gives the same answers as the C kernels."""
    n_bits = 64
    db = clustered_codes(rng, 800, n_bits)
    ids = rng.choice(10**5, 800, replace=False)
    q = np.concatenate([near(rng, db, n_bits, 8), random_codes(rng, 4, n_bits)])
    opts = {"budget": float("inf")} if backend == "mih" else {}
    with use_kernel("numpy"):
        index = make(backend, n_bits, **opts)
        index.add(ids, db)
        index.add(10**6 + np.arange(20), db[:20])  # tail rows
        index.remove(ids[:5])  # tombstones
        np_res = index.search(q, 15), index.radius_search(q, 6)
    ids2 = np.concatenate([ids[5:], 10**6 + np.arange(20)])
    db2 = np.concatenate([db[5:], db[:20]])
    assert_knn(index, ids2, db2, q, 15, n_bits)
    np.testing.assert_array_equal(np_res[0][1], index.search(q, 15)[1])
    for (a, b), (c, d) in zip(np_res[1], index.radius_search(q, 6)):
        np.testing.assert_array_equal(b, d)


# ---------------------------------------------------------------------------------------
# codes shared by many items (what a trained model gives): MIH's per-code tables


def shared_codes(rng, n: int, n_bits: int, n_codes: int = 60) -> np.ndarray:
    """``n`` items on ``n_codes`` clustered codes with skewed (Zipf-like) popularity: a few
    codes carry hundreds of items, most carry a handful, as when a trained hash collapses
    each clothing type onto a few codes."""
    codes = clustered_codes(rng, n_codes, n_bits, n_centres=6, max_flips=3)
    weight = 1.0 / np.arange(1, n_codes + 1) ** 1.2
    return codes[rng.choice(n_codes, n, p=weight / weight.sum())]


@pytest.mark.parametrize("kernel", ["c", "numpy"])
@pytest.mark.parametrize("n_bits", [32, 64, 128])
def test_mih_on_shared_codes_matches_reference(kernel, n_bits, rng, tmp_path):
    """Ties broken by id, filters, tombstones, rows added after the build and a save/open
    round trip, all on codes shared by hundreds of items each."""
    n = 2500
    db = shared_codes(rng, n, n_bits)
    ids = rng.choice(10**6, n, replace=False)  # id order unrelated to insertion order
    q = np.concatenate([db[:8], near(rng, db, n_bits, 8, flips=1), near(rng, db, n_bits, 4, flips=3),
                        random_codes(rng, 3, n_bits)])
    with use_kernel(kernel):
        index = MIHIndex(n_bits)
        index.add(ids, db)
        index.build()
        assert index._tables.n_codes <= 60 < index._tables.n_indexed  # grouped by code
        for k in (1, 10, 100, n + 5):
            assert_knn(index, ids, db, q, k, n_bits)
        for r in range(4):
            assert_radius(index, ids, db, q, r, n_bits)
        sel = ids[rng.random(n) < 0.5]  # a large filter: a row mask over the grouped rows
        assert_knn(index, ids, db, q, 10, n_bits, filter_ids=sel)
        assert_radius(index, ids, db, q, 2, n_bits, filter_ids=sel)
        small = ids[::97]  # a small filter: scanned directly
        assert_knn(index, ids, db, q, 10, n_bits, filter_ids=small)
        gone = ids[rng.choice(n, 150, replace=False)]  # tombstones inside the shared codes
        index.remove(gone)
        keep = ~np.isin(ids, gone)
        assert_knn(index, ids[keep], db[keep], q, 10, n_bits)
        assert_radius(index, ids[keep], db[keep], q, 1, n_bits)
        extra = np.concatenate([db[:20], near(rng, db, n_bits, 20, flips=1)])  # the unsorted tail
        extra_ids = np.concatenate([rng.choice(10**6, 20, replace=False) + 10**6, np.arange(20)])
        extra_ids = extra_ids[~np.isin(extra_ids, ids)]
        index.add(extra_ids, extra[: extra_ids.size])
        all_ids = np.concatenate([ids[keep], extra_ids])
        all_db = np.concatenate([db[keep], extra[: extra_ids.size]])
        assert index._n > index._n_main  # the new rows are not in the tables yet
        assert_knn(index, all_ids, all_db, q, 10, n_bits)
        assert_knn(index, all_ids, all_db, q, 300, n_bits)
        for r in (0, 2, 3):
            assert_radius(index, all_ids, all_db, q, r, n_bits)
        index.save(tmp_path / "shared.fhi")
        again = open_index(tmp_path / "shared.fhi")
        assert_knn(again, all_ids, all_db, q, 25, n_bits)
        assert_radius(again, all_ids, all_db, q, 2, n_bits)


def test_mih_radius_orders_dense_and_sparse_levels(rng):
    """A distance level made of many codes is merged into id order through a bitmap when its
    rows are dense in their span, through a sort when they are sparse: both exact."""
    n_bits = 32
    base = random_codes(rng, 1, n_bits)
    flips = np.packbits(np.eye(n_bits, dtype=bool), axis=1)
    ring = np.concatenate([base, base ^ flips])  # the base code and its 32 neighbours at 1
    dense = ring[rng.integers(0, ring.shape[0], 4000)]  # rows of all 33 codes interleaved
    sparse = np.concatenate([ring, random_codes(rng, 20000, n_bits)])  # one row per code, a wide span
    for db in (dense, sparse):
        ids = rng.choice(10**7, db.shape[0], replace=False)
        index = MIHIndex(n_bits, budget=float("inf"))
        index.add(ids, db)
        assert_radius(index, ids, db, np.concatenate([base, ring[5:7]]), 2, n_bits)
        assert_knn(index, ids, db, np.concatenate([base, ring[5:7]]), 50, n_bits)


# ---------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("backend", CONFIGS)
def test_refuses_bad_input(backend, rng):
    index = make(backend, 64)
    good = random_codes(rng, 4, 64)
    index.add([1, 2, 3, 4], good)
    with pytest.raises(TypeError, match="uint8"):
        index.add([5], good[:1].astype(np.int64))
    with pytest.raises(TypeError, match="uint8"):
        index.search(good.astype(np.float32), 3)
    with pytest.raises(ValueError, match="bytes wide"):
        index.add([5], random_codes(rng, 1, 32))
    with pytest.raises(ValueError, match="bytes wide"):
        index.search(random_codes(rng, 2, 128), 3)
    with pytest.raises(ValueError, match="already in the index"):
        index.add([4, 5], random_codes(rng, 2, 64))
    with pytest.raises(ValueError, match="duplicate ids"):
        index.add([7, 7], random_codes(rng, 2, 64))
    with pytest.raises(ValueError, match="non-negative"):
        index.add([-3], random_codes(rng, 1, 64))
    with pytest.raises(ValueError, match="2 ids for 1 codes"):
        index.add([8, 9], random_codes(rng, 1, 64))
    with pytest.raises(TypeError):
        index.add([1.5], random_codes(rng, 1, 64))
    with pytest.raises(ValueError):
        index.search(good, -1)
    with pytest.raises(ValueError):
        index.radius_search(good, -2)
    assert len(index) == 4  # nothing half-added
    assert_knn(index, [1, 2, 3, 4], good, good, 4, 64)
    odd = make(backend, 12)
    with pytest.raises(ValueError, match="padding bits"):
        odd.add([1], np.array([[0xFF, 0xFF]], dtype=np.uint8))


# ---------------------------------------------------------------------------------------
# persistence


@pytest.mark.parametrize("backend", CONFIGS)
def test_save_load_roundtrip(backend, rng, tmp_path):
    n_bits = 64
    db = clustered_codes(rng, 500, n_bits)
    ids = rng.choice(10**6, 500, replace=False)
    index = make(backend, n_bits)
    index.add(ids, db)
    index.remove(ids[:10])
    q = near(rng, db, n_bits, 10)
    before = index.search(q, 12)
    path = tmp_path / "index.fhi"
    index.save(path)
    assert path.read_bytes().startswith(MAGIC)
    for loaded in (open_index(path), type(index).load(path), BinaryIndex.load(path)):
        assert type(loaded) is type(index) and loaded.n_bits == n_bits and len(loaded) == 490
        assert loaded.options() == index.options()
        after = loaded.search(q, 12)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
    # add to the saved index, save again, reopen: nothing lost
    loaded = open_index(path)
    more = random_codes(rng, 30, n_bits)
    loaded.add(10**7 + np.arange(30), more)
    loaded.save(path)
    again = open_index(path)
    all_ids = np.concatenate([ids[10:], 10**7 + np.arange(30)])
    np.testing.assert_array_equal(again.ids(), np.sort(all_ids))
    assert_knn(again, all_ids, np.concatenate([db[10:], more]), q, 12, n_bits)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_into_another_local_backend(rng, tmp_path):
    db = random_codes(rng, 200, 32)
    flat = make("flat", 32)
    flat.add(np.arange(200), db)
    flat.save(tmp_path / "f.fhi")
    mih = MIHIndex.load(tmp_path / "f.fhi", m=2)
    assert isinstance(mih, MIHIndex) and mih.options()["m"] == 2
    assert_knn(mih, np.arange(200), db, db[:5], 5, 32)


def _saved_index(rng, path, backend="flat"):
    index = make(backend, 64)
    index.add(np.arange(300), random_codes(rng, 300, 64))
    index.save(path)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 5, 20, 60, 100, -200, -1])
def test_truncated_file_is_refused(cut, rng, tmp_path):
    path = tmp_path / "index.fhi"
    data = _saved_index(rng, path)
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(IndexFormatError, match="truncated|header"):
        open_index(path)


@pytest.mark.parametrize("where", [0, 9, 13, 17, 30, 60, 200, 2000, -1])
def test_corrupted_byte_is_refused(where, rng, tmp_path):
    path = tmp_path / "index.fhi"
    data = bytearray(_saved_index(rng, path, backend="mih"))
    data[where] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError):
        open_index(path)


def test_other_files_are_refused(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("hello, this is not an index file at all" * 3)
    for name in ("empty", "text"):
        with pytest.raises(IndexFormatError):
            open_index(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        open_index(tmp_path / "missing")


def test_trailing_bytes_are_refused(rng, tmp_path):
    path = tmp_path / "index.fhi"
    path.write_bytes(_saved_index(rng, path) + b"\0")
    with pytest.raises(IndexFormatError, match="trailing"):
        open_index(path)


def _run(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("crash_at", ["write", "replace"])
def test_crash_during_save_keeps_previous_file(crash_at, rng, tmp_path):
    path = tmp_path / "index.fhi"
    original = _saved_index(rng, path, backend="mih")
    proc = _run(
        f"""
        import os, numpy as np
        from fashionhash.index import open_index
        index = open_index({str(path)!r})
        index.add(10**6 + np.arange(5000), np.random.default_rng(0).integers(0, 256, (5000, 8), dtype=np.uint8))
        if {crash_at!r} == "write":
            os.fsync = lambda fd: os._exit(9)   # die with the new file half written
        else:
            os.replace = lambda a, b: os._exit(9)  # die just before the switch
        index.save({str(path)!r})
        """,
        tmp_path,
    )
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == original
    assert len(open_index(path)) == 300


def test_killed_during_bulk_add_keeps_saved_catalogue(rng, tmp_path):
    """A process killed while adding (and while saving) leaves the last save intact."""
    cat = HashIndex("mih", 64, tmp_path / "cat")
    db = random_codes(rng, 200, 64)
    cat.add(np.arange(200), db, [{"gender": "Women"}] * 200)
    cat.save()
    cat.close()
    proc = _run(
        f"""
        import os, numpy as np
        from fashionhash.index import HashIndex
        cat = HashIndex.open({str(tmp_path / "cat")!r})
        rng = np.random.default_rng(0)
        for a in range(0, 20000, 1000):
            cat.add(10**6 + np.arange(a, a + 1000), rng.integers(0, 256, (1000, 8), dtype=np.uint8),
                    [{{"gender": "Men"}}] * 1000)
            if a == 10000:
                os.fsync = lambda fd: os._exit(9)   # killed in the middle of save()
                cat.save()
        """,
        tmp_path,
    )
    assert proc.returncode == 9, proc.stderr
    reopened = HashIndex.open(tmp_path / "cat")
    assert len(reopened) == 200
    assert reopened.filter_ids({"gender": "Men"}).size == 0
    assert_knn(reopened.index, np.arange(200), db, db[:5], 5, 64)
    assert len(list((tmp_path / "cat").glob("codes-*.fhi"))) == 1


def test_failed_bulk_add_changes_nothing(rng, tmp_path):
    cat = HashIndex("flat", 32, tmp_path / "cat")
    db = random_codes(rng, 50, 32)
    cat.add(np.arange(50), db, [{"colour": "Red"}] * 50)
    cat.save()
    bad_meta = [{"colour": "Blue"}] * 9 + [{"colour": object()}]
    with pytest.raises(TypeError, match="JSON"):
        cat.add(100 + np.arange(10), random_codes(rng, 10, 32), bad_meta)
    with pytest.raises(ValueError, match="already"):
        cat.add([49, 50], random_codes(rng, 2, 32), [{"colour": "Blue"}] * 2)
    assert len(cat) == 50 and cat.filter_ids({"colour": "Blue"}).size == 0
    # the backend failing midway: metadata rolled back with it
    original = cat.index.add

    def exploding_add(ids, codes):
        original(ids, codes)
        raise RuntimeError("disk on fire")

    cat.index.add = exploding_add
    with pytest.raises(RuntimeError):
        cat.add(200 + np.arange(5), random_codes(rng, 5, 32), [{"colour": "Green"}] * 5)
    cat.index.add = original
    assert cat.filter_ids({"colour": "Green"}).size == 0
    cat.close()
    reopened = HashIndex.open(tmp_path / "cat")
    assert len(reopened) == 50 and reopened.get(7)["colour"] == "Red"


# ---------------------------------------------------------------------------------------
# metadata and filtered search

GENDERS = ["Men", "Women", "Boys", "Girls", "Unisex"]
CATEGORIES = ["Apparel", "Accessories", "Footwear", "Personal Care"]


def _catalogue(rng, n, n_bits):
    db = clustered_codes(rng, n, n_bits, n_centres=15)
    ids = rng.choice(10**6, n, replace=False)
    meta = [
        {
            "gender": GENDERS[rng.integers(0, 5)] if j % 97 else "Girls",
            "masterCategory": CATEGORIES[rng.integers(0, 4)],
            "year": int(rng.integers(2010, 2019)),
            "image_path": f"images/{ids[j]}.jpg",
        }
        for j in range(n)
    ]
    return db, ids, meta


@pytest.mark.parametrize("backend", CONFIGS)
def test_filtered_search_matches_reference(backend, rng, tmp_path):
    n_bits, n = 64, 1200
    db, ids, meta = _catalogue(rng, n, n_bits)
    cat = HashIndex(make(backend, n_bits), path=tmp_path / "cat")
    cat.add(ids, db, meta)
    q = near(rng, db, n_bits, 12)
    for filters in (
        {"gender": "Women"},
        {"gender": "Women", "masterCategory": "Apparel"},
        {"gender": ["Men", "Boys"]},
        {"year": 2015},
        {"gender": "Girls", "masterCategory": "Footwear"},  # tiny subset
        {"gender": "Nobody"},
    ):
        allowed = ids[
            [
                all(str(m[k]) in ([str(v)] if isinstance(v, (str, int)) else [str(x) for x in v]) for k, v in filters.items())
                for m in meta
            ]
        ]
        np.testing.assert_array_equal(cat.filter_ids(filters), np.sort(allowed))
        d, i = cat.search(q, 10, filters)
        rd, ri = ref_knn(ids[np.isin(ids, allowed)], db[np.isin(ids, allowed)], q, 10, n_bits)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(d, rd)
        got = cat.radius_search(q, 8, filters)
        want = ref_radius(ids[np.isin(ids, allowed)], db[np.isin(ids, allowed)], q, 8, n_bits)
        assert [g[1].tolist() for g in got] == [w[1] for w in want]
    with pytest.raises(ValueError, match="unknown filter keys"):
        cat.search(q, 5, {"colour": "Red"})
    # unfiltered equals the plain index
    assert_knn(cat.index, ids, db, q, 10, n_bits)


def test_metadata_get_query_and_persistence(rng, tmp_path):
    db, ids, meta = _catalogue(rng, 300, 32)
    cat = HashIndex("mih", 32, tmp_path / "cat")
    cat.add(ids, db, meta)
    assert cat.get(ids[3]) == {"id": int(ids[3]), **meta[3]}
    with pytest.raises(KeyError):
        cat.get(-5)
    hits = cat.query(db[:2], 3, {"masterCategory": "Apparel"})
    assert len(hits) == 2 and all(h["masterCategory"] == "Apparel" for h in hits[0])
    assert hits[0][0]["distance"] <= hits[0][-1]["distance"]
    assert "image_path" in hits[0][0]
    cat.remove(ids[:50])
    with pytest.raises(KeyError):
        cat.get(ids[0])
    cat.save()
    cat.add([10**7], db[:1], [{"gender": "Men", "image_path": "x.jpg"}])
    cat.save()
    cat.close()
    again = HashIndex.open(tmp_path / "cat")
    assert len(again) == 251 and again.get(10**7)["image_path"] == "x.jpg"
    assert again.get_many([ids[60], -1])[1] is None
    assert again.known_keys() == {"gender", "masterCategory", "year"}
    assert len(list((tmp_path / "cat").glob("codes-*.fhi"))) == 1
    with pytest.raises(FileExistsError):
        HashIndex("mih", 32, tmp_path / "cat")
    # unsaved changes are not visible after reopening
    again.add([10**7 + 1], db[:1])
    again.close()
    assert len(HashIndex.open(tmp_path / "cat")) == 251


def test_in_memory_catalogue(rng):
    db, ids, meta = _catalogue(rng, 100, 16)
    cat = HashIndex("flat", 16)
    cat.add(ids, db, meta)
    assert_knn(cat.index, ids, db, db[:3], 4, 16)
    with pytest.raises(ValueError, match="in memory"):
        cat.save()


# ---------------------------------------------------------------------------------------
# faiss approximate kinds


@pytest.mark.parametrize("kind", ["hash", "multihash"])
def test_faiss_hash_kinds_are_valid(kind, rng):
    pytest.importorskip("faiss")
    n_bits = 64
    db = clustered_codes(rng, 2000, n_bits, n_centres=10, max_flips=2)
    ids = rng.choice(10**6, 2000, replace=False)
    index = make("faiss", n_bits, kind=kind, hash_bits=16, nflip=2)
    index.add(ids, db)
    assert not index.exact
    q = near(rng, db, n_bits, 20, flips=1)
    d, i = index.search(q, 10)
    true = ref_distances(q, db, n_bits)
    lookup = {int(x): j for j, x in enumerate(ids)}
    for j in range(len(q)):
        valid = i[j] >= 0
        got = [(int(a), int(b)) for a, b in zip(d[j][valid], i[j][valid])]
        assert got == sorted(got)  # (distance, id) order
        assert all(true[j, lookup[b]] == a for a, b in got)  # true distances
    rd, ri = ref_knn(ids, db, q, 10, n_bits)
    # tie-aware recall: a hit counts when it is as close as the true 10th neighbour
    recall = np.mean((i >= 0) & (d <= rd[:, -1:]))
    assert recall >= 0.9
    # filtered search is exact even for approximate kinds (scan of the subset)
    assert_knn(index, ids, db, q, 10, n_bits, filter_ids=ids[::7])


def test_registry_and_errors():
    assert {"flat", "mih", "faiss", "milvus"} <= set(INDEXES.names())
    with pytest.raises(KeyError, match="unknown index backend"):
        INDEXES.build("nope", n_bits=8)
    with pytest.raises(ValueError):
        make("flat", 0)
    with pytest.raises(ValueError):
        MIHIndex(64, m=1)  # 64-bit substrings cannot be direct keys
    assert math.isinf(MIHIndex(64, budget=float("inf")).options()["budget"])


@pytest.mark.parametrize("n_bits", [32, 64, 128])
def test_scan_of_a_large_part_of_the_rows_matches_numpy(n_bits, rng):
    """k-NN for k a large part of n (a two-stage shortlist) selects by distance histogram in
    C: the same (distance, id) order as the numpy scan, ties at the k-th distance by id,
    ids in any row order, a mask, fewer rows than k."""
    n = 1200
    db = to_words(shared_codes(rng, n, n_bits))
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    q = to_words(np.concatenate([shared_codes(rng, 4, n_bits), random_codes(rng, 2, n_bits)]))
    mask = rng.random(n) < 0.7
    for k in (n // _kernel.SELECT_FRACTION, n // 3, n - 1, n + 5):
        for allowed in (None, mask):
            with use_kernel("numpy"):
                want = _kernel.scan_knn(db, ids, allowed, q, k)
            with use_kernel("c"):
                got = _kernel.scan_knn(db, ids, allowed, q, k)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    sorted_ids = np.arange(n, dtype=np.int64)  # rows already in id order: no sort needed
    with use_kernel("c"):
        got = _kernel.scan_knn(db, sorted_ids, None, q, n // 2)
    with use_kernel("numpy"):
        np.testing.assert_array_equal(got[1], _kernel.scan_knn(db, sorted_ids, None, q, n // 2)[1])
