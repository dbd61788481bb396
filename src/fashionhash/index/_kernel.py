"""Hamming search kernels: a small C library (compiled on first use, cached) and numpy
fallbacks with identical results.

Why C: a numpy linear scan runs ~20x slower than faiss' popcount loop, and multi-index
hashing touches a few thousand scattered rows per query, which numpy cannot do without
large per-call overheads. The C source lives in :mod:`._csrc`; it is compiled with the
system C compiler (``$CC``, else ``cc``/``gcc``) into ``$FASHIONHASH_CACHE/kernels``
(default ``~/.cache/fashionhash/kernels``), keyed by a hash of the source, flags and CPU,
and loaded with ctypes. When no compiler works, or
``FASHIONHASH_KERNEL=numpy``, the numpy path is used (same answers, slower);
``FASHIONHASH_KERNEL=c`` makes a failed build an error instead.

Conventions (shared with the C code): database codes are ``(n, W)`` uint64 *words* (the
packed bytes zero-padded to a multiple of 8 bytes), rows are positions in that array, ids
are int64 labels, ``allowed`` is an optional ``(n,)`` bool/uint8 mask, and results are
ordered by (distance, id).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from fashionhash.descriptors import rerank_rows

from ._csrc import SOURCE

log = logging.getLogger(__name__)

PAD_DISTANCE = np.iinfo(np.int32).max
"""Distance reported next to id -1 when fewer than k items qualify."""

RadiusList = list[tuple[np.ndarray, np.ndarray]]

#: the exact scan selects by distance histogram instead of a heap when k >= n / SELECT_FRACTION
SELECT_FRACTION = 16

_ABI_VERSION = 5
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_forced: str | None = None  # set by use_kernel()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


# ---------------------------------------------------------------------------------------
# building / loading the C library


def _cache_dir() -> Path:
    # the project-wide cache convention (fashionhash.data.catalogue.cache_dir)
    env = os.environ.get("FASHIONHASH_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "fashionhash") / "kernels"


def _cpu_fingerprint() -> str:
    # -march=native output is only valid on the same CPU family: key the cache on its flags.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cache: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set $CC)")
    cache.mkdir(parents=True, exist_ok=True)
    attempts = [["-O3", "-march=native"], ["-O3"]]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(
            "\0".join([SOURCE, cc, *flags, sys.platform, platform.machine(), _cpu_fingerprint()]).encode()
        ).hexdigest()[:20]
        target = cache / f"libfhkernel-{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=".fhkernel-", suffix=".so", dir=cache)
        os.close(fd)
        src = Path(tmp[:-3] + ".c")  # private to this process: concurrent builds cannot clash
        try:
            src.write_text(SOURCE)
            cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", "-o", tmp, str(src), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[:2000]}")
                continue
            os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
            log.info("compiled Hamming kernels: %s", target)
            return target
        finally:
            for leftover in (tmp, src):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
    raise RuntimeError("compiling the Hamming kernels failed:\n" + "\n".join(errors))


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_INT = ctypes.c_int
_DBL = ctypes.c_double


class _MIHStruct(ctypes.Structure):
    _fields_ = [
        ("codes", _P), ("ids", _P), ("allowed", _P),
        ("n_indexed", _I64), ("n_total", _I64),
        ("W", _I32), ("m", _I32),
        ("start", _P), ("len", _P),
        ("offsets", _P), ("off_base", _P),
        ("keys", _P), ("key_base", _P), ("nkeys", _P),
        ("entries", _P), ("n_codes", _I64), ("tcodes", _P), ("gstart", _P), ("grows", _P),
        ("budget", _DBL), ("probe_cost", _DBL), ("cand_cost", _DBL),
    ]  # fmt: skip


def _load_lib() -> ctypes.CDLL:
    cache = _cache_dir()
    try:
        path = _compile(cache)
    except PermissionError:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        path = _compile(Path(tempfile.gettempdir()) / f"fashionhash-{user}")
    lib = ctypes.CDLL(str(path))
    if lib.fh_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"stale kernel library {path}")
    lib.fh_scan_knn.argtypes = [_P, _I64, _INT, _P, _P, _P, _I64, _INT, _I32, _P, _P]
    lib.fh_scan_knn.restype = _INT
    lib.fh_scan_knn_select.argtypes = [_P, _I64, _INT, _P, _P, _P, _I64, _INT, _I32, _P, _P]
    lib.fh_scan_knn_select.restype = _INT
    lib.fh_scan_radius.argtypes = [_P, _I64, _INT, _P, _P, _I64, _INT, _P, _P, _P, _I64, _P]
    lib.fh_scan_radius.restype = _I64
    lib.fh_mih_knn.argtypes = [ctypes.POINTER(_MIHStruct), _P, _I64, _INT, _I32, _P, _P, _P, _P]
    lib.fh_mih_knn.restype = _INT
    lib.fh_mih_radius.argtypes = [
        ctypes.POINTER(_MIHStruct), _P, _I64, _INT, _P, _P, _P, _I64, _P, _P, _P,
    ]  # fmt: skip
    lib.fh_mih_radius.restype = _I64
    lib.fh_mih_build_direct.argtypes = [_P, _I64, _INT, _P, _P]
    lib.fh_mih_build_direct.restype = None
    lib.fh_rerank.argtypes = [_P, _INT, _P, _P, _I64, _P, _INT, _INT, _P, _P]
    lib.fh_rerank.restype = _INT
    return lib


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _lib_error
    mode = _forced or os.environ.get("FASHIONHASH_KERNEL", "auto").lower()
    if mode == "numpy":
        return None
    if _lib is None and _lib_error is None:
        with _lock:
            if _lib is None and _lib_error is None:
                try:
                    _lib = _load_lib()
                except Exception as exc:  # noqa: BLE001 - any build failure means fallback
                    _lib_error = str(exc)
                    log.warning("C Hamming kernels unavailable, using numpy (slow): %s", exc)
    if _lib is None and mode == "c":
        raise RuntimeError(f"FASHIONHASH_KERNEL=c but the C kernels are unavailable: {_lib_error}")
    return _lib


def kernel_name() -> str:
    """``"c"`` or ``"numpy"``: which implementation searches run on."""
    return "c" if _get_lib() is not None else "numpy"


@contextlib.contextmanager
def use_kernel(name: str):
    """Force ``"c"`` or ``"numpy"`` kernels inside a ``with`` block (tests, benchmarks)."""
    global _forced
    if name not in ("c", "numpy", "auto"):
        raise ValueError(f"kernel must be 'c', 'numpy' or 'auto', got {name!r}")
    old, _forced = _forced, None if name == "auto" else name
    try:
        yield
    finally:
        _forced = old


def n_threads() -> int:
    env = os.environ.get("FASHIONHASH_THREADS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def _map_chunks(fn, n_items: int, min_chunk: int = 8, per_thread: int = 4):
    """Run ``fn(start, stop)`` over contiguous chunks of range(n_items) on the thread pool.

    The C calls release the GIL, so this is real parallelism. Several chunks per thread
    smooth out queries of uneven cost (e.g. MIH queries that fall back to a scan).
    """
    global _pool, _pool_size
    threads = n_threads()
    if threads == 1 or n_items < 2 * min_chunk:
        return [fn(0, n_items)]
    n_chunks = min(threads * per_thread, max(1, n_items // min_chunk))
    bounds = np.linspace(0, n_items, n_chunks + 1).astype(np.int64)
    if _pool is None or _pool_size != threads:
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="fashionhash-index")
        _pool_size = threads
    futures = [_pool.submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return [f.result() for f in futures]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _as_mask(allowed: np.ndarray | None, n: int) -> np.ndarray | None:
    if allowed is None:
        return None
    allowed = np.ascontiguousarray(allowed)
    if allowed.shape != (n,):
        raise ValueError(f"allowed mask must be ({n},), got {allowed.shape}")
    return allowed.view(np.uint8) if allowed.dtype == np.bool_ else allowed.astype(np.uint8)


# ---------------------------------------------------------------------------------------
# words and popcounts (numpy)


def to_words(packed: np.ndarray) -> np.ndarray:
    """Packed ``(N, B)`` uint8 -> ``(N, ceil(B/8))`` uint64 words, zero padded."""
    n, b = packed.shape
    w = (b + 7) // 8
    if b == 8 * w:
        return np.ascontiguousarray(packed).view(np.uint64).reshape(n, w)
    buf = np.zeros((n, 8 * w), dtype=np.uint8)
    buf[:, :b] = packed
    return buf.view(np.uint64).reshape(n, w)


def _popcount_rows(x: np.ndarray) -> np.ndarray:
    """``(..., W)`` uint64 -> ``(...)`` int32 bit counts."""
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)


def extract_keys(words: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits ``[start, start+length)`` of the flattened little-endian words -> uint32 keys."""
    w, off = divmod(int(start), 64)
    x = words[:, w] >> np.uint64(off)
    if off + length > 64:
        x = x | (words[:, w + 1] << np.uint64(64 - off))
    return (x & np.uint64((1 << length) - 1)).astype(np.uint32)


def _extract_one(q: np.ndarray, start: int, length: int) -> int:
    return int(extract_keys(q.reshape(1, -1), start, length)[0])


# ---------------------------------------------------------------------------------------
# linear scan


def _topk_numpy(d: np.ndarray, ids: np.ndarray, valid: np.ndarray | None, k: int):
    """One query: distances ``(n,)`` -> k best (distance, id) pairs, padded."""
    out_d = np.full(k, PAD_DISTANCE, dtype=np.int32)
    out_i = np.full(k, -1, dtype=np.int64)
    if valid is not None:
        sel = np.flatnonzero(valid)
        d, ids = d[sel], ids[sel]
    kk = min(k, d.shape[0])
    if kk == 0:
        return out_d, out_i
    kth = np.partition(d, kk - 1)[kk - 1]
    cand = np.flatnonzero(d <= kth)  # everything that can be in the answer, ties included
    order = np.lexsort((ids[cand], d[cand]))[:kk]
    out_d[:kk] = d[cand[order]]
    out_i[:kk] = ids[cand[order]]
    return out_d, out_i


def scan_knn(words, ids, allowed, queries, k: int):
    """Exact k-NN by linear scan: ``(n, W)`` words x ``(Q, W)`` query words ->
    (distances ``(Q, k)`` int32, ids ``(Q, k)`` int64), (distance, id) order, padded."""
    n, nq = words.shape[0], queries.shape[0]
    out_d = np.full((nq, k), PAD_DISTANCE, dtype=np.int32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if k == 0 or nq == 0 or n == 0:
        return out_d, out_i
    mask = _as_mask(allowed, n)
    lib = _get_lib()
    if lib is not None:
        W = words.shape[1]
        # a large part of the rows (a two-stage shortlist): select by distance histogram,
        # since a heap would pay log k on each of >= k admissions
        select = k * SELECT_FRACTION >= n

        def run(a, b):
            fn = lib.fh_scan_knn_select if select else lib.fh_scan_knn
            if fn(_ptr(words), n, W, _ptr(ids), _ptr(mask), _ptr(queries[a:b]), b - a, k,
                  PAD_DISTANCE, _ptr(out_d[a:b]), _ptr(out_i[a:b])) < 0:  # fmt: skip
                raise MemoryError("the scan kernel could not allocate its scratch memory")

        _map_chunks(run, nq, min_chunk=4, per_thread=1)
        return out_d, out_i
    step = max(1, (1 << 24) // max(n, 1))  # bound the (chunk, n) distance matrix
    for a in range(0, nq, step):
        dist = _popcount_rows(queries[a : a + step, None, :] ^ words[None, :, :])
        for j in range(dist.shape[0]):
            out_d[a + j], out_i[a + j] = _topk_numpy(dist[j], ids, mask, k)
    return out_d, out_i


def group_radius(nq: int, qidx: np.ndarray, dist: np.ndarray, rows: np.ndarray, ids: np.ndarray):
    """Unsorted (query, distance, row) triples -> per query (distances int32, ids int64)
    sorted by (distance, id)."""
    found_ids = ids[rows]
    order = np.lexsort((found_ids, dist, qidx))
    qidx, dist, found_ids = qidx[order], dist[order].astype(np.int32), found_ids[order]
    bounds = np.searchsorted(qidx, np.arange(nq + 1))
    return [(dist[bounds[q] : bounds[q + 1]], found_ids[bounds[q] : bounds[q + 1]]) for q in range(nq)]


def _empty_triples():
    return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64)


def scan_radius(words, allowed, queries, radius: int):
    """All rows within ``radius`` by linear scan -> unsorted (query, distance, row) triples."""
    n, nq = words.shape[0], queries.shape[0]
    if n == 0 or nq == 0:
        return _empty_triples()
    mask = _as_mask(allowed, n)
    lib = _get_lib()
    if lib is not None:
        W = words.shape[1]

        def run(a, b):
            parts, cap, q = [], max(4096, 64 * (b - a)), a
            while q < b:
                oq = np.empty(cap, np.int32)
                od = np.empty(cap, np.int32)
                orow = np.empty(cap, np.int64)
                cnt = np.zeros(1, np.int64)
                done = lib.fh_scan_radius(_ptr(words), n, W, _ptr(mask), _ptr(queries[q:b]), b - q, radius,
                                          _ptr(oq), _ptr(od), _ptr(orow), cap, _ptr(cnt))  # fmt: skip
                c = int(cnt[0])
                parts.append((oq[:c].astype(np.int64) + q, od[:c], orow[:c]))
                if done == 0:
                    cap *= 4  # one block of queries needs more room than that
                q += int(done)
            return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

        parts = _map_chunks(run, nq, min_chunk=4, per_thread=1)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
    qs, ds, rs = [], [], []
    step = max(1, (1 << 24) // max(n, 1))
    for a in range(0, nq, step):
        dist = _popcount_rows(queries[a : a + step, None, :] ^ words[None, :, :])
        ok = dist <= radius
        if mask is not None:
            ok &= mask.astype(bool)[None, :]
        qi, ri = np.nonzero(ok)
        qs.append(qi + a)
        ds.append(dist[qi, ri])
        rs.append(ri)
    return np.concatenate(qs).astype(np.int64), np.concatenate(ds).astype(np.int32), np.concatenate(rs)


# ---------------------------------------------------------------------------------------
# multi-index hashing tables


@dataclass
class CodeGroups:
    """The rows behind each of the ``n`` distinct codes among rows ``[0, n_rows)``.

    Code ``g``'s rows are ``rows[start[g]:start[g + 1]]``, ascending. When every row has its
    own code, ``start`` and ``rows`` are None and code ``g`` is row ``g``.
    """

    n_rows: int
    n: int
    start: np.ndarray | None  # (n + 1,) int64
    rows: np.ndarray | None  # (n_rows,) int32

    @property
    def nbytes(self) -> int:
        return 0 if self.start is None else int(self.start.nbytes + self.rows.nbytes)

    def rows_of(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes ``(c,)`` -> (their rows concatenated, the position in ``g`` of each row)."""
        if self.start is None:
            return g.astype(np.int64), np.arange(g.shape[0])
        lo, hi = self.start[g], self.start[g + 1]
        return self.rows[_ranges(lo, hi)].astype(np.int64), np.repeat(np.arange(g.shape[0]), hi - lo)


def group_codes(words: np.ndarray, n_rows: int) -> tuple[np.ndarray, CodeGroups]:
    """Group rows ``[0, n_rows)`` of ``(n, W)`` words by code -> (the distinct codes
    ``(n_codes, W)`` (a view of ``words`` when all differ), their groups)."""
    if n_rows >= 2**31:
        raise ValueError("MIH tables hold int32 row numbers: at most 2^31 - 1 rows")
    w = words[:n_rows]
    order = np.lexsort(w.T[::-1]) if w.shape[1] > 1 else np.argsort(w[:, 0], kind="stable")
    sorted_w = w[order]
    new = np.ones(n_rows, dtype=bool)
    new[1:] = np.any(sorted_w[1:] != sorted_w[:-1], axis=1)
    first = np.flatnonzero(new)
    if first.shape[0] == n_rows:
        return w, CodeGroups(n_rows, n_rows, None, None)
    start = np.append(first, n_rows).astype(np.int64)
    return sorted_w[first], CodeGroups(n_rows, first.shape[0], start, order.astype(np.int32))


@dataclass
class MIHTables:
    """Compact hash tables over the distinct codes of rows ``[0, n_indexed)``: one per
    substring, CSR layout.

    Substring ``j`` is bits ``[start[j], start[j] + length[j])`` of the flattened words.
    Direct tables (``nkeys[j] == -1``) index offsets by key (``2^len + 1`` entries);
    others keep sorted distinct keys and are binary searched. Each table also stores the
    codes of its entries in bucket order, so a bucket's candidates are read sequentially.
    """

    groups: CodeGroups
    start: np.ndarray  # (m,) int32
    length: np.ndarray  # (m,) int32
    offsets: np.ndarray  # concatenated uint32
    off_base: np.ndarray  # (m,) int64
    keys: np.ndarray  # concatenated uint32
    key_base: np.ndarray  # (m,) int64
    nkeys: np.ndarray  # (m,) int64
    entries: np.ndarray  # (m, n_codes) int32 code numbers
    codes: np.ndarray  # (m, n_codes, W) uint64: the code of each entry, inline

    @property
    def m(self) -> int:
        return int(self.start.shape[0])

    @property
    def n_indexed(self) -> int:
        return self.groups.n_rows

    @property
    def n_codes(self) -> int:
        return self.groups.n

    @property
    def nbytes(self) -> int:
        parts = (self.offsets, self.keys, self.entries, self.codes)
        return int(sum(a.nbytes for a in parts) + self.groups.nbytes)

    def lookup(self, j: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bucket bounds ``(lo, hi)`` into ``entries[j]`` for an array of keys."""
        ob = int(self.off_base[j])
        nk = int(self.nkeys[j])
        if nk < 0:
            off = self.offsets[ob : ob + (1 << int(self.length[j])) + 1]
            return off[keys].astype(np.int64), off[keys.astype(np.int64) + 1].astype(np.int64)
        ks = self.keys[int(self.key_base[j]) : int(self.key_base[j]) + nk]
        off = self.offsets[ob : ob + nk + 1].astype(np.int64)
        pos = np.searchsorted(ks, keys)
        hit = pos < nk
        hit[hit] = ks[pos[hit]] == keys[hit]
        lo = np.where(hit, off[np.minimum(pos, nk)], 0)
        hi = np.where(hit, off[np.minimum(pos + 1, nk)], 0)
        return lo, hi


def substring_layout(n_bytes_: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the ``8 * n_bytes`` code bits into ``m`` contiguous substrings of near-equal length.

    Padding bits (n_bits not a multiple of 8) are always 0 in every code, so whichever
    substring holds them never differs on them: correctness is unaffected.
    """
    total = 8 * n_bytes_
    if not 1 <= m <= total:
        raise ValueError(f"m must be in [1, {total}], got {m}")
    length = np.full(m, total // m, dtype=np.int32)
    length[: total % m] += 1
    if length.max() > 32:
        raise ValueError(f"substrings of {length.max()} bits: m must be >= {math.ceil(total / 32)}")
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int32)
    return start, length


def build_tables(codes: np.ndarray, groups: CodeGroups, n_bytes_: int, m: int) -> MIHTables:
    """Hash the distinct codes ``(n_codes, W)`` words of ``groups`` into ``m`` substring tables."""
    start, length = substring_layout(n_bytes_, m)
    lib = _get_lib()
    n = groups.n
    offsets, keys_all, entries = [], [], np.empty((m, n), dtype=np.int32)
    off_base, key_base, nkeys = np.zeros(m, np.int64), np.zeros(m, np.int64), np.zeros(m, np.int64)
    o_pos = k_pos = 0
    for j in range(m):
        keys = extract_keys(codes, int(start[j]), int(length[j]))
        L = int(length[j])
        # Direct addressing while the offsets array stays within a few entries per code.
        direct = L <= 24 and (1 << L) <= 8 * max(n, 1 << 12)
        if direct:
            off = np.zeros((1 << L) + 1, dtype=np.uint32)
            if lib is not None and n:
                lib.fh_mih_build_direct(_ptr(keys), n, L, _ptr(off), _ptr(entries[j]))
            else:
                np.cumsum(np.bincount(keys, minlength=1 << L), out=off[1:])
                entries[j] = np.argsort(keys, kind="stable")
            nkeys[j] = -1
        else:
            order = np.argsort(keys, kind="stable")
            entries[j] = order
            uniq, first = np.unique(keys[order], return_index=True)
            off = np.append(first, n).astype(np.uint32)
            keys_all.append(uniq.astype(np.uint32))
            key_base[j] = k_pos
            k_pos += uniq.shape[0]
            nkeys[j] = uniq.shape[0]
        offsets.append(off)
        off_base[j] = o_pos
        o_pos += off.shape[0]
    return MIHTables(
        groups=groups,
        start=start,
        length=length,
        offsets=np.concatenate(offsets),
        off_base=off_base,
        keys=np.concatenate(keys_all) if keys_all else np.zeros(1, np.uint32),
        key_base=key_base,
        nkeys=nkeys,
        entries=entries,
        codes=np.ascontiguousarray(codes[entries]),
    )


@dataclass
class MIHCost:
    """Per-query work budget (in units of one row of a linear scan) and unit costs."""

    budget: float
    probe_cost: float
    cand_cost: float


def _mih_struct(t: MIHTables, words, ids, mask, n_total: int, cost: MIHCost) -> _MIHStruct:
    g = t.groups
    return _MIHStruct(
        _ptr(words), _ptr(ids), _ptr(mask), t.n_indexed, n_total, words.shape[1], t.m,
        _ptr(t.start), _ptr(t.length), _ptr(t.offsets), _ptr(t.off_base), _ptr(t.keys),
        _ptr(t.key_base), _ptr(t.nkeys), _ptr(t.entries), g.n, _ptr(t.codes), _ptr(g.start), _ptr(g.rows),
        cost.budget, cost.probe_cost, cost.cand_cost,
    )  # fmt: skip


_MASK_CACHE: dict[tuple[int, int], np.ndarray | None] = {}
_MAX_NUMPY_MASKS = 1 << 20


def _flip_masks(length: int, s: int) -> np.ndarray | None:
    """All ``length``-bit masks with ``s`` bits set (uint32), None when too many to list."""
    key = (length, s)
    if key not in _MASK_CACHE:
        if math.comb(length, s) > _MAX_NUMPY_MASKS:
            _MASK_CACHE[key] = None
        elif length <= 20:
            v = np.arange(1 << length, dtype=np.uint32)
            _MASK_CACHE[key] = v[np.bitwise_count(v) == s]
        else:
            masks = [sum(1 << b for b in c) for c in combinations(range(length), s)]
            _MASK_CACHE[key] = np.array(masks, dtype=np.uint32)
    return _MASK_CACHE[key]


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])`` over i."""
    lens = hi - lo
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, np.int64)
    starts = np.cumsum(lens) - lens
    return np.repeat(lo - starts, lens) + np.arange(total)


def _cost_to_reach(t: MIHTables, cost: MIHCost, s: int, i: int, target: int) -> float:
    """Twin of ``cost_to_reach`` in the C source."""
    c, m = 0.0, t.m
    while m * s + i - 1 < target and s <= 32 and c < 1e300:
        L = int(t.length[i])
        if s <= L:
            c += math.comb(L, s) * (cost.probe_cost + t.n_codes / float(1 << L) * cost.cand_cost)
        i += 1
        if i == m:
            i, s = 0, s + 1
    return c


def _mih_query_numpy(t: MIHTables, words, ids, mask, n_total, q, k, radius, cost: MIHCost, stats):
    """numpy twin of ``mih_query`` in the C source over the indexed rows: returns
    (distances, rows) of the k best (k-NN, sorted by (distance, id)) or of all rows within
    ``radius`` (unsorted), or None when the budget runs out. Every row of a code within
    reach is read (the C code stops at the first one the heap refuses: same answer)."""
    m, knn = t.m, k is not None
    qk = [_extract_one(q, int(t.start[j]), int(t.length[j])) for j in range(m)]
    best_d = np.empty(0, np.int32)
    best_r = np.empty(0, np.int64)

    def merge(d, rows):
        nonlocal best_d, best_r
        best_d = np.concatenate([best_d, d])
        best_r = np.concatenate([best_r, rows])
        if knn:
            order = np.lexsort((ids[best_r], best_d))[:k]
            best_d, best_r = best_d[order], best_r[order]

    def threshold():
        if knn:
            return int(best_d[-1]) if best_d.shape[0] == k else PAD_DISTANCE
        return radius

    spent = float(n_total - t.n_indexed)
    if t.n_codes == 0:
        return best_d, best_r
    met = [0] * m  # codes met per table: a fully met table means every code was seen
    for s in range(int(t.length.max()) + 1):
        for i in range(m):
            complete = m * s + i - 1
            if knn:
                if best_d.shape[0] == k and best_d[-1] <= complete:
                    return best_d, best_r
            elif complete >= radius:
                return best_d, best_r
            if (not knn and s == 0 and i == 0) or (knn and s >= 2 and best_d.shape[0] == k):
                target = int(best_d[-1]) if knn else radius
                if spent + _cost_to_reach(t, cost, s, i, target) > cost.budget:
                    return None
            L = int(t.length[i])
            if s > L:
                continue
            occ = t.n_codes / float(1 << L)
            probes = math.comb(L, s)
            if probes > t.n_codes + 64 or spent + probes * (cost.probe_cost + occ * cost.cand_cost) > cost.budget:
                return None
            flips = _flip_masks(L, s)
            if flips is None:
                return None
            lo, hi = t.lookup(i, np.uint32(qk[i]) ^ flips)
            spent += flips.shape[0] * cost.probe_cost + float((hi - lo).sum()) * cost.cand_cost
            stats[0] += int((hi - lo).sum())
            stats[1] += flips.shape[0]
            at = _ranges(lo, hi)
            g = t.entries[i][at].astype(np.int64)
            cw = t.codes[i][at]
            d = _popcount_rows(cw ^ q)
            ok = d <= threshold()
            for j in range(m):  # keep a code only at its first meeting (see the C source)
                if j == i:
                    continue
                sd = np.bitwise_count(extract_keys(cw, int(t.start[j]), int(t.length[j])) ^ np.uint32(qk[j]))
                ok &= (sd > s) if j < i else (sd >= s)
            rows, which = t.groups.rows_of(g[ok])
            d = d[ok][which]
            if mask is not None:
                keep = mask[rows].astype(bool)
                rows, d = rows[keep], d[keep]
            merge(d, rows)
            met[i] += g.shape[0]
            if met[i] == t.n_codes:
                return best_d, best_r
            if spent > cost.budget:
                return None
    return best_d, best_r


def mih_knn(t: MIHTables, words, ids, allowed, n_total: int, queries, k: int, cost: MIHCost):
    """MIH k-NN -> (distances ``(Q, k)``, ids ``(Q, k)``, fallback ``(Q,)`` bool, stats).

    Rows flagged in ``fallback`` exhausted their budget; their outputs are meaningless and
    the caller must answer them another way. stats = [candidates, probes, fallbacks].
    """
    nq = queries.shape[0]
    out_d = np.full((nq, k), PAD_DISTANCE, dtype=np.int32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    fallback = np.zeros(nq, dtype=np.uint8)
    stats = np.zeros(3, dtype=np.int64)
    if nq == 0 or k == 0:
        return out_d, out_i, fallback.astype(bool), stats
    mask = _as_mask(allowed, n_total)
    lib = _get_lib()
    if lib is not None:
        st = _mih_struct(t, words, ids, mask, n_total, cost)

        def run(a, b):
            local = np.zeros(3, dtype=np.int64)
            lib.fh_mih_knn(ctypes.byref(st), _ptr(queries[a:b]), b - a, k, PAD_DISTANCE,
                           _ptr(out_d[a:b]), _ptr(out_i[a:b]), _ptr(fallback[a:b]), _ptr(local))  # fmt: skip
            return local

        for local in _map_chunks(run, nq):
            stats += local
        return out_d, out_i, fallback.astype(bool), stats
    for qi in range(nq):
        res = _mih_query_numpy(t, words, ids, mask, n_total, queries[qi], k, None, cost, stats)
        if res is None:
            fallback[qi] = 1
            continue
        d, rows = res
        if n_total > t.n_indexed:  # rows added since the build
            tail = np.arange(t.n_indexed, n_total)
            td = _popcount_rows(words[tail] ^ queries[qi])
            if mask is not None:
                tail, td = tail[mask[tail].astype(bool)], td[mask[tail].astype(bool)]
            d, rows = np.concatenate([d, td]), np.concatenate([rows, tail])
            order = np.lexsort((ids[rows], d))[:k]
            d, rows = d[order], rows[order]
        out_d[qi, : d.shape[0]] = d
        out_i[qi, : d.shape[0]] = ids[rows]
    stats[2] = int(fallback.sum())
    return out_d, out_i, fallback.astype(bool), stats


def _mih_radius_c(lib, st, queries, radius: int, fallback, a: int, b: int):
    """C radius search of queries [a, b) -> ([(per-query counts, distances, ids)], stats),
    each query's hits already in (distance, id) order."""
    parts, q, cap = [], a, max(1 << 16, 256 * (b - a))
    local = np.zeros(3, dtype=np.int64)
    while q < b:
        counts = np.zeros(b - q, np.int64)
        out_d = np.empty(cap, np.int32)
        out_id = np.empty(cap, np.int64)
        need = np.zeros(1, np.int64)
        done = lib.fh_mih_radius(ctypes.byref(st), _ptr(queries[q:b]), b - q, radius, _ptr(counts), _ptr(out_d),
                                 _ptr(out_id), cap, _ptr(need), _ptr(fallback[q:b]), _ptr(local))  # fmt: skip
        if done < 0:
            raise MemoryError("the MIH radius kernel could not allocate its scratch memory")
        used = int(counts[:done].sum())
        parts.append((counts[:done], out_d[:used], out_id[:used]))
        q += int(done)
        if q < b:  # the next query's hits did not fit: room for it, and for the rest at this rate
            cap = max(cap, 2 * int(need[0]), int(1.25 * used / max(done, 1) * (b - q)))
    return parts, local


def mih_radius(t: MIHTables, words, ids, allowed, n_total: int, queries, radius: int, cost: MIHCost):
    """MIH radius search -> (per query (distances, ids) in (distance, id) order, fallback
    ``(Q,)`` bool, stats). Fallback queries get empty results: the caller scans them."""
    nq = queries.shape[0]
    fallback = np.zeros(nq, dtype=np.uint8)
    stats = np.zeros(3, dtype=np.int64)
    if nq == 0:
        return [], fallback.astype(bool), stats
    mask = _as_mask(allowed, n_total)
    lib = _get_lib()
    if lib is not None:
        st = _mih_struct(t, words, ids, mask, n_total, cost)
        out: RadiusList = []
        for parts, local in _map_chunks(lambda a, b: _mih_radius_c(lib, st, queries, radius, fallback, a, b), nq):
            stats += local
            for counts, d, found in parts:
                bounds = np.concatenate([[0], np.cumsum(counts)])
                out += [(d[lo:hi], found[lo:hi]) for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        return out, fallback.astype(bool), stats
    qs, ds, rs = [], [], []
    for qi in range(nq):
        res = _mih_query_numpy(t, words, ids, mask, n_total, queries[qi], None, radius, cost, stats)
        if res is None:
            fallback[qi] = 1
            continue
        d, rows = res
        qs.append(np.full(d.shape[0], qi, np.int64))
        ds.append(d.astype(np.int32))
        rs.append(rows)
    stats[2] = int(fallback.sum())
    if n_total > t.n_indexed:  # rows added since the build, for the queries answered here
        done = np.flatnonzero(~fallback.astype(bool))
        qi, d, rows = scan_radius(words[t.n_indexed : n_total], None if mask is None else mask[t.n_indexed :],
                                  queries[done], radius)  # fmt: skip
        qs.append(done[qi])
        ds.append(d)
        rs.append(rows + t.n_indexed)
    triples = (np.concatenate(qs), np.concatenate(ds), np.concatenate(rs)) if qs else _empty_triples()
    return group_radius(nq, *triples, ids), fallback.astype(bool), stats


# ---------------------------------------------------------------------------------------
# second stage: cosine re-rank of shortlists by int8 descriptors


def rerank_int8(queries: np.ndarray, rows: np.ndarray, sqnorms: np.ndarray, cand_rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each query's shortlist by cosine to its descriptor, keep the k best.

    ``queries (Q, d)`` float, ``rows (N, d)`` int8 store rows with ``sqnorms (N,)`` int64
    their squared norms, ``cand_rows (Q, R)`` int64 the store row of each shortlist entry
    (-1: none). Returns (cosines ``(Q, k)`` float32, shortlist positions ``(Q, k)`` int64),
    best first, equal cosines in shortlist order, padded with (0, -1): the same answer as
    :func:`fashionhash.descriptors.rerank_rows` (its numpy twin). Rows are read in place:
    nothing of size (Q, R, d) is built.
    """
    lib = _get_lib()
    if lib is None:
        return rerank_rows(queries, rows, sqnorms, cand_rows, k)
    nq, r = cand_rows.shape
    d = rows.shape[1]
    q64 = np.ascontiguousarray(queries, dtype=np.float64)
    cand = np.ascontiguousarray(cand_rows, dtype=np.int64)
    rows, sqnorms = np.ascontiguousarray(rows, dtype=np.int8), np.ascontiguousarray(sqnorms, dtype=np.int64)
    out_s = np.zeros((nq, k), np.float32)
    out_p = np.full((nq, k), -1, np.int64)
    if nq == 0 or k == 0:
        return out_s, out_p

    def run(a, b):
        if lib.fh_rerank(_ptr(rows), d, _ptr(sqnorms), _ptr(q64[a:b]), b - a, _ptr(cand[a:b]), r, k,
                         _ptr(out_s[a:b]), _ptr(out_p[a:b])) < 0:  # fmt: skip
            raise MemoryError("the re-rank kernel could not allocate its heap")

    _map_chunks(run, nq, min_chunk=4, per_thread=1)
    return out_s, out_p
