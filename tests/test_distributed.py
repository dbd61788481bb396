"""Several processes (torch.distributed, gloo, on loopback) give what one process gives:
the sharded encoder's gradients equal the one-process gradients of the same global batch,
a two-rank training run (interrupted and resumed) ends where a one-process run ends, and
`fashionhash encode --folder` under torchrun (two shards) gives the codes and index of
one process.

The training workers are started with ``torch.multiprocessing.spawn`` and the environment
torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR...), so the code under test joins the
process group exactly as under torchrun; the encoding test runs torchrun itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fashionhash import distributed
from fashionhash.config import Config, load_config, save_config
from fashionhash.encoding import merge_chunks
from fashionhash.index.build import index_encoded
from fashionhash.index import HashIndex
from fashionhash.pipeline import build_method, load_run
from fashionhash.training import resume_config, train

ROOT = Path(__file__).resolve().parents[1]
# a process that waits on a peer fails after 3 minutes instead of the 2-hour default
os.environ.setdefault("FASHIONHASH_DIST_TIMEOUT", "180")
#: a frozen-feature problem small enough for seconds: 530 training items, 8 steps an epoch
FROZEN_ARGS = ["model.mode=frozen", "data.n_views=1", "data.n_query=40", "data.n_val=30",
               "data.min_per_class=1", "data.n_damaged=0", "model.n_bits=16", "model.hidden=64",
               "model.dropout=0", "train.batch_size=64", "train.num_workers=0", "train.threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """Spawned process: the environment torchrun gives a worker, then ``fn(*args)``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fn(*args)


def _spawn(fn, *args, world: int = 2) -> None:
    torch.multiprocessing.spawn(_as_rank, args=(world, _free_port(), fn, args), nprocs=world)


# ---------------------------------------------------------------- gradients of one step


class _ToyBackbone(nn.Module):
    """A backbone with parameters and no batch statistics: finetune mode in miniature."""

    feat_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, self.feat_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _methods() -> dict[str, tuple[nn.Module, bool]]:
    """name -> (method, local_inputs): a backbone's inputs are sharded, cached features are not."""
    from fashionhash.methods.adversarial import AdversarialHashing
    from fashionhash.methods.sgml import SGML

    torch.manual_seed(0)
    return {
        "adversarial+backbone": (AdversarialHashing(12, 8, 3, hidden=16, dropout=0.0,
                                                    backbone=_ToyBackbone()), True),
        "adversarial": (AdversarialHashing(5, 8, 3, hidden=16, dropout=0.0), False),
        "sgml": (SGML(5, 8, 3, hidden=16, dropout=0.0, attr_sizes=[2]), False),
    }


def _grads(method: nn.Module, batch: dict) -> tuple[dict, dict]:
    losses, _ = method.objectives(batch)
    groups = {n: [p for g in gs for p in g["params"]] for n, gs in method.param_groups().items()}
    return ({n: float(v) for n, v in losses.items()},
            {n: torch.autograd.grad(losses[n], groups[n], allow_unused=True) for n in losses})


def _check_step_gradients() -> None:
    with distributed.session() as info:
        b = 4  # per rank; the global batch has b * world items
        g = torch.Generator().manual_seed(1)
        n = b * info.world
        full = {"x": torch.randn(n, 5, generator=g), "x_view": torch.randn(n, 5, generator=g),
                "y": torch.randint(0, 3, (n,), generator=g), "item": torch.arange(n),
                "attrs": torch.randint(0, 2, (n, 1), generator=g)}
        own = slice(info.rank * b, (info.rank + 1) * b)
        for name, (method, local_inputs) in _methods().items():
            method.train()
            torch.manual_seed(2)  # the random pair partners of the adversarial loss
            ref_losses, ref = _grads(method, full)
            batch = dict(full, x=full["x"][own], x_view=full["x_view"][own]) if local_inputs else full
            torch.manual_seed(2)
            with distributed.sharded_encoder(method, info, b, local_inputs=local_inputs, seed=info.rank):
                losses, got = _grads(method, batch)
            for group, gs in got.items():
                distributed.all_reduce_mean_([t for t in gs if t is not None], info)
            assert losses == pytest.approx(ref_losses, rel=1e-5), name
            for group in ref:
                for r, t in zip(ref[group], got[group]):
                    assert (r is None) == (t is None), (name, group)
                    if r is not None:
                        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-6, msg=f"{name} {group}")


def test_sharded_step_has_the_one_process_gradients():
    _spawn(_check_step_gradients)


# ---------------------------------------------------------------- a whole training run


def _synthetic_features(cat, positions, mcfg, *, augment_seed=None, strength=1.0, progress=None,
                        num_workers=0, descriptors=False, calibration=None):
    """Stand-in for the backbone's cached features: a fixed random projection of the pixels
    (plus seeded noise for an augmented view), so no backbone weights are needed."""
    from fashionhash.pipeline import feature_dim

    px = cat.pixels[positions].reshape(len(positions), -1).astype(np.float32) / 255
    proj = np.random.default_rng(0).normal(size=(px.shape[1], feature_dim(mcfg.backbone)))
    feats = np.maximum(px @ proj.astype(np.float32) / 10, 0)
    if augment_seed is not None:
        feats += np.random.default_rng([augment_seed, len(positions)]).normal(
            0, 0.1 * strength, feats.shape).astype(np.float32)
    return feats.astype(np.float32), np.ones(len(positions), bool)


def _train_frozen(root: str, run_dir: str, epochs_then_resume: tuple[int, ...]) -> None:
    import fashionhash.pipeline as pipeline

    pipeline.item_features = _synthetic_features  # what the trainer's item_inputs reads in frozen mode
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml", [f"data.root={root}", *FROZEN_ARGS,
                                                                f"train.epochs={epochs_then_resume[0]}"])
    # one process group for all the calls, as the caller's own (a real resume is a new
    # torchrun): re-creating it on the same port inside one process races with the old
    # store, which may still be listening (seen to hang a clean-clone CI run)
    with distributed.session():
        train(cfg, run_dir)
        for epochs in epochs_then_resume[1:]:
            train(resume_config(run_dir, [f"train.epochs={epochs}"]), run_dir, resume=True)


def test_two_ranks_resumed_match_one_process(synthetic_fmnist, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setattr("fashionhash.pipeline.item_features", _synthetic_features)
    _train_frozen(str(synthetic_fmnist), str(one), (2,))
    _spawn(_train_frozen, str(synthetic_fmnist), str(two), (1, 2))  # killed after epoch 1, resumed

    a = torch.load(one / "checkpoints/last.pt", weights_only=False)
    b = torch.load(two / "checkpoints/last.pt", weights_only=False)
    assert a["method"].keys() == b["method"].keys() and b["epoch"] == 1
    for k in a["method"]:
        torch.testing.assert_close(b["method"][k], a["method"][k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 alone wrote the log: each epoch once, and the resume
    events = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("epoch")) for e in events] == [("epoch", 0), ("resume", 1), ("epoch", 1)]
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    for ea, eb in zip(a["history"], b["history"]):
        assert eb["train"] == pytest.approx(ea["train"], rel=1e-4)
        assert eb["best_epoch"] == ea["best_epoch"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m fashionhash.cli ARGS`` from the repository."""
    return subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           "-m", "fashionhash.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_finetune_under_torchrun(synthetic_fmnist, tmp_path):
    """The unchanged command under torchrun: photos through DistributedSampler, rank 0 alone
    logs, reports and evaluates."""
    run = tmp_path / "run"
    proc = _torchrun("train", "--config", "configs/fashion_mnist.yaml", "--run-dir", str(run), "--evaluate",
                     "--quiet", f"data.root={synthetic_fmnist}", "data.n_query=40", "data.n_val=30",
                     "data.min_per_class=1", "data.n_damaged=20", "model.n_bits=16", "model.hidden=64",
                     "train.batch_size=64", "train.num_workers=0", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trained adversarial") == 1 and proc.stdout.count("mAP@all") == 1, proc.stdout
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["epoch"]
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    assert (run / "metrics.json").is_file()


# ---------------------------------------------------------------- sharded encoding


def _small_run(path: Path) -> Path:
    """A run directory holding a seeded, untrained small-CNN encoder (no weights to fetch)."""
    cfg = Config()
    cfg.data.dataset = "fashion_mnist"
    cfg.model.backbone, cfg.model.mode, cfg.model.image_size = "small_cnn", "finetune", 28
    cfg.model.n_bits, cfg.model.hidden = 16, 32
    path.mkdir()
    save_config(cfg, path / "config.yaml")
    (path / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    torch.manual_seed(0)
    (path / "checkpoints").mkdir()
    torch.save({"method": build_method(cfg, 3).state_dict(), "epoch": 0}, path / "checkpoints" / "best.pt")
    return path


def test_encode_under_torchrun_matches_one_process(tmp_path):
    from PIL import Image

    run, photos = _small_run(tmp_path / "run"), tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(25):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    (photos / "005.png").write_bytes(b"not a photo")  # in chunk 1, which rank 1 encodes
    common = ["--engine", "torch", "--chunk-size", "4", "--workers", "1", "--quiet"]

    one = distributed.encode_folder_distributed(load_run(run), photos, tmp_path / "one", engine="torch",
                                                chunk_size=4, num_workers=1)
    assert one is not None and one.complete and one.encoded == 25
    proc = _torchrun("encode", str(run), "--folder", str(photos), "--out", str(tmp_path / "two"),
                     "--index", str(tmp_path / "two-index"), *common)
    assert proc.returncode == 0, proc.stderr
    # rank 0 alone reports, for both shards; rank 1 met the unreadable photo and said so
    assert proc.stdout.count("encoded 25 photos") == 1, proc.stdout
    assert "[rank 1] WARNING" in proc.stderr and "[rank 1] INFO" not in proc.stderr

    a, b = merge_chunks(tmp_path / "one"), merge_chunks(tmp_path / "two")
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.ok, a.ok)
    np.testing.assert_array_equal(b.packed, a.packed)
    assert not a.ok[5] and a.ok.sum() == 24
    index_one = index_encoded(a, tmp_path / "one-index")
    index_two = HashIndex.open(tmp_path / "two-index")
    try:
        assert len(index_two) == len(index_one) == 24
        for x, y in zip(index_one.search(a.packed[a.ok], 5), index_two.search(a.packed[a.ok], 5)):
            np.testing.assert_array_equal(y, x)
    finally:
        index_one.close()
        index_two.close()
