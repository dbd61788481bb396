"""The ``milvus`` backend on embedded Milvus Lite and on a real Milvus server (optional extra).

Needs ``pip install 'fashionhash[milvus]'`` (pymilvus 2.5, milvus-lite 2.5.1 and the
standalone server ``milvus==2.3.5``); skipped otherwise, or when Milvus cannot start here.
The server is started once per session (``milvus_server`` in conftest.py, see
``tests/milvus_server.py``); each test uses its own collection. ``flat`` is the reference.
"""
from __future__ import annotations

import itertools
import time
import warnings

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")

from fashionhash.index import (  # noqa: E402
    INDEXES,
    FlatIndex,
    HashIndex,
    IndexFormatError,
    MilvusIndex,
    open_index,
)

from test_index import (  # noqa: E402
    assert_knn,
    assert_radius,
    clustered_codes,
    near,
    random_codes,
)

_names = (f"c{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("milvus") / "lite.db")
    warnings.filterwarnings("ignore", category=UserWarning, module="milvus_lite")
    try:
        probe = MilvusIndex(64, uri=uri, collection="probe")
        probe.drop()
    except Exception as exc:  # noqa: BLE001 - any start-up failure means "cannot test here"
        pytest.skip(f"Milvus Lite cannot start here: {type(exc).__name__}: {exc}")
    return uri


@pytest.fixture(params=["lite", "server"])
def uri(request) -> str:
    """The same tests on an embedded Milvus Lite file and on the session's server."""
    if request.param == "lite":
        return request.getfixturevalue("lite_uri")
    return request.getfixturevalue("milvus_server").uri


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def flat_of(ids, codes, n_bits: int) -> FlatIndex:
    ref = FlatIndex(n_bits)
    ref.add(ids, codes)
    return ref


def assert_same_as(index, ref, q, k: int, radius: int, filter_ids=None) -> None:
    """k-NN and radius results of ``index`` equal those of the reference index."""
    for got, want in zip(index.search(q, k, filter_ids), ref.search(q, k, filter_ids)):
        np.testing.assert_array_equal(got, want)
    for (gd, gi), (wd, wi) in zip(index.radius_search(q, radius, filter_ids),
                                  ref.radius_search(q, radius, filter_ids), strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gd, wd)


def test_registered_as_external():
    assert "milvus" in INDEXES.names() and INDEXES.get("milvus").external
    with pytest.raises(ValueError, match="uri"):
        MilvusIndex(64)


# the server pays ~10 s a case: one code length there (16 bits still runs on Lite)
@pytest.mark.parametrize(("uri", "n_bits"), [("lite", 16), ("lite", 64), ("server", 64)], indirect=["uri"])
def test_matches_reference(uri, rng, n_bits):
    db = clustered_codes(rng, 300, n_bits)
    ids = rng.choice(10**6, 300, replace=False)
    index = MilvusIndex(n_bits, uri=uri, collection=next(_names))
    index.add(ids, db)
    assert len(index) == 300
    q = np.concatenate([near(rng, db, n_bits, 6), db[:3], random_codes(rng, 3, n_bits)])
    for k in (1, 10, 40):
        assert_knn(index, ids, db, q, k, n_bits)
    assert_radius(index, ids, db, q, 3, n_bits)
    assert_knn(index, ids, db, q, 10, n_bits, filter_ids=ids[::5])
    assert_radius(index, ids, db, q, 4, n_bits, filter_ids=ids[::3])
    # all-equal codes: ties broken by id even though Milvus orders them arbitrarily
    same = np.repeat(db[:1], 50, axis=0)
    eq = MilvusIndex(n_bits, uri=uri, collection=next(_names))
    eq.add(np.arange(50)[::-1].copy(), same)
    assert_knn(eq, np.arange(50)[::-1], same, same[:2], 7, n_bits)
    d, i = eq.search(same[:1], 60)
    assert (i[0, 50:] == -1).all()


def test_remove_duplicates_and_validation(uri, rng):
    db = random_codes(rng, 100, 64)
    index = MilvusIndex(64, uri=uri, collection=next(_names))
    index.add(np.arange(100), db)
    with pytest.raises(ValueError, match="already in the index"):
        index.add([5, 500], random_codes(rng, 2, 64))
    with pytest.raises(TypeError):
        index.add([501], db[:1].astype(np.int16))
    with pytest.raises(ValueError, match="bytes wide"):
        index.add([501], random_codes(rng, 1, 32))
    assert index.remove([1, 2, 3, 1000]) == 3
    assert len(index) == 97
    keep = np.setdiff1d(np.arange(100), [1, 2, 3])
    assert_knn(index, keep, db[keep], db[:5], 5, 64)
    np.testing.assert_array_equal(index.ids(), keep)
    np.testing.assert_array_equal(index.get_codes([7, 0]), db[[7, 0]])


def test_manifest_roundtrip(uri, rng, tmp_path):
    db = random_codes(rng, 80, 32)
    name = next(_names)
    index = MilvusIndex(32, uri=uri, collection=name)
    index.add(np.arange(80), db)
    index.save(tmp_path / "m.fhi")
    again = open_index(tmp_path / "m.fhi")
    assert isinstance(again, MilvusIndex) and len(again) == 80 and again.options()["collection"] == name
    assert_knn(again, np.arange(80), db, db[:4], 6, 32)
    data = bytearray((tmp_path / "m.fhi").read_bytes())
    data[-3] ^= 1
    (tmp_path / "m.fhi").write_bytes(bytes(data))
    with pytest.raises(IndexFormatError):
        open_index(tmp_path / "m.fhi")


def test_bit_length_mismatch_and_missing_collection(uri, rng, tmp_path):
    name = next(_names)
    index = MilvusIndex(32, uri=uri, collection=name)
    index.add(np.arange(5), random_codes(rng, 5, 32))
    with pytest.raises(ValueError, match="does not hold 64-bit codes"):
        MilvusIndex(64, uri=uri, collection=name)
    index.save(tmp_path / "m.fhi")
    index.drop()
    # the manifest's collection is gone: an error, never a silently empty index
    with pytest.raises(FileNotFoundError, match="rebuild"):
        open_index(tmp_path / "m.fhi")


def test_catalogue_with_milvus(uri, rng, tmp_path):
    db = clustered_codes(rng, 200, 64)
    ids = np.arange(200) * 2
    meta = [{"gender": ["Men", "Women"][j % 2], "image_path": f"{j}.jpg"} for j in range(200)]
    cat = HashIndex("milvus", 64, tmp_path / "cat", uri=uri, collection=next(_names))
    cat.add(ids, db, meta)
    q = near(rng, db, 64, 5)
    women = ids[1::2]
    d, i = cat.search(q, 8, {"gender": "Women"})
    assert np.isin(i, women).all()
    assert_knn(cat.index, ids, db, q, 8, 64, filter_ids=women)
    cat.save()
    cat.close()
    again = HashIndex.open(tmp_path / "cat")
    assert len(again) == 200 and again.get(ids[3])["gender"] == "Women"


# ------------------------------------------------------------------------- server only


def test_server_add_remove_search_like_flat(milvus_server, rng):
    n_bits = 64
    db = clustered_codes(rng, 3000, n_bits)
    ids = rng.choice(10**9, 3000, replace=False)
    index = MilvusIndex(n_bits, uri=milvus_server.uri, collection=next(_names))
    assert index.options()["index_type"] == "BIN_IVF_FLAT"
    index.add(ids[:2000], db[:2000])
    index.add(ids[2000:], db[2000:])  # a second batch: results span both
    ref = flat_of(ids, db, n_bits)
    q = np.concatenate([near(rng, db, n_bits, 20), random_codes(rng, 4, n_bits)])
    assert_same_as(index, ref, q, 25, 3)
    assert_same_as(index, ref, q, 10, 5, filter_ids=ids[::7])
    gone = ids[::4]
    assert index.remove(gone) == gone.size and ref.remove(gone) == gone.size
    assert len(index) == len(ref) == 3000 - gone.size
    assert not index.contains(gone).any() and index.contains(ids[1::4]).all()
    assert_same_as(index, ref, q, 25, 3)


def test_server_restart_keeps_everything(milvus_server, rng, tmp_path):
    n_bits = 32
    db = random_codes(rng, 600, n_bits)
    name = next(_names)
    index = MilvusIndex(n_bits, uri=milvus_server.uri, collection=name)
    index.add(np.arange(500), db[:500])
    index.save(tmp_path / "m.fhi")
    # acknowledged after the save (flush): must survive too
    index.add(np.arange(500, 600), db[500:])
    index.remove([3, 4])
    index.close()
    live = MilvusIndex(n_bits, uri=milvus_server.uri, collection=name, timeout=3)
    milvus_server.stop()  # SIGTERM, then SIGKILL: a crash as far as Milvus can tell
    try:
        # an open index whose server went away: a clear error in about its timeout, not
        # after pymilvus' minutes of retries
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="does not answer"):
            live.search(db[:1], 5)
        assert time.monotonic() - t0 < 30
    finally:
        milvus_server.start()  # the other tests need it
    # the launcher may move to the next port (the old one lingers in TIME_WAIT)
    again = open_index(tmp_path / "m.fhi", uri=milvus_server.uri)
    keep = np.setdiff1d(np.arange(600), [3, 4])
    assert len(again) == 598
    np.testing.assert_array_equal(again.ids(), keep)
    np.testing.assert_array_equal(again.get_codes(keep), db[keep])
    assert_same_as(again, flat_of(keep, db[keep], n_bits), db[:10], 5, 2)


def test_token_never_written_to_disk(milvus_server, rng, tmp_path, monkeypatch):
    secret = "root:Milvus-s3cret-for-the-test"
    cat = HashIndex("milvus", 16, tmp_path / "cat", uri=milvus_server.uri, collection=next(_names),
                    token=secret)
    cat.add(np.arange(10), random_codes(rng, 10, 16))
    cat.save()
    cat.close()
    files = [p for p in (tmp_path / "cat").rglob("*") if p.is_file()]
    assert any(p.suffix == ".fhi" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    # reopened, the token comes from the environment (auth is off on the test server, so
    # this checks it is accepted, and the options above show it is not stored)
    monkeypatch.setenv("FASHIONHASH_MILVUS_TOKEN", secret)
    again = HashIndex.open(tmp_path / "cat")
    assert len(again) == 10 and "token" not in again.index.options()


def test_clear_error_when_server_is_down(rng):
    from milvus_server import free_ports

    port = free_ports(1)[0]  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"cannot reach Milvus at http://127.0.0.1:{port}.*make milvus"):
        MilvusIndex(64, uri=f"http://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - t0 < 20


def test_server_two_stage_search_like_flat(milvus_server, rng, tmp_path):
    """Two-stage search on a Milvus-backed catalogue: Milvus returns the Hamming shortlist,
    the descriptors kept in the index directory re-rank it; ids, order, Hamming distances
    and cosines equal the local ``flat`` catalogue's over the same codes and descriptors,
    after removals and a reopen, with and without a filter."""
    from fashionhash.descriptors import l2_normalise, quantize

    n, n_bits, d = 1500, 64, 48
    db = clustered_codes(rng, n, n_bits)
    db[1::5] = db[0]  # a shared code: ties at the shortlist's edge, ordered by id
    ids = rng.choice(10**6, n, replace=False)
    desc = quantize(l2_normalise(rng.normal(size=(n, d))))
    desc[2::7] = desc[0]  # equal cosines: the Hamming (distance, id) order decides
    meta = [{"gender": ["Men", "Women"][j % 2]} for j in range(n)]
    cats = {"milvus": HashIndex("milvus", n_bits, tmp_path / "m", descriptor_dim=d, uri=milvus_server.uri,
                                collection=next(_names)),
            "flat": HashIndex("flat", n_bits, tmp_path / "f", descriptor_dim=d)}
    for cat in cats.values():
        cat.add(ids, db, meta, descriptors=desc)
        cat.remove(ids[::11])
        cat.save()
        cat.close()
    cats = {name: HashIndex.open(tmp_path / name[0]) for name in cats}
    assert cats["milvus"].index.name == "milvus" and cats["milvus"].descriptor_dim == d
    q = np.concatenate([near(rng, db, n_bits, 12), db[:2], random_codes(rng, 2, n_bits)])
    q_desc = np.concatenate([rng.normal(size=(14, d)), desc[:1].astype(float), rng.normal(size=(1, d))])
    for filters in (None, {"gender": "Women"}):
        for k, shortlist in ((10, 50), (5, 400)):
            got = cats["milvus"].search_two_stage(q, q_desc, k, shortlist, filters)
            want = cats["flat"].search_two_stage(q, q_desc, k, shortlist, filters)
            np.testing.assert_array_equal(got[2], want[2])
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
            assert (got[2] >= 0).all()
    for cat in cats.values():
        cat.close()
