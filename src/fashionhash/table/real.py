"""The table's real-valued rows: SGML's embedding ranked by cosine, and the naive L1 match
of pixels or backbone features (no hashing), under the same protocol as ``evaluate_run``."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fashionhash.evaluation.metrics import tie_order
from fashionhash.evaluation.naive import l1_distances, pixel_vectors, rank_metrics
from fashionhash.pipeline import DAMAGED_SEED, load_run
from fashionhash.table.dataset import Data, write_json
from fashionhash.table.plan import NAIVE_FEATURES, NAIVE_PIXELS

log = logging.getLogger(__name__)
QUERY_K = 100  # query time: top-100 of every query (one result page plus margin)


def _real_eval(d: Data, q: np.ndarray, db: np.ndarray, dam: np.ndarray | None, dam_ok: np.ndarray | None,
               metric: str) -> dict:
    """Scores of queries ``q (Q, F)`` against the database ``db (D, F)``, and of damaged
    copies ``dam (Q', F)`` against database + queries (exhaustive ranking). The database is
    listed in ``tie_order``, as ``evaluate_run`` lists it: integer pixel L1 distances tie, and
    Fashion-MNIST's ids are sorted by class."""
    workers = os.cpu_count() or 1
    o = tie_order(len(db))
    db, pos_db = db[o], d.pos_db[o]
    m = rank_metrics(q, db, d.labels(d.pos_q), d.labels(pos_db), metric=metric,
                     query_attrs=d.attrs(d.pos_q), db_attrs=d.attrs(pos_db), attr_keys=d.keys,
                     workers=workers)
    if dam is not None and len(dam):
        true_index = (len(db) + np.arange(len(dam)))[dam_ok]  # the queries follow the database
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

    t0 = time.perf_counter()
    search()
    return 1000 * (time.perf_counter() - t0) / max(1, n)


@torch.no_grad()
def sgml_real(run_dir: Path, d: Data, extra: dict) -> None:
    """SGML evaluated as what it is, a float32 embedding ranked by cosine similarity, into
    ``metrics_real.json`` (``extra``: the hashing run's table figures)."""
    t0 = time.time()
    run = load_run(run_dir)

    def embed(x: np.ndarray) -> np.ndarray:  # (N, F) features -> (N, K) unit embeddings
        x = torch.as_tensor(x)
        return torch.cat([run.method.embed(x[i:i + 4096].float()) for i in range(0, len(x), 4096)]).numpy()

    q, db = embed(d.features(d.pos_q)[0]), embed(d.features(d.pos_db)[0])
    dam, dam_ok = None, None
    if len(d.pos_dam) and run.cfg.data.n_damaged:
        x, dam_ok = d.features(d.pos_dam, DAMAGED_SEED)
        dam = embed(x)
    m = _real_eval(d, q, db, dam, dam_ok, "cosine")
    m.update({"method": "sgml", "n_bits": run.n_bits, "embedding": "float32, cosine",
              "eval_seconds": round(time.time() - t0, 2), "bytes": 4 * run.n_bits,
              "query_ms_flat": _real_query_ms(q, db, "cosine"),
              **{k: extra.get(k) for k in ("encode_ms", "train_seconds", "epochs", "best_epoch", "lr")}})
    write_json(run_dir / "metrics_real.json", m)
    log.info("%s sgml %d bits real-valued: mAP %.4f top-1 %.4f", d.plan.key, run.n_bits, m["map"], m["top1"])


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


def naive_row(d: Data, space: str) -> Path:
    """The naive baseline: L1 between raw vectors (pixels or backbone features), no hashing."""
    out_dir = d.runs / (NAIVE_PIXELS if space == "pixels" else NAIVE_FEATURES)
    if (out_dir / "metrics.json").is_file():
        log.info("%s naive L1 (%s): evaluated before, skipped", d.plan.key, space)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_dam = len(d.pos_dam) if d.cfg.data.n_damaged else 0
    if space == "pixels":
        size = 28 if d.cat.paths is None else 32
        t1 = time.perf_counter()
        q, _ = _pixels(d, d.pos_q, size)
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
    log.info("%s naive L1 (%s): mAP %.4f top-1 %.4f in %.0fs", d.plan.key, space, m["map"], m["top1"],
             m["eval_seconds"])
    return out_dir
