"""On-disk cache of backbone features, keyed by data + backbone + preprocessing.

Frozen-mode training computes a catalogue's features once; every later run (and every
method of the results table) reads them back in a second. Entries are written atomically,
so a killed extraction never leaves a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from fashionhash.data.catalogue import cache_dir

log = logging.getLogger(__name__)


def cache_key(parts: dict) -> str:
    """A short stable hash of a JSON-serialisable description."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def array_digest(a: np.ndarray) -> str:
    """A short hash of an array's bytes (e.g. the positions a cache entry covers)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def cache_has(parts: dict, root: Path | None = None) -> bool:
    """Whether an entry for ``parts`` exists (it may still turn out unreadable)."""
    root = Path(root) if root is not None else cache_dir() / "features"
    return (root / f"{cache_key(parts)}.npz").is_file()


def cached_array(parts: dict, compute: Callable[[], tuple[np.ndarray, np.ndarray]],
                 root: Path | None = None, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features (N, F) dtype, ok (N,) bool)`` for ``parts``, computing them once
    (``dtype``: float32, or float16 for the large activation maps of partial mode)."""
    root = Path(root) if root is not None else cache_dir() / "features"
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(parts)
    path = root / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["features"], z["ok"]
        except (OSError, ValueError, KeyError) as e:  # damaged entry: recompute
            log.warning("feature cache entry %s unreadable (%s); recomputing", path, e)
    feats, ok = compute()
    tmp = root / f"{key}.{os.getpid()}.tmp.npz"
    feats = np.asarray(feats, dtype=dtype)
    np.savez(tmp, features=feats, ok=np.asarray(ok, dtype=bool))
    os.replace(tmp, path)
    (root / f"{key}.json").write_text(json.dumps(parts, sort_keys=True, default=str, indent=1))
    return feats, ok
