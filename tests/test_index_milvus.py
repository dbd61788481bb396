"""The ``milvus`` backend on an embedded Milvus Lite file (optional extra).

Needs ``pip install 'fashionhash[milvus]'`` (pymilvus 2.5, milvus-lite 2.5.1, setuptools<81);
skipped otherwise, or when Milvus Lite cannot start here. Kept small: one Milvus Lite
process for the module, one collection per test.
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")

from fashionhash.index import INDEXES, HashIndex, IndexFormatError, MilvusIndex, open_index  # noqa: E402

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


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_registered_as_external():
    assert "milvus" in INDEXES.names() and INDEXES.get("milvus").external
    with pytest.raises(ValueError, match="uri"):
        MilvusIndex(64)


@pytest.mark.parametrize("n_bits", [16, 64])
def test_matches_reference(lite_uri, rng, n_bits):
    db = clustered_codes(rng, 300, n_bits)
    ids = rng.choice(10**6, 300, replace=False)
    index = MilvusIndex(n_bits, uri=lite_uri, collection=next(_names))
    index.add(ids, db)
    assert len(index) == 300
    q = np.concatenate([near(rng, db, n_bits, 6), db[:3], random_codes(rng, 3, n_bits)])
    for k in (1, 10, 40):
        assert_knn(index, ids, db, q, k, n_bits)
    assert_radius(index, ids, db, q, 3, n_bits)
    assert_knn(index, ids, db, q, 10, n_bits, filter_ids=ids[::5])
    # all-equal codes: ties broken by id even though Milvus orders them arbitrarily
    same = np.repeat(db[:1], 50, axis=0)
    eq = MilvusIndex(n_bits, uri=lite_uri, collection=next(_names))
    eq.add(np.arange(50)[::-1].copy(), same)
    assert_knn(eq, np.arange(50)[::-1], same, same[:2], 7, n_bits)
    d, i = eq.search(same[:1], 60)
    assert (i[0, 50:] == -1).all()


def test_remove_duplicates_and_validation(lite_uri, rng):
    db = random_codes(rng, 100, 64)
    index = MilvusIndex(64, uri=lite_uri, collection=next(_names))
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


def test_manifest_roundtrip(lite_uri, rng, tmp_path):
    db = random_codes(rng, 80, 32)
    name = next(_names)
    index = MilvusIndex(32, uri=lite_uri, collection=name)
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
    with pytest.raises(ValueError, match="does not hold"):
        MilvusIndex(64, uri=lite_uri, collection=name)


def test_catalogue_with_milvus(lite_uri, rng, tmp_path):
    db = clustered_codes(rng, 200, 64)
    ids = np.arange(200) * 2
    meta = [{"gender": ["Men", "Women"][j % 2], "image_path": f"{j}.jpg"} for j in range(200)]
    cat = HashIndex("milvus", 64, tmp_path / "cat", uri=lite_uri, collection=next(_names))
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
