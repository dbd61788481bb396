"""What one CUDA GPU adds, measured in one prepared run (``benchmarks/results/accelerator.md``):

1. **end-to-end fine-tuning** of the paper's method (``model.mode=finetune``, otherwise the
   demo's settings: 224 px, 64 bits, single stage), trained until val mAP@1000 stops
   improving or the training budget ends; the best val epoch is then evaluated once on the
   test queries (``fashionhash evaluate``), beside the frozen demo's figures;
2. **the paper's claim at 5 paired seeds**: ``fashionhash table --methods
   adversarial,ablations`` (heads on cached frozen features, learning rate chosen on val,
   early stopping), its runs side by side on the GPU.

Both go through the CLI, as child processes side by side, so that one failing leaves the
other's figures. On the 2-core CPU machine the same commands run too, only far slower
(fine-tuning: hours per epoch). Run it again with the same ``--runs`` to go on: the
fine-tuning resumes from its last epoch (up to ``--epochs``), the table from its finished runs.
Usage::

    python benchmarks/bench_accelerator.py [--data DIR] [--train-budget-s 300]
    python benchmarks/bench_accelerator.py --smoke   # a tiny check of the script itself
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_DATA = ["data.limit=400", "data.n_query=30", "data.n_val=30", "data.min_per_class=5",
              "data.n_damaged=20", "model.image_size=64", "model.hidden=64", "train.batch_size=32"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fashionhash", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), f"> {log}", flush=True)
    # a session of its own: stopping it at the budget stops its workers too
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else ""


def finetune_cmd(a: argparse.Namespace, run: Path) -> list[str]:
    workers = a.workers or max(1, (os.cpu_count() or 2) - 4)
    over = [f"data.root={a.data}"] if a.data else []
    over += ["model.mode=finetune", "descriptor.kind=none", f"train.epochs={a.epochs}",
             f"train.patience={a.patience}", f"train.num_workers={workers}", f"train.device={a.device}"]
    if a.smoke:
        over += [*SMOKE_DATA, "train.epochs=1"]
    return _cli("train", "--config", "configs/demo.yaml", "--run-dir", str(run), "--quiet", *over)


def table_cmd(a: argparse.Namespace, runs: Path, out: Path, seeds: int) -> list[str]:
    sizes = ["--quick", "--bits", "16"] if a.smoke else ["--bits", "64"]
    return _cli("table", "--datasets", "kaggle", "--methods", "adversarial,ablations", *sizes, "--seeds", "1",
                "--ablation-seeds", str(seeds),
                "--jobs", str(a.table_jobs), "--runs", str(runs), "--out", str(out),
                *(["--data", str(a.data)] if a.data else []))


def run_finetune(a: argparse.Namespace, run: Path, deadline: float) -> dict:
    """Train until early stopping or ``deadline`` (then stopped: the best val epoch so far
    is kept on disk), evaluate the best epoch once. Returns what happened."""
    log = run.parent / "finetune_train.log"
    t0 = time.time()
    # a run stopped at an earlier call's budget goes on where it stopped (same stream)
    resume = (run / "checkpoints" / "last.pt").is_file()
    cmd = _cli("train", "--run-dir", str(run), "--resume", "--quiet", f"train.epochs={a.epochs}") \
        if resume else finetune_cmd(a, run)
    p = _start(cmd, log.with_name("finetune_resume.log") if resume else log)
    while p.poll() is None and time.time() < deadline:
        time.sleep(2)
    stopped = p.poll() is None
    _stop(p)
    out = {"train_seconds": round(time.time() - t0, 1), "stopped_at_budget": stopped, "train_rc": p.returncode,
           "resumed": resume}
    if not (run / "checkpoints" / "best.pt").is_file():
        out["error"] = _tail(log)
        return out
    t1 = time.time()
    ev = _start(_cli("evaluate", str(run), "--quiet"), run.parent / "finetune_eval.log")
    out["eval_rc"] = ev.wait()
    out["eval_seconds"] = round(time.time() - t1, 1)
    if out["eval_rc"] != 0:
        out["error"] = _tail(run.parent / "finetune_eval.log")
    return out


def run_table(a: argparse.Namespace, deadline: float, table: dict) -> None:
    """The ablation table in stages of more seeds (3, then ``a.seeds``): each stage resumes
    the last one's runs and rewrites the table only when it finishes, so a stage stopped at
    ``deadline`` leaves the previous stage's table."""
    t0 = time.time()
    for seeds in sorted({min(3, a.seeds), a.seeds}):
        cmd = table_cmd(a, a.runs / "table", a.out / "accelerator_table", 2 if a.smoke else seeds)
        p = _start(cmd, a.runs / f"table_{seeds}.log")
        while p.poll() is None and time.time() < deadline:
            time.sleep(2)
        stopped = p.poll() is None
        _stop(p)
        table.update(cmd=cmd, rc=p.returncode, seconds=time.time() - t0, stopped_at_budget=stopped,
                     error=_tail(a.runs / f"table_{seeds}.log"))
        if p.returncode != 0:
            return
        table["seeds"] = seeds


def _epochs(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if r.get("event") == "epoch"]


def report(a: argparse.Namespace, run: Path, ft: dict | None, table: dict | None, out: Path) -> Path:
    lines = ["# What an accelerator adds", "",
             f"`python benchmarks/bench_accelerator.py {' '.join(a.argv)}`, {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").is_file() else {}
    if ft is not None:
        lines += ["## End-to-end fine-tuning of the paper's method (64 bits, 224 px)", "",
                  f"Device: {meta.get('gpu') or meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
                  f"commit {meta.get('git_commit', '?')}. Command: `{' '.join(finetune_cmd(a, run)[1:])}`, "
                  f"then `fashionhash evaluate {run}`.", "",
                  "| epoch | seconds | val mAP@1000 | val top-1 |", "|---:|---:|---:|---:|"]
        for r in _epochs(run):
            lines.append(f"| {r['epoch']} | {r['seconds']:.1f} | {r['val']['map@1000']:.4f} | {r['val']['top1']:.4f} |")
        lines += ["", f"Training {ft['train_seconds']:.0f} s"
                  + (" (stopped at the time budget; the best val epoch is kept)" if ft["stopped_at_budget"] else "")
                  + (f", evaluation {ft['eval_seconds']:.0f} s." if "eval_seconds" in ft else ".")]
        m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        if m:
            keys = [("map", "mAP@all"), ("map@1000", "mAP@1000"), ("top1", "top-1"),
                    ("same_product_top1", "same-product top-1"), ("same_product_top10", "same-product top-10"),
                    ("graded_ndcg@10", "graded nDCG@10")]
            lines += ["", f"Test queries, best val epoch ({m.get('checkpoint_epoch')}):", "",
                      "| " + " | ".join(n for k, n in keys if k in m) + " |",
                      "|" + "---:|" * sum(k in m for k, _ in keys),
                      "| " + " | ".join(f"{m[k]:.4f}" for k, _ in keys if k in m) + " |"]
        if ft.get("error"):
            lines += ["", "Failed:", "", "```", ft["error"], "```"]
        lines.append("")
    if table is not None and "cmd" in table:
        lines += ["## The ablations at paired seeds", "", f"Last command: `{' '.join(table['cmd'][1:])}` "
                  f"({table['seconds']:.0f} s in all, exit {table['rc']}"
                  + (", stopped at the time budget" if table["stopped_at_budget"] else "")
                  + f"); the table below is the last finished stage's ({table.get('seeds', 'none')} seeds).", ""]
        md = out / "accelerator_table" / "table.md"
        lines += ([ln for ln in md.read_text().splitlines()[2:]] if md.is_file()
                  else ["Failed:", "", "```", table.get("error", ""), "```"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accelerator.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="Kaggle-layout folder (default: the project's default)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "accelerator")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--device", default="auto", help="train.device of the fine-tuning (auto | cuda | cpu)")
    p.add_argument("--epochs", type=int, default=12, help="fine-tuning epoch cap")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--train-budget-s", type=float, default=300, help="fine-tuning training time budget")
    p.add_argument("--table-budget-s", type=float, default=480, help="the ablation table's time budget")
    p.add_argument("--workers", type=int, help="photo-loading workers (default: CPUs - 4)")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds of the ablations")
    p.add_argument("--table-jobs", type=int, default=6)
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny subsets: checks this script, not the figures")
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    run = a.runs / "finetune"
    t0 = time.time()
    table, worker = None, None
    if not a.no_table:
        table = {}
        worker = threading.Thread(target=run_table, args=(a, t0 + a.table_budget_s, table))
        worker.start()
    ft = None if a.no_finetune else run_finetune(a, run, t0 + a.train_budget_s)
    if worker is not None:
        worker.join()
    path = report(a, run, ft, table, a.out)
    print(path.read_text())
    return 0 if (ft is None or not ft.get("error")) and (table is None or table.get("rc") == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
