"""How the second stage's learned projection depends on its settings, on the validation split.

For a run with a fitted descriptor (``descriptor.kind: gem``), from its cached raw
descriptors: PCA-whitening alone, then a projection trained from it for each setting of a
grid (views, epochs, learning rate, tau), each scored by the descriptor alone: damaged copies
of the val items searched by cosine against the database plus the val originals (top-1 /
top-10), as ``fashionhash fit-descriptor`` scores its candidates. The test queries are never
read. The views are those the run's fit used (cached), so a grid costs training time only.
A grid entry may also ask for more training photos (``items``, up to the whole database) or
more augmented views than the run's fit drew: ``--items``/``--views`` then compute (and cache)
that many views of that many photos first, a backbone pass per photo, view and scale; smaller
``items`` take nested subsets of the same photos.

    python benchmarks/bench_descriptor.py runs/demo
    python benchmarks/bench_descriptor.py runs/demo --grid '[{"views": 1, "epochs": 80, "lr": 0.01}]'
    python benchmarks/bench_descriptor.py runs/demo --items 41003 --views 3 \
        --grid '[{"items": 41003, "views": 3, "epochs": 40, "lr": 0.02}]'

Writes benchmarks/results/bench_descriptor.md (unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_GRID = [{"views": 1, "epochs": 30, "lr": 1e-3}, {"views": 2, "epochs": 30, "lr": 1e-3},
                *({"views": 1, "epochs": 80, "lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)),
                {"views": 2, "epochs": 80, "lr": 1e-2}, {"views": 2, "epochs": 80, "lr": 2e-2},
                {"views": 2, "epochs": 120, "lr": 3e-2}]


def _val_descriptors(run_dir: Path, items: int | None = None, n_views: int | None = None):
    """(raw database, raw val, raw damaged val copies kept, true gallery rows, views, the
    training photos' granularity labels, cfg).

    ``items``/``n_views`` (default: the run's ``descriptor.learn_items``/``learn_views``):
    the training photos and augmented views to prepare; ``views[v]`` is ``(items, D)`` with
    the photos in the order of a seeded permutation, so ``views[v][:n]`` is a nested subset."""
    from fashionhash.cli import _Bars
    from fashionhash.pipeline import VAL_DAMAGED_SEED, VIEW_SEED, Labels, item_descriptors, load_run, open_data

    run = load_run(run_dir)
    cfg, d = run.cfg, run.cfg.descriptor
    cat, split = open_data(cfg, run_dir / "split.json")
    pos_db, pos_val = cat.positions(split.database), cat.positions(split.val)

    bars = _Bars()

    def raw(positions, seed=None):
        # a bar per pass: photos not yet in the feature cache cost a backbone pass per scale
        progress = bars.phase(f"descriptors (augment seed {seed})", len(positions) * len(d.scales or [0]))
        return item_descriptors(cat, positions, cfg, augment_seed=seed, strength=cfg.data.augment_strength,
                                progress=progress, num_workers=cfg.train.num_workers)

    r_db, _ = raw(pos_db)
    r_val, val_ok = raw(pos_val)
    r_dam, dam_ok = raw(pos_val[:cfg.data.n_damaged], VAL_DAMAGED_SEED)
    keep = np.flatnonzero(dam_ok & val_ok[:len(r_dam)])
    if items is None and n_views is None:
        # the training photos and views fit_descriptor drew (same seed), read back from the cache
        rows = np.sort(np.random.default_rng(cfg.train.seed).choice(len(pos_db), min(d.learn_items, len(pos_db)),
                                                                     replace=False))
        order = np.arange(len(rows))
    else:
        perm = np.random.default_rng(cfg.train.seed).permutation(len(pos_db))[:min(items or d.learn_items,
                                                                                  len(pos_db))]
        rows = np.sort(perm)
        order = np.searchsorted(rows, perm)  # back to the permutation's order: nested prefixes
    views = [r_db[rows]] + [raw(pos_db[rows], VIEW_SEED + v)[0] for v in range(max(n_views or d.learn_views, 1))]
    # what the sgml projection loss compares: class, then the graded attributes (-1 missing)
    lab, at = Labels.build(cat, sorted(set(cat.labels))), pos_db[rows][order]
    labels = np.concatenate([lab.y[at, None], lab.attrs[at]], axis=1)
    return r_db, r_val, r_dam[keep], len(pos_db) + keep, [v[order] for v in views], labels, cfg


def main(argv: list[str] | None = None) -> int:
    from fashionhash.descriptors import Whitening
    from fashionhash.evaluation.two_stage import descriptor_only_hits
    from fashionhash.training.descriptor import learn_projection

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--grid", type=json.loads, default=DEFAULT_GRID,
                   help="JSON list of {views, epochs, lr, tau, items, loss (item or sgml), other_items (sgml)}")
    p.add_argument("--items", type=int, default=None,
                   help="training photos to prepare views of (default: the run's descriptor.learn_items)")
    p.add_argument("--views", type=int, default=None,
                   help="augmented views per photo to prepare (default: the run's descriptor.learn_views)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_descriptor.md")
    args = p.parse_args(argv)
    r_db, r_val, r_dam, true, views, labels, cfg = _val_descriptors(args.run_dir, args.items, args.views)
    start = Whitening.fit(r_db, min(cfg.descriptor.dim, *r_db.shape))

    def score(m: Whitening) -> dict[int, float]:
        return descriptor_only_hits(m(r_dam), np.concatenate([m.quantized(r_db), m.quantized(r_val)]), true)

    rows = [("PCA-whitening only", score(start), 0.0)]

    def write() -> None:  # after every row: a long grid keeps what it measured if stopped
        _write(args.out, argv, rows, len(true), len(r_db) + len(r_val), len(views[0]))

    write()
    for g in args.grid:
        if g.get("views", 1) > len(views) - 1:
            raise SystemExit(f"{g}: {len(views) - 1} views prepared (descriptor.learn_views, or --views)")
        t0 = time.time()
        n = g.get("items", len(views[0]))
        if n > len(views[0]):
            raise SystemExit(f"{g}: {len(views[0])} training photos prepared (--items)")
        m = learn_projection(start, [v[:n] for v in views[:1 + g.get("views", 1)]], epochs=g["epochs"],
                             lr=g.get("lr", 1e-3),
                             tau=g.get("tau", cfg.descriptor.learn_tau), seed=cfg.train.seed,
                             loss=g.get("loss", "item"), labels=labels[:n], other_items=g.get("other_items", 1.0))
        rows.append((", ".join(f"{k} {v}" for k, v in g.items()), score(m), time.time() - t0))
        print(f"{rows[-1][0]}: top-1 {rows[-1][1][1]:.3f} top-10 {rows[-1][1][10]:.3f} ({rows[-1][2]:.0f} s)",
              flush=True)
        write()
    print(f"wrote {args.out}")
    return 0


def _write(out: Path, argv: list[str] | None, rows: list, n_copies: int, n_gallery: int, n_train: int) -> None:
    command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    lines = ["# Descriptor projection settings on val", "",
             f"`python benchmarks/bench_descriptor.py {command}`: damaged copies of {n_copies} val "
             f"items against {n_gallery} items (database + val originals), descriptor alone; "
             f"up to {n_train} training photos. Training time on this machine's cores (shared or not).", "",
             "| projection | top-1 | top-10 | train s |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {h[1]:.3f} | {h[10]:.3f} | {t:.0f} |" for name, h, t in rows]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
