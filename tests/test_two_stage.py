"""Two-stage search end to end on the tiny real catalogue: a run trained with a descriptor
(fitted and chosen on val), evaluated, indexed, searched through the CLI and the service."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fashionhash import codes as C  # noqa: E402
from fashionhash.cli import main  # noqa: E402
from fashionhash.evaluation.two_stage import SHORTLISTS  # noqa: E402
from fashionhash.index import HashIndex  # noqa: E402
from fashionhash.index.build import IndexInfo, build_index  # noqa: E402
from fashionhash.pipeline import load_run  # noqa: E402
from fashionhash.serving import SearchService, ServiceConfig  # noqa: E402
from fashionhash.serving.service import BadRequest  # noqa: E402

from test_serving import TINY_RUN_ARGS  # noqa: E402

DESCRIPTOR_ARGS = ["descriptor.kind=gem", "descriptor.scales=[64,48]", "descriptor.dim=32",
                   "descriptor.learn_epochs=2", "descriptor.learn_items=60", "descriptor.learn_views=1"]
TOKEN = "t0ken"


@pytest.fixture(scope="module")
def ts_run(tiny_kaggle, tmp_path_factory, request) -> Path:
    run = tmp_path_factory.mktemp("two_stage") / "run"
    config = request.config.rootpath / "configs" / "demo.yaml"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--evaluate", "--quiet",
                 f"data.root={tiny_kaggle}", *TINY_RUN_ARGS, *DESCRIPTOR_ARGS]) == 0
    return run


@pytest.fixture(scope="module")
def ts_index(ts_run) -> Path:
    path = ts_run.parent / "index"
    build_index(ts_run, path).close()
    return path


@pytest.fixture
def ts_service(ts_run, ts_index, tmp_path):
    path = tmp_path / "index"
    shutil.copytree(ts_index, path)
    svc = SearchService.open(ts_run, path, ServiceConfig(token=TOKEN))
    yield svc
    svc.close()


def test_descriptor_is_fitted_on_val_and_reported(ts_run):
    meta = json.loads((ts_run / "descriptor.json").read_text())
    assert meta["projection"] in ("whitening", "learned")
    assert set(meta["val_descriptor_alone"]) == {"whitening", "learned"}
    # sign codes up to the descriptor's width are tried: none fits 32 dimensions but 0
    assert set(meta["val"]) == {"0"} and meta["sign_bits"] == 0
    assert meta["shortlist"] in SHORTLISTS and meta["dim"] == 32
    metrics = json.loads((ts_run / "metrics.json").read_text())
    for key in ("same_product_2stage_top1", "same_product_2stage_top10", "same_product_descriptor_top1"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["same_product_2stage_top1"] <= metrics["same_product_2stage_top10"]
    assert metrics["bytes_per_item"] == 32 // 8 + 32 and metrics["shortlist"] == meta["shortlist"]
    # the class-level metrics are those of the codes alone: the descriptor does not touch them
    assert 0 <= metrics["map"] <= 1


def test_index_stores_descriptors_of_the_run(ts_run, ts_index):
    info = IndexInfo.load(ts_index)
    with HashIndex.open(ts_index) as index:
        assert index.descriptor_dim == 32 == info.descriptor["dim"]
        ids = index.index.ids()
        assert index.get_descriptors(ids).shape == (len(ids), 32)
    assert list(ts_index.glob("descriptors-*.fhd"))


def _item_photo(service: SearchService) -> tuple[int, bytes]:
    item_id = int(service.index.index.ids()[5])
    return item_id, Path(service.index.get(item_id)["image_path"]).read_bytes()


def test_photo_search_is_two_stage_and_finds_the_photo_first(ts_service):
    item_id, data = _item_photo(ts_service)
    res = ts_service.search_image(data, k=5)
    assert res["ranking"]["stage"] == "two-stage" and res["ranking"]["shortlist"] == ts_service.shortlist
    top = res["results"][0]
    assert top["id"] == item_id and top["score"] > 0.99
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    similar = ts_service.similar(item_id, k=5)
    assert similar["ranking"]["stage"] == "two-stage" and item_id not in [r["id"] for r in similar["results"]]
    assert ts_service.stats()["ranking"]["stage"] == "two-stage"


def test_photos_encoded_together_match_one_by_one(ts_run, ts_index):
    """The batcher's path (several photos in one backbone call per scale) gives each photo
    the code and descriptor it gets alone; a bad photo among them fails alone."""
    from fashionhash.data.transforms import ImageError
    from fashionhash.index.build import encode_photo_two_stage, encode_photos

    run = load_run(ts_run)
    index = HashIndex.open(ts_index)
    try:
        datas = [Path(m["image_path"]).read_bytes() for m in index.get_many(index.index.ids()[:5].tolist())]
    finally:
        index.close()
    together = encode_photos(run, [datas[0], b"not an image", *datas[1:]], descriptor=True)
    assert isinstance(together[1], ImageError)
    for data, got in zip(datas, [together[0], *together[2:]], strict=True):
        code, desc = encode_photo_two_stage(run, data)
        np.testing.assert_array_equal(got[0], code)
        np.testing.assert_allclose(got[1], desc, atol=1e-4)


def test_concurrent_photo_searches_are_batched_and_answered_as_alone(ts_service):
    from concurrent.futures import ThreadPoolExecutor

    ids = [int(i) for i in ts_service.index.index.ids()[:6]]
    datas = [Path(ts_service.index.get(i)["image_path"]).read_bytes() for i in ids]
    alone = [[r["id"] for r in ts_service.search_image(d, k=5)["results"]] for d in datas]

    def search(d: bytes):
        try:
            return [r["id"] for r in ts_service.search_image(d, k=5)["results"]]
        except BadRequest as e:
            return e

    with ThreadPoolExecutor(7) as pool:
        together = list(pool.map(search, [*datas, b"\xff\xd8\xff broken jpeg"]))
    assert together[:6] == alone and isinstance(together[6], BadRequest)


def test_a_large_query_photo_is_shrunk_to_the_catalogues_size(ts_service):
    """A sharp photo 5x the thumbnails' size is encoded at their size (data.query_shrink),
    and still finds its product first; with the option off it is encoded as it came."""
    import io

    from PIL import Image

    from fashionhash.index.build import _decode_upload

    item_id, data = _item_photo(ts_service)
    run = ts_service.run
    w, h = run.meta["photo_size"]
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (w, h)  # the tiny catalogue's photos are all one size
        big = img.convert("RGB").resize((w * 5, h * 5), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    assert _decode_upload(run, buf.getvalue()).size == (w, h)
    assert ts_service.search_image(buf.getvalue(), k=3)["results"][0]["id"] == item_id
    run.cfg.data.query_shrink = False
    try:
        big_w, big_h = _decode_upload(run, buf.getvalue()).size  # JPEG draft decode: ~the model's size
        assert big_w > w and big_h > h
    finally:
        run.cfg.data.query_shrink = True


def test_codes_only_is_one_flag_away(ts_run, ts_index):
    svc = SearchService.open(ts_run, ts_index, ServiceConfig(two_stage=False))
    try:
        _, data = _item_photo(svc)
        res = svc.search_image(data, k=3)
        assert res["ranking"]["stage"] == "hamming" and all("score" not in r for r in res["results"])
    finally:
        svc.close()


def test_added_item_gets_a_descriptor_and_is_found(ts_service):
    _, data = _item_photo(ts_service)
    added = ts_service.add_item(data, {"articleType": "Tshirts", "id": 90000001})
    assert added["id"] == 90000001
    with HashIndex.open(ts_service.index_path) as reopened:
        assert reopened.get_descriptors([90000001]).shape == (1, 32)
    top = ts_service.search_image(data, k=3)["results"][:2]
    assert 90000001 in [r["id"] for r in top]
    ts_service.delete_item(90000001)
    with HashIndex.open(ts_service.index_path) as reopened:
        assert not reopened.index.contains([90000001])[0]
        with pytest.raises(KeyError):
            reopened.get_descriptors([90000001])


def test_cli_search_says_how_it_ranked(ts_index, capsys):
    with HashIndex.open(ts_index) as index:
        photo = index.get(int(index.index.ids()[0]))["image_path"]
    assert main(["search", str(ts_index), photo, "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "re-ranked by descriptor cosine" in out and "cos" in out
    assert main(["search", str(ts_index), photo, "-k", "3", "--codes-only"]) == 0
    assert "ranked by Hamming distance" in capsys.readouterr().out


def test_refitted_descriptor_is_not_mixed_with_an_old_index(ts_run, ts_index, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ts_run, run)
    assert main(["fit-descriptor", str(run), "model.n_bits=8"]) != 0
    assert "descriptor.* settings only" in capsys.readouterr().err
    assert main(["fit-descriptor", str(run), "descriptor.dim=16", "descriptor.learn_epochs=0", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["projection"] == "whitening"
    svc = SearchService.open(run, ts_index)
    try:  # the index's int8 rows were made with the old fit: codes alone, never a mix
        assert svc.shortlist is None
    finally:
        svc.close()


def test_sign_code_shortlist_end_to_end(ts_run, tmp_path, capsys):
    """A descriptor refitted with a 16-bit sign code: evaluation, the index and the service
    all take the shortlist from it; the distances shown stay the hash code's."""
    run = tmp_path / "run"
    shutil.copytree(ts_run, run)
    assert main(["fit-descriptor", str(run), "descriptor.sign_bits=16", "--quiet"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["sign_bits"] == 16 and set(meta["val"]) == {"16"}
    assert main(["evaluate", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["shortlist_sign_bits"] == 16 and 0 <= metrics["same_product_2stage_top1"] <= 1
    build_index(run, tmp_path / "index").close()
    assert IndexInfo.load(tmp_path / "index").descriptor["sign_bits"] == 16
    svc = SearchService.open(run, tmp_path / "index")
    try:
        assert svc.index.sign_bits == 16 and svc.stats()["ranking"]["sign_bits"] == 16
        item_id, data = _item_photo(svc)
        res = svc.search_image(data, k=5)
        assert res["ranking"]["sign_bits"] == 16 and "16-bit sign code" in res["ranking"]["by"]
        assert res["results"][0]["id"] == item_id and res["results"][0]["distance"] == 0
        label = svc.index.get(item_id)["articleType"]
        filtered = svc.similar(item_id, k=5, filters={"articleType": label})["results"]
        assert filtered and all(svc.index.get(r["id"])["articleType"] == label for r in filtered)
        codes = svc.index.index.get_codes([item_id] + [r["id"] for r in filtered])
        assert [r["distance"] for r in filtered] == C.hamming(codes[:1], codes[1:])[0].tolist()
    finally:
        svc.close()


def test_descriptor_needs_a_frozen_efficientnet(synthetic_fmnist, tmp_path, capsys, request):
    rc = main(["train", "--config", str(request.config.rootpath / "configs" / "fashion_mnist.yaml"),
               "--run-dir", str(tmp_path / "r"), f"data.root={synthetic_fmnist}", "descriptor.kind=gem"])
    assert rc != 0
    assert "EfficientNet-Lite" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.yaml").exists()
