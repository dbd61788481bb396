"""The whole table: per dataset, the learning-rate choice, every method at every bit length
and over seeds at the largest, the naive rows; then
``table.md``, ``table.json`` and one precision-recall figure per dataset."""
from __future__ import annotations

import logging
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fashionhash.config import git_commit
from fashionhash.table.dataset import Data, open_dataset, read_json, write_json
from fashionhash.table.plan import (
    ABLATION_SEEDS, ABLATIONS, ALL_BITS, N_SEEDS, NAIVE_FEATURES, NAIVE_PIXELS, PAPER, VARIANTS, Plan, TableOptions, make_plans,
    select_labels,
)
from fashionhash.table.real import naive_row
from fashionhash.table.report import (
    collect, edge_notes, headline, markdown, paired_notes, plot_pr, run_summary, update_headline, update_readme,
)
from fashionhash.table.runs import choose_lrs, train_runs

log = logging.getLogger(__name__)


def _work_signature(ds_dir: Path) -> frozenset:
    """What training and evaluation leave in a dataset's runs folder: the run logs (lr
    candidates included) and metrics files, by name, size and modification time."""
    seen = set()
    for p in [*ds_dir.glob("*/log.jsonl"), *ds_dir.glob("lr/*/log.jsonl"), *ds_dir.glob("*/metrics*.json")]:
        try:
            st = p.stat()
        except FileNotFoundError:  # its run folder set aside (renamed) while this looked
            continue
        seen.add((str(p), st.st_size, st.st_mtime_ns))
    return frozenset(seen)


class _Timer:
    """Wall seconds per piece of the plan, added over invocations in ``path``
    (``timings.json``). Saved every ``every`` seconds while a piece runs and when it ends,
    so an invocation stopped midway (Ctrl-C, a kill) keeps the time it spent; one that
    trained and evaluated nothing (a table only rebuilt) adds nothing."""

    def __init__(self, path: Path, every: float = 60.0) -> None:
        self.path, self.every = path, every
        self.base: dict[str, float] = read_json(path) or {}
        self.pieces: dict[str, float] = {}
        self._before = _work_signature(path.parent)

    def __call__(self, piece: str, fn, *args):
        t0, stop = time.time(), threading.Event()
        beat = threading.Thread(target=self._beat, args=(piece, t0, stop), daemon=True)
        beat.start()
        try:
            return fn(*args)
        finally:
            stop.set()
            beat.join()
            self.pieces[piece] = self.pieces.get(piece, 0.0) + time.time() - t0
            self._save({})

    def _beat(self, piece: str, t0: float, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self._save({piece: time.time() - t0})

    def _save(self, running: dict[str, float]) -> None:
        if _work_signature(self.path.parent) == self._before:
            return
        acc = dict(self.base)
        for k, v in [*self.pieces.items(), *running.items(), ("total", sum(self.pieces.values()) + sum(running.values()))]:
            acc[k] = acc.get(k, 0.0) + v
        write_json(self.path, acc)

    def totals(self) -> dict[str, float]:
        """Every invocation's pieces so far (what ``timings.json`` holds)."""
        return read_json(self.path) or {}


def run_dataset(opts: TableOptions, plan: Plan, labels: list[str], extra: list[str], bits_list: list[int],
                n_seeds: int, timer: _Timer, n_ablation_seeds: int = 0) -> tuple[Data, list[str]]:
    """Train and evaluate what ``plan`` asks for on one dataset (resuming what is done);
    the dataset and the notes its table gets."""
    notes = []
    if any(x in plan.skip for x in labels):
        notes.append(f"Not run on this dataset: {', '.join(x for x in labels if x in plan.skip)} "
                     "(the item-level term needs augmented views, which this plan leaves out).")
        labels = [x for x in labels if x not in plan.skip]
    views = max((1 for x in labels if "data.n_views=1" in VARIANTS[x][1]), default=0)
    d = timer("prepare (split, features)", open_dataset, plan, opts.runs, views, opts.progress)
    # said once here: every run re-opens the catalogue and would repeat its warnings
    logging.getLogger("fashionhash.data.catalogue").setLevel(logging.ERROR)
    top = max(bits_list)
    # 0) the learning rate of every learned method, on val at seed 0 and the largest bit length
    lrs = timer("learning-rate choice", choose_lrs, d, labels, top, opts.jobs)
    # 1) every method at the largest bit length (seed 0, mostly the chosen candidates)
    timer(f"seed 0, {top} bits", train_runs, d, [(x, top, 0) for x in labels], lrs, top, opts.jobs)
    # 2) the other bit lengths (every method; the ablations too with --all-bits), and 3)
    # more seeds for every row, in one batch (neither depends on the other)
    low = labels if plan.low_bits == "all" else [x for x in labels if x not in ABLATIONS]
    skipped = [x for x in labels if x not in low]
    if skipped and len(bits_list) > 1:
        notes.append(f"Only at {top} bits (they test the paper's method, not a bit length): {', '.join(skipped)}.")
    seed_bits = sorted(b for b in plan.seed_bits if b in bits_list)
    if n_seeds > 1 and seed_bits:
        notes.append(f"Every row at {n_seeds} seeds (train.seed=0..{n_seeds - 1}) at "
                     f"{', '.join(map(str, seed_bits))} bits"
                     + ("; the other bit lengths at seed 0." if len(seed_bits) < len(bits_list) else "."))
    specs = [(x, bits, 0) for bits in sorted(b for b in bits_list if b != top) for x in low]
    for seed in range(1, n_seeds):
        for bits in sorted(seed_bits, reverse=True):
            specs += [(x, bits, seed) for x in labels if bits == top or x in low]
    # the ablations and the paper's method beside them, paired by seed, at the largest bits
    ablated = [x for x in labels if x in ABLATIONS]
    if ablated and n_ablation_seeds > 1:
        paired = [PAPER, *ablated] if PAPER in labels else ablated
        specs += [(x, top, seed) for seed in range(1, n_ablation_seeds) for x in paired
                  if (x, top, seed) not in specs]
        notes.append(f"Ablations: {n_ablation_seeds} seeds each at {top} bits (train.seed=0.."
                     f"{n_ablation_seeds - 1}), beside the paper's method at the same seeds.")
    timer("fewer bits and more seeds", train_runs, d, specs, lrs, top, opts.jobs)
    # 4) the naive baselines (one row each, no hashing)
    for row, space in ((NAIVE_PIXELS, "pixels"), (NAIVE_FEATURES, "features")):
        if row in extra:
            timer(f"naive L1, {space}", naive_row, d, space)
    return d, notes


def _protocol(d: Data, runs: Path) -> str:
    s, dcfg, m, p = d.split, d.cfg.data, d.cfg.model, d.plan
    subset = (f" (a seeded random subset of {dcfg.limit:,} items of the catalogue, `data.limit`)"
              if dcfg.limit else "")
    split = d.split_path.relative_to(runs.parent) if d.split_path.is_relative_to(runs.parent) else d.split_path
    return (f"{len(s.query)} test queries against {len(s.database)} database items{subset} "
            f"({len(s.protocol['classes'])} classes; relevance = same {dcfg.label_key}); "
            f"{m.backbone} {m.mode} at {m.image_size} px, head {m.hidden} wide; every learned method "
            f"trains until val {d.cfg.train.select_metric} has not improved for {p.patience} epochs "
            f"(at most {p.max_epochs}) and keeps its best val epoch, {_lr_rule(p.lrs)}; split `{split}`.")


def _lr_rule(lrs: tuple[float, ...]) -> str:
    # one rate given (`--lrs`, e.g. one chosen by an earlier invocation) is no choice on val
    if len(lrs) == 1:
        return f"at the one learning rate given ({lrs[0]:g}, `--lrs`: no choice on val here)"
    return f"with the learning rate chosen on val among {', '.join(f'{lr:g}' for lr in lrs)} at seed 0"


def _dataset_table(opts: TableOptions, plan: Plan, labels: list[str], extra: list[str], bits_list: list[int],
                   n_seeds: int, n_ablation_seeds: int) -> dict:
    """Run one dataset and gather its part of ``table.json``."""
    timer = _Timer(opts.runs / plan.key / "timings.json")
    d, notes = run_dataset(opts, plan, labels, extra, bits_list, n_seeds, timer, n_ablation_seeds)
    rows = collect(d, labels, bits_list, extra, max(n_seeds, n_ablation_seeds))
    notes += paired_notes(rows, max(bits_list))
    notes += edge_notes(rows, list(plan.lrs), plan.max_epochs, plan.patience)
    png = opts.out / f"pr_{plan.key}.png"
    has_png = plot_pr(rows, png, plan.title.split(" (")[0])
    if not d.keys:
        notes.append("nDCG@10 grades by class only here (this dataset has no attributes).")
    acc = timer.totals()
    summary = run_summary(d.runs)
    notes.append("Measured wall time per piece, summed over the invocations that built these runs: "
                 + ", ".join(f"{k} {v / 60:.1f} min" for k, v in acc.items() if k != "total")
                 + f"; in all {acc.get('total', 0.0) / 60:.1f} min. Per run (from the run folders): "
                 f"{summary['text']}.")
    return {"title": plan.title, "protocol": _protocol(d, opts.runs), "rows": rows, "notes": notes,
            "pr_png": png.name if has_png else None, "timings": acc, "run_summary": summary,
            "max_epochs": plan.max_epochs, "patience": plan.patience, "lrs": list(plan.lrs),
            "runs": str(d.runs)}


def _general_notes(load: float) -> list[str]:
    return [
        "mAP@all / mAP@1000: DeepHash definition, ties broken by a fixed random order of the "
        "database (`tie_order`). top-1: tie-aware "
        "expected precision of the closest match (the paper's metric). P@H≤2: precision within "
        "Hamming radius 2 (hashing rows only). nDCG@10: graded gains = fraction of articleType, "
        "baseColour, gender, usage, season that agree. Same-product: damaged copies of the "
        "queries searched against database + originals (product photos only).",
        "Mean ± sample std over seeds where seeds > 1. lr: the learning rate chosen on val. "
        "epochs: epochs trained (early stopping); best epoch: the one kept (best val score). "
        "Train s: wall-clock training of the heads including the per-epoch validation (cached "
        "backbone features, one torch thread per run, runs side by side on 2 shared cores). "
        "Encode ms/img: photo -> code throughput; for frozen-backbone methods the measured "
        "EfficientNet-Lite0 cost per photo (JPEG decode + ONNX) plus the head. Bytes/item: packed "
        "code (float32 vector for the real-valued rows). Query ms: top-100 of each of the test "
        "queries against the database, flat Hamming scan (`flat` index) and multi-index hashing "
        "(`mih`); for the real-valued rows an exhaustive numpy L1 / cosine scan.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
        f"(load average at start {load:.1f}), torch {torch.__version__}, numpy {np.__version__}.",
    ]


def build_table(opts: TableOptions) -> Path:
    """Run (or resume) the table ``opts`` asks for and write ``table.md``, ``table.json``
    and ``pr_<dataset>.png`` into ``opts.out`` (and the blocks of ``opts.readme`` and
    ``opts.headline``).
    Returns the path of ``table.md``."""
    t_all = time.time()
    opts.out.mkdir(parents=True, exist_ok=True)
    plans = make_plans(opts)
    unknown = [ds for ds in opts.datasets if ds not in plans]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}: {', '.join(plans)}")
    labels, extra = select_labels(opts.methods, opts.quick)
    bits_list = list(opts.bits or ((16,) if opts.quick else ALL_BITS))
    n_seeds = opts.seeds or (2 if opts.quick else N_SEEDS)
    n_ablation_seeds = opts.ablation_seeds or (2 if opts.quick else ABLATION_SEEDS)
    load = os.getloadavg()[0]
    cat_log = logging.getLogger("fashionhash.data.catalogue")  # run_dataset quietens it
    level = cat_log.level
    tables = {}
    try:
        for ds in opts.datasets:
            cat_log.setLevel(level)
            log.info("== %s: %d methods x %s bits, at most %d epochs, patience %d", plans[ds].title,
                     len(labels), bits_list, plans[ds].max_epochs, plans[ds].patience)
            tables[ds] = _dataset_table(opts, plans[ds], labels, extra, bits_list, n_seeds, n_ablation_seeds)
    finally:
        cat_log.setLevel(level)
    sha = git_commit() or "unknown"
    commit = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    header = [f"`{opts.command or 'fashionhash table'}` — generated {time.strftime('%Y-%m-%d %H:%M')}, "
              f"commit `{commit}`, {time.time() - t_all:.0f}s wall for this invocation."]
    notes = _general_notes(load)
    md = markdown(tables, header, notes)
    (opts.out / "table.md").write_text(md)
    if opts.readme:
        update_readme(opts.readme, md, opts.out)
    if opts.headline:
        update_headline(opts.headline, headline(tables, f"Generated by {header[0]}"))
    write_json(opts.out / "table.json", {"command": header[0], "notes": notes, "datasets": tables})
    log.info("wrote %s, %s (%.0fs)", opts.out / "table.md", opts.out / "table.json", time.time() - t_all)
    return opts.out / "table.md"
