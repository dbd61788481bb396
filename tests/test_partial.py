"""Partial mode (``model.mode=partial``): the backbone's tail from block ``train_from`` trains
on cached activations of the frozen front. A tiny run on real photos at 64 px: the tail's
weights change and the front's do not, resume equals an uninterrupted run, evaluation and
the photo encoder (torch and ONNX) give the codes of front + trained tail + head, checked
against a slow float32 reference; bad settings are refused before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionhash.cli import main
from fashionhash.config import load_config
from fashionhash.models.backbones import build_backbone
from fashionhash.pipeline import build_method, image_array, item_activations, load_run, open_data
from conftest import assert_same_last_checkpoint

ARGS = ["--config", "configs/demo.yaml", "data.n_query=20", "data.n_val=12", "data.min_per_class=5",
        "data.n_damaged=10", "data.n_views=1", "model.image_size=64", "model.n_bits=16",
        "model.hidden=64", "model.mode=partial", "model.engine=onnx", "model.train_from=-1", "train.batch_size=32",
        "train.num_workers=0", "train.threads=1", "descriptor.kind=none"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _train(tiny_kaggle: Path, run: Path, *extra: str) -> int:
    return main(["train", "--run-dir", str(run), "--quiet", *ARGS, f"data.root={tiny_kaggle}", *extra])


@pytest.fixture(scope="module")
def partial_run(tiny_kaggle, tmp_path_factory) -> Path:
    """Two epochs of partial mode, chosen on same-product top-1 of the damaged val copies
    (frozen mode's item-level val scores work here too), then evaluated."""
    run = tmp_path_factory.mktemp("partial") / "run"
    assert _train(tiny_kaggle, run, "train.epochs=2", "train.select_metric=same_product_top1",
                  "--evaluate") == 0
    return run


def _fresh_method(run: Path):
    """The run's method as training started it: ImageNet tail, seeded head."""
    r = load_run(run)
    return build_method(r.cfg, len(r.classes), r.meta.get("attr_sizes"))


def test_tail_trains_front_does_not(partial_run):
    state = torch.load(partial_run / "checkpoints/last.pt", weights_only=False)["method"]
    start = _fresh_method(partial_run).state_dict()
    tail = {k: v for k, v in state.items() if k.startswith("backbone.")}
    # the checkpoint holds the tail alone (Lite0's last block and the head conv), no stem
    assert tail and all(k.startswith(("backbone.blocks.0.", "backbone.conv_head", "backbone.bn_head"))
                        for k in tail), sorted(tail)
    moved = [k for k, v in tail.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "backbone.blocks.0._expand_conv.weight" in moved and "backbone.conv_head.weight" in moved
    # eval-mode BatchNorm: the ImageNet running statistics are kept
    for k in tail:
        if "running_" in k:
            assert torch.equal(tail[k], start[k]), k
    # the photo encoder's front is the registry's pretrained backbone, untouched
    front = load_run(partial_run).encoder("torch").model.backbone.net.state_dict()
    for k, v in build_backbone("efficientnet_lite0").state_dict().items():
        assert torch.equal(front[k], v), k
    log = [json.loads(x) for x in (partial_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [0, 1]
    assert 0 <= log[-1]["val"]["same_product_top1"] <= 1


def test_resume_equals_uninterrupted(tiny_kaggle, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(tiny_kaggle, full, "train.epochs=2") == 0
    assert _train(tiny_kaggle, part, "train.epochs=1") == 0
    assert main(["train", "--run-dir", str(part), "--resume", "--quiet", "train.epochs=2"]) == 0
    assert_same_last_checkpoint(full, part)


def _reference_codes(run, photos: list[str]) -> np.ndarray:
    """Slow and obvious: float32 pixels -> pretrained blocks [:start] -> the run's trained
    tail -> its head, one photo at a time, nothing cached, no float16."""
    m = run.cfg.model
    net = build_backbone(m.backbone)
    tail = run.method.backbone
    spec = net.preprocessing
    out = []
    with torch.no_grad():
        for p in photos:
            x = torch.from_numpy(image_array(p, spec, m.image_size))[None]
            out.append(run.method.encode(net.forward_blocks(x, tail.start).flatten(1))[0].numpy())
    return np.stack(out)


def test_encoder_and_evaluation_use_the_trained_tail(partial_run):
    run = load_run(partial_run)
    cat, split = open_data(run.cfg, partial_run / "split.json")
    q = np.load(partial_run / "codes/query.npz")
    pos = cat.positions(q["ids"])[:8]
    photos = [str(cat.paths[i]) for i in pos]
    ref = _reference_codes(run, photos)
    # the photo encoder (service, `fashionhash encode`, index build): float32 end to end
    for engine in ("torch", "onnx"):
        real, ok = run.encode_sources(photos, engine=engine, num_workers=0)
        assert ok.all()
        np.testing.assert_allclose(real, ref, atol=1e-4, err_msg=engine)
    # the fast path (training's val, evaluation): cached float16 activations -> tail -> head
    acts, ok = item_activations(cat, pos, run.cfg.model, num_workers=0)
    assert acts.dtype == np.float16 and ok.all()
    np.testing.assert_allclose(run.codes_from_inputs(acts), ref, atol=2e-2)
    np.testing.assert_allclose(q["real"][:8], ref, atol=2e-2)  # what `evaluate` saved
    # a trained tail is not the ImageNet one: the codes differ from the untrained start's
    fresh = _fresh_method(partial_run)
    fresh.head.load_state_dict(run.method.head.state_dict())
    with torch.no_grad():
        untrained = fresh.eval().encode(torch.from_numpy(acts).float()).numpy()
    assert np.abs(untrained - ref).max() > 1e-2
    metrics = json.loads((partial_run / "metrics.json").read_text())
    assert metrics["mode"] == "partial" and 0 <= metrics["map"] <= 1


def test_exported_graph_is_the_composed_network(partial_run, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "encoder.onnx"
    assert main(["export", str(partial_run), "--onnx", "--out", str(out)]) == 0
    run = load_run(partial_run)
    cat, _ = open_data(run.cfg, partial_run / "split.json")
    photos = [str(cat.paths[i]) for i in range(4)]
    x = np.stack([image_array(p, build_backbone("efficientnet_lite0").preprocessing, 64) for p in photos])
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _reference_codes(run, photos), atol=1e-4)
    capsys.readouterr()
    assert main(["encode", str(partial_run), photos[0]]) == 0  # the CLI prints the photo's code
    assert len(capsys.readouterr().out.split()[0]) == 4  # 16 bits = 2 bytes = 4 hex digits


def test_activation_cache_keys(tiny_kaggle):
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_kaggle}", "model.image_size=64",
                                            "model.mode=partial", "model.engine=onnx"])
    cat, _ = open_data(cfg)
    pos = np.arange(4)
    last, _ = item_activations(cat, pos, cfg.model, num_workers=0)
    assert last.shape == (4, 192 * 2 * 2)
    cfg.model.train_from = 15  # the same block as -1: the same entry
    assert np.array_equal(item_activations(cat, pos, cfg.model, num_workers=0)[0], last)
    cfg.model.train_from = 11  # another block: another entry (112 channels at 4x4)
    assert item_activations(cat, pos, cfg.model, num_workers=0)[0].shape == (4, 112 * 4 * 4)
    cfg.model.train_from = -1
    view, _ = item_activations(cat, pos, cfg.model, augment_seed=1000, num_workers=0)
    assert view.shape == last.shape and not np.array_equal(view, last)


@pytest.mark.parametrize("override, message", [
    ("model.train_from=16", "blocks 0..15"),
    ("model.train_from=-17", "blocks 0..15"),
    ("model.backbone=small_cnn", "EfficientNet-Lite"),
    ("method.name=lsh", "closed form"),
    ("method.name=itq", "closed form"),
    ("model.mode=partly", "model.mode is one of"),
    ("descriptor.kind=gem", "descriptor.kind=none"),
    ("model.train_from=stage7", "whole number"),
    ("model.engine=onnx_int8", "model.mode=frozen"),  # no int8 front for the activations
])
def test_bad_settings_refused_before_anything_is_written(tiny_kaggle, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert _train(tiny_kaggle, run, override) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()
