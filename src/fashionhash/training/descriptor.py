"""Fit a run's second-stage descriptor after its hash head is trained (frozen runs with
``descriptor.kind`` set), choosing everything on the validation split:

1. PCA-whitening of the catalogue's raw descriptors (the training items = the database);
2. optionally (``descriptor.learn_epochs > 0``) a linear projection that starts from that
   whitening and is trained so that augmented views of a training photo find each other in
   the batch (the item contrast of :class:`~fashionhash.losses.core.ItemContrastLoss`),
   which teaches the descriptor what a shopper's photo changes (crop, rotation, light,
   scale, JPEG) and what it keeps; kept only if it beats the whitening on val;
3. the shortlist size, by the two-stage same-product hit rate of the validation items'
   damaged copies against the database plus the val originals.

Writes ``descriptor.npz`` (the linear map) and ``descriptor.json`` (choices and val scores).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fashionhash import codes as C
from fashionhash.descriptors import Whitening
from fashionhash.evaluation.two_stage import SHORTLISTS, choose_shortlist, two_stage_hits
from fashionhash.losses.core import ItemContrastLoss
from fashionhash.pipeline import (VAL_DAMAGED_SEED, VIEW_SEED, item_descriptors, item_features, load_run,
                                  open_data, save_descriptor)

log = logging.getLogger(__name__)

PhaseFactory = Callable[[str, int], "Callable[[int], None] | None"]


def learn_projection(start: Whitening, views: list[np.ndarray], *, epochs: int, tau: float = 0.05,
                     lr: float = 1e-3, batch: int = 512, seed: int = 0) -> Whitening:
    """Train the linear map of ``start`` so that two views ``(N, D)`` of an item are nearest
    neighbours among the batch; returns a new map (same centring, trained projection)."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.nn.Parameter(torch.from_numpy(start.proj.copy()))
    mean = torch.from_numpy(start.mean)
    xs = [torch.from_numpy(np.asarray(v, np.float32)) - mean for v in views]
    loss_fn = ItemContrastLoss(tau=tau)
    opt = torch.optim.Adam([proj], lr=lr)
    n, d = len(xs[0]), proj.shape[1]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n - 1, batch):
            idx = perm[s:s + batch]
            a, b = torch.randperm(len(xs), generator=gen)[:2].tolist()
            z = torch.nn.functional.normalize(torch.cat([xs[a][idx], xs[b][idx]]) @ proj, dim=1)
            # the loss divides by the width K (made for +-1 codes): sqrt(d)-scaled unit rows
            # give plain cosines over tau
            loss = loss_fn(z * d ** 0.5, torch.cat([idx, idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log.info("descriptor projection epoch %d: item contrast %.4f", epoch + 1, total / n)
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
                                  strength=cfg.data.augment_strength, num_workers=workers)
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
                                           seed=cfg.train.seed)

    # val: damaged copies of the first val items against the database + the val originals
    n_dam = cfg.data.n_damaged
    db_packed, _ = codes(pos_db)
    val_packed, val_ok = codes(pos_val)
    dam_packed, dam_ok = codes(pos_val[:n_dam], VAL_DAMAGED_SEED)
    raw_val, raw_dam = raw(pos_val, "descriptors val"), raw(pos_val[:n_dam], "descriptors val damaged",
                                                            VAL_DAMAGED_SEED)
    keep = np.flatnonzero(dam_ok & val_ok[:n_dam])
    g_packed = np.concatenate([db_packed, val_packed])
    g_ids = np.concatenate([cat.ids[pos_db], cat.ids[pos_val]])
    shortlists = [d.shortlist] if d.shortlist else list(SHORTLISTS)
    scores = {}
    for name, m in maps.items():
        g_desc = np.concatenate([m.quantized(raw_db), m.quantized(raw_val)])
        scores[name] = two_stage_hits(dam_packed[keep], m(raw_dam[keep]), g_packed, g_desc, g_ids,
                                      len(pos_db) + keep, shortlists)
        log.info("descriptor %s on val: %s", name, scores[name])
    best = max(scores, key=lambda k: max((v[1], v[10]) for v in scores[k].values()))
    r = choose_shortlist(scores[best])
    meta = {"projection": best, "shortlist": int(r),
            "val": {name: {str(k): v for k, v in s.items()} for name, s in scores.items()}}
    save_descriptor(run.path, maps[best], **meta)
    return meta
