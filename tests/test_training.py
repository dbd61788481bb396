"""Training through the real CLI: one epoch on real photos, resume after a kill equals an
uninterrupted run, divergence stops with a clear message, a corrupt JPEG is skipped."""
import json
import math

import numpy as np
import pytest
import torch

from fashionhash.cli import main
from fashionhash.config import load_config
from fashionhash.training import TrainingDiverged, train
from conftest import assert_same_last_checkpoint

FM_ARGS = ["data.n_query=40", "data.n_val=30", "data.min_per_class=1", "data.n_damaged=20",
           "train.num_workers=0", "train.batch_size=64", "model.n_bits=16", "model.hidden=64"]


def _fm(synthetic_fmnist, *extra):
    return ["--config", "configs/fashion_mnist.yaml", f"data.root={synthetic_fmnist}", *FM_ARGS, *extra]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_one_epoch_real_photos_through_cli(tiny_kaggle, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/demo.yaml", "--run-dir", str(run), "--evaluate", "--quiet",
               f"data.root={tiny_kaggle}", "data.n_query=20", "data.n_val=12", "data.min_per_class=5",
               "data.n_damaged=10", "model.image_size=64", "model.n_bits=32", "train.epochs=1",
               "train.batch_size=32", "train.num_workers=1", "train.select_metric=same_product_top10",
               "descriptor.kind=none"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mAP@all" in out and "same product top-1" in out
    for name in ("config.yaml", "meta.json", "split.json", "log.jsonl", "checkpoints/last.pt",
                 "checkpoints/best.pt", "metrics.json", "pr_curve.png", "codes/database.npz"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["git_commit"] and len(meta["classes"]) == 4
    assert meta["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["map"] <= 1 and metrics["n_bits"] == 32
    # damaged copies of val items are scored every epoch, so item settings are chosen on val
    epoch = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    assert epoch["event"] == "epoch" and 0 <= epoch["val"]["same_product_top1"] <= epoch["val"]["same_product_top10"] <= 1
    # the corrupt JPEG in the fixture never reached the model: it was skipped with a warning
    split = json.loads((run / "split.json").read_text())
    assert 99000001 in split["database"] + split["query"] + split["val"]
    # encode a photo through the CLI
    photo = next((tiny_kaggle / "images").glob("*.jpg"))
    assert main(["encode", str(run), str(photo)]) == 0
    assert len(capsys.readouterr().out.split()[0]) == 8  # 32 bits = 4 bytes = 8 hex digits


def test_resume_after_kill_equals_uninterrupted(synthetic_fmnist, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--run-dir", str(full), "--quiet", *_fm(synthetic_fmnist, "train.epochs=2")]) == 0
    assert main(["train", "--run-dir", str(part), "--quiet", *_fm(synthetic_fmnist, "train.epochs=1")]) == 0
    # "kill" after epoch 1, then resume with the longer schedule
    assert main(["train", "--run-dir", str(part), "--resume", "--quiet", "train.epochs=2"]) == 0
    assert_same_last_checkpoint(full, part)


def test_val_same_product_scores():
    from fashionhash.training.trainer import _val_metrics

    rng = np.random.default_rng(0)
    db = rng.choice([-1.0, 1.0], size=(50, 16))
    val = -db[:6]  # far from every database code
    out = _val_metrics(val, db, np.arange(6), np.arange(50) % 6, damaged_real=val[[1, 4]],
                       damaged_rows=[1, 4])
    assert out["same_product_top1"] == out["same_product_top10"] == 1.0
    # a copy that lands on a database item's code, tied with it: half a hit at top-1
    out = _val_metrics(val, np.concatenate([db, val[[4]]]), np.arange(6), np.arange(51) % 6,
                       damaged_real=val[[4]], damaged_rows=[4])
    assert out["same_product_top1"] == 0.5 and out["same_product_top10"] == 1.0


def test_val_scores_do_not_follow_a_class_sorted_database():
    from fashionhash.training.trainer import _val_metrics

    # every code equal: one tie group of 500 + 500 items listed class by class. Ranked by
    # index, class 0's queries would find all theirs first (AP 1) and class 1's last (AP ~0.31):
    # map@1000 ~0.65. In a random order each class is spread through the tie: ~0.5.
    db, val = np.ones((1000, 16)), np.ones((40, 16))
    db_y, val_y = np.repeat([0, 1], 500), np.repeat([0, 1], 20)
    out = _val_metrics(val, db, val_y, db_y)
    assert abs(out["map@1000"] - 0.5) < 0.05, out
    assert out["top1"] == 0.5  # tie-aware, order or not
    assert out == _val_metrics(val, db, val_y, db_y)  # a fixed order: reproducible


def test_select_metric_must_exist_on_val(synthetic_fmnist, tmp_path, capsys):
    # finetune mode validates class-level scores only
    args = _fm(synthetic_fmnist, "train.epochs=1", "train.select_metric=same_product_top10")
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--quiet", *args]) == 2
    assert "select_metric" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_existing_run_is_not_overwritten(synthetic_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--quiet", *_fm(synthetic_fmnist, "train.epochs=1")]) == 0
    assert main(["train", "--run-dir", str(run), "--quiet", *_fm(synthetic_fmnist, "train.epochs=1")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_nan_loss_stops_with_clear_message(synthetic_fmnist, tmp_path, monkeypatch):
    from fashionhash.methods.adversarial import AdversarialHashing

    real = AdversarialHashing.objectives

    def poisoned(self, batch):
        losses, parts = real(self, batch)
        losses["encoder"] = losses["encoder"] * float("nan")
        return losses, parts

    monkeypatch.setattr(AdversarialHashing, "objectives", poisoned)
    cfg = load_config("configs/fashion_mnist.yaml", [f"data.root={synthetic_fmnist}", *FM_ARGS])
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(cfg, tmp_path / "nan")
    lines = (tmp_path / "nan" / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "diverged"


def _scripted_val(monkeypatch, scores):
    """Val map@1000 follows ``scores`` epoch by epoch (whatever the weights)."""
    from fashionhash.training import trainer

    it = iter(scores)
    monkeypatch.setattr(trainer._ValSet, "scores", lambda self, method: {"map@1000": next(it), "top1": 0.0})


def _epochs(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_early_stopping_stops_and_keeps_the_best_epoch(synthetic_fmnist, tmp_path, monkeypatch):
    # best at epoch 1, then 2 epochs without a better score: stop after epoch 3 of at most 10
    _scripted_val(monkeypatch, [0.2, 0.5, 0.4, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--quiet",
                 *_fm(synthetic_fmnist, "train.epochs=10", "train.patience=2")]) == 0
    log = _epochs(run)
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [0, 1, 2, 3]
    assert log[-1] == {**log[-1], "event": "early_stop", "epoch": 3, "best_epoch": 1, "patience": 2}
    best = torch.load(run / "checkpoints/best.pt", weights_only=False)
    assert best["epoch"] == 1 and best["val"]["map@1000"] == 0.5
    # resuming a run that stopped early trains nothing more
    assert main(["train", "--run-dir", str(run), "--resume", "--quiet"]) == 0
    assert [r["epoch"] for r in _epochs(run) if r["event"] == "epoch"] == [0, 1, 2, 3]
    assert torch.load(run / "checkpoints/last.pt", weights_only=False)["epoch"] == 3


def test_patience_zero_trains_every_epoch(synthetic_fmnist, tmp_path, monkeypatch):
    _scripted_val(monkeypatch, [0.5, 0.1, 0.1, 0.1])
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--quiet", *_fm(synthetic_fmnist, "train.epochs=4")]) == 0
    assert [r["event"] for r in _epochs(run)] == ["epoch"] * 4
    assert torch.load(run / "checkpoints/best.pt", weights_only=False)["epoch"] == 0


def test_device_is_resolved_and_refused_clearly(monkeypatch):
    from fashionhash.models.device import resolve_device

    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("auto", processes=2).type == "cpu"  # one process per GPU: not yet
    with pytest.raises(ValueError, match="several processes"):
        resolve_device("cuda", processes=2)


def test_bfloat16_heads_train_and_a_bad_precision_is_refused(synthetic_fmnist, tmp_path, capsys):
    args = _fm(synthetic_fmnist, "train.epochs=1")
    assert main(["train", "--run-dir", str(tmp_path / "bad"), "--quiet", *args, "train.precision=half"]) == 2
    assert "train.precision='half'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--quiet", *args, "train.precision=bfloat16"]) == 0
    epoch = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(epoch["train"]["total"]) and 0 <= epoch["val"]["map@1000"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(synthetic_fmnist, tmp_path, capsys):
    args = _fm(synthetic_fmnist, "train.epochs=1", "train.device=cuda")
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--quiet", *args]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_progress_bar_opens_on_the_first_photo(capsys):
    """A phase whose array comes from the feature cache never updates: it shows no empty bar."""
    from fashionhash.cli import _Bars

    bars = _Bars()
    bars.phase("features cached", 10)
    assert "features cached" not in capsys.readouterr().err
    update = bars.phase("features computed", 2)
    update(1)
    update(1)
    assert "features computed" in capsys.readouterr().err
