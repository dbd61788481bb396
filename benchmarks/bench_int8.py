"""The int8 engine against fp32 ONNX for the frozen EfficientNet-Lite0: speed and fidelity.

* batch 1, 1 intra-op thread (a photo upload): ``FeatureExtractor.embed_array`` on one
  normalised photo, fp32 and int8 calls alternating so that other load hits both alike;
  median and p90 of ``--calls`` calls each;
* batched, 1 thread: batches of 64 normalised photos, alternating, best of ``--repeat``;
* end to end: ``FeatureExtractor`` on JPEG paths with its defaults (decode threads, one
  batch per core), alternating, best of ``--repeat``;
* fidelity: cosine between the fp32 and int8 pooled features of the same photos, and
  between their raw two-stage descriptors (GeM of the last block and of the head map).

``--float-tails 0,1,2`` benchmarks one int8 model per ``model.int8_float_tail`` (the last
blocks and the head conv kept float32), ``--float-fronts 3`` one per ``model.int8_float_front``
(the stem and first blocks kept float32), all alternating with fp32; ``--no-e2e`` skips
the end-to-end rows (which use every core).

The int8 model is the one ``model.engine=onnx_int8`` runs use: calibrated on the seeded
training photos of the default data config (``pipeline.int8_calibration``).

    FASHIONHASH_CACHE=/tmp/cache python benchmarks/bench_int8.py          # 224 and 128 px
    python benchmarks/bench_int8.py --sizes 128 --photos 200 --calls 50   # quicker
    python benchmarks/bench_int8.py --float-tails 0,1 --float-fronts 3 --no-e2e --out benchmarks/results/int8_float_parts.md

Writes benchmarks/results/int8.md (unless --out is given).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_features import load_avg, photo_paths  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FASHIONHASH_DATA", REPO.parent / "shared" / "data" / "fashion-product-images-small"))


def _label(tail: int, front: int = 0) -> str:
    return "int8" + (f" tail {tail}" if tail else "") + (f" front {front}" if front else "")


def _extractors(size: int, threads: int | None, variants: list[tuple[int, int]], descriptor: bool = False) -> dict:
    """``{"fp32": ..., "int8": ..., "int8 tail N": ...}`` FeatureExtractors of the ImageNet
    Lite0 at ``size`` (pooled features, or with ``descriptor`` the raw GeM descriptors)."""
    from fashionhash.config import Config
    from fashionhash.models.backbones import build_backbone
    from fashionhash.models.descriptor import DescriptorNet
    from fashionhash.models.features import FeatureExtractor
    from fashionhash.pipeline import int8_calibration

    def model():
        return DescriptorNet(build_backbone("efficientnet_lite0"), pooled=False).eval() if descriptor else None

    out = {"fp32": FeatureExtractor("efficientnet_lite0", image_size=size, threads=threads, model=model())}
    for tail, front in variants:
        cfg = Config()
        cfg.model.engine, cfg.model.int8_float_tail, cfg.model.int8_float_front = "onnx_int8", tail, front
        out[_label(tail, front)] = FeatureExtractor("efficientnet_lite0", image_size=size, engine="onnx_int8",
                                             threads=threads, calibration=int8_calibration(cfg), model=model())
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _alternate(fns: dict, calls: int) -> dict[str, np.ndarray]:
    """Seconds of each call, the functions called in turn (order flipped every round)."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(calls):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in out.items()}


def bench_size(size: int, paths: list[Path], calls: int, repeat: int, variants: list[tuple[int, int]], e2e: bool) -> dict:
    """All measurements at one input size; returns rows for the report."""
    one = _extractors(size, threads=1, variants=variants)  # 1-thread sessions for batch-1 and batched model-only
    x = one["fp32"].normalise(_decoded(one["fp32"], paths))
    feats = {k: fx.embed_array(x[:256], single_thread=True) for k, fx in one.items()}
    desc = {k: fx.embed_array(x[:256], single_thread=True)
            for k, fx in _extractors(size, threads=1, variants=variants, descriptor=True).items()}
    single = _alternate({k: (lambda fx=fx, i=iter(range(10**9)): fx.embed_array(x[next(i) % len(x)][None], single_thread=True))
                         for k, fx in one.items()}, calls)
    batch = x[:64]
    batched = _alternate({k: (lambda fx=fx: fx.embed_array(batch, single_thread=True)) for k, fx in one.items()}, repeat)
    if e2e:
        full = _extractors(size, threads=None, variants=variants)  # the defaults: a batch per core, decode threads
        ends = _alternate({k: (lambda fx=fx: fx(paths)) for k, fx in full.items()}, repeat)
    row = {"size": size, "load": load_avg(), "engines": list(one)}
    for k in one:
        row[k] = {"b1_median_ms": 1e3 * float(np.median(single[k])), "b1_p90_ms": 1e3 * float(np.percentile(single[k], 90)),
                  "b64_ms_per_photo": 1e3 * float(batched[k].min()) / len(batch),
                  "e2e_photos_per_s": len(paths) / float(ends[k].min()) if e2e else float("nan")}
        if k != "fp32":
            cos, dcos = _cosine(feats["fp32"], feats[k]), _cosine(desc["fp32"], desc[k])
            row[k].update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), n_cos=len(cos),
                          desc_cos_mean=float(dcos.mean()), desc_cos_min=float(dcos.min()))
    print(f"{size}px: {row}", flush=True)
    return row


def _decoded(fx, paths: list[Path]) -> np.ndarray:
    from fashionhash.models.features import _PrepSpec, _prepare_batch

    spec = _PrepSpec(fx.image_size, fx.channels, fx.resize_mode, None, 1.0)
    _, u8, ok, _ = _prepare_batch([str(p) for p in paths], 0, spec)
    return u8[ok]


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# int8 (static, QDQ) vs fp32 ONNX Runtime: EfficientNet-Lite0 features", "",
        f"`{' '.join(['python benchmarks/bench_int8.py', *sys.argv[1:]])}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs: fp32 and int8 calls alternate, so load hits both alike). "
        f"{args.photos} catalogue photos spread over the ids; int8 calibrated on the 64 seeded training photos "
        "that `model.engine=onnx_int8` runs use; `int8 tail N`: `model.int8_float_tail=N` (the last N blocks "
        "and the head conv float32); `int8 front N`: `model.int8_float_front=N` (the stem and the first N "
        "blocks float32).", "",
        "| size | engine | batch 1, 1 thread: median ms | p90 ms | batch 64, 1 thread: ms/photo "
        "| end to end (decode + model, defaults): photos/s | feature cosine to fp32: mean / min "
        "| raw descriptor cosine to fp32: mean / min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fp32"]
        for k in r["engines"]:
            v = r[k]
            cos = (f"{v['cos_mean']:.4f} / {v['cos_min']:.4f} (n={v['n_cos']})" if k != "fp32" else "-")
            dcos = f"{v['desc_cos_mean']:.4f} / {v['desc_cos_min']:.4f}" if k != "fp32" else "-"
            e2e = "-" if np.isnan(v["e2e_photos_per_s"]) else f"{v['e2e_photos_per_s']:.0f}"
            speed = "" if k == "fp32" else (f" ({f['b64_ms_per_photo'] / v['b64_ms_per_photo']:.2f}x)")
            lines.append(f"| {r['size']} | {k} | {v['b1_median_ms']:.1f} | {v['b1_p90_ms']:.1f} | "
                         f"{v['b64_ms_per_photo']:.2f}{speed} | {e2e} | {cos} | {dcos} |")
        lines.append(f"| {r['size']} | (load {r['load']}) | | | | | | |")
    lines += ["", f"Batch 1: {args.calls} calls per engine; batch 64 and end to end: best of {args.repeat}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="224,128")
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--float-tails", default="0", help="model.int8_float_tail values, e.g. 0,1,2")
    ap.add_argument("--float-fronts", default="", help="model.int8_float_front values (tail 0), e.g. 3")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows (they use every core)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8.md")
    args = ap.parse_args()
    paths = photo_paths(args.data, args.photos)
    variants = ([(int(t), 0) for t in args.float_tails.split(",") if t]
                + [(0, int(f)) for f in args.float_fronts.split(",") if f])
    rows = [bench_size(int(s), paths, args.calls, args.repeat, variants, not args.no_e2e) for s in args.sizes.split(",")]
    text = report(rows, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
