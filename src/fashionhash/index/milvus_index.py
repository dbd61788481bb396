"""``milvus``: Milvus through pymilvus (optional extra ``fashionhash[milvus]``).

One collection with an INT64 primary key ``id`` and a ``BINARY_VECTOR`` field ``code``
searched with the HAMMING metric. The same code works with

* Milvus Lite — ``uri`` is a local ``.db`` path; only ``BIN_FLAT`` is supported there
  (``milvus-lite==2.5.1``; 3.x refuses binary vectors);
* a Milvus server — ``uri="http://host:19530"``; ``BIN_IVF_FLAT`` by default, searched
  with ``nprobe = nlist`` so that it stays exact (lower ``nprobe`` for speed).

The data lives in Milvus: inserts and deletes are durable as soon as Milvus acknowledges
them, and ``save(path)`` writes only a small checksummed manifest (URI, collection, options;
never the token) that :func:`~fashionhash.index.open_index` reconnects from; the token is
passed again as ``token=`` or read from ``$FASHIONHASH_MILVUS_TOKEN``. Reopening a manifest
whose collection is gone (a new or wiped server) is an error, not a new empty index. A bulk add
interrupted midway leaves the batches already inserted (Milvus has no multi-batch
transactions); the in-process backends do not have this caveat.

Milvus stores duplicate primary keys without complaint, so ``add`` checks ids first, and
it breaks distance ties arbitrarily, so searches over-fetch and re-sort to the common
(distance, id) order, falling back to an exact scan of the fetched codes when a tie
straddles Milvus' result limit.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from . import _kernel
from ._kernel import PAD_DISTANCE, to_words
from .base import INDEXES, BinaryIndex, RadiusResult, _as_ids
from .persist import write_container

log = logging.getLogger(__name__)

TOKEN_ENV = "FASHIONHASH_MILVUS_TOKEN"
MAX_LIMIT = 16384  # Milvus' cap on top-k and on range-search results
_INSERT_BATCH = 2000
_ID_BATCH = 1000
_QUERY_BATCH = 256
#: seconds for loading and flushing a collection, which take long on big ones
_SLOW_TIMEOUT = 120.0
#: what pymilvus' errors say when the server is gone (it has no dedicated exception)
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "failed to connect", "Fail connecting", "Retry run out",
                "Retry timeout")


def import_pymilvus():
    try:
        import pymilvus  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "the 'milvus' index backend needs pymilvus (and milvus-lite for local files): "
            "pip install 'fashionhash[milvus]'"
        ) from exc
    return pymilvus


def is_lite(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


def _id_expr(ids: np.ndarray) -> str:
    return "id in [" + ",".join(str(int(i)) for i in ids) + "]"


@INDEXES.register("milvus")
class MilvusIndex(BinaryIndex):
    """Milvus / Milvus Lite collection behind the common interface.

    Options: ``uri`` (``.db`` path or server URL; required), ``collection``,
    ``index_type`` (default BIN_FLAT on Lite, BIN_IVF_FLAT on a server), ``nlist``,
    ``nprobe`` (default nlist: exact), ``token`` (not saved; default
    ``$FASHIONHASH_MILVUS_TOKEN``), ``timeout`` (seconds to wait for the server),
    ``create`` (False: the collection must exist already; not saved).
    """

    name = "milvus"
    external = True

    def __init__(
        self,
        n_bits: int,
        uri: str | None = None,
        collection: str = "fashionhash",
        index_type: str | None = None,
        nlist: int = 1024,
        nprobe: int | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        create: bool = True,
    ) -> None:
        super().__init__(n_bits)
        if not uri:
            raise ValueError("the milvus backend needs uri= (a local .db path for Milvus Lite, or http://host:19530)")
        pymilvus = import_pymilvus()
        uri = str(uri)
        self._lite = is_lite(uri)
        if self._lite:
            uri = str(Path(uri).expanduser().resolve())
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self._uri = uri
        self._collection = collection
        self._index_type = index_type or ("BIN_FLAT" if self._lite else "BIN_IVF_FLAT")
        if self._lite and self._index_type != "BIN_FLAT":
            raise ValueError(f"Milvus Lite only supports BIN_FLAT for binary vectors, got {self._index_type}")
        self._nlist = int(nlist)
        self._nprobe = int(nprobe) if nprobe is not None else self._nlist
        self._dim = 8 * self.n_bytes
        self._timeout = float(timeout)
        self._client = self._connect(pymilvus, token or os.environ.get(TOKEN_ENV) or None)
        self._ensure_collection(pymilvus, create)

    def _connect(self, pymilvus, token: str | None):
        kwargs = {"uri": self._uri, "timeout": self._timeout}
        if token:
            kwargs["token"] = token
        try:
            client = pymilvus.MilvusClient(**kwargs)
            client.has_collection(self._collection, timeout=max(1, math.ceil(self._timeout)))  # answers?
        except pymilvus.MilvusException as exc:
            hint = "" if self._lite else " (is the server running? `make milvus` starts a local one)"
            raise ConnectionError(f"cannot reach Milvus at {self._uri}{hint}: {exc.message}") from exc
        return client

    def options(self):
        return {
            "uri": self._uri,
            "collection": self._collection,
            "index_type": self._index_type,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
            "timeout": self._timeout,
        }

    def _ensure_collection(self, pymilvus, create: bool) -> None:
        c = self._call
        exists = c("has_collection", self._collection)
        if not exists and not create:
            raise FileNotFoundError(
                f"collection {self._collection!r} is not on the Milvus server at {self._uri} "
                "(a new or wiped server?): rebuild the index there"
            )
        if exists:
            fields = {f["name"]: f for f in c("describe_collection", self._collection)["fields"]}
            dim = int(fields.get("code", {}).get("params", {}).get("dim", -1))
            if "id" not in fields or dim != self._dim:
                raise ValueError(
                    f"collection {self._collection!r} at {self._uri} does not hold {self._dim}-bit codes "
                    f"(fields: {sorted(fields)}, dim {dim})"
                )
        else:
            schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
            schema.add_field("code", pymilvus.DataType.BINARY_VECTOR, dim=self._dim)
            params = self._client.prepare_index_params()
            extra = {} if self._index_type == "BIN_FLAT" else {"params": {"nlist": self._nlist}}
            params.add_index(field_name="code", index_type=self._index_type, metric_type="HAMMING", **extra)
            c("create_collection", self._collection, schema=schema, index_params=params, consistency_level="Strong")
            log.info("created Milvus collection %s at %s (%s)", self._collection, self._uri, self._index_type)
        c("load_collection", self._collection, timeout=max(self._timeout, _SLOW_TIMEOUT))

    def _call(self, method: str, *args, **kwargs):
        """One client call, bounded by ``timeout``: pymilvus would otherwise retry a server
        that went away for minutes. A server that cannot be reached -> ConnectionError."""
        pymilvus = import_pymilvus()
        try:
            # an int: pymilvus' retry loop ignores a float timeout and retries 75 times
            timeout = max(1, math.ceil(kwargs.pop("timeout", self._timeout)))
            return getattr(self._client, method)(*args, timeout=timeout, **kwargs)
        except pymilvus.MilvusException as exc:
            text = str(exc)
            if any(m in text for m in _UNREACHABLE):
                raise ConnectionError(f"Milvus at {self._uri} does not answer ({method}): {exc.message}") from exc
            raise

    def close(self) -> None:
        self._client.close()

    def drop(self) -> None:
        """Delete the whole collection."""
        self._call("drop_collection", self._collection)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- data ------------------------------------------------------------------------

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        found = []
        for a in range(0, ids.size, _ID_BATCH):
            chunk = ids[a : a + _ID_BATCH]
            rows = self._call("query", self._collection, filter=_id_expr(chunk), output_fields=["id"])
            found.extend(int(r["id"]) for r in rows)
        return np.unique(np.asarray(found, dtype=np.int64))

    def add(self, ids, codes) -> None:
        packed = self.check_codes(codes)
        ids = self._new_ids(ids, packed.shape[0])
        if ids.size == 0:
            return
        with self._lock:
            dup = self._existing(ids)
            if dup.size:
                raise ValueError(f"ids already in the index: {dup[:5].tolist()} (remove them first)")
            for a in range(0, ids.size, _INSERT_BATCH):
                rows = [
                    {"id": int(i), "code": c.tobytes()}
                    for i, c in zip(ids[a : a + _INSERT_BATCH], packed[a : a + _INSERT_BATCH])
                ]
                self._call("insert", self._collection, rows)

    def remove(self, ids) -> int:
        ids = np.unique(_as_ids(ids))
        with self._lock:
            present = self._existing(ids)
            for a in range(0, present.size, _ID_BATCH):
                self._call("delete", self._collection, ids=[int(i) for i in present[a : a + _ID_BATCH]])
            return int(present.size)

    def __len__(self) -> int:
        res = self._call("query", self._collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def _iterate(self, expr: str, fields: list[str]):
        it = self._call("query_iterator", self._collection, batch_size=4096, filter=expr, output_fields=fields)
        try:
            while True:
                batch = it.next()
                if not batch:
                    break
                yield batch
        finally:
            it.close()

    def ids(self) -> np.ndarray:
        out = [np.asarray([r["id"] for r in b], dtype=np.int64) for b in self._iterate("id >= 0", ["id"])]
        return np.sort(np.concatenate(out)) if out else np.empty(0, np.int64)

    def contains(self, ids) -> np.ndarray:
        ids = _as_ids(ids)
        return np.isin(ids, self._existing(np.unique(ids)))

    def _fetch(self, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, packed codes) matching a filter expression."""
        ids, codes = [], []
        for batch in self._iterate(expr, ["id", "code"]):
            for r in batch:
                ids.append(int(r["id"]))
                code = r["code"]
                codes.append(code[0] if isinstance(code, list) else code)
        packed = np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(ids), self.n_bytes)
        return np.asarray(ids, dtype=np.int64), packed

    def get_codes(self, ids) -> np.ndarray:
        ids = _as_ids(ids)
        got_ids, packed = self._fetch(_id_expr(np.unique(ids)))
        order = np.argsort(got_ids)
        pos = np.searchsorted(got_ids[order], ids)
        pos = np.minimum(pos, max(got_ids.size - 1, 0))
        if got_ids.size == 0 or np.any(got_ids[order][pos] != ids):
            raise KeyError("some ids are not in the index")
        return packed[order][pos]

    # -- search ----------------------------------------------------------------------

    def _params(self, extra: dict | None = None) -> dict:
        params = {} if self._index_type == "BIN_FLAT" else {"nprobe": self._nprobe}
        params.update(extra or {})
        return {"metric_type": "HAMMING", "params": params}

    def _raw_search(self, qb: np.ndarray, limit: int, expr: str, extra: dict | None = None):
        out = []
        for a in range(0, qb.shape[0], _QUERY_BATCH):
            res = self._call(
                "search",
                self._collection,
                data=[row.tobytes() for row in qb[a : a + _QUERY_BATCH]],
                anns_field="code",
                limit=limit,
                filter=expr,
                search_params=self._params(extra),
                output_fields=[],
            )
            for hits in res:
                out.append(
                    (
                        np.asarray([int(round(h["distance"])) for h in hits], dtype=np.int64),
                        np.asarray([int(h["id"]) for h in hits], dtype=np.int64),
                    )
                )
        return out

    def _filter_chunks(self, filter_ids) -> list[str]:
        """Filter expressions, 10k ids each (Milvus parses every id of an ``in`` list)."""
        if filter_ids is None:
            return [""]
        if isinstance(filter_ids, (set, frozenset)):
            filter_ids = np.fromiter(filter_ids, np.int64, count=len(filter_ids))
        ids = np.unique(_as_ids(filter_ids, what="filter_ids"))
        return [_id_expr(ids[a : a + 10000]) for a in range(0, ids.size, 10000)]

    def search(self, codes, k: int, filter_ids=None) -> tuple[np.ndarray, np.ndarray]:
        qb = self.check_codes(codes)
        k = self.check_k(k)
        nq = qb.shape[0]
        out_d = np.full((nq, k), PAD_DISTANCE, np.int32)
        out_i = np.full((nq, k), -1, np.int64)
        if k == 0 or nq == 0:
            return out_d, out_i
        chunks = self._filter_chunks(filter_ids)
        if filter_ids is not None and chunks == []:
            return out_d, out_i
        per_query = [[] for _ in range(nq)]
        for expr in chunks:
            for j, (d, i) in enumerate(self._exact_topk(qb, k, expr)):
                per_query[j].append((d, i))
        for j, parts in enumerate(per_query):
            d = np.concatenate([p[0] for p in parts])
            i = np.concatenate([p[1] for p in parts])
            o = np.lexsort((i, d))[:k]
            out_d[j, : o.size] = d[o]
            out_i[j, : o.size] = i[o]
        return out_d, out_i

    def _exact_topk(self, qb: np.ndarray, k: int, expr: str):
        """Per query the exact k best (distance, id) under ``expr``: over-fetch until the
        list runs past the k-th distance (or holds everything), else scan fetched codes."""
        done: list = [None] * qb.shape[0]
        pending = []
        limit = min(MAX_LIMIT, k + max(16, k))
        results = self._raw_search(qb, limit, expr) if k < MAX_LIMIT else []
        if k >= MAX_LIMIT:
            pending = list(range(qb.shape[0]))
        for j, (d, i) in enumerate(results):
            if d.size < limit or d[-1] > d[k - 1]:
                o = np.lexsort((i, d))[:k]
                done[j] = (d[o], i[o])
            else:
                pending.append(j)
        while pending and limit < MAX_LIMIT and k < MAX_LIMIT:
            limit = min(MAX_LIMIT, 4 * limit)
            results = self._raw_search(qb[pending], limit, expr)
            still = []
            for j, (d, i) in zip(pending, results):
                if d.size < limit or d[-1] > d[k - 1]:
                    o = np.lexsort((i, d))[:k]
                    done[j] = (d[o], i[o])
                else:
                    still.append(j)
            pending = still
        if pending:  # a tie wider than Milvus' limit: brute force over the fetched codes
            log.warning("Milvus tie wider than %d results: scanning codes for %d queries", MAX_LIMIT, len(pending))
            ids, packed = self._fetch(expr or "id >= 0")
            d, i = _kernel.scan_knn(to_words(packed), ids, None, to_words(qb[pending]), k)
            for r, j in enumerate(pending):
                keep = i[r] >= 0
                done[j] = (d[r][keep].astype(np.int64), i[r][keep])
        return done

    def radius_search(self, codes, radius: int, filter_ids=None) -> RadiusResult:
        qb = self.check_codes(codes)
        radius = self.check_radius(radius)
        nq = qb.shape[0]
        per_query: list[list] = [[] for _ in range(nq)]
        for expr in self._filter_chunks(filter_ids):
            # Milvus keeps range_filter <= distance < radius
            res = self._raw_search(qb, MAX_LIMIT, expr, {"radius": radius + 1, "range_filter": 0})
            full = [j for j, (d, _) in enumerate(res) if d.size >= MAX_LIMIT]
            if full:
                ids, packed = self._fetch(expr or "id >= 0")
                qi, d, rows = _kernel.scan_radius(to_words(packed), None, to_words(qb[full]), radius)
                for j, (dd, ii) in zip(full, _kernel.group_radius(len(full), qi, d, rows, ids)):
                    res[j] = (dd.astype(np.int64), ii)
            for j, part in enumerate(res):
                per_query[j].append(part)
        out = []
        for parts in per_query:
            d = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
            i = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
            o = np.lexsort((i, d))
            out.append((d[o].astype(np.int32), i[o]))
        return out

    # -- persistence -----------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Flush Milvus and write a manifest that :func:`open_index` reconnects from."""
        self._call("flush", self._collection, timeout=max(self._timeout, _SLOW_TIMEOUT))
        meta = {"backend": self.name, "n_bits": self.n_bits, "options": self.options(), "saved_at": time.time()}
        write_container(path, meta, {})

    @classmethod
    def _restore(cls, path, meta, arrays, n_bits, options) -> "MilvusIndex":
        # the manifest promises data in an existing collection: never recreate it empty
        return cls(n_bits=n_bits, **{"create": False, **options})
