"""Fixed, seeded, saved splits shared by every method.

Protocol (as in the deep-hashing literature): classes with fewer than ``min_per_class``
items are left out; ``n_query`` items are drawn at random as test queries and ``n_val`` as
validation queries (checkpoint selection only); every other item forms the retrieval
database, and the training set *is* the database (the database includes the training
images). Queries and validation items are never trained on nor in the database.
For a catalogue with an official ``split`` attribute (Fashion-MNIST), queries and
validation are drawn from its test part only and the database is its train part.

Sizes left unset (None) scale with the catalogue, so that a few hundred photos of one's own
give a split without tuning: ``min_per_class`` = 50 (the protocol's), or 1% of the items
when that is less (at least 2); ``n_query`` = ``n_val`` = 1000, or a tenth of the eligible
items each when that is less. On the Kaggle catalogue and Fashion-MNIST these are the
protocol's 50 / 1000 / 1000. Sizes someone set are kept, and an error names the setting to
lower when they do not fit.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashionhash.data.catalogue import Catalogue
from fashionhash.files import atomic_write

log = logging.getLogger(__name__)
#: the protocol's sizes, and the cap of the sizes scaled with a small catalogue
MIN_PER_CLASS, N_QUERY, N_VAL = 50, 1000, 1000


@dataclass
class Split:
    """Item ids of each part; ``train`` equals ``database``."""

    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    database: np.ndarray
    protocol: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        data = {k: np.asarray(getattr(self, k)).tolist() for k in ("train", "val", "query", "database")}
        data["protocol"] = self.protocol
        atomic_write(path, [json.dumps(data).encode()])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        data = json.loads(Path(path).read_text())
        return cls(**{k: np.asarray(data[k], dtype=np.int64) for k in ("train", "val", "query", "database")},
                   protocol=data.get("protocol", {}))

    def sizes(self) -> dict[str, int]:
        return {k: int(len(getattr(self, k))) for k in ("train", "val", "query", "database")}


def _auto_min_per_class(n_items: int) -> int:
    return max(2, min(MIN_PER_CLASS, n_items // 100))


def _kept_classes(cat: Catalogue, min_per_class: int | None) -> tuple[list[str], int]:
    """Classes with enough items, and the threshold used; logs what is left out."""
    threshold = _auto_min_per_class(len(cat)) if min_per_class is None else min_per_class
    counts = Counter(cat.labels.tolist())
    kept = sorted(c for c, n in counts.items() if n >= threshold)
    if not kept:
        raise ValueError(f"no class of {cat.label_key!r} has {threshold} items (data.min_per_class), "
                         f"the largest has {max(counts.values(), default=0)}: lower data.min_per_class")
    dropped = [n for c, n in counts.items() if n < threshold]
    if dropped:
        log.warning("%d of %d classes have fewer than %d items (data.min_per_class) and are left out "
                    "of training and evaluation (%d items; they are still indexed)",
                    len(dropped), len(counts), threshold, sum(dropped))
    return kept, threshold


def _part_sizes(n_pool: int, n_query: int | None, n_val: int | None, has_database: bool) -> tuple[int, int]:
    """Query and val sizes: the ones set, or scaled to the pool; an error naming the
    settings when they leave no database."""
    q = min(N_QUERY, n_pool // 10) if n_query is None else n_query
    v = min(N_VAL, n_pool // 10) if n_val is None else n_val
    room = n_pool - (0 if has_database else 2)  # a database of at least 2 items
    if q < 1 or v < 1 or q + v > room:
        fit = max(room // 2, 0)
        raise ValueError(
            f"{n_pool} eligible items cannot give {q} queries (data.n_query) + {v} validation items "
            f"(data.n_val)" + ("" if has_database else " and a database") +
            (f": lower them, e.g. data.n_query={min(q, fit)} data.n_val={min(v, fit)}, or leave them "
             "unset to scale with the catalogue" if fit >= 1 else ": the catalogue is too small "
             "(it needs at least 10 items in classes of data.min_per_class)"))
    return q, v


def make_split(cat: Catalogue, *, seed: int = 0, n_query: int | None = None, n_val: int | None = None,
               min_per_class: int | None = None) -> Split:
    """Draw the split (see module docstring). Deterministic given ``seed`` and the catalogue."""
    kept_classes, min_per_class = _kept_classes(cat, min_per_class)
    keep = np.isin(cat.labels, kept_classes)
    rng = np.random.default_rng(seed)
    if "split" in cat.attrs:
        pool = np.flatnonzero(keep & (cat.attrs["split"] == "test"))
        db = np.flatnonzero(keep & (cat.attrs["split"] == "train"))
    else:
        pool = np.flatnonzero(keep)
        db = None
    n_query, n_val = _part_sizes(len(pool), n_query, n_val, db is not None)
    pool = pool[rng.permutation(len(pool))]
    query, val = pool[:n_query], pool[n_query:n_query + n_val]
    if db is None:
        db = pool[n_query + n_val:]
    db = np.sort(db)
    ids = cat.ids
    protocol = {
        "seed": seed, "min_per_class": min_per_class, "n_classes": len(kept_classes),
        "n_query": int(n_query), "n_val": int(n_val),
        "label_key": cat.label_key, "catalogue": cat.name,
        "classes": kept_classes, "database_is_train": True,
    }
    return Split(train=ids[db], val=np.sort(ids[val]), query=np.sort(ids[query]),
                 database=ids[db], protocol=protocol)
