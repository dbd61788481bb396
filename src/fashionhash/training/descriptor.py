"""Fit a run's second-stage descriptor after its hash head is trained (frozen runs with
``descriptor.kind`` set), choosing everything on the validation split:

1. PCA-whitening of the catalogue's raw descriptors (the training items = the database);
2. optionally (``descriptor.learn_epochs > 0``) a linear projection that starts from that
   whitening and is trained so that augmented views of a training photo find each other in
   the batch (the item contrast of :class:`~fashionhash.losses.core.ItemContrastLoss`),
   which teaches the descriptor what a shopper's photo changes (crop, rotation, light,
   scale, JPEG) and what it keeps; kept only if it finds the val items' damaged copies
   more often (descriptor alone, against the database plus the val originals). SGML's
   granularity-weighted loss instead (``learn_projection(loss="sgml")``, in
   ``benchmarks/bench_descriptor.py``) lost two thirds of the hits on val (docs/results.md);
3. the shortlist: by the hash code or by a sign code of the descriptor (its outputs are
   first rotated to PCA order, which leaves every cosine as it was), and its size, by the
   two-stage same-product hit rate of those damaged copies.

Writes ``descriptor.npz`` (the linear map) and ``descriptor.json`` (choices and val scores).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fashionhash import codes as C
from fashionhash.descriptors import Whitening
from fashionhash.evaluation.two_stage import (SHORTLISTS, SIGN_BITS, choose_shortlist, descriptor_only_hits,
                                              shortlist_codes, two_stage_hits)
from fashionhash.losses.core import ItemContrastLoss
from fashionhash.losses.metric import SoftBinomialDevianceLoss
from fashionhash.methods.sgml import attribute_granularity
from fashionhash.pipeline import (VAL_DAMAGED_SEED, VIEW_SEED, PhaseFactory, int8_calibration, item_descriptors,
                                  item_features, load_run, open_data, save_descriptor)

log = logging.getLogger(__name__)

PROJECTION_LOSSES = ("item", "sgml")


def learn_projection(start: Whitening, views: list[np.ndarray], *, epochs: int, tau: float = 0.05,
                     lr: float = 1e-3, batch: int = 512, seed: int = 0, loss: str = "item",
                     labels: np.ndarray | None = None, other_items: float = 1.0) -> Whitening:
    """Train the linear map of ``start`` on views ``(N, D)`` of N items; returns a new map
    (same centring, trained projection). ``loss="item"``: two views of an item are nearest
    neighbours among the batch; ``"sgml"``: every pair's cosine is pulled up or pushed down
    by its granularity over ``labels`` ``(N, A)`` (class first, then attributes, -1 missing):
    1 for two views of one item, ``other_items`` x the fraction of agreeing labels for two
    items (1.0: SGML's own, where two items that agree on every label count as one item;
    below 1 the very item ranks above its look-alikes)."""
    if loss not in PROJECTION_LOSSES:
        raise ValueError(f"descriptor projection loss {loss!r}: one of {', '.join(PROJECTION_LOSSES)}")
    if loss == "sgml" and (labels is None or len(labels) != len(views[0])):
        raise ValueError("the sgml projection loss needs labels (N, A) for the N training items")
    gen = torch.Generator().manual_seed(seed)
    proj = torch.nn.Parameter(torch.from_numpy(start.proj.copy()))
    mean = torch.from_numpy(start.mean)
    xs = [torch.from_numpy(np.asarray(v, np.float32)) - mean for v in views]
    lab = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64).reshape(len(xs[0]), -1))
    loss_fn = ItemContrastLoss(tau=tau) if loss == "item" else SoftBinomialDevianceLoss()
    opt = torch.optim.Adam([proj], lr=lr)
    n, d = len(xs[0]), proj.shape[1]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n - 1, batch):
            idx = perm[s:s + batch]
            a, b = torch.randperm(len(xs), generator=gen)[:2].tolist()
            z = torch.nn.functional.normalize(torch.cat([xs[a][idx], xs[b][idx]]) @ proj, dim=1)
            both = torch.cat([idx, idx])
            if loss == "item":
                # the loss divides by the width K (made for +-1 codes): sqrt(d)-scaled unit
                # rows give plain cosines over tau
                loss_value = loss_fn(z * d ** 0.5, both)
            else:
                g = other_items * attribute_granularity(lab[both, 0], lab[both, 1:])
                loss_value = loss_fn(z, torch.where(both[:, None] == both[None, :], torch.ones_like(g), g))
            opt.zero_grad()
            loss_value.backward()
            opt.step()
            total += float(loss_value.detach()) * len(idx)
        log.info("descriptor projection epoch %d: %s loss %.4f", epoch + 1, loss, total / n)
    return Whitening(start.mean, proj.detach().numpy().astype(np.float32))


def fit_descriptor(run_dir: str | Path, *, phase: PhaseFactory | None = None) -> dict:
    """Fit and save the run's descriptor (see the module docstring); returns its settings."""
    run = load_run(run_dir)
    cfg, d = run.cfg, run.cfg.descriptor
    cat, split = open_data(cfg, Path(run_dir) / "split.json")
    workers = cfg.train.num_workers

    def raw(positions, label, seed=None):
        progress = phase(label, len(positions) * len(d.scales or [0])) if phase else None
        return item_descriptors(cat, positions, cfg, augment_seed=seed, strength=cfg.data.augment_strength,
                                progress=progress, num_workers=workers)[0]

    def codes(positions, seed=None):
        feats, ok = item_features(cat, positions, cfg.model, augment_seed=seed,
                                  strength=cfg.data.augment_strength, num_workers=workers,
                                  calibration=int8_calibration(cfg))
        return C.pack(run.codes_from_inputs(feats)), ok

    pos_db, pos_val = cat.positions(split.database), cat.positions(split.val)
    raw_db = raw(pos_db, "descriptors database")
    maps = {"whitening": Whitening.fit(raw_db, min(d.dim, *raw_db.shape))}
    if d.learn_epochs > 0:
        rng = np.random.default_rng(cfg.train.seed)
        rows = np.sort(rng.choice(len(pos_db), min(d.learn_items, len(pos_db)), replace=False))
        sub = pos_db[rows]
        views = [raw_db[rows]] + [raw(sub, f"descriptors view {v + 1}", VIEW_SEED + v)
                                  for v in range(max(d.learn_views, 1))]
        maps["learned"] = learn_projection(maps["whitening"], views, epochs=d.learn_epochs, tau=d.learn_tau,
                                           lr=d.learn_lr, seed=cfg.train.seed)

    # val: damaged copies of the first val items against the database + the val originals
    n_dam = cfg.data.n_damaged
    db_packed, _ = codes(pos_db)
    val_packed, val_ok = codes(pos_val)
    dam_packed, dam_ok = codes(pos_val[:n_dam], VAL_DAMAGED_SEED)
    raw_val, raw_dam = raw(pos_val, "descriptors val"), raw(pos_val[:n_dam], "descriptors val damaged",
                                                            VAL_DAMAGED_SEED)
    keep = np.flatnonzero(dam_ok & val_ok[:n_dam])
    true = len(pos_db) + keep
    alone = {name: descriptor_only_hits(m(raw_dam[keep]), np.concatenate([m.quantized(raw_db), m.quantized(raw_val)]),
                                        true) for name, m in maps.items()}
    log.info("descriptors alone on val: %s", alone)
    best = max(alone, key=lambda k: (alone[k][1], alone[k][10]))
    mapping = maps[best].pca_ordered(raw_db)
    g_packed = np.concatenate([db_packed, val_packed])
    g_ids = np.concatenate([cat.ids[pos_db], cat.ids[pos_val]])
    g_desc = np.concatenate([mapping.quantized(raw_db), mapping.quantized(raw_val)])
    q_desc = mapping(raw_dam[keep])
    shortlists = [d.shortlist] if d.shortlist else list(SHORTLISTS)
    scores = {}
    for bits in [d.sign_bits] if d.sign_bits >= 0 else [b for b in SIGN_BITS if b <= mapping.dim]:
        m = mapping.with_sign_code(raw_db, bits)
        scores[bits] = two_stage_hits(shortlist_codes(m, dam_packed[keep], q_desc), q_desc,
                                      shortlist_codes(m, g_packed, g_desc), g_desc, g_ids, true, shortlists)
        log.info("two-stage on val, shortlist by %s: %s", f"{bits}-bit sign code" if bits else "hash code",
                 scores[bits])
    bits, r = choose_shortlist(scores)
    meta = {"projection": best, "shortlist": int(r), "sign_bits": int(bits),
            "val_descriptor_alone": alone,
            "val": {str(b): {str(k): v for k, v in per.items()} for b, per in scores.items()}}
    save_descriptor(run.path, mapping.with_sign_code(raw_db, bits), **meta)
    return meta
