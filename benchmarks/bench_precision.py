"""Training steps of a frozen-mode head in float32 against bfloat16 (``train.precision``).

The table and the demo train heads over cached 1,280-d features: one epoch is 160 steps
of 256 rows (41,003 training photos). This times those steps for the paper's method and
CSQ (the registry's own ``objectives`` and Adam, as the trainer steps them), float32 and
bfloat16 alternating step blocks so that other load on shared cores hits both alike, and
the validation encoding (43,003 rows, always float32 in training; bfloat16 shown for
reference). Random features of the real shape: the speed of a matrix product does not
depend on the values. Whether bfloat16 trains as well is a separate question, answered on
val by runs (docs/results.md).

    python benchmarks/bench_precision.py               # 1 thread, 3 rounds of 40 steps
    python benchmarks/bench_precision.py --threads 2 --rounds 5

Writes benchmarks/results/precision.md (unless --out is given).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_features import load_avg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEAT, BITS, CLASSES, HIDDEN, BATCH, STEPS_PER_EPOCH, VAL_ROWS = 1280, 64, 68, 1024, 256, 160, 43003


def _method(name: str, precision: str):
    import fashionhash.methods  # noqa: F401  (registers the methods)
    from fashionhash.methods.base import METHODS
    from fashionhash.models.heads import set_precision

    torch.manual_seed(0)
    m = METHODS.build(name, FEAT, BITS, CLASSES, hidden=HIDDEN).train()
    set_precision(m, precision)
    params = {k: [p for g in gs for p in g["params"]] for k, gs in m.param_groups().items()}
    return m, params, {k: torch.optim.Adam(ps, lr=1e-3) for k, ps in params.items()}


def _steps(state, batch: dict, n: int) -> float:
    """Seconds for ``n`` training steps (every group's gradient at one point, then the steps)."""
    m, params, optims = state
    t0 = time.perf_counter()
    for _ in range(n):
        losses, _ = m.objectives(batch)
        grads = {k: torch.autograd.grad(v, params[k], allow_unused=True) for k, v in losses.items()}
        for k, gs in grads.items():
            for p, g in zip(params[k], gs):
                p.grad = g
            optims[k].step()
    return time.perf_counter() - t0


def _encode_s(state, x: torch.Tensor, low: bool) -> float:
    m = state[0].eval()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        for i in range(0, len(x), 2048):
            m.encode(x[i:i + 2048])
    m.train()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="adversarial,csq")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="steps per round and precision")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    x = torch.randn(BATCH, FEAT, generator=g)
    batch = {"x": x, "x_view": x + 0.1 * torch.randn(BATCH, FEAT, generator=g), "y": y,
             "item": torch.arange(BATCH), "attrs": torch.zeros(BATCH, 0, dtype=torch.long)}
    val = torch.randn(VAL_ROWS, FEAT, generator=g)
    rows = [f"| method | precision | ms per step | s per epoch (160 steps) | val encode s ({VAL_ROWS} rows) |",
            "|---|---|---:|---:|---:|"]
    load0 = load_avg()
    for name in args.methods.split(","):
        states = {p: _method(name, p) for p in ("float32", "bfloat16")}
        for s in states.values():
            _steps(s, batch, 3)  # warm-up: oneDNN picks its kernels
        best = {p: float("inf") for p in states}
        enc = {p: float("inf") for p in states}
        for r in range(args.rounds):
            for p in (list(states) if r % 2 == 0 else list(states)[::-1]):
                best[p] = min(best[p], _steps(states[p], batch, args.steps) / args.steps)
                enc[p] = min(enc[p], _encode_s(states[p], val, p == "bfloat16"))
        for p in states:
            rows.append(f"| {name} | {p} | {best[p] * 1e3:.1f} | {best[p] * STEPS_PER_EPOCH:.2f} | {enc[p]:.2f} |")
        print("\n".join(rows[-2:]), flush=True)
    cpu = platform.processor() or platform.machine()
    bf16 = "yes" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no"
    text = "\n".join([
        "# Training precision: float32 against bfloat16 heads",
        "",
        f"`python benchmarks/bench_precision.py --threads {args.threads} --rounds {args.rounds} "
        f"--steps {args.steps}`; {os.cpu_count()} cores ({cpu}, AVX-512 BF16: {bf16}), "
        f"{args.threads} torch thread(s), 1-minute load average {load0} at the start.",
        "Best of the rounds (step blocks alternate between the precisions). A 1280-1024-64 head, batch "
        f"{BATCH}, random features; the paper's method includes its discriminator.",
        "",
        *rows, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
