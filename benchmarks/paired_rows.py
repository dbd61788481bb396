"""Every row of a results table against one reference row, paired by seed: the t-test of the
table's own ablation lines (``paired_difference``), applied to the peers, so that "X leads"
is read against the seed spread. Reads the table's JSON (per-seed scores), trains nothing:

    python benchmarks/paired_rows.py benchmarks/results/fmnist/table.json --against adversarial \\
        --out benchmarks/results/fmnist/paired.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fashionhash.table.report import PAIRED_KEYS, paired_difference, paired_seeds, plain_name  # noqa: E402


def paired_lines(rows: list[dict], against: str, bits: int) -> list[str]:
    """Markdown table lines: each row at ``bits`` minus the row labelled ``against``."""
    ref = next((r for r in rows if r["label"] == against and r["bits"] == bits), None)
    if ref is None:
        raise SystemExit(f"no row {against!r} at {bits} bits")
    head = " | ".join(f"{name} (row minus it, t)" for _, name in PAIRED_KEYS)
    out = [f"| {bits} bits, minus {plain_name(ref)} | seeds | {head} |", "|---|---:|" + "---:|" * len(PAIRED_KEYS)]
    for row in rows:
        if row is ref or row["bits"] != bits:
            continue
        cells, n = [], 0
        for key, _ in PAIRED_KEYS:
            ref_v, row_v = paired_seeds(ref, row, key)
            if len(ref_v) < 2:
                cells.append("–")
                continue
            p = paired_difference(row_v, ref_v)
            n = p["n"]
            mark = "**" if p["significant"] else ""
            cells.append(f"{mark}{p['mean']:+.4f}{mark} ± {p['sd']:.4f} ({p['t']:.2f})")
        out.append(f"| {row['name']} | {n or '–'} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path, help="a table.json written by `fashionhash table`")
    ap.add_argument("--against", default="adversarial", help="label of the reference row (default: the paper's method)")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    table = json.loads(args.table.read_text())
    lines = [f"# Rows paired by seed against `{args.against}`", "",
             f"`python benchmarks/paired_rows.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "Mean ± std of the per-seed differences over the seeds both rows have; in brackets the "
             "paired t; bold where a paired t-test rejects no difference at 5%.", ""]
    for ds in table["datasets"].values():
        lines += [f"## {ds['title']}", "", *paired_lines(ds["rows"], args.against, args.bits), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
