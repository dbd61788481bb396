"""Cost of one query photo on the search service's path, in process (no HTTP): what a photo
upload pays before the index is asked.

* ``codes``: ``encode_photo`` (decode, one backbone pass at the model's size, hash head);
* ``two-stage``: ``encode_photo_two_stage`` (the same pass also pools the descriptor, then
  one more pass per other descriptor scale, then the descriptor's projection);
* each with the ONNX sessions on 1 and on 2 intra-op threads, one photo after another
  (latency) and from 2 threads at once (throughput), and batches of 4 photos per call
  (what batching concurrent uploads would save).

    python benchmarks/bench_photo.py                 # runs/demo, 200 catalogue photos

Writes benchmarks/results/photo_encode.md and .json (unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_features import DEFAULT_DATA, photo_paths  # noqa: E402

from fashionhash.config import git_commit  # noqa: E402
from fashionhash.index.build import _decode_upload, encode_photo, encode_photo_two_stage  # noqa: E402
from fashionhash.pipeline import descriptor_scales, load_run  # noqa: E402


def serial_ms(fn, items: list) -> float:
    """Milliseconds per call of ``fn`` over ``items``, one after another (after a warm-up)."""
    for x in items[:5]:
        fn(x)
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return 1000 * (time.perf_counter() - t0) / len(items)


def concurrent_per_s(fn, items: list, n_threads: int) -> float:
    """Calls per second of ``fn`` over ``items`` shared by ``n_threads`` threads."""
    parts = [items[i::n_threads] for i in range(n_threads)]
    threads = [threading.Thread(target=lambda p=p: [fn(x) for x in p]) for p in parts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(items) / (time.perf_counter() - t0)


def set_threads(run, n: int) -> None:
    """ONNX intra-op threads of the run's query encoders (sessions are cached per count)."""
    for fx in [run.encoder(), *run.descriptor_encoders()]:
        fx.threads = n


def measure(run, datas: list[bytes]) -> list[dict]:
    images = [_decode_upload(run, d) for d in datas]
    rows = []
    for threads in (1, 2):
        set_threads(run, threads)
        for path, one, batch in (
            ("codes", lambda d: encode_photo(run, d), lambda b: run.encode_sources(b, num_workers=0)),
            ("two-stage", lambda d: encode_photo_two_stage(run, d), lambda b: run.encode_two_stage(b)),
        ):
            batches = [images[i:i + 4] for i in range(0, len(images) - 3, 4)]
            rows.append({
                "path": path, "threads": threads,
                "ms_per_photo": serial_ms(one, datas),
                "photos_per_s_2_callers": concurrent_per_s(one, datas, 2),
                "ms_per_photo_batch4": serial_ms(batch, batches) / 4,
            })
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# One query photo, in process",
        "",
        f"`{meta['command']}` (commit {meta['commit']}) — run `{meta['run']}` ({meta['method']}, "
        f"engine {meta['engine']}, descriptor scales {meta['scales']}), {meta['photos']} catalogue "
        f"photos sent as JPEG bytes, {meta['cpus']} CPUs ({meta['machine']}), load average "
        f"before/after {meta['load_before']} / {meta['load_after']}.",
        "",
        "`ms/photo`: one photo after another (bytes -> packed code, and descriptor for two-stage); "
        "`photos/s, 2 callers`: two threads encoding at once, as the service's two encode slots "
        "do; `ms/photo in batches of 4`: four photos per call.",
        "",
        "| path | ONNX threads | ms/photo | photos/s, 2 callers | ms/photo in batches of 4 |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['path']} | {r['threads']} | {r['ms_per_photo']:.1f} | {r['photos_per_s_2_callers']:.0f} | "
              f"{r['ms_per_photo_batch4']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a run with a fitted descriptor (default runs/demo)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="catalogue folder whose photos are sent")
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/photo_encode")
    args = ap.parse_args(argv)
    run = load_run(args.run)
    if run.descriptor is None:
        ap.error(f"{args.run} has no fitted descriptor: the two-stage path needs one")
    datas = [Path(p).read_bytes() for p in photo_paths(args.data, args.photos)]
    meta = {"command": " ".join(["python benchmarks/bench_photo.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": (git_commit() or "unknown")[:12], "run": args.run, "method": run.cfg.method.name,
            "engine": run.cfg.model.engine, "scales": descriptor_scales(run.cfg), "photos": len(datas),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    rows = measure(run, datas)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
