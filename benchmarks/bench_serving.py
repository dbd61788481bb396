"""Load test of the search service on loopback: latency percentiles and throughput.

Starts the real server (uvicorn, one process, as ``fashionhash serve`` runs it) in a
subprocess and drives it from client threads, each with a keep-alive connection
(stdlib ``http.client``), after a warm-up:

* ``GET /items/{id}/similar?k=10`` for random ids: query by example (the headline);
* the same with an attribute filter (``gender=Men``);
* ``GET /items?offset=...&limit=48``: a page of the catalogue grid;
* ``POST /search`` with real catalogue photos (only with a trained run: it runs the CNN).

Every response must be a 200 with the expected number of results; any error fails the run.

    python benchmarks/bench_serving.py                    # runs/demo if evaluated, else synthetic
    python benchmarks/bench_serving.py --run runs/demo    # that run (index built if missing)
    python benchmarks/bench_serving.py --synthetic        # 44,000 random-cluster codes + fake metadata
    python benchmarks/bench_serving.py --quick            # smoke test
    python benchmarks/bench_serving.py --run runs/demo --shortlist 1000   # two-stage, R = 1,000
    python benchmarks/bench_serving.py --run runs/demo --codes-only       # Hamming ranking alone

With a two-stage index (one that stores descriptors) the service re-ranks a Hamming
shortlist by descriptor cosine; the report says which ranking ran (from ``GET /stats``, and
every search response is checked to have used it) and the server's own ``search_ms``
beside the client's latency.

Writes benchmarks/results/bench_serving.md (unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from fashionhash.serving.service import ServiceConfig  # noqa: E402

N_SYNTHETIC = 44_000
N_BITS = 64
GENDERS = ["Men", "Women", "Unisex", "Boys", "Girls"]
MASTER = ["Apparel", "Accessories", "Footwear", "Personal Care", "Free Items", "Sporting Goods", "Home"]
TYPES = [f"type{i:02d}" for i in range(68)]
COLOURS = ["Black", "White", "Blue", "Brown", "Grey", "Red", "Green", "Pink", "Navy Blue", "Purple",
           "Silver", "Yellow", "Beige", "Gold", "Maroon", "Orange", "Olive", "Multi", "Cream", "Steel"]


# ---------------------------------------------------------------------------------- data


def synthetic_index(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` clustered 64-bit codes (learned codes cluster by class) with fake attributes."""
    from fashionhash.index import HashIndex
    from fashionhash.index.build import IndexInfo

    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 256, size=(1500, N_BITS // 8), dtype=np.uint8)
    assign = rng.integers(0, len(centres), n)
    codes = centres[assign].copy()
    bits = np.unpackbits(codes, axis=1)
    for _ in range(4):  # 0..4 random bit flips per item around its centre
        flip = rng.random(n) < 0.6
        col = rng.integers(0, N_BITS, n)
        bits[flip, col[flip]] ^= 1
    codes = np.packbits(bits, axis=1)
    ids = np.arange(1, n + 1, dtype=np.int64) * 3  # sparse ids, like a real catalogue
    meta = [{"gender": GENDERS[int(rng.integers(0, 5))] if i % 3 else "Men",
             "masterCategory": MASTER[assign[i] % len(MASTER)], "articleType": TYPES[assign[i] % len(TYPES)],
             "baseColour": COLOURS[int(rng.integers(0, len(COLOURS)))],
             "productDisplayName": f"Synthetic product {ids[i]}"} for i in range(n)]
    index = HashIndex("mih", N_BITS, path)
    index.add(ids, codes, meta)
    index.save()
    index.close()
    IndexInfo(run_dir="", n_bits=N_BITS, backend="mih", items="synthetic", count=n, dataset="synthetic",
              catalogue_root=None, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              max_catalogue_id=int(ids.max())).save(path)
    return path


def serve_main(index: str, run: str | None, port: int, plain: bool = False, config=None) -> None:
    """Server process: load the service once and serve it (no model for synthetic data)."""
    import logging

    import uvicorn

    from fashionhash.index import HashIndex
    from fashionhash.index.build import IndexInfo
    from fashionhash.serving import SearchService, ServiceConfig, create_app

    logging.basicConfig(level=logging.WARNING)
    config = config or ServiceConfig()
    if run:
        service = SearchService.open(run, index, config)
    else:
        service = SearchService(None, HashIndex.open(index), index, IndexInfo.load(index), config)
    # plain: the pure-Python HTTP parser and event loop even when httptools/uvloop are installed
    extra = {"http": "h11", "loop": "asyncio"} if plain else {}
    uvicorn.run(create_app(service), host="127.0.0.1", port=port, log_level="warning", access_log=False, **extra)


# ---------------------------------------------------------------------------------- load


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (results files are committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def server_stack(plain: bool) -> str:
    """Which HTTP parser and event loop uvicorn uses (it picks the C ones when installed)."""
    import importlib.util

    if plain:
        return "h11 + asyncio (forced)"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http} + {loop}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    import http.client

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = "fhbench" + os.urandom(8).hex()
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def load(port: int, make_request, n: int, concurrency: int, check) -> tuple[np.ndarray, float, list[str]]:
    """Send ``n`` requests from ``concurrency`` client threads, each with its own
    keep-alive connection (stdlib ``http.client``: a light client, so the measurement is
    the server's, not the client library's); latencies (ms), wall seconds, errors."""
    import http.client
    import threading

    lat = np.zeros(n)
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                method, url, body, headers = make_request(i)
                t0 = time.perf_counter()
                try:
                    conn.request(method, url, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    lat[i] = (time.perf_counter() - t0) * 1000
                    problem = check(r.status, data)
                except (OSError, http.client.HTTPException) as e:
                    lat[i] = (time.perf_counter() - t0) * 1000
                    problem = repr(e)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                if problem:
                    with lock:
                        errors.append(f"{method} {url}: {problem}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0, errors


def expect_results(k: int, stage: str | None = None, search_ms: list | None = None):
    """Response check: a 200 with k results (ranked by ``stage`` when given); the server's
    ``search_ms`` of each response is appended to ``search_ms``."""
    def check(status: int, data: bytes) -> str | None:
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        body = json.loads(data)
        got = len(body.get("results", body.get("items", [])))
        if stage is not None and body.get("ranking", {}).get("stage") != stage:
            return f"ranked by {body.get('ranking')}, expected {stage}"
        if search_ms is not None and "search_ms" in body:
            search_ms.append(float(body["search_ms"]))
        return None if got == k else f"{got} results, expected {k}"
    return check


def code_version() -> str:
    """The commit measured (with ``+`` when the code in the working tree differs from it;
    results files do not count)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "*.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + "+" * bool(dirty)


def stats(port: int) -> dict:
    """The service's ``GET /stats`` (size, backend, how it ranks)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def ranking_text(ranking: dict, n_items: int) -> str:
    if ranking["stage"] != "two-stage":
        return "Hamming distance alone (one stage)"
    r, bits = int(ranking["shortlist"]), int(ranking.get("sign_bits") or 0)
    first = f"a {bits}-bit sign code of the descriptor" if bits else "the hash code"
    return (f"two-stage: the top {r:,} ({r / max(n_items, 1):.0%} of the catalogue) by Hamming distance on "
            f"{first}, re-ranked by cosine to the {ranking['descriptor_bytes']}-d int8 descriptor")


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="evaluated run directory (default runs/demo when evaluated)")
    p.add_argument("--index", type=Path,
                   help="index of the run (default RUN/index, built if missing); without --run: that index "
                        "alone, searched by example")
    p.add_argument("--synthetic", action="store_true", help=f"{N_SYNTHETIC:,} synthetic items, no model")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="few requests, small synthetic index")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serving.md")
    p.add_argument("--plain-uvicorn", action="store_true",
                   help="force uvicorn's pure-Python h11 parser and asyncio loop (no httptools/uvloop)")
    p.add_argument("--shortlist", type=int, default=0,
                   help="Hamming shortlist the descriptors re-rank on a two-stage index (0: the run's choice)")
    p.add_argument("--codes-only", action="store_true", help="rank by Hamming distance alone")
    p.add_argument("--photo-batch", type=int, default=ServiceConfig.photo_batch,
                   help="photo uploads encoded together at most (1: each on its own)")
    p.add_argument("--browse", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the filtered similar-item query and the catalogue page")
    p.add_argument("--append", action="store_true",
                   help="add this run's section to --out instead of replacing the file (compare rankings)")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)  # internal: server process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.server:
        config = ServiceConfig(two_stage=not args.codes_only, shortlist=args.shortlist,
                               photo_batch=args.photo_batch)
        serve_main(str(args.index), str(args.run) if args.run else None, args.port, args.plain_uvicorn, config)
        return 0

    from fashionhash.index import HashIndex

    n_req = 200 if args.quick else args.requests
    tmp = tempfile.TemporaryDirectory(prefix="bench_serving_")
    index_only = args.index is not None and args.run is None and not args.synthetic
    run = None if args.synthetic or index_only else (args.run or ROOT / "runs" / "demo")
    if run is not None and not (run / "metrics.json").is_file():
        if args.run:
            raise SystemExit(f"{run} is not an evaluated run (no metrics.json)")
        print(f"{run} is not evaluated yet: using a synthetic index", flush=True)
        run = None
    if index_only:  # no model: query by example only, ranked with the index's own descriptors
        index_path = args.index
        source = f"index `{_rel(index_path)}` alone (no model: no photo uploads)"
    elif run is None:
        index_path = synthetic_index(Path(tmp.name) / "index", 2000 if args.quick else N_SYNTHETIC)
        source = (f"synthetic: clustered random {N_BITS}-bit codes (1,500 centres, 0-4 bits flipped), "
                  "fake metadata, no model")
    else:
        index_path = args.index or run / "index"
        if not index_path.exists():
            from fashionhash.index.build import build_index

            print(f"building {index_path} ...", flush=True)
            build_index(run, index_path).close()
        from fashionhash.config import load_config

        m = load_config(run / "config.yaml").model  # photo uploads cost what the backbone costs
        source = (f"run `{_rel(run)}` ({m.mode} {m.backbone}, {m.image_size} px photos) "
                  f"with its index `{_rel(index_path)}`")
    index = HashIndex.open(index_path)
    ids = index.index.ids()
    photos = [m["image_path"] for m in index.get_many(ids[:: max(1, len(ids) // 300)].tolist())
              if m and m.get("image_path")]
    n_items, n_bits = len(index), index.n_bits
    index.close()

    port = free_port()
    cmd = [sys.executable, __file__, "--server", "--index", str(index_path), "--port", str(port)]
    if run is not None:
        cmd += ["--run", str(run)]
    if args.plain_uvicorn:
        cmd.append("--plain-uvicorn")
    cmd += ["--shortlist", str(args.shortlist), "--photo-batch", str(args.photo_batch)]
    cmd += ["--codes-only"] * args.codes_only
    load_before = os.getloadavg()
    proc = subprocess.Popen(cmd)
    rows = []
    try:
        wait_ready(port, proc)
        ranking = stats(port)["ranking"]
        stage = ranking["stage"]
        rng = random.Random(0)
        id_list = ids.tolist()
        k = args.k
        get = lambda url: ("GET", url, None, {})  # noqa: E731
        scenarios = [
            (f"GET /items/{{id}}/similar?k={k}", n_req, args.concurrency,
             lambda i: get(f"/items/{rng.choice(id_list)}/similar?k={k}"), (k, stage)),
        ]
        if args.browse:
            scenarios += [
                (f"GET /items/{{id}}/similar?k={k}&gender=Men", n_req // 2, args.concurrency,
                 lambda i: get(f"/items/{rng.choice(id_list)}/similar?k={k}&gender=Men"), (k, stage)),
                ("GET /items?offset=...&limit=48", n_req // 2, args.concurrency,
                 lambda i: get(f"/items?offset={rng.randrange(0, n_items - 48)}&limit=48"), (48, None)),
            ]
        if run is not None and photos:
            bodies = [multipart({"k": str(k)}, {"image": ("q.jpg", Path(f).read_bytes(), "image/jpeg")})
                      for f in photos]
            scenarios.append((f"POST /search (photo upload, k={k})", max(20, n_req // 10), 4,
                              lambda i: ("POST", "/search", bodies[i % len(bodies)][0],
                                         {"Content-Type": bodies[i % len(bodies)][1]}), (k, stage)))
        failed = False
        for name, n, conc, make, (want, want_stage) in scenarios:
            load(port, make, min(100, n), conc, expect_results(want, want_stage))  # warm-up (caches, connections)
            search_ms: list[float] = []
            lat, wall, errors = load(port, make, n, conc, expect_results(want, want_stage, search_ms))
            failed |= bool(errors)
            p50, p90, p99 = np.percentile(lat, [50, 90, 99])
            server = "-" if not search_ms else " / ".join(f"{x:.1f}" for x in np.percentile(search_ms, [50, 99]))
            rows.append(f"| `{name}` | {n:,} | {conc} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {lat.max():.1f} | "
                        f"{server} | {n / wall:,.0f} | {len(errors)} |")
            print(rows[-1], flush=True)
            for e in errors[:5]:
                print("  error:", e, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    load_after = os.getloadavg()

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"`python benchmarks/bench_serving.py {argv_text}`".replace(" `", "`") + f" (code {code_version()})",
        "",
        f"Data: {source}; {n_items:,} items, {n_bits}-bit codes, `mih` backend. Server: one uvicorn "
        f"process as `fashionhash serve` runs it ({server_stack(args.plain_uvicorn)}), clients: threads "
        f"with keep-alive `http.client` connections on "
        f"the same machine over loopback, "
        f"after a warm-up of up to 100 requests per row. {os.cpu_count()} CPUs ({platform.machine()}), "
        f"Python {platform.python_version()}; load average before/after "
        f"{' '.join(f'{x:.1f}' for x in load_before)} / {' '.join(f'{x:.1f}' for x in load_after)} "
        "(other jobs share this machine).",
        "",
        f"Ranking of the searches: {ranking_text(ranking, n_items)}. Photo uploads waiting at the same "
        f"time are encoded together, up to {args.photo_batch} (`ServiceConfig.photo_batch`; 1: each on "
        f"its own, two at once).",
        "",
        "| request | requests | clients | p50 ms | p90 ms | p99 ms | max ms | server search_ms p50 / p99 "
        "| requests/s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Latency is measured by the client: queueing behind the other clients' requests included. "
        "server search_ms: the service's own time for the search (shortlist, re-rank, metadata) of "
        "each request, without HTTP, JSON, queueing or, for a photo, the backbone.",
        "",
    ])
    if not args.quick or args.out != p.get_default("out"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        appending = args.append and args.out.exists()
        head = args.out.read_text().rstrip("\n") + "\n\n" if appending else "# Search service load test\n\n"
        args.out.write_text(head + text)
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
