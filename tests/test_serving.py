"""The search service end to end: a tiny run trained on real photos through the CLI, its
catalogue indexed with ``build_index``, and the real FastAPI app over it (TestClient).

Covers every endpoint, every kind of bad input (the server answers 4xx JSON and keeps
serving), the write token, persistence of writes across a restart, index building (reuse
of evaluation's codes) and the CLI's ``index`` and ``search`` commands.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from fashionhash import codes as C  # noqa: E402
from fashionhash.config import load_config  # noqa: E402
from fashionhash.cli import main  # noqa: E402
from fashionhash.index import HashIndex  # noqa: E402
from fashionhash.index.build import INFO_NAME, IndexInfo, _saved_codes, build_index  # noqa: E402
from fashionhash.serving import SearchService, ServiceConfig, create_app  # noqa: E402

TOKEN = "s3cret-token"
UPLOAD_LIMIT = 400_000
# the tiny run of tests/test_training.py (same arguments, so the feature cache is shared)
TINY_RUN_ARGS = ["data.n_query=20", "data.n_val=12", "data.min_per_class=5", "data.n_damaged=10",
                 "model.image_size=64", "model.n_bits=32", "train.epochs=1", "train.batch_size=32",
                 "train.num_workers=1", "descriptor.kind=none"]
# session fixtures are memoised here so tests/test_browser.py, which imports them, reuses
# the same trained run and index instead of training again
_MEMO: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tiny_kaggle, tmp_path_factory, request) -> Path:
    """A run trained for one epoch on the tiny real catalogue and evaluated (codes saved)."""
    if "run" not in _MEMO:
        run = tmp_path_factory.mktemp("serving") / "run"
        config = request.config.rootpath / "configs" / "demo.yaml"
        rc = main(["train", "--config", str(config), "--run-dir", str(run), "--evaluate", "--quiet",
                   f"data.root={tiny_kaggle}", *TINY_RUN_ARGS])
        assert rc == 0
        _MEMO["run"] = run
    return _MEMO["run"]


@pytest.fixture(scope="session")
def tiny_index(tiny_run) -> Path:
    """The tiny run's whole catalogue indexed (read-only: tests that write use a copy)."""
    if "index" not in _MEMO:
        path = tiny_run.parent / "index"
        build_index(tiny_run, path).close()
        _MEMO["index"] = path
    return _MEMO["index"]


@pytest.fixture
def index_copy(tiny_index, tmp_path) -> Path:
    path = tmp_path / "index"
    shutil.copytree(tiny_index, path)
    return path


@pytest.fixture
def service(tiny_run, index_copy):
    svc = SearchService.open(tiny_run, index_copy, ServiceConfig(token=TOKEN, max_upload_bytes=UPLOAD_LIMIT))
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _photos(index_path: Path, n: int = 3) -> list[dict]:
    """Metadata of the first n indexed catalogue items (ids ascending)."""
    index = HashIndex.open(index_path)
    try:
        return [m for m in index.get_many(index.index.ids()[:n].tolist())]
    finally:
        index.close()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width x height`` pixels (a
    decompression bomb: a few bytes that would decode to gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def _gif_claiming(width: int, height: int) -> bytes:
    """A one-pixel GIF whose screen descriptor claims ``width x height`` pixels."""
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _convert(path: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------ index build


def test_build_index_reuses_evaluation_codes(tiny_run, tiny_index, tiny_kaggle):
    info = IndexInfo.load(tiny_index)
    saved = _saved_codes(tiny_run, 32)
    split = json.loads((tiny_run / "split.json").read_text())
    assert set(saved) == (set(split["database"]) | set(split["query"])) - {99000001}
    # 160 readable photos + the corrupt JPEG in the catalogue; the corrupt one is skipped
    assert (info.count, info.skipped, info.n_bits, info.backend) == (160, 1, 32, "mih")
    assert info.reused_codes == len(saved) and info.encoded == 161 - len(saved)
    assert info.run_dir == str(tiny_run.resolve())
    assert Path(info.catalogue_root) == tiny_kaggle.resolve()

    index = HashIndex.open(tiny_index)
    try:
        assert len(index) == 160 and 99000001 not in index.index
        ids = np.asarray(sorted(saved))
        assert np.array_equal(index.index.get_codes(ids), np.stack([saved[i] for i in ids]))
        meta = index.get(int(ids[0]))
        assert {"gender", "masterCategory", "articleType", "baseColour", "productDisplayName",
                "season", "usage", "year"} <= set(meta)
        assert Path(meta["image_path"]).is_absolute() and Path(meta["image_path"]).is_file()
        # reused codes are what encoding the photo now gives (same model, same pixels)
        from fashionhash.pipeline import load_run

        run = load_run(tiny_run)
        some = ids[:6]
        fresh = C.pack(run.encode_sources([index.get(int(i))["image_path"] for i in some], num_workers=0)[0])
        assert C.hamming(fresh, index.index.get_codes(some)).diagonal().max() <= 1
        # codes of items evaluation never saw (validation photos) were encoded, not left zero
        val = [i for i in split["val"] if i in index.index]
        assert val and np.any(index.index.get_codes(val))
    finally:
        index.close()


def test_build_index_options(tiny_run, tmp_path):
    path = tmp_path / "db"
    index = build_index(tiny_run, path, backend="flat", items="database")
    split = json.loads((tiny_run / "split.json").read_text())
    assert len(index) == len(set(split["database"]) - {99000001}) and index.index.name == "flat"
    index.close()
    with pytest.raises(FileExistsError):
        build_index(tiny_run, path)
    build_index(tiny_run, path, overwrite=True).close()  # replaced whole, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    assert IndexInfo.load(path).items == "all"


def test_stale_evaluation_codes_are_not_reused(tiny_run, tiny_index, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert _saved_codes(run, 32)
    assert not _saved_codes(run, 64)  # another code length: never mixed in
    best = run / "checkpoints" / "best.pt"
    for f in (run / "codes").glob("*.npz"):  # the checkpoint is newer than the codes
        os.utime(f, (best.stat().st_mtime - 100, best.stat().st_mtime - 100))
    assert _saved_codes(run, 32) == {}
    # codes newer than the checkpoint but from another model (say another checkpoint's
    # evaluation) fail the spot check: every photo is encoded instead
    with np.load(tiny_run / "codes" / "database.npz") as z:
        np.savez(run / "codes" / "database.npz", ids=z["ids"], packed=~z["packed"], n_bits=32)
    (run / "codes" / "query.npz").unlink()
    index = build_index(run, tmp_path / "index")
    info = IndexInfo.load(tmp_path / "index")
    assert info.reused_codes == 0 and info.encoded == 161 and len(index) == 160
    reference = HashIndex.open(tiny_index)  # built from the genuine codes: the same answer
    some = reference.index.ids()[:20]
    assert C.hamming(index.index.get_codes(some), reference.index.get_codes(some)).diagonal().max() <= 1
    reference.close()
    index.close()


# ------------------------------------------------------------------------------ reads


def test_health_stats_facets_and_page(client, tiny_run):
    assert client.get("/health").json() == {"status": "ok", "items": 160}
    s = client.get("/stats").json()
    assert (s["items"], s["n_bits"], s["backend"]) == (160, 32, "mih")
    # names only: the server's folders are not the client's business
    assert s["run"]["path"] == tiny_run.name and s["run"]["method"] == "csq"
    assert s["index_path"] == "index"
    assert s["writes_enabled"] is True and "articleType" in s["filter_keys"]
    f = client.get("/facets").json()
    assert set(f) == {"gender", "masterCategory", "articleType", "baseColour"}
    assert {v["value"]: v["count"] for v in f["articleType"]} == {
        "Tshirts": 40, "Jeans": 40, "Watches": 40, "Casual Shoes": 40}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/style.css").text.replace("http://www.w3.org", "")  # no CDN


def test_items_paging_and_filters(client):
    r = client.get("/items", params={"offset": 0, "limit": 50}).json()
    assert r["total"] == 160 and len(r["items"]) == 50
    ids = [it["id"] for it in r["items"]]
    assert ids == sorted(ids)
    r2 = client.get("/items", params={"offset": 150, "limit": 50}).json()
    assert len(r2["items"]) == 10 and not set(ids) & {it["id"] for it in r2["items"]}
    item = r["items"][0]
    assert set(item) == {"id", "name", "summary", "attributes", "image_url"}
    assert item["image_url"] == f"/images/{item['id']}"
    a = item["attributes"]  # the Kaggle catalogue's summary, as the page showed it before
    assert item["summary"] == " · ".join(a[k] for k in ("articleType", "baseColour", "gender") if a.get(k))
    assert item["name"] == item["attributes"]["productDisplayName"]
    jeans = client.get("/items", params={"articleType": "Jeans", "limit": 200}).json()
    assert jeans["total"] == 40 and all(it["attributes"]["articleType"] == "Jeans" for it in jeans["items"])
    two = client.get("/items?articleType=Jeans&articleType=Watches&limit=200").json()
    assert two["total"] == 80
    assert client.get("/items?articleType=&limit=5").json()["total"] == 160  # empty = no filter
    assert client.get("/items", params={"articleType": "Saree"}).json()["total"] == 0
    for params in ({"colour": "Red"}, {"offset": -1}, {"offset": "x"}, {"limit": 0}, {"limit": 10_000}):
        bad = client.get("/items", params=params)
        assert bad.status_code == 400 and "error" in bad.json(), params


def test_get_item(client, index_copy):
    meta = _photos(index_copy, 1)[0]
    r = client.get(f"/items/{meta['id']}")
    assert r.status_code == 200 and r.json()["attributes"]["articleType"] == meta["articleType"]
    for bad in ("123456789", "abc", "-3", "1.5", "99000001"):
        r = client.get(f"/items/{bad}")
        assert r.status_code == 404 and "error" in r.json(), bad


def test_similar_by_stored_code(client, service, index_copy):
    item_id = _photos(index_copy, 1)[0]["id"]
    r = client.get(f"/items/{item_id}/similar", params={"k": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["query"]["id"] == item_id and body["k"] == 7 and len(body["results"]) == 7
    assert body["took_ms"] >= body["search_ms"] >= 0
    res_ids = [h["id"] for h in body["results"]]
    assert item_id not in res_ids  # the item itself is not its own neighbour
    dists = [h["distance"] for h in body["results"]]
    assert dists == sorted(dists)
    # distances are the Hamming distances between the stored codes; none closer was left out
    codes = service.index.index
    all_ids = codes.ids()
    ref = C.hamming(codes.get_codes([item_id]), codes.get_codes(all_ids))[0]
    assert dists == [int(ref[all_ids.tolist().index(i)]) for i in res_ids]
    others = np.sort(ref[all_ids != item_id])
    assert dists == others[:7].tolist()
    # filters restrict the neighbours
    r = client.get(f"/items/{item_id}/similar", params={"k": 5, "articleType": "Watches"}).json()
    assert r["results"] and all(h["attributes"]["articleType"] == "Watches" for h in r["results"])
    for params, status in (({"k": 0}, 400), ({"k": 101}, 400), ({"k": "ten"}, 400),
                           ({"k": 5, "fabric": "silk"}, 400)):
        bad = client.get(f"/items/{item_id}/similar", params=params)
        assert bad.status_code == status and "error" in bad.json(), params
    assert client.get("/items/123456789/similar").status_code == 404


def test_search_by_photo(client, index_copy):
    meta = _photos(index_copy, 1)[0]
    jpeg = Path(meta["image_path"]).read_bytes()
    for name, data, ctype in (("q.jpg", jpeg, "image/jpeg"),
                              ("q.png", _convert(meta["image_path"], "PNG"), "image/png"),
                              ("q.webp", _convert(meta["image_path"], "WEBP"), "image/webp")):
        r = client.post("/search", files={"image": (name, data, ctype)}, data={"k": "5"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == 5 and body["took_ms"] >= body["encode_ms"] > 0
        assert body["results"][0]["distance"] <= 2
        if name == "q.jpg":  # the very photo: the same code as the indexed item
            zero = [h["id"] for h in body["results"] if h["distance"] == 0]
            assert meta["id"] in zero
            assert len(body["query"]["code"]) == 8  # 32 bits in hex
    r = client.post("/search", files={"image": ("q.jpg", jpeg, "image/jpeg")},
                    data={"k": "10", "articleType": "Watches"})
    assert r.status_code == 200 and all(h["attributes"]["articleType"] == "Watches" for h in r.json()["results"])


def _gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_animated_gif_is_searched_by_its_first_frame(client, index_copy):
    metas = _photos(index_copy, 40)
    # two frames from photos of different types, so the two frames give different codes;
    # palette images, so the GIF stores their pixels exactly and a PNG can hold the same
    first = Image.open(metas[0]["image_path"]).convert("RGB")
    other = next(m for m in metas if m["articleType"] != metas[0]["articleType"])
    second = Image.open(other["image_path"]).convert("RGB").resize(first.size)
    frames = [f.quantize(256) for f in (first, second)]
    gif = _gif(frames)
    with Image.open(io.BytesIO(gif)) as check:
        assert check.n_frames == 2 and check.is_animated

    def search(name: str, data: bytes, ctype: str) -> dict:
        r = client.post("/search", files={"image": (name, data, ctype)}, data={"k": "8"})
        assert r.status_code == 200, (name, r.text)
        return r.json()

    by_gif = search("q.gif", gif, "image/gif")
    by_first = search("first.png", _png(frames[0]), "image/png")
    by_second = search("second.png", _png(frames[1]), "image/png")
    assert by_first["query"]["code"] != by_second["query"]["code"]  # the test can tell the frames apart
    assert by_gif["query"]["code"] == by_first["query"]["code"]
    assert by_gif["results"] == by_first["results"]
    # a still GIF is a one-frame GIF: searched as well
    assert search("still.gif", _gif(frames[:1]), "image/gif")["query"]["code"] == by_first["query"]["code"]
    # searched with, never added: the catalogue serves JPEG/PNG/WebP only
    r = client.post("/items", files={"image": ("a.gif", gif, "image/gif")}, headers=_auth())
    assert r.status_code == 415 and "GIF" in r.json()["error"]


def test_bad_uploads_get_4xx_and_the_server_keeps_serving(client, index_copy):
    jpeg = Path(_photos(index_copy, 1)[0]["image_path"]).read_bytes()
    big = jpeg + b"\0" * (UPLOAD_LIMIT + 1 - len(jpeg))  # a JPEG just over the limit
    cases = [
        ("not an image", ("a.jpg", b"this is not an image at all", "image/jpeg"), {}, 415),
        ("broken GIF", ("a.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"), {}, 400),
        ("GIF bomb", ("a.gif", _gif_claiming(20000, 20000), "image/gif"), {}, 400),
        ("truncated JPEG", ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), {}, 400),
        ("empty", ("a.jpg", b"", "image/jpeg"), {}, 400),
        ("bomb", ("a.png", _png_claiming(20000, 20000), "image/png"), {}, 400),
        ("over the limit", ("a.jpg", big, "image/jpeg"), {}, 413),
        ("k too big", ("a.jpg", jpeg, "image/jpeg"), {"k": "1000"}, 400),
        ("k zero", ("a.jpg", jpeg, "image/jpeg"), {"k": "0"}, 400),
        ("k not a number", ("a.jpg", jpeg, "image/jpeg"), {"k": "many"}, 400),
        ("unknown filter", ("a.jpg", jpeg, "image/jpeg"), {"fabric": "silk"}, 400),
    ]
    for what, upload, data, status in cases:
        r = client.post("/search", files={"image": upload}, data=data)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str), what
        assert client.get("/health").status_code == 200, what
    for what in ("bomb", "GIF bomb"):
        upload = next(c[1] for c in cases if c[0] == what)
        assert "too large" in client.post("/search", files={"image": upload}).json()["error"], what
    # no photo field, or not multipart at all
    assert client.post("/search", data={"k": "5"}).status_code == 400
    assert client.post("/search", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
    broken = {"content-type": "multipart/form-data; boundary=x"}
    assert client.post("/search", content=b"--x\r\nbroken", headers=broken).status_code == 400
    # still answering real searches afterwards
    assert client.post("/search", files={"image": ("a.jpg", jpeg, "image/jpeg")}).status_code == 200


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks):
    """Drive the ASGI app directly with a body fed chunk by chunk; returns (status,
    body, bytes the app pulled)."""
    pulled = 0
    sent: list[dict] = []
    it = iter(chunks)

    async def receive():
        nonlocal pulled
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/search", "raw_path": b"/search", "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def test_oversized_bodies_are_refused_without_reading_them(service):
    app = create_app(service)
    chunk = 64 * 1024

    def endless():  # a chunked upload that never ends: must be cut at the limit
        yield (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff")
        while True:
            yield b"\0" * chunk

    status, body, pulled = _asgi_post(app, [(b"content-type", b"multipart/form-data; boundary=b")], endless())
    assert status == 413 and "limit" in body["error"]
    assert pulled <= UPLOAD_LIMIT + 64 * 1024 + 2 * chunk
    # a declared Content-Length over the limit is refused before reading anything
    status, body, pulled = _asgi_post(app, [(b"content-type", b"multipart/form-data; boundary=b"),
                                            (b"content-length", b"50000000")], endless())
    assert status == 413 and pulled == 0


def test_images_are_served_from_the_catalogue_only(client, service, index_copy):
    meta = _photos(index_copy, 1)[0]
    r = client.get(f"/images/{meta['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == Path(meta["image_path"]).read_bytes()
    for path in ("/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "/images/../../etc/passwd", "/images/-1", "/images/1e3", "/images/%2e%2e",
                 "/images/%00", "/images/123456789", "/images/" + "9" * 40):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "passwd" not in r.text or "error" in r.json()
    # an index row pointing outside the catalogue folder is never followed
    code = service.index.index.get_codes([meta["id"]])
    for i, outside in enumerate(("/etc/passwd", str(index_copy / INFO_NAME), str(index_copy / ".." / "x.jpg"))):
        service.index.add([10**9 + i], code, [{"articleType": "Jeans", "image_path": outside}])
        assert client.get(f"/images/{10**9 + i}").status_code == 404


# ------------------------------------------------------------------------------ writes


def test_writes_need_the_token(client, tiny_run, index_copy):
    jpeg = Path(_photos(index_copy, 1)[0]["image_path"]).read_bytes()
    files = {"image": ("new.jpg", jpeg, "image/jpeg")}
    item_id = _photos(index_copy, 1)[0]["id"]
    for headers in ({}, _auth("wrong"), {"Authorization": TOKEN}, {"Authorization": "Basic czNjcmV0"}):
        r = client.post("/items", files=files, data={"articleType": "Jeans"}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"], headers
        assert client.delete(f"/items/{item_id}", headers=headers).status_code == 401
    assert client.get("/health").json()["items"] == 160
    # a server started without a token refuses every write
    svc = SearchService.open(tiny_run, index_copy, ServiceConfig(token=None))
    try:
        with TestClient(create_app(svc)) as c:
            assert c.post("/items", files=files, headers=_auth()).status_code == 403
            assert c.delete(f"/items/{item_id}", headers=_auth()).status_code == 403
    finally:
        svc.close()


def test_add_search_delete_and_persist_across_restart(client, service, tiny_run, index_copy):
    src = _photos(index_copy, 1)[0]
    photo = _convert(src["image_path"], "PNG")
    attrs = {"gender": "Women", "articleType": "Jeans", "baseColour": "Teal",
             "productDisplayName": "Test Teal Jeans"}
    r = client.post("/items", files={"image": ("teal.png", photo, "image/png")}, data=attrs, headers=_auth())
    assert r.status_code == 201, r.text
    item = r.json()
    new_id = item["id"]
    assert new_id > 99000001 and item["name"] == "Test Teal Jeans" and item["attributes"] == attrs
    # searchable at once, photo served from the index's uploads folder
    hits = client.post("/search", files={"image": ("q.png", photo, "image/png")},
                       data={"k": "3", "baseColour": "Teal"}).json()["results"]
    assert [(h["id"], h["distance"]) for h in hits] == [(new_id, 0)]
    assert client.get(f"/images/{new_id}").content == photo
    assert client.get("/items", params={"baseColour": "Teal"}).json()["total"] == 1
    assert any(v["value"] == "Teal" for v in client.get("/facets").json()["baseColour"])
    # JSON attributes and an explicit id; a taken id is a conflict
    r = client.post("/items", files={"image": ("b.jpg", Path(src["image_path"]).read_bytes(), "image/jpeg")},
                    data={"attributes": json.dumps({"id": 5, "articleType": "Watches"})}, headers=_auth())
    assert r.status_code == 201 and r.json()["id"] == 5
    r = client.post("/items", files={"image": ("b.jpg", photo, "image/png")}, data={"id": "5"}, headers=_auth())
    assert r.status_code == 409
    for bad_attrs in ({"bad key!": "x"}, {"image_path": "/etc/passwd"}, {"id": "-4"}, {"attributes": "[1]"}):
        r = client.post("/items", files={"image": ("b.png", photo, "image/png")}, data=bad_attrs, headers=_auth())
        assert r.status_code == 400, bad_attrs
    r = client.post("/items", files={"image": ("b.jpg", b"nope", "image/jpeg")}, headers=_auth())
    assert r.status_code == 415
    assert client.get("/health").json()["items"] == 162

    # restart: a new service over the same directory sees both writes
    service.close()
    again = SearchService.open(tiny_run, index_copy, ServiceConfig(token=TOKEN))
    try:
        with TestClient(create_app(again)) as c2:
            assert c2.get(f"/items/{new_id}").json()["attributes"] == attrs
            assert c2.get(f"/images/{new_id}").content == photo
            assert c2.get("/health").json()["items"] == 162
            r = c2.delete(f"/items/{new_id}", headers=_auth())
            assert r.status_code == 200 and r.json() == {"deleted": new_id}
            assert c2.delete(f"/items/{new_id}", headers=_auth()).status_code == 404
            assert c2.get(f"/items/{new_id}").status_code == 404
            # a catalogue item can be removed too (its photo stays in the catalogue)
            assert c2.delete(f"/items/{src['id']}", headers=_auth()).status_code == 200
            assert Path(src["image_path"]).is_file()
    finally:
        again.close()
    third = SearchService.open(tiny_run, index_copy, ServiceConfig())
    try:
        assert third.health()["items"] == 160
        with pytest.raises(Exception, match="no item"):
            third.get_item(new_id)
        assert not list((index_copy / "uploads").glob(f"{new_id}.*"))  # its photo is gone
        assert third.get_item(5)["attributes"] == {"articleType": "Watches"}
    finally:
        third.close()
    service.index = HashIndex.open(index_copy)  # the fixture closes it again


def test_concurrent_reads_and_writes(client, index_copy):
    from concurrent.futures import ThreadPoolExecutor

    metas = _photos(index_copy, 8)
    photo = Path(metas[0]["image_path"]).read_bytes()

    def read(i: int) -> int:
        return client.get(f"/items/{metas[i % 8]['id']}/similar", params={"k": 5}).status_code

    def write(i: int) -> int:
        return client.post("/items", files={"image": ("a.jpg", photo, "image/jpeg")},
                           data={"articleType": "Jeans"}, headers=_auth()).status_code

    with ThreadPoolExecutor(8) as pool:
        reads = pool.map(read, range(40))
        writes = pool.map(write, range(4))
        assert set(reads) == {200} and set(writes) == {201}
    assert client.get("/health").json()["items"] == 164


# ------------------------------------------------------------------------------ CLI


def test_cli_search(tiny_index, capsys):
    meta = _photos(tiny_index, 1)[0]
    assert main(["search", str(tiny_index), meta["image_path"], "-k", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:5]]
    assert len(rows) == 4 and rows[0][1] == "0"
    assert str(meta["id"]) in [r[2] for r in rows if r[1] == "0"]
    assert "search took" in out
    assert main(["search", str(tiny_index), meta["image_path"], "-k", "3", "--filter", "articleType=Watches",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["results"]) == 3 and {h["attributes"]["articleType"] for h in res["results"]} == {"Watches"}
    assert main(["search", str(tiny_index), meta["image_path"], "--filter", "fabric=silk"]) == 2
    assert "unknown filter" in capsys.readouterr().err
    assert main(["search", str(tiny_index), __file__]) == 2  # not an image
    assert main(["search", str(tiny_index / "missing"), meta["image_path"]]) == 2


def test_cli_index_build_and_add(tiny_run, tmp_path, capsys):
    out = tmp_path / "ix"
    assert main(["index", "build", str(tiny_run), "--out", str(out), "--backend", "flat", "--quiet"]) == 0
    assert "indexed 160 items (32 bits, flat)" in capsys.readouterr().out
    assert main(["index", "build", str(tiny_run), "--out", str(out), "--quiet"]) == 2  # exists
    photo = _photos(out, 1)[0]["image_path"]
    assert main(["index", "add", str(out), str(tiny_run), photo, "--attr", "gender=Men",
                 "--attr", "articleType=Jeans", "--quiet"]) == 0
    new_id = int(capsys.readouterr().out.split()[0])
    index = HashIndex.open(out)
    try:
        assert len(index) == 161
        meta = index.get(new_id)
        assert meta["gender"] == "Men" and Path(meta["image_path"]).parent == (out / "uploads").resolve()
    finally:
        index.close()
    assert main(["index", "add", str(out), str(tiny_run), __file__, "--quiet"]) == 2
    assert len(HashIndex.open(out)) == 161


def test_cli_serve_refuses_a_busy_port(tiny_run, tiny_index, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_run), "--index", str(tiny_index), "--port", str(port)]) == 2
    assert "in use" in capsys.readouterr().err


def test_cli_serve_passes_the_ranking_options(tiny_run, tiny_index, monkeypatch):
    """`fashionhash serve --shortlist R` / `--codes-only` / `--photo-batch N` reach the service
    (the server is stubbed); a batch under 1 is refused."""
    import fashionhash.serving.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda *a, **kw: calls.append(kw))
    base = ["serve", str(tiny_run), "--index", str(tiny_index), "--port", "0"]
    assert main(base) == 0 and main([*base, "--shortlist", "1000"]) == 0 and main([*base, "--codes-only"]) == 0
    assert main([*base, "--photo-batch", "1"]) == 0 and main([*base, "--photo-batch", "0"]) == 2
    assert [(c["two_stage"], c["shortlist"], c["photo_batch"]) for c in calls] == [
        (True, 0, ServiceConfig.photo_batch), (True, 1000, ServiceConfig.photo_batch),
        (False, 0, ServiceConfig.photo_batch), (True, 0, 1)]


def test_demo_indexes_then_serves(tiny_kaggle, tmp_path, monkeypatch, capsys):
    """`fashionhash demo` trains, evaluates, builds RUN/index and serves it (the server is
    stubbed here; tests/test_browser.py runs the real one); --no-serve stops after indexing."""
    import socket

    import fashionhash.serving.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda *a, **kw: calls.append((a, kw)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "demo"
    argv = ["demo", "--data", str(tiny_kaggle), "--run-dir", str(run), "--quiet", *TINY_RUN_ARGS]
    assert main([*argv, "--port", str(port)]) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}" in out and "indexed 160 items" in out
    assert len(calls) == 1 and calls[0][0][:2] == (run, run / "index") and calls[0][1]["port"] == port
    assert IndexInfo.load(run / "index").count == 160
    # again, for scripts: the run resumes (nothing to do), the index is reused, no server
    assert main([*argv, "--no-serve"]) == 0
    assert "is up to date" in capsys.readouterr().out and len(calls) == 1


def test_demo_takes_another_config(tiny_kaggle, tmp_path, capsys, request):
    run = tmp_path / "item"
    config = str(request.config.rootpath / "configs" / "very_product.yaml")
    argv = ["demo", "--data", str(tiny_kaggle), "--run-dir", str(run), "--quiet", "--no-serve",
            "--config", config, *TINY_RUN_ARGS, "method.params.item_bits=16"]
    assert main(argv) == 0
    saved = load_config(run / "config.yaml")
    assert saved.method.params == {"item_bits": 16, "w_item": 1.0, "item_tau": 0.05}
    assert saved.model.n_bits == 32  # the command line wins over the file
    assert IndexInfo.load(run / "index").count == 160
    capsys.readouterr()
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "x"),
                 "--config", config]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_fashion_mnist_items_are_drawn_from_pixels(synthetic_fmnist, tmp_path, request):
    """The demo's fallback catalogue has pixels, not files: /images renders them as PNG."""
    run = tmp_path / "fm"
    config = request.config.rootpath / "configs" / "fashion_mnist.yaml"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--evaluate", "--quiet",
                 f"data.root={synthetic_fmnist}", "data.n_query=20", "data.n_val=20", "data.min_per_class=1",
                 "data.n_damaged=0", "train.num_workers=0", "train.batch_size=256", "model.n_bits=16",
                 "model.hidden=64", "train.epochs=1"]) == 0
    build_index(run, tmp_path / "index").close()
    assert IndexInfo.load(tmp_path / "index").catalogue_root is None
    svc = SearchService.open(run, tmp_path / "index", ServiceConfig())
    try:
        with TestClient(create_app(svc)) as c:
            assert c.get("/health").json()["items"] == 600
            r = c.get("/images/7")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(r.content)).size == (112, 112)
            assert c.get("/images/600").status_code == 404
            hits = c.get("/items/7/similar", params={"k": 5}).json()["results"]
            assert len(hits) == 5
    finally:
        svc.close()
