"""How the second stage's learned projection depends on its settings, on the validation split.

For a run with a fitted descriptor (``descriptor.kind: gem``), from its cached raw
descriptors: PCA-whitening alone, then a projection trained from it for each setting of a
grid (views, epochs, learning rate, tau), each scored by the descriptor alone: damaged copies
of the val items searched by cosine against the database plus the val originals (top-1 /
top-10), as ``fashionhash fit-descriptor`` scores its candidates. The test queries are never
read. The views are those the run's fit used (cached), so a grid costs training time only.

    python benchmarks/bench_descriptor.py runs/demo
    python benchmarks/bench_descriptor.py runs/demo --grid '[{"views": 1, "epochs": 80, "lr": 0.01}]'

Writes benchmarks/results/bench_descriptor.md (unless --out is given).
"""
from __future__ import annotations

import argparse
import json
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


def _val_descriptors(run_dir: Path):
    """(raw database, raw val, raw damaged val copies kept, true gallery rows, views, cfg)."""
    from fashionhash.pipeline import VAL_DAMAGED_SEED, VIEW_SEED, item_descriptors, load_run, open_data

    run = load_run(run_dir)
    cfg, d = run.cfg, run.cfg.descriptor
    cat, split = open_data(cfg, run_dir / "split.json")
    pos_db, pos_val = cat.positions(split.database), cat.positions(split.val)

    def raw(positions, seed=None):
        return item_descriptors(cat, positions, cfg, augment_seed=seed, strength=cfg.data.augment_strength,
                                num_workers=cfg.train.num_workers)

    r_db, _ = raw(pos_db)
    r_val, val_ok = raw(pos_val)
    r_dam, dam_ok = raw(pos_val[:cfg.data.n_damaged], VAL_DAMAGED_SEED)
    keep = np.flatnonzero(dam_ok & val_ok[:len(r_dam)])
    # the training photos and views fit_descriptor drew (same seed), read back from the cache
    rows = np.sort(np.random.default_rng(cfg.train.seed).choice(len(pos_db), min(d.learn_items, len(pos_db)),
                                                                 replace=False))
    views = [r_db[rows]] + [raw(pos_db[rows], VIEW_SEED + v)[0] for v in range(max(d.learn_views, 1))]
    return r_db, r_val, r_dam[keep], len(pos_db) + keep, views, cfg


def main(argv: list[str] | None = None) -> int:
    from fashionhash.descriptors import Whitening
    from fashionhash.evaluation.two_stage import descriptor_only_hits
    from fashionhash.training.descriptor import learn_projection

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--grid", type=json.loads, default=DEFAULT_GRID,
                   help="JSON list of {views, epochs, lr, tau} (views up to the run's descriptor.learn_views)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_descriptor.md")
    args = p.parse_args(argv)
    r_db, r_val, r_dam, true, views, cfg = _val_descriptors(args.run_dir)
    start = Whitening.fit(r_db, min(cfg.descriptor.dim, *r_db.shape))

    def score(m: Whitening) -> dict[int, float]:
        return descriptor_only_hits(m(r_dam), np.concatenate([m.quantized(r_db), m.quantized(r_val)]), true)

    rows = [("PCA-whitening only", score(start), 0.0)]
    for g in args.grid:
        if g.get("views", 1) > len(views) - 1:
            raise SystemExit(f"{g}: the run's fit cached {len(views) - 1} views (descriptor.learn_views)")
        t0 = time.time()
        m = learn_projection(start, views[:1 + g.get("views", 1)], epochs=g["epochs"], lr=g.get("lr", 1e-3),
                             tau=g.get("tau", cfg.descriptor.learn_tau), seed=cfg.train.seed)
        rows.append((", ".join(f"{k} {v}" for k, v in g.items()), score(m), time.time() - t0))
        print(f"{rows[-1][0]}: top-1 {rows[-1][1][1]:.3f} top-10 {rows[-1][1][10]:.3f} ({rows[-1][2]:.0f} s)",
              flush=True)
    lines = [f"# Descriptor projection settings on val (`{args.run_dir}`)", "",
             f"`python benchmarks/bench_descriptor.py {args.run_dir}`: damaged copies of {len(true)} val "
             f"items against {len(r_db) + len(r_val)} items (database + val originals), descriptor alone; "
             f"{len(views[0])} training photos. Training time on this machine's cores (shared or not).", "",
             "| projection | top-1 | top-10 | train s |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {h[1]:.3f} | {h[10]:.3f} | {t:.0f} |" for name, h, t in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
