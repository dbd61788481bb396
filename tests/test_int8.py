"""The int8 engine (models/quantize.py) on the tiny real catalogue: features close to fp32,
the same file from two builds, cache keys apart from fp32's (which stay as they were), a
run whose query encoder gives the codes of its cached catalogue features, and clear refusals
where int8 cannot work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fashionhash import codes as C
from fashionhash.cli import main
from fashionhash.config import Config, load_config
from fashionhash.data.catalogue import open_catalogue
from fashionhash.models.features import FeatureExtractor
from fashionhash.models.quantize import Calibration, float_front_nodes, float_tail_nodes
from fashionhash.pipeline import (_feature_key, build_method, check_engine, int8_calibration, item_descriptors,
                                  item_features, load_run, open_data)

from test_serving import TINY_RUN_ARGS

SIZE = 96  # small for speed; 3 strided stages still give a 3x3 head map


def _photos(tiny_kaggle: Path) -> list[str]:
    return [str(p) for p in sorted((tiny_kaggle / "images").glob("*.jpg"))]


@pytest.fixture(scope="module")
def calibration(tiny_kaggle) -> Calibration:
    return Calibration.from_files(_photos(tiny_kaggle)[::10])  # 17 photos


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_features_close_to_fp32_and_same_from_two_builds(tiny_kaggle, calibration, tmp_path,
                                                              monkeypatch):
    photos = _photos(tiny_kaggle)
    fp32, ok32 = FeatureExtractor("efficientnet_lite0", image_size=SIZE)(photos)
    fx = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8", calibration=calibration)
    int8, ok8 = fx(photos)
    assert ok8.tolist() == ok32.tolist() and int((~ok8).sum()) == 1
    cos = _cosine(fp32[ok8], int8[ok8])
    assert cos.mean() > 0.97 and cos.min() > 0.9, (cos.mean(), cos.min())
    assert np.abs(fp32[ok8] - int8[ok8]).max() > 1e-3  # it really is another engine
    # a second build from scratch (another cache folder): the same bytes, the same features
    monkeypatch.setenv("FASHIONHASH_CACHE", str(tmp_path / "other"))
    again = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8", calibration=calibration)
    assert again.onnx_path != fx.onnx_path and again.onnx_path.name == fx.onnx_path.name
    assert again.onnx_path.read_bytes() == fx.onnx_path.read_bytes()
    np.testing.assert_array_equal(again(photos)[0], int8)
    # other calibration photos: another file
    other = Calibration.from_files(_photos(tiny_kaggle)[1::10])
    assert other.tag != calibration.tag
    assert FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8",
                            calibration=other).onnx_path.name != fx.onnx_path.name


def _float_weight_convs(path: Path) -> set[str]:
    """Names of the Conv nodes of an ONNX graph whose weights are not dequantized int8."""
    import onnx

    graph = onnx.load(str(path)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in dq}


def test_float_tail_keeps_the_last_blocks_float(tiny_kaggle, calibration):
    """model.int8_float_tail=1: block 15 and the head conv of the trunk stay float32 (the
    rest int8); features still match fp32; its own file and tag, tail 0's tag unchanged."""
    photos = _photos(tiny_kaggle)[:24]
    fp32, ok = FeatureExtractor("efficientnet_lite0", image_size=SIZE)(photos, num_workers=0)
    tail0 = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8", calibration=calibration)
    tail1 = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8",
                             calibration=Calibration(calibration.photos, float_tail=1))
    # tail 0 keeps the tag (file names, feature cache keys) it had before the setting existed
    assert Calibration(calibration.photos, 0).tag == calibration.tag != Calibration(calibration.photos, 1).tag
    assert tail1.onnx_path.name != tail0.onnx_path.name
    # the trunk part of the merged graph (the float tail graph's nodes are prefixed "tail/")
    trunk = {n for n in _float_weight_convs(tail1.onnx_path) if not n.startswith("tail/")}
    assert trunk == {"/_blocks.15/_expand_conv/Conv", "/_blocks.15/_depthwise_conv/Conv",
                     "/_blocks.15/_project_conv/Conv", "/_conv_head/Conv"}, trunk
    assert not {n for n in _float_weight_convs(tail0.onnx_path) if not n.startswith("tail/")}
    f0, _ = tail0(photos, num_workers=0)
    f1, _ = tail1(photos, num_workers=0)
    cos = _cosine(fp32[ok], f1[ok])
    assert cos.mean() > 0.97 and cos.min() > 0.9, (cos.mean(), cos.min())
    assert np.abs(f1[ok] - f0[ok]).max() > 1e-4  # another graph, not tail 0's


def test_float_front_keeps_the_first_blocks_float(tiny_kaggle, calibration):
    """model.int8_float_front=3: the stem and blocks 0-2 stay float32, the rest int8; the
    features come closer to fp32 than all-int8 ones (the first layers hold most of the error)."""
    photos = _photos(tiny_kaggle)[:24]
    fp32, ok = FeatureExtractor("efficientnet_lite0", image_size=SIZE)(photos, num_workers=0)
    front = Calibration(calibration.photos, float_front=3)
    assert front.tag not in (calibration.tag, Calibration(calibration.photos, float_tail=3).tag)
    fx = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8", calibration=front)
    trunk = {n for n in _float_weight_convs(fx.onnx_path) if not n.startswith("tail/")}
    assert trunk == {"/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv", "/_blocks.0/_project_conv/Conv",
                     *(f"/_blocks.{b}/_{c}_conv/Conv" for b in (1, 2) for c in ("expand", "depthwise", "project"))}, trunk
    int8, _ = FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8",
                               calibration=calibration)(photos, num_workers=0)
    got, _ = fx(photos, num_workers=0)
    cos_front, cos_int8 = _cosine(fp32[ok], got[ok]), _cosine(fp32[ok], int8[ok])
    assert cos_front.min() > 0.95 and cos_front.mean() > cos_int8.mean(), (cos_front.mean(), cos_int8.mean())


def test_float_tail_nodes_and_refusals():
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Relu", [a], [b], name=n) for a, b, n in
             [("x", "a", "/_conv_stem/Conv"), ("a", "b", "/_blocks.0/Conv"), ("b", "c", "/_blocks.1/Conv"),
              ("c", "d", "/_blocks.1/Add"), ("d", "e", "/_conv_head/Conv"), ("e", "y", "/Clip_1")]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    assert float_tail_nodes(graph, 2, 0) == []
    assert float_tail_nodes(graph, 2, 1) == ["/_blocks.1/Conv", "/_blocks.1/Add", "/_conv_head/Conv", "/Clip_1"]
    assert float_tail_nodes(graph, 2, 2)[0] == "/_blocks.0/Conv"
    with pytest.raises(ValueError, match="3"):
        float_tail_nodes(graph, 2, 3)
    assert float_front_nodes(graph, 2, 0) == []
    assert float_front_nodes(graph, 2, 1) == ["/_conv_stem/Conv", "/_blocks.0/Conv"]
    with pytest.raises(ValueError):
        float_front_nodes(graph, 2, 2)  # every block float: use model.engine=onnx
    with pytest.raises(ValueError):
        Calibration((b"x",), float_tail=-1)
    cfg = Config()
    cfg.model.engine = "onnx_int8"
    for bad in (-1, 17):
        cfg.model.int8_float_tail = bad
        with pytest.raises(ValueError, match="int8_float_tail"):
            check_engine(cfg.model)
    cfg.model.int8_float_tail = 16  # every block (the stem alone in int8): allowed
    check_engine(cfg.model)
    cfg.model.int8_float_tail = 0
    for bad in (-1, 16):
        cfg.model.int8_float_front = bad
        with pytest.raises(ValueError, match="int8_float_front"):
            check_engine(cfg.model)
    cfg.model.int8_float_front, cfg.model.int8_float_tail = 3, 14  # 17 of 16 blocks
    with pytest.raises(ValueError, match="int8_float_front"):
        check_engine(cfg.model)
    cfg.model.int8_float_tail = 1
    check_engine(cfg.model)


def test_feature_keys_of_int8_differ_and_fp32_keys_are_unchanged(tiny_kaggle, calibration):
    cat = open_catalogue("kaggle", tiny_kaggle)
    pos = np.arange(10)
    fp32 = _feature_key(cat, pos, "efficientnet_lite0", 224, None, 1.0)
    # the key every existing fp32 cache entry was written under
    assert fp32 == {"catalogue": cat.fingerprint(), "positions": fp32["positions"], "backbone": "efficientnet_lite0",
                    "size": 224, "augment_seed": None, "strength": None, "version": 1}
    int8 = _feature_key(cat, pos, "efficientnet_lite0", 224, None, 1.0, calibration=calibration)
    assert int8 == dict(fp32, engine="onnx_int8", int8=calibration.tag)
    desc = _feature_key(cat, pos, "efficientnet_lite0", 224, None, 1.0, "descriptor", calibration)
    assert desc["output"] == "descriptor" and desc["int8"] == calibration.tag


@pytest.fixture(scope="module")
def int8_run(tiny_kaggle, tmp_path_factory, request) -> Path:
    """The demo's config trained on the tiny catalogue with the int8 engine, a descriptor at
    two scales, evaluated (codes of the database written from the cached features)."""
    run = tmp_path_factory.mktemp("int8") / "run"
    config = request.config.rootpath / "configs" / "demo.yaml"
    args = [a for a in TINY_RUN_ARGS if not a.startswith(("descriptor.", "model.image_size"))]
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--evaluate", "--quiet",
                 f"data.root={tiny_kaggle}", *args, f"model.image_size={SIZE}", "model.engine=onnx_int8",
                 "descriptor.kind=gem", "descriptor.scales=[96,64]", "descriptor.dim=32",
                 "descriptor.learn_epochs=1", "descriptor.learn_items=40", "descriptor.learn_views=1"]) == 0
    return run


def test_int8_run_encodes_photos_as_its_cached_catalogue(int8_run):
    """The query encoder (int8 trunk + float head in one graph) gives the codes that the head
    gives on the cached int8 features of the same photos, i.e. the index's codes."""
    run = load_run(int8_run)
    cfg = run.cfg
    cat, split = open_data(cfg, int8_run / "split.json")
    pos = cat.positions(split.database)[:80]
    cal = int8_calibration(cfg)
    feats, ok = item_features(cat, pos, cfg.model, calibration=cal)
    want = run.codes_from_inputs(feats)
    got, ok_enc = run.encode_sources(list(cat.paths[pos]))
    assert ok_enc.tolist() == ok.tolist() and ok.sum() >= 70
    np.testing.assert_allclose(got[ok], want[ok], atol=1e-4)
    assert np.array_equal(C.pack(got[ok]), C.pack(want[ok]))
    # varied codes, so that equality means something (CSQ, the demo's method, gathers the
    # codes of a class at its hash centre: about one code per class)
    assert len(np.unique(C.pack(got[ok]), axis=0)) >= 5
    # the two-stage query encoder: its descriptors at each scale are the cached ones
    desc, _ = item_descriptors(cat, pos, cfg)
    first, *others = run.descriptor_encoders()
    out, _ = first(list(cat.paths[pos]), num_workers=0)
    np.testing.assert_allclose(out[ok, :cfg.model.n_bits], want[ok], atol=1e-4)
    from fashionhash.pipeline import combine_scales

    per_scale = [out[:, cfg.model.n_bits:]] + [fx(list(cat.paths[pos]), num_workers=0)[0] for fx in others]
    np.testing.assert_allclose(combine_scales(per_scale)[ok], desc[ok], atol=1e-4)
    # ... and the database codes the evaluation wrote (what an index holds)
    db = np.load(int8_run / "codes" / "database.npz")
    rows = {int(i): r for r, i in enumerate(db["ids"])}
    written = db["packed"][[rows[int(i)] for i in cat.ids[pos[ok]]]]
    assert np.array_equal(written, C.pack(got[ok]))


def test_int8_run_cli_encode_and_refusals(int8_run, tiny_kaggle, capsys):
    photo = _photos(tiny_kaggle)[5]
    assert main(["encode", str(int8_run), photo]) == 0
    code = capsys.readouterr().out.split()[0]
    assert main(["encode", str(int8_run), photo, "--engine", "onnx_int8"]) == 0
    assert capsys.readouterr().out.split()[0] == code
    # fp32 codes would not match the int8 index: refused, with the reason
    run = load_run(int8_run)
    for engine in ("torch", "onnx"):
        with pytest.raises(ValueError, match="onnx_int8"):
            run.encode_sources([photo], engine=engine)
    assert main(["encode", str(int8_run), photo, "--engine", "torch"]) != 0
    assert "onnx_int8" in capsys.readouterr().err


def test_int8_is_refused_where_it_cannot_work(tiny_kaggle, calibration):
    cfg = Config()
    cfg.model.engine = "onnx_int8"
    cfg.model.mode = "finetune"
    with pytest.raises(ValueError, match="model.mode=frozen"):
        build_method(cfg, 4)
    cfg.model.mode, cfg.model.backbone = "frozen", "small_cnn"
    with pytest.raises(ValueError, match="efficientnet"):
        check_engine(cfg.model)
    cfg.model.engine = "int4"
    with pytest.raises(ValueError, match="onnx_int8"):
        check_engine(cfg.model)
    # a backbone without the EfficientNet-Lite blocks, or no calibration photos
    from fashionhash.models.backbones import build_backbone

    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        FeatureExtractor("small_cnn", engine="onnx_int8", calibration=calibration,
                         model=build_backbone("small_cnn"))
    with pytest.raises(ValueError, match="calibration"):
        FeatureExtractor("efficientnet_lite0", image_size=SIZE, engine="onnx_int8")
    # item_features needs the run's calibration with int8, and only with int8
    cat = open_catalogue("kaggle", tiny_kaggle)
    m = Config().model
    with pytest.raises(ValueError, match="calibration"):
        item_features(cat, np.arange(3), m, calibration=calibration)
    m.engine = "onnx_int8"
    with pytest.raises(ValueError, match="calibration"):
        item_features(cat, np.arange(3), m)


def test_fp32_run_refuses_the_int8_engine(tmp_path):
    from test_encoding import _make_run

    run = load_run(_make_run(tmp_path / "fp32", mode="frozen", image_size=64, n_bits=16))
    with pytest.raises(ValueError, match="onnx or torch"):
        run.encoder("onnx_int8")
    assert json.loads((tmp_path / "fp32" / "meta.json").read_text())["classes"]
    assert load_config(tmp_path / "fp32" / "config.yaml").model.engine == "onnx"
