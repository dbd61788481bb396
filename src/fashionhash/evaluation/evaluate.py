"""Evaluate a trained run on its test queries: class-level retrieval metrics, the graded
"subjective" score, and the same-product test on damaged copies of the query photos.

Writes ``metrics.json``, ``pr_curve.png`` and the codes (``codes/*.npz``: ids + packed bits)
into the run directory. Reads codes and labels; never imports training.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from fashionhash import codes as C
from fashionhash.data.catalogue import GRADED_ATTRIBUTES
from fashionhash.evaluation.metrics import (evaluate_retrieval, ndcg_at_k, ndcg_from_order, plot_pr_curves,
                                            rerank_key, same_item_topk, tie_order)
from fashionhash.evaluation.two_stage import (catalogue_gains, descriptor_only_hits, shortlist_codes,
                                              two_stage_hits, two_stage_topk)
from fashionhash.pipeline import DAMAGED_SEED, PhaseFactory, item_descriptors, item_inputs, load_run, open_data

log = logging.getLogger(__name__)



def _encode_items(run, cat, positions, *, augment_seed=None, strength=1.0, phase=None, label=""):
    """Relaxed codes ``(n, K)`` and ok mask of catalogue items (cached features when frozen,
    cached activations through the trained tail when partial; with a descriptor configured,
    its raw descriptors are cached in the same pass)."""
    progress = phase(label, len(positions)) if phase else None
    m = run.cfg.model
    if m.mode in ("frozen", "partial"):
        feats, ok = item_inputs(cat, positions, run.cfg, augment_seed=augment_seed, strength=strength,
                                progress=progress, num_workers=run.cfg.train.num_workers,
                                descriptors=run.cfg.descriptor.kind != "none")
        return run.codes_from_inputs(feats), ok
    sources = cat.sources()
    real, ok = [], []
    for s in range(0, len(positions), 2048):
        chunk = [sources[i] for i in positions[s:s + 2048]]
        r, o = run.encode_sources(chunk, augment_seed=None if augment_seed is None else augment_seed + s,
                                  strength=strength)
        real.append(r)
        ok.append(o)
        if progress:
            progress(len(chunk))
    return np.concatenate(real), np.concatenate(ok)


def same_product_eval(q_real_damaged: np.ndarray, gallery_packed: np.ndarray, true_index: np.ndarray,
                      n_bits: int, ks=(1, 10)) -> dict:
    """Top-k hit rates of the one true item for damaged query copies (tie-aware), with plain
    Hamming ranking and with tie re-ranking by the asymmetric distance."""
    dist = C.hamming(C.pack(q_real_damaged), gallery_packed)
    out = {f"same_product_top{k}": v for k, v in same_item_topk(dist, true_index, ks).items()}
    rerank = rerank_key(dist, C.asymmetric_distance(q_real_damaged, gallery_packed, n_bits), n_bits)
    out.update({f"same_product_top{k}_rerank": v
                for k, v in same_item_topk(rerank, true_index, ks).items()})
    return out


def _descriptors(run, cat, positions, *, phase=None, label="", **kw) -> np.ndarray:
    progress = phase(label, len(positions) * len(run.cfg.descriptor.scales or [0])) if phase else None
    desc, _ = item_descriptors(cat, positions, run.cfg, progress=progress,
                               num_workers=run.cfg.train.num_workers, **kw)
    return desc


def two_stage_eval(run, cat, pos_db: np.ndarray, db_packed: np.ndarray, pos_q: np.ndarray,
                   q_packed: np.ndarray, dam_real: np.ndarray, dam_ok: np.ndarray, *,
                   phase: PhaseFactory | None = None) -> dict:
    """Same-product scores of two-stage search for the damaged copies ``dam_real`` of the
    first ``len(dam_ok)`` queries (those with ``dam_ok``) against the database plus the query
    originals, at the shortlist size chosen on val when the descriptor was fitted, and their
    graded nDCG@10 (gains of this gallery, in its order)."""
    if run.descriptor is None:
        raise ValueError(f"{run.path} has descriptor.kind={run.cfg.descriptor.kind!r} but no fitted "
                         f"descriptor: run `fashionhash fit-descriptor {run.path}`")
    mapping, meta = run.descriptor
    r = int(meta["shortlist"])
    g_desc = np.concatenate([mapping.quantized(_descriptors(run, cat, pos_db, phase=phase,
                                                            label="descriptors database")),
                             mapping.quantized(_descriptors(run, cat, pos_q))])
    dam_desc = mapping(_descriptors(run, cat, pos_q[:len(dam_ok)], augment_seed=DAMAGED_SEED,
                                    strength=run.cfg.data.augment_strength, phase=phase,
                                    label="descriptors damaged copies"))[dam_ok]
    g_packed = np.concatenate([db_packed, q_packed])
    g_ids = np.concatenate([cat.ids[pos_db], cat.ids[pos_q]])
    true = len(pos_db) + np.flatnonzero(dam_ok)
    gains = catalogue_gains(cat, pos_q[:len(dam_ok)][dam_ok], np.concatenate([pos_db, pos_q]), true)
    dam_short = shortlist_codes(mapping, C.pack(dam_real[dam_ok]), dam_desc)
    g_short = shortlist_codes(mapping, g_packed, g_desc)
    hits = two_stage_hits(dam_short, dam_desc, g_short, g_desc, g_ids, true, [r])[r]
    alone = descriptor_only_hits(dam_desc, g_desc, true)
    order = two_stage_topk(dam_short, dam_desc, g_short, g_desc, g_ids, r, 10)
    return {
        "graded_ndcg@10_2stage": ndcg_from_order(order, gains, 10),
        "same_product_2stage_top1": hits[1], "same_product_2stage_top10": hits[10],
        "same_product_descriptor_top1": alone[1], "same_product_descriptor_top10": alone[10],
        "shortlist": r, "shortlist_sign_bits": mapping.sign_bits, "descriptor_dim": int(mapping.dim),
        "descriptor_projection": meta.get("projection"),
        # the sign code lives in memory only (rebuilt from the descriptors when the index opens)
        "bytes_per_item": int(C.n_bytes(run.n_bits) + mapping.dim),
    }


def evaluate_run(run_dir: str | Path, *, phase: PhaseFactory | None = None,
                 checkpoint: str = "best", device: str = "cpu") -> dict:
    """Evaluate ``run_dir`` on its test queries (the networks on ``device``, see
    :func:`~fashionhash.pipeline.load_run`); returns and saves the metrics."""
    t0 = time.time()
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint, device)
    cfg = run.cfg
    cat, split = open_data(cfg, run_dir / "split.json")
    pos_q, pos_db = cat.positions(split.query), cat.positions(split.database)
    q_real, q_ok = _encode_items(run, cat, pos_q, phase=phase, label="encode queries")
    db_real, db_ok = _encode_items(run, cat, pos_db, phase=phase, label="encode database")
    pos_q, q_real = pos_q[q_ok], q_real[q_ok]
    pos_db, db_real = pos_db[db_ok], db_real[db_ok]
    t_enc = time.time() - t0
    q_packed, db_packed = C.pack(q_real), C.pack(db_real)
    keys = tuple(k for k in GRADED_ATTRIBUTES if k in cat.attrs)
    labels = cat.labels
    # ranked in a fixed random order of the database (ties by index would follow the ids)
    o = tie_order(len(pos_db))
    pos_r, db_r = pos_db[o], db_packed[o]
    metrics = evaluate_retrieval(
        q_packed, db_r, run.n_bits, labels[pos_q], labels[pos_r],
        query_attrs={k: cat.attrs[k][pos_q] for k in keys} if keys else None,
        db_attrs={k: cat.attrs[k][pos_r] for k in keys} if keys else None,
        attr_keys=keys, query_real=q_real,
    )
    pr = metrics.pop("pr_curve", None)

    # same product: damaged copies of the first n_damaged queries against database + originals
    n_dam = min(cfg.data.n_damaged, len(pos_q))
    if n_dam:
        dam_pos = pos_q[:n_dam]
        dam_real, dam_ok = _encode_items(run, cat, dam_pos, augment_seed=DAMAGED_SEED,
                                         strength=cfg.data.augment_strength, phase=phase,
                                         label="encode damaged copies")
        gallery = np.concatenate([db_r, q_packed])
        true_index = len(db_packed) + np.arange(n_dam)
        metrics.update(same_product_eval(dam_real[dam_ok], gallery, true_index[dam_ok], run.n_bits))
        metrics["n_damaged"] = int(dam_ok.sum())
        # one graded score of every granularity: the very product, its design, its type
        gains = catalogue_gains(cat, dam_pos[dam_ok], np.concatenate([pos_r, pos_q]), true_index[dam_ok])
        metrics["graded_ndcg@10"] = ndcg_at_k(C.hamming(C.pack(dam_real[dam_ok]), gallery), gains, 10)
        if cfg.descriptor.kind != "none":
            # in the stored order: the descriptors' feature cache is keyed by the positions, and
            # the shortlist breaks its ties by id (as the index does), so the order is moot
            metrics.update(two_stage_eval(run, cat, pos_db, db_packed, pos_q, q_packed, dam_real, dam_ok,
                                          phase=phase))

    metrics.update({
        "n_bits": run.n_bits, "n_query": int(len(pos_q)), "n_database": int(len(pos_db)),
        "distinct_database_codes": int(len(np.unique(db_packed, axis=0))),
        "method": cfg.method.name, "backbone": cfg.model.backbone, "mode": cfg.model.mode,
        "dataset": cfg.data.dataset, "checkpoint_epoch": run.meta["checkpoint_epoch"],
        "eval_seconds": round(time.time() - t0, 2), "encode_seconds": round(t_enc, 2),
    })
    codes_dir = run_dir / "codes"
    codes_dir.mkdir(exist_ok=True)
    np.savez(codes_dir / "database.npz", ids=cat.ids[pos_db], packed=db_packed, n_bits=run.n_bits)
    np.savez(codes_dir / "query.npz", ids=cat.ids[pos_q], packed=q_packed, real=q_real,
             n_bits=run.n_bits)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if pr is not None:
        plot_pr_curves({f"{cfg.method.name} {run.n_bits} bits": (np.asarray(pr["precision"]),
                                                               np.asarray(pr["recall"]))},
                       run_dir / "pr_curve.png", title=f"{cfg.data.dataset}: precision-recall over Hamming radius")
        metrics["pr_curve"] = pr
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics

