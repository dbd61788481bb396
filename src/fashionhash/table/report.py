"""The table's output: rows gathered from the run folders (mean ± std over seeds), markdown,
the precision-recall figure, and the block of a results page it replaces."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fashionhash.table.dataset import Data, read_json
from fashionhash.table.plan import ABLATIONS, EXTRA_ROWS, NAIVE_FEATURES, NAIVE_PIXELS, PAPER, SGML_REAL, VARIANTS
from fashionhash.table.runs import epoch_log, parse_run_name, run_dir_of

COLUMNS = [  # (header, key, format)
    ("mAP@all", "map", "{:.4f}"), ("mAP@1000", "map@1000", "{:.4f}"), ("top-1", "top1", "{:.4f}"),
    ("P@H≤2", "p@h2", "{:.4f}"), ("nDCG@10", "ndcg@10", "{:.4f}"),
    ("same-product top-1", "same_product_top1", "{:.4f}"),
    ("same-product top-10", "same_product_top10", "{:.4f}"),
    ("lr", "lr", "{:g}"), ("epochs", "epochs", "{:.0f}"), ("best epoch", "best_epoch", "{:.0f}"),
    ("train s", "train_seconds", "{:.0f}"), ("encode ms/img", "encode_ms", "{:.2f}"),
    ("bytes/item", "bytes", "{:.0f}"), ("query ms (scan)", "query_ms_flat", "{:.3f}"),
    ("query ms (MIH)", "query_ms_mih", "{:.3f}"),
]
QUALITY = {"map", "map@1000", "top1", "p@h2", "ndcg@10", "same_product_top1", "same_product_top10"}
README_START, README_END = "<!-- table:start -->", "<!-- table:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def _row(label: str, name: str, bits: int | None, found: list[tuple[int, dict]]) -> dict:
    """One table row: per numeric key, the values of every seed, their mean and sample std."""
    keys = sorted({k for _, m in found for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    per_seed = {k: [m.get(k) for _, m in found] for k in keys}
    mean, std = {}, {}
    for k, vals in per_seed.items():
        v = [x for x in vals if x is not None]
        if v:
            mean[k] = float(np.mean(v))
            std[k] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"label": label, "name": name, "bits": bits, "seeds": [s for s, _ in found],
            "mean": mean, "std": std, "per_seed": per_seed, "pr_curve": found[0][1].get("pr_curve")}


def collect(d: Data, labels: list[str], bits_list: list[int], extra_rows: list[str], n_seeds: int) -> list[dict]:
    """Rows of one dataset: per (label, bits), the metrics of every seed found, mean and std."""
    rows = []
    # photo -> features cost, measured once per dataset (delete the file to measure again on
    # a quiet machine): added here so that every row uses the same measurement
    timing = read_json(d.runs / "backbone_timing.json")
    backbone_ms = timing["ms_per_photo"] if timing else 0.0
    for label in labels:
        for bits in bits_list:
            found, found_real = [], []
            for seed in range(n_seeds):
                rd = run_dir_of(d, label, bits, seed)
                m = read_json(rd / "metrics.json")
                if m is None:
                    continue
                extra = read_json(rd / "table_extra.json") or {}
                if "encode_ms_head" in extra:
                    extra["encode_ms"] = backbone_ms + extra["encode_ms_head"]
                found.append((seed, {**m, **extra}))
                real = read_json(rd / "metrics_real.json")
                if real is not None:
                    found_real.append((seed, {**real, "encode_ms": extra.get("encode_ms")}))
            if found:
                rows.append(_row(label, VARIANTS[label][2], bits, found))
            if found_real and label == "sgml" and SGML_REAL in extra_rows:
                rows.append(_row(SGML_REAL, EXTRA_ROWS[SGML_REAL], bits, found_real))
    for label in (NAIVE_PIXELS, NAIVE_FEATURES):
        m = read_json(d.runs / label / "metrics.json") if label in extra_rows else None
        if m:
            if label == NAIVE_FEATURES:
                m["encode_ms"] = backbone_ms
            rows.append(_row(label, EXTRA_ROWS[label], None, [(0, m)]))
    return rows


#: two-sided 5% critical values of Student's t for 1..9 degrees of freedom (then ~2)
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26)
PAIRED_KEYS = (("top1", "top-1"), ("map@1000", "mAP@1000"))


def plain_name(row: dict) -> str:
    """A row's name without the markdown bold the paper's row carries in the table."""
    return row["name"].replace("**", "")


def paired_difference(a: list[float], b: list[float]) -> dict:
    """The paired-by-seed difference ``a - b`` (same seed = same split, initialisation
    and batch order): its mean, the std of the per-seed differences, the larger of the two
    rows' own seed std, and whether a paired t-test rejects "no difference" at 5%."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    n = len(d)
    sd = float(np.std(d, ddof=1)) if n > 1 else 0.0
    t = float(d.mean() / (sd / np.sqrt(n))) if n > 1 and sd > 0 else 0.0
    crit = _T95[n - 2] if 2 <= n <= len(_T95) + 1 else 2.0
    spread = max(float(np.std(a, ddof=1)), float(np.std(b, ddof=1))) if n > 1 else 0.0
    return {"n": n, "mean": float(d.mean()), "sd": sd, "t": t, "significant": n > 1 and abs(t) > crit,
            "seed_spread": spread, "beyond_spread": n > 1 and abs(float(d.mean())) > spread}


def paired_seeds(paper: dict, row: dict, key: str) -> tuple[list[float], list[float]]:
    """The values of ``key`` in two rows of table.json at the seeds both have, in the same order."""
    pa = dict(zip(paper["seeds"], paper["per_seed"].get(key, [])))
    ab = dict(zip(row["seeds"], row["per_seed"].get(key, [])))
    common = [s for s in paper["seeds"] if s in ab and pa.get(s) is not None and ab[s] is not None]
    return [pa[s] for s in common], [ab[s] for s in common]


def paired_notes(rows: list[dict], bits: int) -> list[str]:
    """One plain sentence per ablation at ``bits``: does the paper's full method beat it by
    more than the seed spread (paired by seed)?"""
    paper = next((r for r in rows if r["label"] == PAPER and r["bits"] == bits), None)
    out = []
    for row in (r for r in rows if r["label"] in ABLATIONS and r["bits"] == bits and paper):
        parts = []
        for key, name in PAIRED_KEYS:
            a, b = paired_seeds(paper, row, key)
            if len(a) < 2:
                continue
            p = paired_difference(a, b)
            verdict = ("larger than the seed spread and significant (paired t-test, 5%)"
                       if p["significant"] and p["beyond_spread"] else
                       "significant (paired t-test, 5%) but within the seed spread" if p["significant"] else
                       "not significant: within the seed spread" if not p["beyond_spread"] else
                       "beyond the seed spread but not significant (paired t-test, 5%)")
            parts.append(f"{name} {p['mean']:+.4f} ± {p['sd']:.4f} over {p['n']} paired seeds "
                         f"(seed spread {p['seed_spread']:.4f}, t = {p['t']:.2f}): {verdict}")
        if parts:
            out.append(f"The paper's method minus '{row['name']}' at {bits} bits: " + "; ".join(parts) + ".")
    return out


def edge_notes(rows: list[dict], lrs: list[float], max_epochs: int, patience: int) -> list[str]:
    """Where the table's own budget may have held a row back: a learning rate chosen at an
    end of the grid (one beyond it was not tried), and runs that the epoch cap stopped
    while val was still improving (best epoch within ``patience`` of the cap). Ablations
    take the paper's rate and the real-valued SGML row is SGML's run, so neither is named
    for the rate."""
    own = [r for r in rows if r["label"] != SGML_REAL]
    out = []
    ends = ((min(lrs), "smallest"), (max(lrs), "largest")) if len(lrs) > 1 else ()  # one rate: no choice
    for end, side in ends:
        names = sorted({plain_name(r) for r in own if r["label"] not in ABLATIONS and r["mean"].get("lr") == end})
        if names:
            out.append(f"Chose the grid's {side} learning rate ({end:g}), so a rate beyond it was not "
                       f"tried: {'; '.join(names)}.")
    capped = [f"{plain_name(r)} ({r['bits']} bits, seed {seed})" for r in own
              for seed, n, best in zip(r["seeds"], r["per_seed"].get("epochs", []), r["per_seed"].get("best_epoch", []))
              if n is not None and best is not None and n >= max_epochs and n - best < patience]
    if capped:
        out.append(f"Stopped by the {max_epochs}-epoch cap, val having improved within the last {patience} "
                   f"epochs: {'; '.join(capped)}.")
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    if key not in row["mean"]:
        return "–"
    s = fmt.format(row["mean"][key])
    if len(row["seeds"]) > 1 and key in QUALITY:  # timings vary with the machine's load, not the seed
        s += " ± " + fmt.format(row["std"][key])
    return s


def markdown(tables: dict, header: list[str], notes: list[str]) -> str:
    out = ["# Results table", "", *header, ""]
    for key, t in tables.items():
        out += [f"## {t['title']}", "", t["protocol"], ""]
        cols = [c for c in COLUMNS if any(c[1] in r["mean"] for r in t["rows"])]
        out.append("| method | bits | seeds | " + " | ".join(h for h, _, _ in cols) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(cols))
        for bits in sorted({r["bits"] for r in t["rows"] if r["bits"]}, reverse=True) + [None]:
            for r in (r for r in t["rows"] if r["bits"] == bits):
                out.append(f"| {r['name']} | {r['bits'] or '–'} | {len(r['seeds'])} | "
                           + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |")
        if t.get("pr_png"):
            out += ["", f"![precision-recall, {key}]({t['pr_png']})"]
        if t.get("notes"):
            out += ["", *[f"- {n}" for n in t["notes"]]]
        out.append("")
    out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def update_readme(readme: Path, md: str, out: Path) -> None:
    """Put the table into ``readme`` (a markdown page, e.g. docs/results.md) between the
    markers: headings one level down (the page's section owns the title), figure links
    relative to the page's folder, wherever it is."""
    rel = os.path.relpath(out, readme.resolve().parent)
    lines = []
    for line in md.splitlines()[1:]:  # the table.md title is the README section's own
        if line.startswith("#"):
            line = "#" + line
        elif line.startswith("![") and "](" in line:
            name = line[line.index("](") + 2:-1]
            line = line.replace(f"]({name})", f"]({rel}/{name})")
        lines.append(line)
    _replace_block(readme, README_START, README_END, "\n".join(lines))


def _replace_block(page: Path, start: str, end: str, body: str) -> None:
    text = page.read_text()
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{page} needs one {start} ... {end} block")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    page.write_text(head + start + "\n" + body.strip() + "\n" + end + tail)


def headline(tables: dict, header: str) -> str:
    """A newcomer's summary of the table: per dataset, one line per method (no ablations, no
    naive rows), best first by mAP@1000 at the largest bit length, with that score at every
    bit length and the top-1 beside it; the best of each column in bold."""
    out = [header, ""]
    for t in tables.values():
        rows = [r for r in t["rows"] if r["bits"] and r["label"] in VARIANTS and r["label"] not in ABLATIONS]
        bits = sorted({r["bits"] for r in rows}, reverse=True)
        if not bits:
            continue
        by = {(r["label"], r["bits"]): r for r in rows}
        labels = sorted({r["label"] for r in rows if r["bits"] == bits[0]},
                        key=lambda x: -by[(x, bits[0])]["mean"].get("map@1000", -1.0))
        cols = [(b, "map@1000") for b in bits] + [(bits[0], "top1")]
        best = {c: max((by[(x, c[0])]["mean"].get(c[1], -1.0) for x in labels if (x, c[0]) in by), default=None)
                for c in cols}

        def cell(x: str, c: tuple[int, str]) -> str:
            r = by.get((x, c[0]))
            if r is None or c[1] not in r["mean"]:
                return "–"
            s = _cell(r, c[1], "{:.3f}")
            return f"**{s}**" if r["mean"][c[1]] == best[c] else s

        out += [f"**{t['title']}**", "",
                "| method | " + " | ".join(f"mAP@1000, {b} bits" for b in bits) + f" | top-1, {bits[0]} bits | seeds | lr |",
                "|---|" + "---:|" * (len(cols) + 2)]
        for x in labels:
            top = by[(x, bits[0])]
            lr = f"{top['mean']['lr']:g}" if "lr" in top["mean"] else "–"
            out.append(f"| {top['name']} | " + " | ".join(cell(x, c) for c in cols)
                       + f" | {len(top['seeds'])} | {lr} |")
        out.append("")
    return "\n".join(out)


def update_headline(page: Path, md: str) -> None:
    """Put :func:`headline`'s summary into ``page`` (the README) between its markers."""
    _replace_block(page, HEADLINE_START, HEADLINE_END, md)


def plot_pr(rows: list[dict], path: Path, title: str) -> bool:
    """PR curves over Hamming radius of every hashing row at the largest bit length (seed 0)
    in one PNG. Drawn here rather than with ``plot_pr_curves``: a dozen curves need distinct
    colours and line styles (its default colour cycle repeats after ten) and a legend beside
    the axes, not over the curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = max((r["bits"] for r in rows if r["bits"] and r.get("pr_curve")), default=None)
    chosen = [r for r in rows if r["bits"] == top and r.get("pr_curve")]
    if not chosen:
        return False
    fig = Figure(figsize=(9, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.11, 0.52, 0.8))
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(chosen):
        pr = r["pr_curve"]
        paper = r["label"] == PAPER
        ax.plot(pr["recall"], pr["precision"], color="black" if paper else f"C{i % 10}",
                linestyle="-" if paper else styles[(i // 10 + i) % len(styles)],
                linewidth=2.4 if paper else 1.3, marker="." if paper else None, markersize=3,
                label=plain_name(r), zorder=3 if paper else 2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title}, {top} bits: precision-recall over Hamming radius 0..{top}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    fig.savefig(path, format="png")
    return True


def run_summary(ds_dir: Path) -> dict:
    """Training and evaluation seconds of every run folder of a dataset, by piece of the
    plan (lr candidates, seed 0 at the largest bit length, seed 0 at the others, further
    seeds, naive)."""
    groups: dict[str, dict] = {}
    runs = {p: parse_run_name(p.name) for p in sorted(ds_dir.iterdir()) if p.is_dir()}
    top = max((r[1] for p, r in runs.items() if r and (p / "metrics.json").is_file()), default=0)
    for p, r in runs.items():
        m = read_json(p / "metrics.json") if r or p.name.startswith("naive") else None
        if m is None:
            continue
        extra = read_json(p / "table_extra.json") or {}
        real = read_json(p / "metrics_real.json") or {}
        if r is None:
            piece = "naive L1"
        else:
            piece = (f"seed 0, {top} bits" if r[1] == top else "seed 0, fewer bits") if r[2] == 0 else "more seeds"
        g = groups.setdefault(piece, {"runs": 0, "train_s": 0.0, "eval_s": 0.0})
        g["runs"] += 1
        g["train_s"] += extra.get("train_seconds") or 0.0
        g["eval_s"] += (m.get("eval_seconds") or 0.0) + (real.get("eval_seconds") or 0.0)
    for p in sorted((ds_dir / "lr").glob("*_lr*")):
        g = groups.setdefault("lr candidates (the chosen ones became the seed-0 runs)", {"runs": 0, "train_s": 0.0, "eval_s": 0.0})
        g["runs"] += 1
        g["train_s"] += sum(r.get("seconds", 0.0) for r in epoch_log(p))
    text = "; ".join(f"{k}: {g['runs']} runs, training {g['train_s'] / 60:.1f} min, evaluation "
                     f"{g['eval_s'] / 60:.1f} min" for k, g in groups.items())
    return {"groups": groups, "text": text or "no runs"}
