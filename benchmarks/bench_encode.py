"""Encoding throughput of a trained run's whole encoder (backbone + hash head), photos -> codes.

* model-only: photos already decoded, letterboxed and normalised into one float32 array;
  only the encoder runs, batch by batch.
* end-to-end: the library's encoder (``run.encoder(engine)``) on the JPEG paths: decode +
  letterbox + normalise + model, decoding overlapped with the model by worker threads.
* folder -> index: ``fashionhash encode RUN --folder DIR --out OUT --index INDEX`` in a
  fresh process on a folder of JPEGs (start-up, encoding in chunk files, merge, index save).

Engines: PyTorch eager (``torch.no_grad``, NCHW), PyTorch channels-last +
``torch.inference_mode`` (what ``--engine torch`` uses), ONNX Runtime (``--engine onnx``).
The machine may be shared: the 1-minute load average after each row is printed beside
it, and ``CPU ms/image`` (this process's CPU time, all threads) is the load-independent
cost. The codes of the engines are compared bit for bit on the end-to-end photos.

    python benchmarks/bench_encode.py                  # runs/demo, 2,000 photos, 10,000 to an index
    python benchmarks/bench_encode.py --quick          # smoke test: 200 photos, 500 to an index

Writes benchmarks/results/encode.md and encode.json (unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_features import DEFAULT_DATA, load_avg, model_only, photo_paths, round_robin_best  # noqa: E402

NEAR_ZERO = 1e-4


def agreement(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> dict:
    """How far two engines' relaxed codes ``(N, K)`` are apart, and their packed bits."""
    from fashionhash import codes as C

    flips = C.hamming(C.pack(a[ok]), C.pack(b[ok])).diagonal()
    return {"photos": int(ok.sum()), "bits": int(ok.sum()) * a.shape[1],
            "differing_bits": int(flips.sum()), "photos_with_differing_codes": int((flips > 0).sum()),
            "near_zero_values": int((np.abs(b[ok]) < NEAR_ZERO).sum()),
            "max_abs_diff": float(np.abs(a[ok] - b[ok]).max())}


def int8_model(fp32_path: Path, calib: np.ndarray):
    """The ONNX encoder statically quantised to int8 (per-channel weights, calibrated on
    ``calib``), as a 1-thread session. Not used by fashionhash: its codes differ."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])


def folder_to_index(run_dir: Path, paths: list[Path], workdir: Path, args) -> dict:
    """Time the CLI turning a folder of ``paths`` (symlinked) into a saved index."""
    folder, out, index = workdir / "photos", workdir / "out", workdir / "index"
    folder.mkdir()
    for p in paths:
        (folder / p.name).symlink_to(p.resolve())
    cmd = [sys.executable, "-m", "fashionhash.cli", "encode", str(run_dir), "--folder", str(folder),
           "--out", str(out), "--index", str(index), "--quiet", "--batch-size", str(args.batch_size),
           "--workers", str(args.workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    secs = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("encoded "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"photos": len(paths), "seconds": secs, "cpu_seconds": cpu, "encode_line": line,
            "command": "fashionhash encode RUN --folder DIR --out OUT --index INDEX", "load": load_avg(),
            "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a trained run directory")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=2000, help="photos for the ONNX rows")
    ap.add_argument("--torch-n", type=int, default=400, help="photos for the (slow) PyTorch rows")
    ap.add_argument("--index-n", type=int, default=10_000, help="photos for the folder -> index row (0: skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case, best one reported")
    ap.add_argument("--quick", action="store_true", help="200 photos, 500 to an index, one repeat")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="extra row: the ONNX graph quantised to int8 (its codes differ; not used)")
    ap.add_argument("--only", help="run only the rows whose 'engine mode settings' contain this text")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "encode.md")
    args = ap.parse_args()
    if args.quick:
        args.n, args.torch_n, args.index_n, args.repeat = 200, 100, 500, 1

    import onnxruntime
    import torch

    from fashionhash.models.encoder import build_encoder
    from fashionhash.models.features import _PrepSpec, _prepare_batch
    from fashionhash.pipeline import load_run

    run = load_run(args.run)
    m = run.cfg.model
    paths = photo_paths(args.data, args.n)
    torch_paths = paths[:args.torch_n]
    default_threads = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    bs = args.batch_size

    t0 = time.perf_counter()
    onnx_fx = run.encoder("onnx")
    print(f"ONNX export + session (cached after the first run): {time.perf_counter() - t0:.1f}s", flush=True)
    eager_fx = build_encoder(run.method, m, "torch", channels_last=False)
    cl_fx = build_encoder(run.method, m, "torch", channels_last=True)
    onnx_intra = build_encoder(run.method, m, "onnx", parallel_batches=1, threads=cpus)
    cl_par = build_encoder(run.method, m, "torch", channels_last=True, parallel_batches=cpus)

    # model-only input: decoded once, outside the timing
    spec = _PrepSpec(m.image_size, onnx_fx.channels, onnx_fx.resize_mode, None, 1.0)
    _, u8, ok, _ = _prepare_batch(paths, 0, spec)
    x = onnx_fx.normalise(u8[ok])
    x_torch = x[:args.torch_n]

    def with_threads(th: int, fn: Callable[[], None]) -> Callable[[], None]:
        def run_() -> None:
            torch.set_num_threads(th)
            try:
                fn()
            finally:
                torch.set_num_threads(default_threads)
        return run_

    def eager(b: np.ndarray) -> None:
        with torch.no_grad():
            eager_fx.model.embed(torch.from_numpy(b))

    def fast(b: np.ndarray) -> None:
        with torch.inference_mode():
            cl_fx.model.embed(torch.from_numpy(b).contiguous(memory_format=torch.channels_last))

    def onnx_single(b: np.ndarray) -> None:
        onnx_fx.embed_array(b, single_thread=True)

    def e2e(fx, items, **kw) -> Callable[[], None]:
        return lambda: fx(items, **{"batch_size": bs, "num_workers": args.workers, **kw})

    # (engine, mode, settings, n, fn)
    cases: list[tuple[str, str, str, int, Callable[[], None]]] = []
    for th in sorted({1, cpus}):
        cases.append(("torch eager", "model-only", f"no_grad, NCHW, {th} thread(s)", len(x_torch),
                      with_threads(th, lambda: model_only(eager, x_torch, bs))))
        cases.append(("torch channels-last", "model-only", f"inference_mode, {th} thread(s)", len(x_torch),
                      with_threads(th, lambda: model_only(fast, x_torch, bs))))
    cases.append(("torch channels-last", "model-only", f"{cpus} batches in parallel x 1 thread", len(x_torch),
                  with_threads(1, lambda: model_only(fast, x_torch, bs, parallel=cpus))))
    cases.append(("onnx", "model-only", f"{cpus} batches in parallel x 1 thread", len(x),
                  lambda: model_only(onnx_single, x, bs, parallel=cpus)))
    cases.append(("onnx", "model-only", f"1 batch at a time x {cpus} intra-op threads", len(x),
                  lambda: model_only(onnx_intra.embed_array, x, bs)))
    cases.append(("onnx", "model-only", f"{cpus} batches in parallel x 1 thread, batch 16", len(x),
                  lambda: model_only(onnx_single, x, 16, parallel=cpus)))
    int8 = None
    if args.int8:
        # calibrated on photos that are not timed or compared
        calib = onnx_fx.normalise(_prepare_batch(photo_paths(args.data, args.n + 128)[-128:], 0, spec)[1])
        int8 = int8_model(onnx_fx.onnx_path, calib)
        cases.append(("onnx int8 (extra: codes differ)", "model-only", f"{cpus} batches in parallel x 1 thread",
                      len(x), lambda: model_only(lambda b: int8.run(None, {"input": b}), x, bs, parallel=cpus)))

    for th in sorted({1, cpus}):
        cases.append(("torch eager", "end-to-end", f"inference_mode, NCHW, {th} thread(s), {args.workers} decode threads",
                      len(torch_paths), with_threads(th, e2e(eager_fx, torch_paths))))
        cases.append(("torch channels-last", "end-to-end", f"{th} thread(s), {args.workers} decode threads",
                      len(torch_paths), with_threads(th, e2e(cl_fx, torch_paths))))
    cases.append(("torch channels-last", "end-to-end", f"{cpus} batches in parallel x 1 thread, "
                  f"{args.workers} decode threads", len(torch_paths), with_threads(1, e2e(cl_par, torch_paths))))
    cases.append(("onnx", "end-to-end", f"default: {cpus} batches in parallel x 1 thread, {args.workers} decode threads",
                  len(paths), e2e(onnx_fx, paths)))
    cases.append(("onnx", "end-to-end", f"{cpus} batches in parallel x 1 thread, 1 decode thread", len(paths),
                  e2e(onnx_fx, paths, num_workers=1)))
    cases.append(("onnx", "end-to-end", f"{cpus} batches in parallel x 1 thread, batch 16", len(paths),
                  e2e(onnx_fx, paths, batch_size=16)))
    cases.append(("onnx", "end-to-end", f"{cpus} batches in parallel x 1 thread, 1 decode process", len(paths),
                  e2e(onnx_fx, paths, num_workers=1, executor="process")))
    cases.append(("onnx", "end-to-end", f"1 batch x {cpus} intra-op threads, 1 decode thread", len(paths),
                  e2e(onnx_intra, paths, num_workers=1)))
    cases.append(("onnx", "end-to-end", "no overlap: decode inline, then the model", len(paths),
                  e2e(onnx_fx, paths, num_workers=0)))

    if args.only:
        cases = [c for c in cases if args.only in " ".join(c[:3])]
    best = round_robin_best(cases, args.repeat, settings_width=58)
    rows = [{"engine": e, "mode": mo, "settings": s, "images": n, "seconds": best[i][0],
             "images_per_s": n / best[i][0], "cpu_ms_per_image": 1000 * best[i][1] / n, "load": best[i][2]}
            for i, (e, mo, s, n, _) in enumerate(cases)]

    # the engines' codes, bit for bit, on the same photos
    real_onnx, ok = onnx_fx(torch_paths, batch_size=bs)
    real_cl, ok_cl = cl_fx(torch_paths, batch_size=bs)
    real_eager, ok_eager = eager_fx(torch_paths, batch_size=bs)
    assert (ok == ok_cl).all() and (ok == ok_eager).all()
    agree = {"onnx vs torch channels-last": agreement(real_onnx, real_cl, ok),
             "onnx vs torch eager": agreement(real_onnx, real_eager, ok)}
    if int8 is not None:
        q = np.concatenate([int8.run(None, {"input": x[i:i + bs]})[0] for i in range(0, len(x), bs)])
        ref = np.concatenate([onnx_fx.embed_array(x[i:i + bs]) for i in range(0, len(x), bs)])
        agree["onnx int8 vs onnx (extra)"] = agreement(q, ref, np.ones(len(x), bool))

    index = None
    if args.index_n:
        with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
            index = folder_to_index(args.run, photo_paths(args.data, args.index_n), Path(tmp), args)
            # against the codes evaluation saved (ONNX backbone features + PyTorch head)
            from fashionhash.encoding import merge_chunks

            merged = merge_chunks(index.pop("out"))
            saved = {}
            for f in sorted((args.run / "codes").glob("*.npz")):
                with np.load(f) as z:
                    saved.update(zip(z["ids"].tolist(), z["packed"]))
            common = [j for j, i in enumerate(merged.ids.tolist()) if i in saved and merged.ok[j]]
            if common:
                from fashionhash import codes as C

                flips = C.hamming(merged.packed[common], np.stack([saved[int(merged.ids[j])] for j in common])).diagonal()
                index["vs_evaluation_codes"] = {"photos": len(common), "differing_bits": int(flips.sum())}

    head = (f"# Encoding benchmark\n\n`python benchmarks/bench_encode.py {' '.join(sys.argv[1:])}`\n\n"
            f"Run `{args.run}` ({run.cfg.method.name}, {m.mode} {m.backbone} + hash head, {run.n_bits} bits) at "
            f"{m.image_size}x{m.image_size}, batch {bs}, catalogue photos (60x80 JPEG). "
            f"{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}. The machine is shared: `load` is the 1-minute load average "
            f"after the row (2 CPUs: above ~0.5 other work competes for them); `CPU ms/image` is this process's "
            f"CPU time per photo (all threads), the load-independent cost: on {cpus} idle cores a row that keeps "
            f"them busy reaches about {cpus} * 1000 / (CPU ms/image) images/s. Each row is the fastest of "
            f"{args.repeat} round-robin runs.\n\n")
    table = ["| engine | mode | settings | images | seconds | images/s | CPU ms/image | load |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['engine']} | {r['mode']} | {r['settings']} | {r['images']} | {r['seconds']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['cpu_ms_per_image']:.2f} | {r['load']} |" for r in rows]
    text = head + "\n".join(table) + "\n"
    text += "\n## Codes of the engines\n\n| comparison | photos | bits | differing bits | relaxed values within 1e-4 of 0 | max abs diff |\n|---|---:|---:|---:|---:|---:|\n"
    text += "".join(f"| {k} | {v['photos']} | {v['bits']} | {v['differing_bits']} "
                    f"({v['photos_with_differing_codes']} photos) | {v['near_zero_values']} | "
                    f"{v['max_abs_diff']:.1e} |\n" for k, v in agree.items())
    if index is not None:
        text += (f"\n## Folder of {index['photos']:,} JPEGs to a saved index\n\n`{index['command']}` (mih backend, "
                 f"a fresh process: start-up, encoding in chunk files, merge, index save): **{index['seconds']:.1f} s** "
                 f"wall, {index['cpu_seconds']:.1f} CPU s, load {index['load']}. The command's own report: "
                 f"\"{index['encode_line']}\".")
        if "vs_evaluation_codes" in index:
            v = index["vs_evaluation_codes"]
            text += (f" Its codes against those evaluation saved for the same photos (ONNX backbone features, "
                     f"PyTorch head): {v['differing_bits']} differing bits over {v['photos']:,} photos.")
        text += "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": f"python benchmarks/bench_encode.py {' '.join(sys.argv[1:])}", "run": str(args.run),
         "image_size": m.image_size, "batch_size": bs, "cpus": cpus, "rows": rows, "agreement": agree,
         "folder_to_index": index}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
