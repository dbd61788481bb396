"""The hashing runs of the table: one folder per (row, bits, seed), a learning-rate choice
per method on val, training side by side in child processes, and the per-run figures the
table adds (epochs, encode and query time).

Every run lives in ``<runs>/<dataset>/<label>_<bits>_s<seed>/``; a run that already has its
``metrics.json`` is not trained again and one killed mid-training resumes from its last
checkpoint. The learning-rate candidates are trained (never evaluated on the test queries)
in ``<runs>/<dataset>/lr/<label>_<bits>_lr<lr>/``; the chosen one is copied into the seed-0
run folder, so it is not trained twice.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import fashionhash
from fashionhash import codes as C
from fashionhash.config import Config, load_config, save_config
from fashionhash.evaluation.evaluate import evaluate_run
from fashionhash.index import INDEXES
from fashionhash.pipeline import load_run
from fashionhash.table.dataset import Data, config_diff, read_json, write_json
from fashionhash.table.plan import ABLATIONS, PAPER, SHALLOW, VARIANTS
from fashionhash.table.real import QUERY_K, sgml_real
from fashionhash.training import TrainingDiverged, train

log = logging.getLogger(__name__)
#: settings that change how fast a run trains, not what it learns: a table resumed with
#: another ``--jobs`` reuses its runs
SPEED_ONLY = ("train.threads", "train.num_workers")

Spec = tuple[str, int, int]  # (row label, bits, seed)


def run_config(d: Data, label: str, bits: int, seed: int, lr: float) -> Config:
    method, overrides, _ = VARIANTS[label]
    overrides = [o.replace("{quarter}", str(bits // 4)) for o in overrides]
    if method in SHALLOW:  # their only randomness is their own seed (projections, rotation)
        overrides = [*overrides, f"method.params.seed={seed}"]
    # on top of the dataset's config as read once at start: an edit of the YAML file while
    # the table runs must not change half of its runs
    return load_config(None, [
        f"method.name={method}", *overrides, f"model.n_bits={bits}", f"train.seed={seed}",
        f"train.epochs={d.plan.max_epochs}", f"train.patience={d.plan.patience}", f"train.lr={lr}",
        # one torch thread per run, in this process or side by side in children: the train
        # seconds of every row are measured the same way
        "train.threads=1"],
        base=d.cfg.to_dict())


def run_dir_of(d: Data, label: str, bits: int, seed: int) -> Path:
    return d.runs / f"{label}_{bits}_s{seed}"


def parse_run_name(name: str) -> tuple[str, int, int] | None:
    """``(label, bits, seed)`` of a run folder's name as :func:`run_dir_of` makes it; None
    for anything else in a dataset's folder (the naive rows, ``lr/``, a run set aside as
    ``<run>.lr<old>``)."""
    m = re.fullmatch(r"(.+)_(\d+)_s(\d+)", name)
    return (m[1], int(m[2]), int(m[3])) if m else None


def _lr_dir(d: Data, label: str, bits: int, lr: float) -> Path:
    return d.runs / "lr" / f"{label}_{bits}_lr{lr:g}"


def _config_changes(run_dir: Path, cfg: Config) -> list[str]:
    """How ``cfg`` differs from the config saved in ``run_dir`` (none saved: no change),
    settings that only change the speed left out."""
    if not (run_dir / "config.yaml").is_file():
        return []
    saved = load_config(run_dir / "config.yaml").to_dict()
    return [x for x in config_diff(saved, cfg.to_dict()) if not x.startswith(SPEED_ONLY)]


def _prepare(run_dir: Path, cfg: Config, d: Data) -> None:
    """Make ``run_dir`` ready to train ``cfg`` (its config saved, the dataset's split copied
    in). A folder made with another config stops the table (one made at a replaced learning
    rate is set aside first, see :func:`_set_aside_if_lr_changed`)."""
    diff = _set_aside_if_lr_changed(run_dir, cfg)
    if diff:
        raise FileExistsError(f"{run_dir} was made with another config ({'; '.join(diff)}): "
                              "delete it or pass another --runs")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "split.json").is_file():
        shutil.copy(d.split_path, run_dir / "split.json")
    if not (run_dir / "config.yaml").is_file():
        save_config(cfg, run_dir / "config.yaml")  # `train --resume` without a checkpoint starts from it


def _set_aside_if_lr_changed(run_dir: Path, cfg: Config) -> list[str]:
    """A run trained at a learning rate that a later, wider choice replaced (its config
    differs in ``train.lr`` only) is renamed ``<run>.lr<old>`` -- kept, not deleted -- so
    that the row trains again at the chosen rate instead of stopping the table. (Learning-
    rate candidates never get here: their rate is in their folder's name.) Returns the
    config changes left in ``run_dir`` (none once it is set aside)."""
    diff = _config_changes(run_dir, cfg)
    if not diff or not all(x.startswith("train.lr:") for x in diff):
        return diff
    old_lr = load_config(run_dir / "config.yaml").train.lr
    aside = run_dir.with_name(f"{run_dir.name}.lr{old_lr:g}")
    if aside.exists():
        raise FileExistsError(f"{run_dir} was trained at lr {old_lr:g}, now {cfg.train.lr:g}, "
                              f"and {aside} exists: delete one of them")
    run_dir.rename(aside)
    log.warning("%s: trained at lr %g, the choice is now %g: kept as %s, training again",
                run_dir.name, old_lr, cfg.train.lr, aside.name)
    return []


def _train_child(run_dir: Path, evaluate: bool) -> None:
    """Train (resume) ``run_dir`` through the CLI in a child process with one torch thread,
    so that several run side by side: on 2 cores two 1-thread runs each take about as long
    per epoch as one 2-thread run (measured on the photos' heads)."""
    src = str(Path(fashionhash.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           # idle OpenMP threads sleep instead of spinning: on a shared machine spinning
           # threads fight the other jobs (a training step ~5x slower, measured)
           "OMP_WAIT_POLICY": "PASSIVE"}
    log_path = run_dir / "table_train.log"
    with open(log_path, "w") as log_file:
        rc = subprocess.call([sys.executable, "-m", "fashionhash", "train", "--run-dir", str(run_dir),
                              "--resume", "--quiet", *(["--evaluate"] if evaluate else [])],
                             stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"training {run_dir} failed (exit {rc}), {log_path}:\n{tail}")


def _train_here(run_dir: Path, evaluate: bool) -> None:
    train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    if evaluate:
        evaluate_run(run_dir)


def _side_by_side(fn, items: list, jobs: int) -> None:
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(jobs) as pool:  # each thread waits on one child process
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def epoch_log(run_dir: Path) -> list[dict]:
    """The epoch records of a run's ``log.jsonl`` (``[]`` before its first epoch)."""
    return [r for r in _log(run_dir) if r.get("event") == "epoch"]


def diverged(run_dir: Path) -> bool:
    """Whether a run stopped on a non-finite loss (a learning rate too high for it)."""
    return any(r.get("event") == "diverged" for r in _log(run_dir))


def _trained(run_dir: Path, cfg: Config) -> bool:
    """Whether a run has stopped: early, at its last epoch, or on a non-finite loss."""
    if diverged(run_dir):
        return True
    epochs = epoch_log(run_dir)
    if not epochs:
        return False
    last = epochs[-1]
    return last["epoch"] + 1 >= cfg.train.epochs or 0 < cfg.train.patience <= last["epoch"] - last["best_epoch"]


def best_val(run_dir: Path, metric: str) -> float:
    """The best val score of a trained run (what chose its checkpoint); -inf for a run
    that diverged, which is never chosen."""
    return -math.inf if diverged(run_dir) else max(r["val"][metric] for r in epoch_log(run_dir))


def choose_lrs(d: Data, labels: list[str], bits: int, jobs: int) -> dict[str, float]:
    """label -> learning rate: every learned row trains with each of ``plan.lrs`` at seed 0
    and ``bits`` bits; the best val ``train.select_metric`` wins (ties: the first listed).
    The same budget for every method; the test queries are never looked at. An ablation
    changes one thing, its loss: it trains at the paper's method's rate (chosen here even
    when the paper's row is not asked for), not at a rate of its own."""
    ablated = [x for x in labels if x in ABLATIONS]
    learned = [x for x in labels if VARIANTS[x][0] not in SHALLOW and x not in ABLATIONS]
    if ablated and PAPER not in learned:
        learned.append(PAPER)
    todo = []
    for label in learned:
        for lr in d.plan.lrs:
            run_dir, cfg = _lr_dir(d, label, bits, lr), run_config(d, label, bits, 0, lr)
            _prepare(run_dir, cfg, d)
            if not _trained(run_dir, cfg):
                todo.append(run_dir)

    def one(run_dir: Path) -> None:
        try:
            (_train_child if jobs > 1 else _train_here)(run_dir, evaluate=False)
        except (RuntimeError, TrainingDiverged):
            if not diverged(run_dir):
                raise
            log.warning("%s: lr candidate %s diverged: not chosen", d.plan.key, run_dir.name)
            return
        log.info("%s: lr candidate %s trained, %d epochs", d.plan.key, run_dir.name, len(epoch_log(run_dir)))

    _side_by_side(one, todo, jobs)
    chosen, val = {}, {}
    for label in learned:
        scores = {lr: best_val(_lr_dir(d, label, bits, lr), d.cfg.train.select_metric) for lr in d.plan.lrs}
        # kept beside the choice, so the candidates' table is read from a file, not a log
        val[label] = {f"{lr:g}": None if math.isinf(s) else s for lr, s in scores.items()}
        if all(math.isinf(v) for v in scores.values()):
            raise RuntimeError(f"{d.plan.key} {label}: training diverged at every learning rate "
                               f"{', '.join(f'{lr:g}' for lr in d.plan.lrs)}")
        chosen[label] = max(d.plan.lrs, key=lambda lr: scores[lr])  # max keeps the first of ties
        log.info("%s %s: lr %g chosen on val (%s)", d.plan.key, label, chosen[label],
                 ", ".join(f"{lr:g}: {s:.4f}" for lr, s in scores.items()))
    chosen.update({x: chosen[PAPER] for x in ablated})
    write_json(d.runs / "lr" / f"chosen_{bits}.json",
               {"metric": d.cfg.train.select_metric, "lrs": list(d.plan.lrs), "chosen": chosen, "val": val})
    return chosen


def _adopt_candidate(d: Data, label: str, bits: int, lr: float, run_dir: Path) -> None:
    """Seed 0 at the bits the learning rate was chosen at: the chosen candidate's training
    is copied in rather than repeated."""
    src = _lr_dir(d, label, bits, lr)
    if (run_dir / "checkpoints" / "last.pt").is_file() or not (src / "checkpoints" / "last.pt").is_file():
        return
    for name in ("meta.json", "log.jsonl"):
        shutil.copy(src / name, run_dir / name)
    shutil.copytree(src / "checkpoints", run_dir / "checkpoints", dirs_exist_ok=True)  # after a kill mid-copy


def train_runs(d: Data, specs: list[Spec], lrs: dict[str, float], lr_bits: int, jobs: int) -> None:
    """Train and evaluate every (label, bits, seed) not done yet, ``jobs`` at a time, then
    measure the table's own figures (encode / query time, SGML's real-valued evaluation) one
    run after the other in this process, so that they are timed without a neighbour."""
    todo = []
    for label, bits, seed in specs:
        run_dir = run_dir_of(d, label, bits, seed)
        cfg = run_config(d, label, bits, seed, lrs.get(label, d.cfg.train.lr))
        _prepare(run_dir, cfg, d)
        if (run_dir / "metrics.json").is_file():
            log.info("%s %s %d bits seed %d: evaluated before, skipped", d.plan.key, label, bits, seed)
            continue
        if seed == 0 and bits == lr_bits and label in lrs:
            _adopt_candidate(d, label, bits, lrs[label], run_dir)
        todo.append((label, bits, seed, run_dir))

    def one(item) -> None:
        label, bits, seed, run_dir = item
        t0 = time.time()
        (_train_child if jobs > 1 else _train_here)(run_dir, evaluate=True)
        m = read_json(run_dir / "metrics.json")
        log.info("%s %s %d bits seed %d: %d epochs (best %d), trained and evaluated in %.0fs: "
                 "mAP %.4f top-1 %.4f", d.plan.key, label, bits, seed, len(epoch_log(run_dir)),
                 m["checkpoint_epoch"] + 1 if m.get("checkpoint_epoch") is not None else 0,
                 time.time() - t0, m["map"], m["top1"])

    _side_by_side(one, todo, jobs)
    for label, bits, seed in specs:
        run_dir = run_dir_of(d, label, bits, seed)
        if not (run_dir / "table_extra.json").is_file():
            write_json(run_dir / "table_extra.json", run_extras(run_dir, d))
        if VARIANTS[label][0] == "sgml" and not (run_dir / "metrics_real.json").is_file():
            sgml_real(run_dir, d, read_json(run_dir / "table_extra.json"))


def code_query_ms(q_packed: np.ndarray, db_packed: np.ndarray, n_bits: int) -> dict:
    """ms per query for the top-``QUERY_K`` of every query ``(Q, K/8)`` against the
    database ``(D, K/8)``, flat scan and MIH."""
    out = {}
    for name in ("flat", "mih"):
        index = INDEXES.build(name, n_bits=n_bits)
        index.add(np.arange(len(db_packed)), db_packed)
        index.search(q_packed[:8], QUERY_K)  # warm-up (kernel load, MIH tables)
        t0 = time.perf_counter()
        index.search(q_packed, QUERY_K)
        out[f"query_ms_{name}"] = 1000 * (time.perf_counter() - t0) / max(1, len(q_packed))
    return out


def run_extras(run_dir: Path, d: Data) -> dict:
    """Epochs, learning rate, training seconds, encode time per image, bytes per item and
    query time of a trained run."""
    run = load_run(run_dir)
    x = d.features(d.pos_q)[0]  # cached: the backbone's cost is measured once, in backbone_ms
    t0 = time.perf_counter()
    run.codes_from_inputs(x)
    head_ms = 1000 * (time.perf_counter() - t0) / max(1, len(x))
    q = np.load(run_dir / "codes" / "query.npz")["packed"]
    db = np.load(run_dir / "codes" / "database.npz")["packed"]
    epochs = epoch_log(run_dir)
    learned = run.cfg.method.name not in SHALLOW
    # the per-epoch log has the whole training, also of a run resumed or copied from an
    # lr candidate (the wall clock of this invocation would not)
    out = {"encode_ms": d.backbone_ms + head_ms, "encode_ms_head": head_ms,
           "bytes": C.n_bytes(run.n_bits), **code_query_ms(q, db, run.n_bits),
           "train_seconds": sum(r.get("seconds", 0.0) for r in epochs),
           "epochs": len(epochs) if learned else 0}
    if learned:  # 1-based, as the epochs column counts
        out.update({"best_epoch": epochs[-1]["best_epoch"] + 1, "lr": run.cfg.train.lr})
    return out
