"""The int8 engine against fp32 ONNX for the frozen EfficientNet-Lite0: speed and fidelity.

* batch 1, 1 intra-op thread (a photo upload): ``FeatureExtractor.embed_array`` on one
  normalised photo, fp32 and int8 calls alternating so that other load hits both alike;
  median and p90 of ``--calls`` calls each;
* batched, 1 thread: batches of 64 normalised photos, alternating, best of ``--repeat``;
* end to end: ``FeatureExtractor`` on JPEG paths with its defaults (decode threads, one
  batch per core), alternating, best of ``--repeat``;
* fidelity: cosine between the fp32 and int8 pooled features of the same photos.

The int8 model is the one ``model.engine=onnx_int8`` runs use: calibrated on the seeded
training photos of the default data config (``pipeline.int8_calibration``).

    FASHIONHASH_CACHE=/tmp/cache python benchmarks/bench_int8.py          # 224 and 128 px
    python benchmarks/bench_int8.py --sizes 128 --photos 200 --calls 50   # quicker

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


def _extractors(size: int, threads: int | None) -> dict:
    """``{"fp32": ..., "int8": ...}`` FeatureExtractors of the ImageNet Lite0 at ``size``."""
    from fashionhash.config import Config
    from fashionhash.models.features import FeatureExtractor
    from fashionhash.pipeline import int8_calibration

    cfg = Config()
    cfg.model.engine = "onnx_int8"
    cal = int8_calibration(cfg)
    return {"fp32": FeatureExtractor("efficientnet_lite0", image_size=size, threads=threads),
            "int8": FeatureExtractor("efficientnet_lite0", image_size=size, engine="onnx_int8",
                                     threads=threads, calibration=cal)}


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


def bench_size(size: int, paths: list[Path], calls: int, repeat: int) -> dict:
    """All measurements at one input size; returns rows for the report."""
    one = _extractors(size, threads=1)  # 1-thread sessions for batch-1 and batched model-only
    x, ok = one["fp32"].normalise(_decoded(one["fp32"], paths)), None
    feats = {k: fx.embed_array(x[:256], single_thread=True) for k, fx in one.items()}
    cos = (feats["fp32"] * feats["int8"]).sum(1) / (np.linalg.norm(feats["fp32"], axis=1) * np.linalg.norm(feats["int8"], axis=1))
    single = _alternate({k: (lambda fx=fx, i=iter(range(10**9)): fx.embed_array(x[next(i) % len(x)][None], single_thread=True))
                         for k, fx in one.items()}, calls)
    batch = x[:64]
    batched = _alternate({k: (lambda fx=fx: fx.embed_array(batch, single_thread=True)) for k, fx in one.items()}, repeat)
    full = _extractors(size, threads=None)  # the defaults: a batch per core, decode threads
    e2e = _alternate({k: (lambda fx=fx: fx(paths)) for k, fx in full.items()}, repeat)
    row = {"size": size, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "n_cos": len(cos), "load": load_avg()}
    for k in ("fp32", "int8"):
        row[k] = {"b1_median_ms": 1e3 * float(np.median(single[k])), "b1_p90_ms": 1e3 * float(np.percentile(single[k], 90)),
                  "b64_ms_per_photo": 1e3 * float(batched[k].min()) / len(batch),
                  "e2e_photos_per_s": len(paths) / float(e2e[k].min())}
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
        "that `model.engine=onnx_int8` runs use.", "",
        "| size | engine | batch 1, 1 thread: median ms | p90 ms | batch 64, 1 thread: ms/photo "
        "| end to end (decode + model, defaults): photos/s | feature cosine to fp32: mean / min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k in ("fp32", "int8"):
            v = r[k]
            cos = f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} (n={r['n_cos']})" if k == "int8" else "-"
            lines.append(f"| {r['size']} | {k} | {v['b1_median_ms']:.1f} | {v['b1_p90_ms']:.1f} | "
                         f"{v['b64_ms_per_photo']:.2f} | {v['e2e_photos_per_s']:.0f} | {cos} |")
        f, q = r["fp32"], r["int8"]
        lines.append(f"| {r['size']} | int8 speed-up | {f['b1_median_ms'] / q['b1_median_ms']:.2f}x | | "
                     f"{f['b64_ms_per_photo'] / q['b64_ms_per_photo']:.2f}x | "
                     f"{q['e2e_photos_per_s'] / f['e2e_photos_per_s']:.2f}x | (load {r['load']}) |")
    lines += ["", f"Batch 1: {args.calls} calls per engine; batch 64 and end to end: best of {args.repeat}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="224,128")
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8.md")
    args = ap.parse_args()
    paths = photo_paths(args.data, args.photos)
    rows = [bench_size(int(s), paths, args.calls, args.repeat) for s in args.sizes.split(",")]
    text = report(rows, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
