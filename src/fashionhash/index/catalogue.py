"""``HashIndex``: a Hamming index plus item metadata in SQLite.

A catalogue directory holds::

    catalogue.sqlite        items (id, image_path, attributes JSON), an (key, value, id)
                            attribute table for filters, and the state (backend, n_bits,
                            options, current codes file)
    codes-<generation>.fhi  the backend's index file (see :mod:`.persist`)
    descriptors-<gen>.fhd   int8 descriptors by id (two-stage search), when the index has them;
                            with a sign code (``sign_mean``) a local ``mih`` index over the
                            descriptors' sign codes is rebuilt from them on open, so it
                            cannot disagree with them

Commit protocol: ``add``/``remove`` change the in-memory index and write metadata inside
an open SQLite transaction; ``save`` first writes a *new* codes file atomically, then
commits the transaction that points the state at it, then deletes older codes files. A
crash before the commit leaves the previous codes file referenced and the metadata rolled
back by SQLite, so reopening always gives the last saved state, consistent on both sides.
(With the external ``milvus`` backend the codes are committed by Milvus itself on insert;
only the metadata follows this protocol.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fashionhash import codes as C
from fashionhash.descriptors import sign_codes

from .base import INDEXES, BinaryIndex, _as_ids, check_filter_keys, open_index
from .descriptor_store import DescriptorStore
from .persist import IndexFormatError

log = logging.getLogger(__name__)

DB_NAME = "catalogue.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    image_path TEXT,
    attributes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attrs (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (key, value, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attrs_by_id ON attrs (id);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
Filters = Mapping[str, "str | int | Sequence[str | int]"]


class HashIndex:
    """A backend index combined with item metadata, filterable by catalogue attributes.

    ``HashIndex("mih", 64, "runs/catalogue")`` creates a new catalogue directory (or an
    in-memory one when ``path`` is None); :meth:`open` reopens a saved one.
    Metadata per item is a flat dict: ``image_path`` is kept apart, every other key is an
    attribute (values are compared as strings; None values are not stored).
    """

    def __init__(
        self,
        backend: str | BinaryIndex = "mih",
        n_bits: int | None = None,
        path: str | os.PathLike | None = None,
        *,
        descriptor_dim: int | None = None,
        sign_mean: np.ndarray | None = None,
        **backend_options: Any,
    ) -> None:
        if isinstance(backend, BinaryIndex):
            if n_bits is not None and n_bits != backend.n_bits:
                raise ValueError(f"n_bits={n_bits} but the backend has {backend.n_bits}")
            self._index = backend
        else:
            if n_bits is None:
                raise ValueError("n_bits is required to create a new index")
            self._index = INDEXES.build(backend, n_bits=n_bits, **backend_options)
        self._path = None if path is None else Path(path)
        self._lock = threading.RLock()
        if self._path is not None:
            if (self._path / DB_NAME).exists():
                raise FileExistsError(f"{self._path} already holds a catalogue: use HashIndex.open()")
            self._path.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        with self._db:
            self._db.execute("BEGIN")
            self._set_state(
                backend=self._index.name,
                n_bits=str(self._index.n_bits),
                options=json.dumps(self._index.options()),
                generation="0",
                codes_file="",
                descriptor_dim=str(descriptor_dim or 0),
                descriptors_file="",
                sign_mean=json.dumps(None if sign_mean is None else np.asarray(sign_mean, np.float32).tolist()),
            )
        self._known_keys: set[str] | None = None
        if sign_mean is not None and not descriptor_dim:
            raise ValueError("a sign code (sign_mean) needs stored descriptors (descriptor_dim)")
        self._desc = DescriptorStore(descriptor_dim) if descriptor_dim else None
        self._sign_mean, self._short = self._sign_index(sign_mean, self._desc)

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self._path is None else str(self._path / DB_NAME)
        # isolation_level=None: transactions are begun and committed explicitly (see save)
        db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL" if self._path is not None else "PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return db

    @classmethod
    def open(cls, path: str | os.PathLike, **backend_options: Any) -> "HashIndex":
        """Reopen a saved catalogue directory (as of its last ``save``)."""
        path = Path(path)
        if not (path / DB_NAME).exists():
            raise FileNotFoundError(f"no catalogue at {path} ({DB_NAME} missing)")
        self = cls.__new__(cls)
        self._path = path
        self._lock = threading.RLock()
        self._known_keys = None
        self._db = self._connect()
        state = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        try:
            backend, n_bits, codes_file = state["backend"], int(state["n_bits"]), state["codes_file"]
            options = {**json.loads(state["options"]), **backend_options}
        except (KeyError, ValueError) as exc:
            raise IndexFormatError(f"{path / DB_NAME}: malformed catalogue state ({exc})") from exc
        if codes_file:
            self._index = open_index(path / codes_file, **backend_options)
            if self._index.n_bits != n_bits:
                raise IndexFormatError(f"{path}: codes file has {self._index.n_bits} bits, catalogue says {n_bits}")
        else:
            self._index = INDEXES.build(backend, n_bits=n_bits, **options)
        n_meta = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        if not self._index.external and len(self._index) != n_meta:
            raise IndexFormatError(f"{path}: {len(self._index)} codes but {n_meta} metadata rows")
        self._desc = self._open_descriptors(path, state, n_meta)
        sign_mean = json.loads(state.get("sign_mean") or "null")
        self._sign_mean, self._short = self._sign_index(sign_mean, self._desc)
        self._cleanup(keep=codes_file, keep_descriptors=state.get("descriptors_file", ""))
        return self

    @staticmethod
    def _sign_index(sign_mean, store: DescriptorStore | None) -> tuple[np.ndarray | None, BinaryIndex | None]:
        """(sign mean, local ``mih`` over the stored descriptors' sign codes), or (None, None)."""
        if sign_mean is None or store is None:
            return None, None
        mean = np.asarray(sign_mean, np.float32)
        short = INDEXES.build("mih", n_bits=int(mean.size))
        for a in range(0, len(store), 65536):  # bounded float memory on a large catalogue
            ids, rows = store.ids[a:a + 65536], store.rows[a:a + 65536]
            short.add(ids, sign_codes(rows, mean))
        return mean, short

    @staticmethod
    def _open_descriptors(path: Path, state: dict, n_items: int) -> DescriptorStore | None:
        dim, name = int(state.get("descriptor_dim") or 0), state.get("descriptors_file", "")
        if not dim:
            return None
        store = DescriptorStore.load(path / name) if name else DescriptorStore(dim)
        if store.dim != dim or len(store) != n_items:
            raise IndexFormatError(f"{path}: {len(store)} descriptors of {store.dim} values for "
                                   f"{n_items} items of {dim}")
        return store

    # -- properties ------------------------------------------------------------------

    @property
    def index(self) -> BinaryIndex:
        """The backend index."""
        return self._index

    @property
    def n_bits(self) -> int:
        return self._index.n_bits

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def descriptor_dim(self) -> int | None:
        """Width of the stored int8 descriptors (two-stage search), None without them."""
        return None if self._desc is None else self._desc.dim

    @property
    def sign_bits(self) -> int:
        """Width of the descriptors' sign code that shortlists two-stage search (0: the
        shortlist comes from the hash codes)."""
        return 0 if self._sign_mean is None else int(self._sign_mean.size)

    def sign_code(self, descriptors) -> np.ndarray:
        """Float query descriptors ``(Q, d)`` -> their packed sign codes ``(Q, B/8)``."""
        if self._sign_mean is None:
            raise ValueError("this index has no sign code")
        return sign_codes(np.asarray(descriptors, np.float32), self._sign_mean)

    @property
    def sign_index(self) -> BinaryIndex | None:
        """The local index over the descriptors' sign codes (None without a sign code)."""
        return self._short

    def get_descriptors(self, ids) -> np.ndarray:
        """Stored int8 descriptors ``(len(ids), d)`` of ``ids`` (KeyError for an unknown id)."""
        if self._desc is None:
            raise ValueError("this index stores no descriptors")
        with self._lock:
            return self._desc.get(ids)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"HashIndex({self._index!r}, path={str(self._path) if self._path else None!r})"

    # -- state helpers ---------------------------------------------------------------

    def _set_state(self, **values: str) -> None:
        self._db.executemany(
            "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )

    def _state(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return "" if row is None else row[0]

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")

    def known_keys(self) -> set[str]:
        """Attribute names that can be used in filters."""
        with self._lock:
            if self._known_keys is None:
                self._known_keys = {r[0] for r in self._db.execute("SELECT DISTINCT key FROM attrs")}
            return set(self._known_keys)

    # -- mutation --------------------------------------------------------------------

    @staticmethod
    def _split_metadata(meta: Mapping[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
        if meta is None:
            return None, {}
        if not isinstance(meta, Mapping):
            raise TypeError(f"metadata entries must be dicts, got {type(meta).__name__}")
        attrs = {str(k): v for k, v in meta.items() if k != "image_path"}
        path = meta.get("image_path")
        return (None if path is None else str(path)), attrs

    def add(self, ids, codes, metadata: Sequence[Mapping[str, Any] | None] | None = None,
            descriptors=None) -> None:
        """Add items with optional metadata (one dict per item) and, for an index with
        descriptors, their int8 descriptors ``(n, d)`` (required there). Not durable until save()."""
        ids = _as_ids(ids)
        if metadata is not None and len(metadata) != ids.shape[0]:
            raise ValueError(f"got {len(metadata)} metadata entries for {ids.shape[0]} ids")
        if (self._desc is None) != (descriptors is None):
            raise ValueError("this index stores descriptors: pass them with the codes" if self._desc is not None
                             else "this index stores no descriptors")
        if self._desc is not None:
            descriptors = self._desc.check_rows(descriptors, ids.shape[0])
        signs = None if self._short is None else sign_codes(descriptors, self._sign_mean)
        rows, attr_rows = [], []
        for j, item_id in enumerate(ids.tolist()):
            image_path, attrs = self._split_metadata(None if metadata is None else metadata[j])
            try:
                blob = json.dumps(attrs, sort_keys=True)
            except TypeError as exc:
                raise TypeError(f"metadata of id {item_id} is not JSON-serialisable: {exc}") from exc
            rows.append((item_id, image_path, blob))
            attr_rows.extend((k, str(v), item_id) for k, v in attrs.items() if v is not None)
        with self._lock:
            self._begin()
            self._db.execute("SAVEPOINT add_items")
            try:
                self._index.add(ids, codes)  # validates codes and ids before changing anything
            except BaseException:
                self._db.execute("ROLLBACK TO add_items")
                self._db.execute("RELEASE add_items")
                raise
            try:
                self._db.executemany("INSERT INTO items (id, image_path, attributes) VALUES (?, ?, ?)", rows)
                self._db.executemany("INSERT INTO attrs (key, value, id) VALUES (?, ?, ?)", attr_rows)
                if self._desc is not None:
                    self._desc.add(ids, descriptors)
                if self._short is not None:  # last: ids already checked new and distinct
                    self._short.add(ids, signs)
            except BaseException:
                self._db.execute("ROLLBACK TO add_items")
                self._db.execute("RELEASE add_items")
                self._index.remove(ids)
                raise
            self._db.execute("RELEASE add_items")
            if self._known_keys is not None:
                self._known_keys.update(k for k, _, _ in attr_rows)

    def remove(self, ids) -> int:
        """Remove items (unknown ids ignored); returns how many codes were removed."""
        ids = np.unique(_as_ids(ids))
        with self._lock:
            self._begin()
            removed = self._index.remove(ids)
            if self._desc is not None:
                self._desc.remove(ids)
            if self._short is not None:
                self._short.remove(ids)
            params = [(int(i),) for i in ids]
            self._db.executemany("DELETE FROM items WHERE id = ?", params)
            self._db.executemany("DELETE FROM attrs WHERE id = ?", params)
            self._known_keys = None
            return removed

    def save(self) -> None:
        """Make everything added/removed so far durable (see the module docstring)."""
        if self._path is None:
            raise ValueError("this HashIndex is in memory (path=None); nothing to save to")
        with self._lock:
            generation = int(self._state("generation") or 0) + 1
            codes_file = f"codes-{generation:08d}.fhi"
            self._index.save(self._path / codes_file)
            desc_file = ""
            if self._desc is not None:
                desc_file = f"descriptors-{generation:08d}.fhd"
                self._desc.save(self._path / desc_file)
            self._begin()
            self._set_state(
                generation=str(generation), codes_file=codes_file, options=json.dumps(self._index.options()),
                descriptors_file=desc_file,
            )
            self._db.execute("COMMIT")
            self._cleanup(keep=codes_file, keep_descriptors=desc_file)
            log.info("saved %d items to %s (%s)", len(self._index), self._path, codes_file)

    def _cleanup(self, keep: str, keep_descriptors: str = "") -> None:
        """Delete codes and descriptor files other than the committed ones (left by older
        saves or crashes)."""
        if self._path is None:
            return
        for pattern, kept in (("codes-*.fhi", keep), ("descriptors-*.fhd", keep_descriptors)):
            for f in self._path.glob(pattern):
                if f.name != kept:
                    with contextlib.suppress(OSError):
                        f.unlink()
        for f in [*self._path.glob(".codes-*.tmp"), *self._path.glob(".descriptors-*.tmp")]:
            with contextlib.suppress(OSError):
                f.unlink()

    def rollback(self) -> None:
        """Drop unsaved changes by reloading the last saved state (in-memory: not supported)."""
        if self._path is None:
            raise ValueError("an in-memory HashIndex has no saved state to roll back to")
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            fresh = HashIndex.open(self._path)
            self._db.close()
            self.__dict__.update(fresh.__dict__)

    def close(self) -> None:
        """Close the database; unsaved changes are discarded."""
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()
            close = getattr(self._index, "close", None)
            if callable(close):
                close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lookup ----------------------------------------------------------------------

    def get(self, item_id: int) -> dict[str, Any]:
        """Metadata of one item: ``{"id", "image_path", **attributes}``; KeyError if absent."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, image_path, attributes FROM items WHERE id = ?", (int(item_id),)
            ).fetchone()
        if row is None:
            raise KeyError(f"id {item_id} is not in the catalogue")
        return {"id": row[0], "image_path": row[1], **json.loads(row[2])}

    def get_many(self, ids: Iterable[int]) -> list[dict[str, Any] | None]:
        """Metadata for each id (None where absent), in the order given."""
        ids = [int(i) for i in ids]
        found: dict[int, dict[str, Any]] = {}
        sql = "SELECT id, image_path, attributes FROM items WHERE id IN ({})"
        with self._lock:
            for a in range(0, len(ids), 500):
                chunk = ids[a : a + 500]
                for r in self._db.execute(sql.format(",".join("?" * len(chunk))), chunk):
                    found[r[0]] = {"id": r[0], "image_path": r[1], **json.loads(r[2])}
        return [found.get(i) for i in ids]

    def filter_ids(self, filters: Filters) -> np.ndarray:
        """Ids whose attributes match every ``key: value`` (a list value means any of)."""
        if not isinstance(filters, Mapping):
            raise TypeError(f"filters must be a dict of attribute -> value(s), got {type(filters).__name__}")
        check_filter_keys(filters.keys(), self.known_keys())
        clauses, params = [], []
        for key, value in filters.items():
            values = [value] if isinstance(value, (str, int, np.integer)) else list(value)
            if not values:
                return np.empty(0, np.int64)
            marks = ",".join("?" * len(values))
            clauses.append(f"SELECT id FROM attrs WHERE key = ? AND value IN ({marks})")
            params.extend([key, *[str(v) for v in values]])
        if not clauses:
            with self._lock:
                return np.asarray([r[0] for r in self._db.execute("SELECT id FROM items ORDER BY id")], np.int64)
        sql = " INTERSECT ".join(clauses) + " ORDER BY id"
        with self._lock:
            return np.asarray([r[0] for r in self._db.execute(sql, params)], dtype=np.int64)

    # -- search ----------------------------------------------------------------------

    def search(self, codes, k: int, filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest (among items matching ``filters``): codes ``(Q, B)`` ->
        (distances ``(Q, k)`` int32, ids ``(Q, k)`` int64), padded with id -1."""
        with self._lock:
            allowed = None if not filters else self.filter_ids(filters)
            return self._index.search(codes, k, filter_ids=allowed)

    def search_two_stage(self, codes, descriptors, k: int, shortlist: int,
                         filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two-stage k nearest: the ``shortlist`` nearest codes (among items matching
        ``filters``), re-ranked by the cosine between each query's float descriptor
        ``(Q, d)`` and the stored int8 descriptors. Returns (cosines ``(Q, k)`` float32,
        Hamming distances ``(Q, k)`` int32, ids ``(Q, k)`` int64), padded with id -1."""
        if self._desc is None:
            raise ValueError("this index stores no descriptors: build it from a run with a descriptor")
        descriptors = np.asarray(descriptors, np.float32)
        if descriptors.ndim != 2 or descriptors.shape[1] != self._desc.dim:
            raise ValueError(f"query descriptors must be (Q, {self._desc.dim}), got {descriptors.shape}")
        k, shortlist = BinaryIndex.check_k(k), BinaryIndex.check_k(shortlist)
        with self._lock:
            codes = self._index.check_codes(codes)
            dist, cand = self._shortlist(codes, descriptors, max(k, shortlist), filters)
            scores, pos = self._desc.rerank(descriptors, cand, k)
            found = pos >= 0
            at = np.where(found, pos, 0)
            out_i = np.where(found, np.take_along_axis(cand, at, 1), -1)
            if dist is None:  # a sign-code shortlist: the hash code's distances of the k kept only
                out_d = self._hash_distances(codes, out_i)
            else:
                out_d = np.where(found, np.take_along_axis(dist, at, 1), 0).astype(np.int32)
        return scores, out_d, out_i

    def rerank(self, descriptors, candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The second stage alone: order shortlists ``candidates (Q, R)`` of ids (-1: padding)
        by the cosine between each query's float descriptor ``(Q, d)`` and the stored int8
        descriptors. Returns (cosines ``(Q, k)`` float32, positions in the shortlist ``(Q, k)``
        int64), best first, equal cosines in shortlist order, padded with (0, -1)."""
        if self._desc is None:
            raise ValueError("this index stores no descriptors")
        with self._lock:  # add/remove replace the store's arrays
            return self._desc.rerank(descriptors, candidates, BinaryIndex.check_k(k))

    def _shortlist(self, codes: np.ndarray, descriptors: np.ndarray, r: int,
                   filters: Filters | None) -> tuple[np.ndarray | None, np.ndarray]:
        """The first stage: ids ``(Q, r)`` of the ``r`` nearest by the hash code, with their
        Hamming distances ``(Q, r)``, or by the descriptors' sign code when the index has
        one, with None (those distances are not the hash code's)."""
        if len(codes) != len(descriptors):
            raise ValueError(f"{len(codes)} codes but {len(descriptors)} descriptors")
        if self._short is None:
            return self.search(codes, r, filters)
        allowed = None if not filters else self.filter_ids(filters)
        return None, self._short.search(self.sign_code(descriptors), r, filter_ids=allowed)[1]

    def _hash_distances(self, codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Hamming distances ``(Q, k)`` int32 between each query's hash code and its result
        ids ``(Q, k)`` (0 where the id is -1)."""
        dist = np.zeros(ids.shape, np.int32)
        for q, row in enumerate(ids):
            ok = row >= 0
            if ok.any():
                dist[q, ok] = C.hamming_one(codes[q], self._index.get_codes(row[ok]))
        return dist

    def radius_search(self, codes, radius: int, filters: Filters | None = None):
        """Items within ``radius`` (matching ``filters``) -> per query (distances, ids)."""
        with self._lock:
            allowed = None if not filters else self.filter_ids(filters)
            return self._index.radius_search(codes, radius, filter_ids=allowed)

    def query(self, codes, k: int, filters: Filters | None = None) -> list[list[dict[str, Any]]]:
        """Like :meth:`search` but returns, per query, dicts of metadata plus ``distance``."""
        dist, ids = self.search(codes, k, filters)
        metas = self.get_many(ids[ids >= 0].tolist())
        it = iter(metas)
        out = []
        for drow, irow in zip(dist, ids):
            hits = []
            for d, i in zip(drow, irow):
                if i < 0:
                    continue
                meta = next(it) or {"id": int(i), "image_path": None}
                hits.append({**meta, "distance": int(d)})
            out.append(hits)
        return out
