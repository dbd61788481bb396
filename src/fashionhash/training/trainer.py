"""The trainer: Adam per optimiser group (encoder; discriminator for adversarial methods),
seeded epochs, JSON-lines log, a checkpoint every epoch with resume after a kill, the best
checkpoint chosen on the validation split (never on the test queries), and early stopping
once that score has not improved for ``train.patience`` epochs.

Under ``torchrun`` every process runs :func:`train` with the same arguments (see
:mod:`fashionhash.distributed`): each process encodes its share of every global batch of
``train.batch_size`` items, the losses see the whole batch, the gradients are averaged,
and only rank 0 writes files, validates and reports progress.

A run directory holds: ``config.yaml`` (resolved), ``meta.json`` (git commit, classes,
versions), ``split.json``, ``log.jsonl``, ``checkpoints/{last,best}.pt`` and, after
evaluation, ``metrics.json`` and ``pr_curve.png``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from fashionhash import codes as C
from fashionhash import distributed
from fashionhash.config import Config, TrainConfig, git_commit, load_config, save_config
from fashionhash.distributed import DistInfo
from fashionhash.files import write_via_temp
from fashionhash.evaluation.metrics import (
    mean_average_precision, ndcg_at_k, relevance_from_labels, same_item_topk, tie_order, top1_expected,
)
from fashionhash.evaluation.two_stage import catalogue_gains
from fashionhash.pipeline import (
    VAL_DAMAGED_SEED, VIEW_SEED, Labels, build_method, check_descriptor_config, check_model_config,
    image_array, item_inputs, open_data,
)
from fashionhash.models.backbones import preprocessing_for
from fashionhash.models.device import device_of, resolve_device
from fashionhash.models.heads import check_precision, set_precision

log = logging.getLogger(__name__)
VAL_DB_IMAGES = 10_000  # finetune mode: validation database sample size


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


@dataclass
class Callbacks:
    """Hooks the CLI uses for progress bars; the library itself only logs."""

    on_phase: Callable[[str, int], Callable[[int], None] | None] = lambda name, total: None
    on_step: Callable[[int, int, int, dict], None] = lambda epoch, step, n, parts: None
    on_epoch: Callable[[dict], None] = lambda record: None


def _atomic_torch_save(obj, path: Path) -> None:
    write_via_temp(path, lambda tmp: torch.save(obj, tmp))


class _JsonLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _FrozenBatches:
    """Batches of cached features (or partial mode's float16 activations): ``x (B, F)``, one
    random augmented view ``x_view (B, F)``."""

    def __init__(self, feats: np.ndarray, views: np.ndarray | None, y: np.ndarray,
                 attrs: np.ndarray, batch_size: int) -> None:
        self.x = torch.from_numpy(feats)
        self.views = None if views is None else torch.from_numpy(views)  # (V, N, F)
        self.y, self.attrs = torch.from_numpy(y), torch.from_numpy(attrs)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return max(1, len(self.y) // self.batch_size)  # drop the ragged last batch

    def epoch(self, rng: np.random.Generator):
        perm = torch.from_numpy(rng.permutation(len(self.y)))
        for s in range(len(self)):
            idx = perm[s * self.batch_size:(s + 1) * self.batch_size]
            batch = {"x": self.x[idx], "y": self.y[idx], "item": idx, "attrs": self.attrs[idx]}
            if self.views is not None:
                v = torch.from_numpy(rng.integers(0, len(self.views), size=len(idx)))
                batch["x_view"] = self.views[v, idx]
            yield batch


class _ImageDataset(torch.utils.data.Dataset):
    """Photos for finetune mode: an augmented input and (optionally) a second augmented view,
    deterministic per (seed, epoch, item) so that resume reproduces the same stream."""

    def __init__(self, sources, y, attrs, spec, size, seed, strength, views: bool) -> None:
        self.sources, self.y, self.attrs = sources, y, attrs
        self.spec, self.size, self.seed, self.strength, self.views = spec, size, seed, strength, views
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        x = image_array(self.sources[i], self.spec, self.size, rng, 0.5 * self.strength)
        out = {"x": torch.from_numpy(x), "y": int(self.y[i]), "item": i,
               "attrs": torch.from_numpy(self.attrs[i])}
        if self.views:
            out["x_view"] = torch.from_numpy(image_array(self.sources[i], self.spec, self.size, rng,
                                                         self.strength))
        return out


def _readable(cat, positions) -> np.ndarray:
    from fashionhash.data.transforms import ImageError, load_image

    if cat.paths is None:
        return np.ones(len(positions), bool)
    ok = np.ones(len(positions), bool)
    for j, p in enumerate(positions):
        try:
            load_image(cat.paths[p])
        except ImageError:
            ok[j] = False
    return ok


def _val_metrics(q_real, db_real, q_y, db_y, damaged_real=None, damaged_rows=None, gains=None) -> dict:
    """Class-level scores of the val items against the database; with ``damaged_real``
    (damaged copies of the val items ``damaged_rows``), also their same-product top-1 /
    top-10 and graded nDCG@10 (``gains``) against the database + the val originals, as
    ``evaluate`` does for the test queries."""
    o = tie_order(len(db_real))  # the database in a fixed random order: ties are not class-sorted
    db_real, db_y = db_real[o], np.asarray(db_y)[o]
    if gains is not None:  # columns: database, then the val originals
        gains = gains[:, np.concatenate([o, np.arange(len(o), gains.shape[1])])]
    q_packed, db_packed = C.pack(q_real), C.pack(db_real)
    dist = C.hamming(q_packed, db_packed)
    rel = relevance_from_labels(q_y, db_y)
    out = {"map@1000": float(mean_average_precision(dist, rel, k=1000)),
           "top1": float(top1_expected(dist, rel))}
    if damaged_real is not None and len(damaged_real):
        gallery = np.concatenate([db_packed, q_packed])
        true = len(db_packed) + np.asarray(damaged_rows)
        dist = C.hamming(C.pack(damaged_real), gallery)
        hits = same_item_topk(dist, true, (1, 10))
        out.update({"same_product_top1": hits[1], "same_product_top10": hits[10]})
        if gains is not None:
            out["graded_ndcg@10"] = ndcg_at_k(dist, gains, 10)
    return out


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False,
          callbacks: Callbacks | None = None) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming from ``checkpoints/last.pt`` when asked).

    Under ``torchrun`` this joins the process group and leaves it when done (or on an
    error); ``callbacks`` are called on rank 0 only. ``--resume`` on several machines needs
    ``run_dir`` on a filesystem they share: every process reads ``checkpoints/last.pt``.
    """
    with distributed.session() as info:
        cb = (callbacks or Callbacks()) if info.is_main else Callbacks()
        out = _train(cfg, Path(run_dir), resume, cb, info)
        if info.is_main and cfg.descriptor.kind != "none":
            from fashionhash.training.descriptor import fit_descriptor

            fit_descriptor(out, phase=cb.on_phase)
        return out


def _train(cfg: Config, run_dir: Path, resume: bool, cb: Callbacks, info: DistInfo) -> Path:
    device = resolve_device(cfg.train.device, info.world)  # refused before anything is written
    check_precision(cfg.train.precision)
    ckpt_dir = _check_run(cfg, run_dir, resume, info)
    # the processes of one machine share its cores
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world)
    torch.set_num_threads(threads)
    jlog = _JsonLog(run_dir / "log.jsonl")
    data = _load_data(cfg, run_dir, cb, info)
    if info.is_main:
        _write_meta(run_dir / "meta.json", data, threads, info, device)

    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    method = build_method(cfg, len(data.classes), data.attr_sizes).to(device)
    set_precision(method, tcfg.precision)
    optims, params = _optimisers(method, tcfg)
    start_epoch, best, history = _restore(ckpt_dir / "last.pt", method, optims, run_dir, jlog, resume, info)
    # shallow methods (LSH, ITQ...) are fitted once in closed form on the training features
    fit = getattr(method, "fit", None)
    if fit is not None and start_epoch == 0:
        if data.train_x is None:
            raise ValueError(f"{cfg.method.name} is fitted on cached features: use model.mode=frozen")
        method.cpu()  # a closed-form fit, cheap: on the CPU whatever the device
        fit(torch.from_numpy(data.train_x), torch.from_numpy(data.train_y))
        method.to(device)
    trainable = any(p.requires_grad for p in method.parameters())
    # as DistributedDataParallel does: start every rank from rank 0's weights (a rank whose
    # initialisation differed, e.g. another torch build, would encode its share differently);
    # identical averaged updates keep them equal from then on
    distributed.broadcast_tensors_([t for t in method.state_dict().values() if t.is_floating_point()],
                                   info)
    step_fn = _Step(method, optims, params, cfg, info, jlog, ckpt_dir / "last.pt", device)

    for epoch in range(start_epoch, tcfg.epochs if trainable else 1):
        if best is not None and _patience_spent(best, epoch - 1, tcfg.patience):
            break  # a resumed run that had already stopped early
        t0 = time.time()
        train_parts = _run_epoch(step_fn, data, epoch, cb) if trainable else {}
        # rank 0 validates; its scores, hence the best-epoch decision, go to every rank
        val = distributed.broadcast_object(data.val.scores(method) if info.is_main else None, info)
        score = val[tcfg.select_metric]
        improved = best is None or score > best["score"]
        if improved:
            best = {"epoch": epoch, "score": score, "metric": tcfg.select_metric}
        record = {"event": "epoch", "epoch": epoch, "train": train_parts, "val": val,
                  "best_epoch": best["epoch"], "seconds": round(time.time() - t0, 2)}
        history.append(record)
        if info.is_main:
            _save_epoch(ckpt_dir, method, optims, record, best, history, improved)
            jlog.write(**record)
        cb.on_epoch(record)
        if _patience_spent(best, epoch, tcfg.patience):
            if info.is_main:
                jlog.write(event="early_stop", epoch=epoch, best_epoch=best["epoch"],
                           patience=tcfg.patience, metric=tcfg.select_metric)
            log.info("%s: no better val %s for %d epochs, stopped after epoch %d (best %d)",
                     run_dir, tcfg.select_metric, tcfg.patience, epoch, best["epoch"])
            break
    distributed.barrier(info)  # no rank returns before rank 0's checkpoint is on disk
    return run_dir


def _patience_spent(best: dict, last_epoch: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs (> 0) after the best one have not beaten it."""
    return patience > 0 and last_epoch - best["epoch"] >= patience


def _check_run(cfg: Config, run_dir: Path, resume: bool, info: DistInfo) -> Path:
    """Refuse a run that cannot start (before anything is written); save its config.
    Returns the checkpoint folder."""
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {run_dir} has no config.yaml")
    elif (ckpt_dir / "last.pt").is_file():
        raise FileExistsError(f"{run_dir} already holds a run: use --resume or another --run-dir")
    tcfg = cfg.train
    if tcfg.batch_size % info.world:
        raise ValueError(f"train.batch_size={tcfg.batch_size} is the global batch: it must be "
                         f"divisible by the number of processes ({info.world})")
    if tcfg.patience < 0:
        raise ValueError(f"train.patience={tcfg.patience}: epochs without a better val score "
                         "before stopping, 0 = never stop early")
    check_model_config(cfg)
    cached = cfg.model.mode in ("frozen", "partial")  # validated on cached inputs, damaged copies too
    selectable = {"map@1000", "top1"} | ({"same_product_top1", "same_product_top10", "graded_ndcg@10"}
                                         if cached and cfg.data.n_damaged else set())
    if tcfg.select_metric not in selectable:
        raise ValueError(f"train.select_metric={tcfg.select_metric!r}: this run's val split "
                         f"gives {sorted(selectable)}")
    check_descriptor_config(cfg)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return ckpt_dir


@dataclass
class _ValSet:
    """What every epoch is validated on: val items ``x (Q, ...)`` against a database
    ``db_x (D, ...)`` (features, or photos in finetune mode), optionally damaged copies of
    the first val items (frozen mode) for the item-level scores."""

    x: np.ndarray
    db_x: np.ndarray
    y: np.ndarray
    db_y: np.ndarray
    damaged: np.ndarray | None = None
    damaged_rows: np.ndarray | None = None
    gains: np.ndarray | None = None

    def scores(self, method) -> dict:
        device = device_of(method)

        def encode(x: np.ndarray) -> np.ndarray:  # (N, ...) -> (N, K) real codes
            method.eval()
            # activation maps and photos expand ~6x inside a block: smaller chunks than features
            n = 2048 if np.prod(x.shape[1:]) <= 4096 else 256
            with torch.no_grad():
                out = [method.encode(torch.from_numpy(x[i:i + n]).to(device)).cpu()
                       for i in range(0, len(x), n)]
            return torch.cat(out).numpy()

        return _val_metrics(encode(self.x), encode(self.db_x), self.y, self.db_y,
                            None if self.damaged is None else encode(self.damaged),
                            self.damaged_rows, self.gains)


@dataclass
class _TrainData:
    """A run's training stream and validation set (``val`` on rank 0 only)."""

    classes: list[str]
    attr_keys: tuple[str, ...]
    attr_sizes: list[int]
    train_y: np.ndarray  # (N,) class indices of the kept training items
    n_steps: int
    stream: Callable[[int, np.random.Generator], Iterator[dict]]  # (epoch, rng) -> batches
    val: _ValSet | None
    train_x: np.ndarray | None = None  # (N, F) frozen mode: the closed-form fits read them
    photo_size: tuple[int, int] | None = None  # the catalogue's median (w, h): see data.query_shrink


def _load_data(cfg: Config, run_dir: Path, cb: Callbacks, info: DistInfo) -> _TrainData:
    split_path = run_dir / "split.json"
    with distributed.main_first(info):
        # rank 0 draws and saves the split; the others read it, or (run directory not
        # shared) draw the same one from the same seed without saving it
        cat, split = open_data(cfg, split_path if info.is_main or split_path.is_file() else None)
    classes = list(split.protocol["classes"])
    labels = Labels.build(cat, classes)
    pos = {p: cat.positions(getattr(split, p)) for p in ("train", "val")}
    load = _finetune_data if cfg.model.mode == "finetune" else _frozen_data
    data = load(cfg, cat, labels, pos, cb, info)
    data.photo_size = cat.photo_size() if info.is_main else None
    return data


def _kept(pos: dict[str, np.ndarray], ok: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for p in ("train", "val"):
        if not ok[p].all():
            log.warning("%s: %d unreadable photos left out", p, int((~ok[p]).sum()))
    return {p: pos[p][ok[p]] for p in ("train", "val")}


def _frozen_data(cfg: Config, cat, labels: Labels, pos: dict, cb: Callbacks, info: DistInfo) -> _TrainData:
    """Cached inputs of the method (frozen: backbone features; partial: activations at block
    ``train_from``) of the training items, their augmented views and the val set, computed by
    the first process of each machine (the others read its cache)."""
    tcfg, dcfg = cfg.train, cfg.data
    what = "activations" if cfg.model.mode == "partial" else "features"
    if cfg.model.mode == "partial":
        _log_activation_memory(cfg, {p: len(pos[p]) for p in pos})
    feats, ok, views = {}, {}, []
    with distributed.main_first(info, local=True):
        for p in ("train", "val"):
            # a configured descriptor is cached in the same backbone pass (evaluation
            # and the index read it): one pass over the catalogue instead of two
            feats[p], ok[p] = item_inputs(cat, pos[p], cfg, num_workers=tcfg.num_workers,
                                          progress=cb.on_phase(f"{what} {p}", len(pos[p])),
                                          descriptors=cfg.descriptor.kind != "none")
        for v in range(dcfg.n_views):
            f, o = item_inputs(cat, pos["train"], cfg, augment_seed=VIEW_SEED + v,
                               strength=dcfg.augment_strength, num_workers=tcfg.num_workers,
                               progress=cb.on_phase(f"{what} view {v + 1}", len(pos["train"])))
            views.append(f)
            ok["train"] = ok["train"] & o
    kept = _kept(pos, ok)
    y_tr, y_val = labels.y[kept["train"]], labels.y[kept["val"]]
    # a boolean index copies: skip it when every photo was read (partial mode's cache is large)
    train_x = feats["train"] if ok["train"].all() else feats["train"][ok["train"]]
    batches = _FrozenBatches(train_x, np.stack([v[ok["train"]] for v in views]) if views else None,
                             y_tr, labels.attrs[kept["train"]], tcfg.batch_size)
    val = None
    if info.is_main:
        val = _ValSet(feats["val"][ok["val"]], train_x, y_val, y_tr)
        if dcfg.n_damaged:
            _add_val_damaged(val, cfg, cat, kept, cb)
    return _TrainData(classes=labels.classes, attr_keys=labels.attr_keys, attr_sizes=labels.attr_sizes(),
                      train_y=y_tr, n_steps=len(batches), stream=lambda epoch, rng: batches.epoch(rng),
                      val=val, train_x=train_x)


def _log_activation_memory(cfg: Config, sizes: dict[str, int]) -> None:
    """Say what partial mode's cache of activations weighs (float16), before computing it."""
    from fashionhash.models.partial import activation_shape, tail_start

    m = cfg.model
    shape = activation_shape(m.backbone, m.image_size, tail_start(m.backbone, m.train_from))
    rows = sizes["train"] * (1 + cfg.data.n_views) + sizes["val"] + min(cfg.data.n_damaged, sizes["val"])
    log.info("partial mode: activations %s per photo at the input of block %d, %.1f KB in float16; "
             "%d rows (train x %d views + val + damaged val) = %.2f GB in memory and on disk",
             "x".join(map(str, shape)), tail_start(m.backbone, m.train_from), 2 * np.prod(shape) / 1e3,
             rows, 1 + cfg.data.n_views, 2 * np.prod(shape) * rows / 1e9)


def _add_val_damaged(val: _ValSet, cfg: Config, cat, kept: dict, cb: Callbacks) -> None:
    """Damaged copies of the first val items (a seed of their own, not the test queries'),
    so that item-level settings are chosen on val as well."""
    first = kept["val"][:cfg.data.n_damaged]
    what = "activations" if cfg.model.mode == "partial" else "features"
    x, ok = item_inputs(cat, first, cfg, augment_seed=VAL_DAMAGED_SEED,
                        strength=cfg.data.augment_strength, num_workers=cfg.train.num_workers,
                        progress=cb.on_phase(f"{what} val damaged", len(first)))
    val.damaged, val.damaged_rows = x[ok], np.flatnonzero(ok)
    val.gains = catalogue_gains(cat, first[ok], np.concatenate([kept["train"], kept["val"]]),
                                len(kept["train"]) + val.damaged_rows)


def _finetune_data(cfg: Config, cat, labels: Labels, pos: dict, cb: Callbacks, info: DistInfo) -> _TrainData:
    """Photos, decoded and augmented per batch; validation on the photos of the val items
    against a fixed sample of the database."""
    mcfg, tcfg, dcfg = cfg.model, cfg.train, cfg.data
    spec = preprocessing_for(mcfg.backbone)
    kept = _kept(pos, {p: _readable(cat, pos[p]) for p in ("train", "val")})
    tr = kept["train"]
    y_tr = labels.y[tr]
    sources = cat.sources()
    ds = _ImageDataset([sources[i] for i in tr], y_tr, labels.attrs[tr], spec, mcfg.image_size,
                       tcfg.seed, dcfg.augment_strength, views=dcfg.n_views > 0)

    def stream(epoch: int, rng: np.random.Generator) -> Iterator[dict]:
        ds.epoch = epoch
        return _image_batches(ds, tcfg, epoch, rng, info)

    val = None
    if info.is_main:  # only rank 0 validates: the others need not hold the images
        # images of the whole database would not fit in memory at 128 px: validate against
        # a fixed random sample of it (the same every epoch, so scores stay comparable)
        keep = np.sort(np.random.default_rng(tcfg.seed).permutation(len(tr))[:VAL_DB_IMAGES])
        val = _ValSet(_stack_images(cat, kept["val"], spec, mcfg.image_size),
                      _stack_images(cat, tr[keep], spec, mcfg.image_size), labels.y[kept["val"]], y_tr[keep])
    return _TrainData(classes=labels.classes, attr_keys=labels.attr_keys, attr_sizes=labels.attr_sizes(),
                      train_y=y_tr, n_steps=max(1, len(ds) // tcfg.batch_size), stream=stream, val=val)


def _write_meta(path: Path, data: _TrainData, threads: int, info: DistInfo, device: torch.device) -> None:
    if path.is_file():  # a resumed run keeps the record of how it started
        return
    meta = {
        "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "classes": data.classes, "n_train": int(len(data.train_y)), "command": sys.argv,
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "threads": threads, "world_size": info.world, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "attr_keys": list(data.attr_keys), "attr_sizes": data.attr_sizes,
        "photo_size": data.photo_size,  # what uploaded photos are shrunk to (data.query_shrink)
    }
    path.write_text(json.dumps(meta, indent=1))


def _optimisers(method, tcfg: TrainConfig) -> tuple[dict[str, torch.optim.Optimizer], dict[str, list]]:
    """One Adam per objective (encoder; discriminator for adversarial methods) and the
    parameters each one updates."""
    lrs = {"heads": tcfg.lr, "backbone": tcfg.lr_backbone, "disc": tcfg.lr_disc}
    groups = method.param_groups()
    optims = {name: torch.optim.Adam([{"params": g["params"], "lr": lrs[g["name"]]} for g in gs],
                                     weight_decay=tcfg.weight_decay)
              for name, gs in groups.items()}
    params = {name: [p for g in gs for p in g["params"]] for name, gs in groups.items()}
    return optims, params


def _restore(last_path: Path, method, optims: dict, run_dir: Path, jlog: _JsonLog, resume: bool,
             info: DistInfo) -> tuple[int, dict | None, list[dict]]:
    """(first epoch to train, best so far, epoch records): from ``last_path`` on resume."""
    if not (resume and last_path.is_file()):
        return 0, None, []
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    method.load_state_dict(state["method"])
    for name, o in optims.items():
        o.load_state_dict(state["optim"][name])
    if info.is_main:
        jlog.write(event="resume", epoch=state["epoch"] + 1)
        log.info("resuming %s at epoch %d", run_dir, state["epoch"] + 1)
    return state["epoch"] + 1, state["best"], state["history"]


def _save_epoch(ckpt_dir: Path, method, optims: dict, record: dict, best: dict, history: list,
                improved: bool) -> None:
    state = {"method": method.state_dict(), "optim": {n: o.state_dict() for n, o in optims.items()},
             "epoch": record["epoch"], "best": best, "history": history}
    _atomic_torch_save(state, ckpt_dir / "last.pt")
    if improved:
        _atomic_torch_save({"method": method.state_dict(), "epoch": record["epoch"], "val": record["val"]},
                           ckpt_dir / "best.pt")


@dataclass
class _Step:
    """One optimisation step of every objective on one global batch."""

    method: torch.nn.Module
    optims: dict
    params: dict
    cfg: Config
    info: DistInfo
    jlog: _JsonLog
    last_path: Path
    device: torch.device = torch.device("cpu")

    def __call__(self, batch: dict, epoch: int, step: int) -> dict[str, float]:
        info, tcfg = self.info, self.cfg.train
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
        with (distributed.sharded_encoder(self.method, info, tcfg.batch_size // info.world,
                                          local_inputs=self.cfg.model.mode == "finetune",
                                          seed=_shard_seed(tcfg.seed, epoch, step, info.rank))
              if info.world > 1 else contextlib.nullcontext()):
            losses, parts = self.method.objectives(batch)
        self._check_finite(losses, parts, epoch, step)
        grads = {name: torch.autograd.grad(losses[name], self.params[name], allow_unused=True)
                 for name in losses if name in self.params}
        # Averaged here rather than by DistributedDataParallel: DDP reduces gradients in
        # hooks of loss.backward(), but each group (encoder, discriminator) takes its
        # gradient with autograd.grad at the same point (simultaneous updates), which DDP
        # would not see; and the sharded encoder's gathers already route every rank's
        # share of the global loss to the right rank. Every rank holds the same groups and
        # the same unused (None) parameters, since every rank computes the same losses.
        distributed.all_reduce_mean_([g for gs in grads.values() for g in gs if g is not None], info)
        for name, gs in grads.items():
            self.optims[name].zero_grad(set_to_none=True)
            for p, gr in zip(self.params[name], gs):
                p.grad = gr
            self.optims[name].step()
        return parts

    def _check_finite(self, losses: dict, parts: dict, epoch: int, step: int) -> None:
        bad = {k: float(v.detach()) for k, v in losses.items() if not math.isfinite(float(v.detach()))}
        if not bad:
            return
        # the losses are the same on every rank: all of them stop here
        if self.info.is_main:
            self.jlog.write(event="diverged", epoch=epoch, step=step, parts=parts)
        raise TrainingDiverged(
            f"loss became non-finite at epoch {epoch}, step {step}: {bad}; parts {parts}. "
            "Lower train.lr or check the inputs; the last good checkpoint is "
            f"{self.last_path if self.last_path.is_file() else 'none'}")


def _run_epoch(step_fn: _Step, data: _TrainData, epoch: int, cb: Callbacks) -> dict[str, float]:
    """Train one epoch; the mean of each loss part over its steps."""
    seed = step_fn.cfg.train.seed
    # seeded per epoch, so that a resumed run draws what the uninterrupted one drew
    torch.manual_seed(seed * 100_003 + epoch)
    rng = np.random.default_rng([seed, epoch])
    step_fn.method.train()
    # frozen mode: every rank draws the same global batches (same seed); the sharded
    # encoder picks each rank's share of them
    sums: dict[str, float] = {}
    n_done = 0
    for step, batch in enumerate(data.stream(epoch, rng)):
        parts = step_fn(batch, epoch, step)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n_done = step + 1
        cb.on_step(epoch, step, data.n_steps, parts)
    return {k: v / max(1, n_done) for k, v in sums.items()}


def _image_batches(ds: _ImageDataset, tcfg: TrainConfig, epoch: int, rng: np.random.Generator,
                   info: DistInfo) -> Iterator[dict]:
    """Finetune mode: the epoch's batches of photos. Under torchrun each rank loads only its
    share of every global batch (``DistributedSampler``), and the labels of the whole global
    batch are gathered, since the losses compare every pair of it."""
    if info.world == 1:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        yield from torch.utils.data.DataLoader(
            ds, batch_size=tcfg.batch_size, shuffle=True, drop_last=True, generator=g,
            num_workers=tcfg.num_workers, persistent_workers=False)
        return
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=info.world, rank=info.rank,
                                                  shuffle=True, seed=tcfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=tcfg.batch_size // info.world, sampler=sampler,
                                         drop_last=True, num_workers=tcfg.num_workers,
                                         persistent_workers=False)
    for batch in loader:
        for key in ("y", "item", "attrs"):
            batch[key] = distributed.all_gather_rows(batch[key], info)
        yield batch


def _shard_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of a rank's private random stream (dropout...) for one step: distinct per rank
    and step, the same after a resume."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def _stack_images(cat, positions, spec, size) -> np.ndarray:
    sources = cat.sources()
    return np.stack([image_array(sources[i], spec, size) for i in positions]) if len(positions) else \
        np.zeros((0, spec.channels, size, size), np.float32)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The saved config of a run, with overrides (e.g. ``train.epochs=30`` to train longer)."""
    return load_config(Path(run_dir) / "config.yaml", overrides)
