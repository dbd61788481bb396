"""What the frozen backbone features allow before any hashing: the ceilings behind the
closest-match and same-product figures of a hashing head trained on them.

Class level (clothing type of the 1,000 test queries; epochs chosen on the val split):

* linear probe and a 1,024-wide MLP probe on the pooled features: a code that encodes the
  predicted type perfectly would have a closest-match rate near this accuracy;
* 1-NN: the type of the nearest database item by cosine on the raw features;
* ``--last-block``: the last EfficientNet block and the 1x1 head conv fine-tuned with the MLP
  probe, on activations cached just before that block (the cheapest way to let the backbone
  adapt on a CPU).

Same product (damaged copies of the queries, each against the database + the originals, as
in ``fashionhash evaluate``): cosine on the raw features (the floor a code is measured
against) and sign-of-PCA codes at 64 to 512 bits with Hamming ranking (tie-aware).

    python benchmarks/bench_ceilings.py                  # demo config, ~5 min with cached features
    python benchmarks/bench_ceilings.py --last-block model.image_size=128   # + ~10 min of fine-tuning
    python benchmarks/bench_ceilings.py --quick          # 4,000 photos, smoke test

Writes ``benchmarks/results/ceilings_<image size>.md`` and ``.json`` (unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fashionhash import codes as C  # noqa: E402
from fashionhash.config import git_commit, load_config  # noqa: E402
from fashionhash.evaluation.metrics import relevance_from_labels, same_item_topk, top1_expected  # noqa: E402
from fashionhash.evaluation.naive import cosine_distances, unit_rows  # noqa: E402
from fashionhash.pipeline import DAMAGED_SEED, Labels, item_features, open_data  # noqa: E402


def fit_probe(head: nn.Module, tail: nn.Module | None, data: dict, epochs: int,
              lr_tail: float = 1e-4, seed: int = 0) -> tuple[float, float, float]:
    """Train ``head(tail(x))`` with cross-entropy on ``data["train"]``; the epoch with the best
    val accuracy is kept. Returns ``(val accuracy, query accuracy, seconds per epoch)``."""
    torch.manual_seed(seed)
    groups = [{"params": head.parameters(), "lr": 1e-3}]
    if tail is not None:
        groups.append({"params": tail.parameters(), "lr": lr_tail})
    opt = torch.optim.Adam(groups, weight_decay=1e-5)
    x_tr, y_tr = data["train"]
    rng = np.random.default_rng(seed)

    def accuracy(part: str) -> float:
        x, y = data[part]
        head.eval()
        if tail is not None:
            tail.eval()
        with torch.inference_mode():
            pred = torch.cat([head(tail(x[i:i + 1024]) if tail is not None else x[i:i + 1024]).argmax(1)
                              for i in range(0, len(x), 1024)])
        return float((pred == y).float().mean())

    best, best_state, t0 = -1.0, None, time.time()
    for _ in range(epochs):
        head.train()
        if tail is not None:
            tail.train()
        perm = torch.from_numpy(rng.permutation(len(y_tr)))
        for s in range(0, len(perm) - 255, 256):
            idx = perm[s:s + 256]
            f = tail(x_tr[idx]) if tail is not None else x_tr[idx]
            loss = F.cross_entropy(head(f), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy("val")
        if acc > best:
            best = acc
            best_state = copy.deepcopy((head.state_dict(), tail.state_dict() if tail is not None else None))
    per_epoch = (time.time() - t0) / max(epochs, 1)
    head.load_state_dict(best_state[0])
    if tail is not None:
        tail.load_state_dict(best_state[1])
    return best, accuracy("query"), per_epoch


def mlp(in_dim: int, n_classes: int) -> nn.Module:
    """The shape of the hashing heads' MLP (``HashHead`` with ``hidden=1024``)."""
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(in_dim, 1024), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(1024, n_classes))


class _Trunk(nn.Module):
    """EfficientNet-Lite up to (not including) its last block: ``embed -> (B, C*h*w)``."""

    def __init__(self, net: nn.Module, channels: int, cells: int) -> None:
        super().__init__()
        self.net, self.feat_dim = net, channels * cells

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_blocks(x, -1).flatten(1)


class _Tail(nn.Module):
    """The last block + head conv + pooling of a copy of ``net`` (only those get gradients),
    ``(B, C*h*w) -> (B, 1280)``."""

    def __init__(self, net: nn.Module, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.net, self.shape = copy.deepcopy(net), shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.pool(self.net.forward_head(x.float().view(-1, *self.shape), -1))


def last_block_rows(cat, pos: dict, y: dict, cfg, epochs: int) -> dict:
    from fashionhash.models.backbones import build_backbone
    from fashionhash.models.features import FeatureExtractor

    net = build_backbone(cfg.model.backbone)
    with torch.inference_mode():
        size = cfg.model.image_size
        shape = tuple(net.forward_blocks(torch.zeros(1, 3, size, size), -1).shape[1:])
    fx = FeatureExtractor(cfg.model.backbone, image_size=cfg.model.image_size,
                          model=_Trunk(net, shape[0], shape[1] * shape[2]).eval())
    t0 = time.time()
    # float16 halves the memory of the cached activations (~260 MB for the catalogue)
    acts = {p: torch.from_numpy(fx([str(s) for s in cat.paths[pos[p]]])[0].astype(np.float16))
            for p in ("train", "val", "query")}
    t_act = time.time() - t0
    data = {p: (acts[p], y[p]) for p in acts}
    val, test, per_epoch = fit_probe(mlp(1280, int(y["train"].max()) + 1), _Tail(net, shape), data, epochs)
    return {"val": val, "query": test, "seconds_per_epoch": per_epoch, "epochs": epochs,
            "activation_seconds": t_act, "activation_shape": list(shape)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    ap.add_argument("--epochs", type=int, default=12, help="probe epochs (best on val kept)")
    ap.add_argument("--last-block", action="store_true", help="also fine-tune the last block")
    ap.add_argument("--last-block-epochs", type=int, default=8)
    ap.add_argument("--bits", default="64,128,256,512")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="4,000 photos, 2 epochs, 200 damaged")
    ap.add_argument("--out", default=None,
                    help="markdown path (default benchmarks/results/ceilings_<image size>.md)")
    args = ap.parse_args(argv)
    # the float32 backbone's ceilings (the demo's int8 engine is a speed option; the user's
    # overrides still win)
    overrides = ["model.engine=onnx", *args.overrides]
    if args.quick:  # before the user's overrides, which win
        overrides = ["data.limit=4000", "data.n_query=200", "data.n_val=200", "data.n_damaged=200",
                     "data.min_per_class=20", *overrides]
        args.epochs, args.last_block_epochs = 2, 1
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_config(args.config, overrides)
    if cfg.model.mode != "frozen" or not cfg.model.backbone.startswith("efficientnet"):
        raise SystemExit("bench_ceilings measures frozen EfficientNet-Lite features")

    t0 = time.time()
    cat, split = open_data(cfg)
    labels = Labels.build(cat, list(split.protocol["classes"]))
    pos = {p: cat.positions(getattr(split, p)) for p in ("train", "val", "query")}
    feats, ok = {}, {}
    for p in pos:
        feats[p], ok[p] = item_features(cat, pos[p], cfg.model)
    for p in pos:  # unreadable photos (zero features) take no part
        pos[p], feats[p] = pos[p][ok[p]], feats[p][ok[p]]
    n_dam = min(cfg.data.n_damaged, len(pos["query"]))
    dam, dam_ok = item_features(cat, pos["query"][:n_dam], cfg.model, augment_seed=DAMAGED_SEED,
                                strength=cfg.data.augment_strength)
    y = {p: torch.from_numpy(labels.y[pos[p]]) for p in pos}
    n_classes = len(split.protocol["classes"])
    t_feat = time.time() - t0
    print(f"features ready in {t_feat:.0f} s: train {len(pos['train'])}, val {len(pos['val'])}, "
          f"query {len(pos['query'])}, damaged {int(dam_ok.sum())}, {n_classes} types", flush=True)

    rows: list[dict] = []
    data = {p: (torch.from_numpy(feats[p]), y[p]) for p in pos}
    for name, head in (("linear probe", nn.Linear(feats["train"].shape[1], n_classes)),
                       ("MLP probe (1,024 wide)", mlp(feats["train"].shape[1], n_classes))):
        val, test, per_epoch = fit_probe(head, None, data, args.epochs)
        rows.append({"what": name, "class_val": val, "class_query": test,
                     "note": f"best of {args.epochs} epochs, {per_epoch:.1f} s/epoch"})
        print(rows[-1], flush=True)
    if args.last_block:
        r = last_block_rows(cat, pos, y, cfg, args.last_block_epochs)
        rows.append({"what": "last block + head conv fine-tuned, MLP probe", "class_val": r["val"],
                     "class_query": r["query"],
                     "note": f"best of {r['epochs']} epochs, {r['seconds_per_epoch']:.0f} s/epoch; activations "
                             f"{'x'.join(map(str, r['activation_shape']))} in {r['activation_seconds']:.0f} s"})
        print(rows[-1], flush=True)

    nn1 = np.argmin(cosine_distances(feats["query"], feats["train"]), axis=1)
    rel = relevance_from_labels(labels.y[pos["query"]], labels.y[pos["train"]])
    # same product: damaged copies against the database + the original query photos
    gal = np.concatenate([feats["train"], feats["query"]])
    true = len(feats["train"]) + np.arange(n_dam)
    dam_u, dam_t = dam[dam_ok], true[dam_ok]
    sp = same_item_topk(cosine_distances(dam_u, gal), dam_t, (1, 10))
    rows.append({"what": "raw features, cosine (no hashing)", "class_query": float(np.mean(
        labels.y[pos["train"]][nn1] == labels.y[pos["query"]])), "sp1": sp[1], "sp10": sp[10],
        "note": "1-NN type for the class column; 5,120 B/item as float32"})
    print(rows[-1], flush=True)
    # unit rows once, centred on the database mean, for every code length
    ref = unit_rows(feats["train"])
    mean = ref.mean(axis=0)
    ref -= mean
    q = unit_rows(feats["query"]) - mean
    gal_c = np.concatenate([ref, q])  # the gallery is the database + the query originals
    dam_c = unit_rows(dam_u) - mean
    # principal directions of the database features (~10,000 items are plenty for 1,280 dims)
    _, _, vt = np.linalg.svd(ref[::max(1, len(ref) // 10_000)], full_matrices=False)
    for bits in (int(b) for b in args.bits.split(",")):
        if bits > vt.shape[0]:
            continue
        proj = vt[:bits].T
        g_codes, d_codes = C.pack(gal_c @ proj), C.pack(dam_c @ proj)
        q_codes, db_codes = C.pack(q @ proj), C.pack(ref @ proj)
        top1 = top1_expected(C.hamming(q_codes, db_codes), rel)
        sp = same_item_topk(C.hamming(d_codes, g_codes), dam_t, (1, 10))
        rows.append({"what": f"sign of PCA, {bits} bits, Hamming", "class_query": top1, "sp1": sp[1],
                     "sp10": sp[10], "note": f"{bits // 8} B/item; class column: tie-aware top-1"})
        print(rows[-1], flush=True)

    result = {"rows": rows, "command": " ".join(["python benchmarks/bench_ceilings.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": args.config, "overrides": overrides,
              "backbone": cfg.model.backbone, "image_size": cfg.model.image_size,
              "n_train": len(pos["train"]), "n_query": len(pos["query"]), "n_damaged": int(dam_ok.sum()),
              "git_commit": git_commit(), "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "seconds": round(time.time() - t0, 1)}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"ceilings_{cfg.model.image_size}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = _markdown(result)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(md)
    print(f"written: {out}")
    return result


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _markdown(r: dict) -> str:
    lines = [
        f"# Ceilings of frozen {r['backbone']} features at {r['image_size']} px",
        "",
        f"`{r['command']}` ({len(r['overrides'])} config overrides: {' '.join(r['overrides']) or 'none'})",
        f"(commit {r['git_commit']}, {r['machine']}, torch threads: {r['threads']}, {r['seconds']:.0f} s; "
        f"{r['n_train']} database items, {r['n_query']} queries, {r['n_damaged']} damaged copies)",
        "",
        "| what | type accuracy / top-1 (val) | type accuracy / top-1 (queries) | same product top-1 | top-10 | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['what']} | {_fmt(row.get('class_val'))} | {_fmt(row.get('class_query'))} | "
                     f"{_fmt(row.get('sp1'))} | {_fmt(row.get('sp10'))} | {row['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
