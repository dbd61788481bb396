"""Float descriptors for the second stage of search: a PCA-whitening fitted on the
catalogue, int8 storage, and re-ranking a Hamming shortlist by cosine similarity.

The binary code finds a shortlist fast; a compact descriptor that keeps more of what the
backbone saw (local detail, colour) orders it. numpy in, numpy out, like :mod:`codes`:

* raw descriptors ``(N, D)`` float32 come from the backbone (:mod:`models.descriptor`);
* :class:`Whitening` maps them to ``(N, d)`` unit vectors (PCA-whitened, then L2);
* :func:`quantize` stores a unit vector as ``d`` int8 values scaled so the largest
  component is +-127 (cosine ranking needs only the direction, so the scale is not kept);
* :func:`rerank` orders candidates by cosine between a float query and int8 rows,
  :func:`rerank_rows` does it for many shortlists at once (the index's C kernel is its
  twin), and :func:`rerank_reference` is the slow, obvious version the tests compare them with;
* :func:`sign_codes` turns descriptors into a short binary code (the signs of their leading,
  PCA-ordered components) whose Hamming shortlist keeps the very product, where the
  type-level hash code does not.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionhash import codes as C

__all__ = ["Whitening", "l2_normalise", "quantize", "dequantize", "squared_norms", "rerank",
           "rerank_rows", "rerank_positions", "rerank_reference", "sign_codes"]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): ``(N, D) -> (N, D)`` float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass
class Whitening:
    """PCA-whitening ``(N, D) -> (N, dim)`` unit rows: centre, project on the top ``dim``
    principal axes, divide each by its standard deviation, L2-normalise.

    Whitening evens out the few directions that every catalogue photo shares (white
    background, the type's silhouette) so that the rest (pattern, colour, detail) weighs
    in the cosine. ``shrink`` adds a fraction of the largest variance to every variance
    before dividing: the smallest components are mostly noise and would otherwise be
    amplified most.
    """

    mean: np.ndarray  # (D,) float32
    proj: np.ndarray  # (D, dim) float32, columns already divided by the std of each axis
    #: (B,) float32 catalogue means of the first B output components: B > 0 means the
    #: shortlist of two-stage search comes from :func:`sign_codes` (B bits) instead of the
    #: hash code
    sign_mean: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    @property
    def sign_bits(self) -> int:
        """Width of the descriptor's sign code (0: the shortlist comes from the hash code)."""
        return 0 if self.sign_mean is None else int(self.sign_mean.size)

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, shrink: float = 0.0) -> "Whitening":
        """Fit on catalogue descriptors ``x (N, D)``; ``dim <= min(N, D)``."""
        x = np.asarray(x, dtype=np.float64)
        n, d_in = x.shape
        if not 0 < dim <= min(n, d_in):
            raise ValueError(f"whitening to {dim} dimensions needs at least {dim} descriptors of "
                             f">= {dim} values, got {n} x {d_in}")
        mean = x.mean(axis=0)
        # eigen-decomposition of the D x D covariance: cheaper than an SVD of N x D for N >> D
        cov = np.cov(x - mean, rowvar=False, bias=True)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1][:dim]
        vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
        std = np.sqrt(vals + shrink * vals[0] + 1e-12)
        return cls(mean.astype(np.float32), (vecs / std).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw descriptors ``(N, D)`` -> whitened unit rows ``(N, dim)`` float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"descriptors of width {self.mean.shape[0]} expected, got shape {x.shape}")
        return l2_normalise((x - self.mean) @ self.proj)

    def quantized(self, x: np.ndarray) -> np.ndarray:
        """Raw descriptors ``(N, D)`` -> stored int8 rows ``(N, dim)``."""
        return quantize(self(x))

    def pca_ordered(self, x: np.ndarray) -> "Whitening":
        """The same map rotated so that its outputs on catalogue descriptors ``x (N, D)``
        are uncorrelated with decreasing variance. Cosines are unchanged (an orthogonal
        rotation of unit rows), but the leading components now carry the most, which
        :func:`sign_codes` needs (a learned projection orders its outputs arbitrarily)."""
        out = self(x).astype(np.float64)
        vals, vecs = np.linalg.eigh(np.cov(out - out.mean(axis=0), rowvar=False, bias=True))
        rot = vecs[:, np.argsort(vals)[::-1]]
        return Whitening(self.mean, (self.proj @ rot).astype(np.float32))

    def with_sign_code(self, x: np.ndarray, bits: int) -> "Whitening":
        """This map with a ``bits``-wide sign code (0: none) centred on catalogue
        descriptors ``x (N, D)``; call on a :meth:`pca_ordered` map."""
        if not 0 <= bits <= self.dim or bits % 8:
            raise ValueError(f"sign code bits must be a multiple of 8 in [0, {self.dim}], got {bits}")
        mean = self(x)[:, :bits].mean(axis=0).astype(np.float32) if bits else None
        return Whitening(self.mean, self.proj, mean)

    def digest(self) -> str:
        """Short hash of the parameters: an index records it to detect a refitted run."""
        h = hashlib.sha256(self.mean.tobytes())
        h.update(self.proj.tobytes())
        if self.sign_mean is not None:  # an index built with another sign code is stale too
            h.update(self.sign_mean.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        extra = {} if self.sign_mean is None else {"sign_mean": self.sign_mean}
        np.savez(tmp, mean=self.mean, proj=self.proj, **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Whitening":
        with np.load(path) as z:
            sign = z["sign_mean"].astype(np.float32) if "sign_mean" in z.files else None
            return cls(z["mean"].astype(np.float32), z["proj"].astype(np.float32), sign)


def sign_codes(unit: np.ndarray, sign_mean: np.ndarray) -> np.ndarray:
    """Packed sign code ``(N, B/8)`` uint8 of descriptors ``(N, d)`` (float unit rows or
    stored int8 rows: the sign of a centred component does not depend on the row's scale
    once the row is made unit): bit j is set where component j >= ``sign_mean[j]``."""
    unit = np.asarray(unit)
    if unit.dtype == np.int8:
        unit = dequantize(unit)
    b = int(np.asarray(sign_mean).size)
    if unit.ndim != 2 or unit.shape[1] < b:
        raise ValueError(f"descriptors (N, >= {b}) expected, got shape {unit.shape}")
    return C.pack(np.asarray(unit[:, :b], np.float32) - sign_mean)


def quantize(x: np.ndarray) -> np.ndarray:
    """Descriptors ``(N, d)`` float -> int8 ``(N, d)``, each row scaled so that its largest
    absolute value is 127 (a per-row scale keeps the precision of every row)."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=-1, keepdims=True)
    return np.rint(x * (127.0 / np.maximum(peak, 1e-12))).astype(np.int8)


def dequantize(q: np.ndarray) -> np.ndarray:
    """int8 rows -> unit float32 rows (the direction they store)."""
    return l2_normalise(np.asarray(q, dtype=np.float32))


def squared_norms(rows: np.ndarray) -> np.ndarray:
    """Exact squared norms of int8 rows ``(N, d)`` -> ``(N,)`` int64 (in blocks: no (N, d)
    int64 copy of a large store)."""
    rows = np.asarray(rows)
    out = np.empty(rows.shape[0], np.int64)
    step = 8192
    for a in range(0, rows.shape[0], step):
        r = rows[a:a + step].astype(np.int64)
        out[a:a + step] = np.einsum("ij,ij->i", r, r)
    return out


def rerank_rows(queries: np.ndarray, rows: np.ndarray, sqnorms: np.ndarray, cand_rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank many shortlists at once (numpy; the index runs a C twin with the same answers).

    ``queries (Q, d)`` float, ``rows (N, d)`` int8 with ``sqnorms (N,)`` their
    :func:`squared_norms`, ``cand_rows (Q, R)`` int64 the row of each shortlist entry in
    ``rows`` (-1: none). Returns (cosines ``(Q, k)`` float32, shortlist positions ``(Q, k)``
    int64), best first, equal cosines in shortlist order, padded with (0, -1). Cosines are
    computed in float64 as in :func:`rerank_reference`, so float32 rounding never merges two
    candidates into a tie the reference would break.
    """
    queries = np.asarray(queries, np.float64)
    cand_rows = np.asarray(cand_rows, np.int64)
    nq, r = cand_rows.shape
    scores = np.zeros((nq, k), np.float32)
    pos = np.full((nq, k), -1, np.int64)
    q_norm = np.linalg.norm(queries, axis=1)
    step = max(1, (1 << 22) // max(1, r * rows.shape[1]))  # bounds the (step, R, d) float64 gather
    for a in range(0, nq, step):
        b = min(nq, a + step)
        valid = cand_rows[a:b] >= 0
        safe = np.where(valid, cand_rows[a:b], 0)
        dots = np.einsum("qrd,qd->qr", rows[safe].astype(np.float64), queries[a:b])
        cos = dots / (q_norm[a:b, None] * np.sqrt(sqnorms[safe].astype(np.float64)) + 1e-300)
        cos[~valid] = -np.inf  # sorts after every real candidate
        order = np.argsort(-cos, axis=1, kind="stable")[:, :k]  # stable: ties keep the shortlist order
        ok = np.take_along_axis(valid, order, 1)
        scores[a:b, :order.shape[1]] = np.where(ok, np.take_along_axis(cos, order, 1), 0.0)
        pos[a:b, :order.shape[1]] = np.where(ok, order, -1)
    return scores, pos


def rerank_positions(query: np.ndarray, candidates: np.ndarray, rows: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rerank` as positions in the shortlist: ``(scores (k',), positions (k',))``, so
    callers can carry along what else they know of each candidate (its Hamming distance)."""
    rows = np.asarray(rows)
    cand_rows = np.where(np.asarray(candidates) >= 0, np.arange(len(rows)), -1)[None]
    scores, pos = rerank_rows(np.asarray(query)[None], rows, squared_norms(rows), cand_rows, k)
    n = int((pos[0] >= 0).sum())
    return scores[0, :n], pos[0, :n]


def rerank(query: np.ndarray, candidates: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order one query's shortlist by descriptor cosine.

    ``query (d,)`` float, ``candidates (R,)`` int64 ids (-1 = padding, dropped), ``rows
    (R, d)`` int8 descriptors of those candidates (any value where the id is -1).
    Returns ``(scores (k',) float32, ids (k',) int64)`` with ``k' = min(k, valid)``,
    best first; equal scores keep the shortlist's (Hamming) order.
    """
    scores, pos = rerank_positions(query, candidates, rows, k)
    return scores, np.asarray(candidates)[pos].astype(np.int64)


def rerank_reference(query: np.ndarray, candidates: np.ndarray, rows: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow, obvious :func:`rerank`: a Python loop over candidates, then a sort by
    (-cosine, shortlist position)."""
    q = np.asarray(query, dtype=np.float64)
    scored = []
    for pos, (cid, row) in enumerate(zip(np.asarray(candidates).tolist(), rows)):
        if cid < 0:
            continue
        r = row.astype(np.float64)
        cos = float(q @ r / (np.linalg.norm(q) * np.linalg.norm(r) + 1e-300))
        scored.append((-cos, pos, cid))
    scored.sort()
    top = scored[:k]
    return (np.array([-s for s, _, _ in top], np.float32), np.array([c for _, _, c in top], np.int64))
