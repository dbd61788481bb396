"""Indexes over a trained model's codes, and the search service on a Milvus server.

Random codes (tests/test_index.py) have almost no ties; a trained model's codes do:
thousands of items share a code at full scale, dozens in the tiny run here. Every backend in
the registry is checked against ``flat`` on the tiny run's own codes, and the whole path
``index build --backend milvus`` -> ``search`` -> the web API runs on a real Milvus server
(the session's ``milvus_server``, see conftest.py).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from fashionhash.cli import main  # noqa: E402
from fashionhash.index import INDEXES, FlatIndex, HashIndex  # noqa: E402
from fashionhash.index.build import build_index  # noqa: E402
from fashionhash.serving import SearchService, ServiceConfig, create_app  # noqa: E402

from test_serving import TOKEN, tiny_index, tiny_run  # noqa: E402,F401  (shared session fixtures)

_collections = (f"trained{i}" for i in itertools.count())


def _backend_options(name: str, request) -> dict:
    if not INDEXES.get(name).external:
        if name == "faiss":
            pytest.importorskip("faiss")
        return {}
    server = request.getfixturevalue("milvus_server")
    return {"uri": server.uri, "collection": next(_collections)}


@pytest.fixture(scope="module")
def trained_codes(tiny_run, tiny_index):
    """(ids, packed codes) of the indexed catalogue and the run's test-query codes."""
    index = HashIndex.open(tiny_index)
    try:
        ids = index.index.ids()
        codes = index.index.get_codes(ids)
    finally:
        index.close()
    with np.load(tiny_run / "codes" / "query.npz") as z:
        queries = z["packed"]
    return ids, codes, queries


@pytest.mark.parametrize("backend", INDEXES.names())
def test_every_backend_matches_flat_on_trained_codes(backend, trained_codes, request):
    ids, codes, queries = trained_codes
    n_bits = 32
    # the point of the test: a trained model's codes are full of ties
    assert np.unique(codes, axis=0).shape[0] < 0.9 * len(codes)
    index = INDEXES.build(backend, n_bits=n_bits, **_backend_options(backend, request))
    ref = FlatIndex(n_bits)
    for target in (index, ref):
        target.add(ids, codes)
    q = np.concatenate([queries, codes[::17]])
    subset = ids[::3]
    for k in (1, 10, 50):
        for got, want in zip(index.search(q, k), ref.search(q, k)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(index.search(q, k, subset), ref.search(q, k, subset)):
            np.testing.assert_array_equal(got, want)
    for r in (0, 2, 4):
        for (gd, gi), (wd, wi) in zip(index.radius_search(q, r), ref.radius_search(q, r), strict=True):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gd, wd)
    removed = ids[::5]
    assert index.remove(removed) == ref.remove(removed) == removed.size
    for got, want in zip(index.search(q, 10), ref.search(q, 10)):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------- the service on Milvus


@pytest.fixture(scope="module")
def milvus_index(tiny_run, milvus_server, tmp_path_factory) -> Path:
    """The tiny run's catalogue indexed into the Milvus server through the CLI."""
    out = tmp_path_factory.mktemp("milvus-index") / "index"
    argv = ["index", "build", str(tiny_run), "--out", str(out), "--backend", "milvus",
            "--uri", milvus_server.uri, "--collection", "shop", "--quiet"]
    assert main(argv) == 0
    return out


def test_cli_build_and_search_on_milvus(milvus_index, tiny_run, tiny_index, milvus_server, tmp_path, capsys):
    local = HashIndex.open(tiny_index)
    remote = HashIndex.open(milvus_index)
    try:
        assert remote.index.name == "milvus" and len(remote) == len(local) == 160
        photo = local.get(int(local.index.ids()[0]))["image_path"]
        ids = local.index.ids()
        np.testing.assert_array_equal(remote.index.get_codes(ids), local.index.get_codes(ids))
    finally:
        local.close()
        remote.close()
    capsys.readouterr()
    results = {}
    for name, index in (("milvus", milvus_index), ("mih", tiny_index)):
        assert main(["search", str(index), photo, "-k", "12", "--filter", "gender=Men", "--json"]) == 0
        results[name] = [(h["id"], h["distance"]) for h in json.loads(capsys.readouterr().out)["results"]]
    assert results["milvus"] == results["mih"] and len(results["mih"]) == 12
    # the collection is in use: a second build into it is refused, --force replaces it
    argv = ["index", "build", str(tiny_run), "--out", str(tmp_path / "again"), "--backend", "milvus",
            "--uri", milvus_server.uri, "--collection", "shop", "--quiet"]
    assert main(argv) == 2
    assert "already holds 160 items" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    assert main(["index", "build", str(tiny_run), "--uri", milvus_server.uri, "--quiet"]) == 2  # not milvus
    # the server is down: a clear error, not a traceback
    from milvus_server import free_ports

    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    argv = ["index", "build", str(tiny_run), "--out", str(tmp_path / "down"), "--backend", "milvus",
            "--uri", down, "--quiet"]
    assert main(argv) == 2
    assert f"cannot reach Milvus at {down}" in capsys.readouterr().err


def test_service_on_milvus_answers_like_local(milvus_index, tiny_index, tiny_run):
    local = SearchService.open(tiny_run, tiny_index, ServiceConfig())
    remote = SearchService.open(tiny_run, milvus_index, ServiceConfig(token=TOKEN))
    try:
        with TestClient(create_app(local)) as lc, TestClient(create_app(remote)) as rc:
            stats = rc.get("/stats").json()
            assert (stats["backend"], stats["items"]) == ("milvus", 160)
            assert stats["index_path"] == milvus_index.name  # its name only, not where it lies
            photo = Path(local.index.get(int(local.index.index.ids()[3]))["image_path"]).read_bytes()
            for data in ({"k": "10"}, {"k": "10", "articleType": "Watches"}):
                want = lc.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data=data).json()
                got = rc.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data=data).json()
                assert [(h["id"], h["distance"]) for h in got["results"]] == \
                    [(h["id"], h["distance"]) for h in want["results"]]
            item = lc.get("/items", params={"articleType": "Jeans"}).json()["items"][0]["id"]
            similar = [[(h["id"], h["distance"]) for h in c.get(f"/items/{item}/similar", params={"k": 5}).json()["results"]]
                       for c in (rc, lc)]
            assert similar[0] == similar[1] and len(similar[0]) == 5
            # writes go to the server: added, found, deleted
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = rc.post("/items", files={"image": ("n.jpg", photo, "image/jpeg")},
                        data={"articleType": "Jeans", "baseColour": "Ultraviolet"}, headers=auth)
            assert r.status_code == 201, r.text
            new_id = r.json()["id"]
            hits = rc.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                           data={"k": "3", "baseColour": "Ultraviolet"}).json()["results"]
            assert [(h["id"], h["distance"]) for h in hits] == [(new_id, 0)]
            assert rc.get("/stats").json()["items"] == 161
            assert rc.delete(f"/items/{new_id}", headers=auth).status_code == 200
            assert rc.get("/stats").json()["items"] == 160
    finally:
        local.close()
        remote.close()
