"""Fixed, seeded, saved splits shared by every method.

Protocol (as in the deep-hashing literature): classes with fewer than ``min_per_class``
items are left out; ``n_query`` items are drawn at random as test queries and ``n_val`` as
validation queries (checkpoint selection only); every other item forms the retrieval
database, and the training set *is* the database (the database includes the training
images). Queries and validation items are never trained on nor in the database.
For a catalogue with an official ``split`` attribute (Fashion-MNIST), queries and
validation are drawn from its test part only and the database is its train part.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashionhash.data.catalogue import Catalogue


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
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        data = json.loads(Path(path).read_text())
        return cls(**{k: np.asarray(data[k], dtype=np.int64) for k in ("train", "val", "query", "database")},
                   protocol=data.get("protocol", {}))

    def sizes(self) -> dict[str, int]:
        return {k: int(len(getattr(self, k))) for k in ("train", "val", "query", "database")}


def make_split(cat: Catalogue, *, seed: int = 0, n_query: int = 1000, n_val: int = 1000,
               min_per_class: int = 50) -> Split:
    """Draw the split (see module docstring). Deterministic given ``seed`` and the catalogue."""
    counts = Counter(cat.labels.tolist())
    kept_classes = sorted(c for c, n in counts.items() if n >= min_per_class)
    keep = np.isin(cat.labels, kept_classes)
    rng = np.random.default_rng(seed)
    if "split" in cat.attrs:
        pool = np.flatnonzero(keep & (cat.attrs["split"] == "test"))
        db = np.flatnonzero(keep & (cat.attrs["split"] == "train"))
    else:
        pool = np.flatnonzero(keep)
        db = None
    if n_query + n_val > len(pool) - (0 if db is not None else 2):
        raise ValueError(f"{len(pool)} eligible items cannot give {n_query} queries + {n_val} val")
    pool = pool[rng.permutation(len(pool))]
    query, val = pool[:n_query], pool[n_query:n_query + n_val]
    if db is None:
        db = pool[n_query + n_val:]
    db = np.sort(db)
    ids = cat.ids
    protocol = {
        "seed": seed, "min_per_class": min_per_class, "n_classes": len(kept_classes),
        "label_key": cat.label_key, "catalogue": cat.name,
        "classes": kept_classes, "database_is_train": True,
    }
    return Split(train=ids[db], val=np.sort(ids[val]), query=np.sort(ids[query]),
                 database=ids[db], protocol=protocol)
