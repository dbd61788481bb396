"""The search service: one trained run and one catalogue index, loaded once, answering
searches by photo and by example, paging the catalogue, and adding/removing items.

:class:`SearchService` knows nothing about HTTP (the CLI's ``search`` uses it directly);
:mod:`fashionhash.serving.app` maps its methods and its :class:`ServiceError` subclasses
to endpoints and status codes. Every method returns JSON-ready dicts.

Thread safety: reads may run concurrently (the index has its own lock); writes are
serialised by a service lock and saved (atomically, see :mod:`fashionhash.index.catalogue`)
before they return, so a restart always sees every acknowledged write.
"""
from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fashionhash import codes as C
from fashionhash.descriptors import dequantize, quantize
from fashionhash.index import BinaryIndex, HashIndex
from fashionhash.index.build import (
    IndexInfo,
    encode_photos,
    encode_upload,
    image_suffix,
    next_id,
    remove_photo,
    store_photo,
)
from fashionhash.serving.batching import PhotoBatcher

if TYPE_CHECKING:
    from fashionhash.pipeline import Run

log = logging.getLogger(__name__)

#: for indexes that do not record their catalogue's display (built before it was): the
#: Kaggle columns. The page offers the facets as filters (any stored attribute can be
#: filtered on); the summary describes an item under its name.
FACET_KEYS = ("gender", "masterCategory", "articleType", "baseColour")
SUMMARY_KEYS = ("articleType", "baseColour", "gender")
#: attribute names accepted for added items
_ATTR_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_MAX_ATTR_VALUE = 500
_MAX_ATTRS = 32
_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
#: GIF signatures: a GIF (animated or not) is searched by its first frame but never stored
_GIF_MAGIC = (b"GIF87a", b"GIF89a")

Filters = Mapping[str, "str | Sequence[str]"]


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status the app answers with."""

    status = 400


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class TooLarge(ServiceError):
    status = 413


class UnsupportedMedia(ServiceError):
    status = 415


class Unavailable(ServiceError):
    status = 503


@dataclass
class ServiceConfig:
    """Limits and secrets of a running service.

    token: bearer token required by ``add_item``/``delete_item`` requests (None: writes
        are refused). max_upload_bytes: largest accepted photo upload. max_k: largest k.
    max_page: largest page of ``list_items``. max_concurrent_encodes: photos decoded and
        encoded at once outside the batcher (each decode may hold up to ~120 MB for a 40 MP
        photo). photo_batch: photo searches that wait at the same time are encoded together,
        up to this many (:mod:`fashionhash.serving.batching`; 1: each on its own, up to
        ``max_concurrent_encodes`` at once).
    two_stage: re-rank the Hamming shortlist by the index's descriptors when it stores
        them (False: codes alone, the paper's single stage). shortlist: its size (0: the one
        chosen on the validation split, recorded in the index).
    """

    token: str | None = None
    two_stage: bool = True
    shortlist: int = 0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    max_page: int = 200
    max_concurrent_encodes: int = 2
    photo_batch: int = 4


class SearchService:
    """A run's model and an index, loaded once; see the module docstring.

    ``run`` may be None for a service that only browses and searches by example (no photo
    uploads), e.g. over a synthetic index in benchmarks.
    """

    def __init__(self, run: "Run | None", index: HashIndex, index_path: str | os.PathLike, info: IndexInfo,
                 config: ServiceConfig | None = None) -> None:
        if run is not None and run.n_bits != index.n_bits:
            raise ValueError(f"the run makes {run.n_bits}-bit codes but the index holds {index.n_bits}-bit codes")
        self.run = run
        self.index = index
        self.index_path = Path(index_path).resolve()
        self.info = info
        self.config = config or ServiceConfig()
        self._roots = info.image_roots(self.index_path)
        self._write_lock = threading.Lock()
        self._encode_slots = threading.BoundedSemaphore(max(1, self.config.max_concurrent_encodes))
        self._cache_lock = threading.Lock()
        self._generation = 0
        self._ids_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._codes_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._facets: dict | None = None
        self._pixels = None  # array-backed catalogue (Fashion-MNIST), opened on first use
        self.facet_keys = tuple(info.facet_keys) if info.facet_keys is not None else FACET_KEYS
        self.summary_keys = tuple(info.summary_keys) if info.summary_keys is not None else SUMMARY_KEYS
        # the columns that name an item, best first
        self._name_keys = (info.name_key or "productDisplayName", info.label_key or "articleType")
        self.shortlist = self._two_stage_shortlist(run, index, info) if self.config.two_stage else None
        if self.shortlist is not None and self.config.shortlist:
            self.shortlist = int(self.config.shortlist)
        # photo searches (descriptor iff two-stage) go through the batcher; other encodes do not
        self._batch_descriptor = self.shortlist is not None
        self._batcher = None
        if run is not None and self.config.photo_batch > 1:
            self._batcher = PhotoBatcher(
                lambda datas: encode_photos(run, datas, descriptor=self._batch_descriptor), self.config.photo_batch)
        self._started = time.time()

    @staticmethod
    def _two_stage_shortlist(run: "Run | None", index: HashIndex, info: IndexInfo) -> int | None:
        """The Hamming shortlist that stored descriptors re-rank, or None (one stage): the
        index must store descriptors made with the run's current descriptor."""
        rec = info.descriptor
        if index.descriptor_dim is None or not rec:
            return None
        if run is not None and (run.descriptor is None or run.descriptor[0].digest() != rec.get("digest")):
            log.warning("the index's descriptors were made with another fit of the run's descriptor: "
                        "searching by codes alone (rebuild the index to re-rank)")
            return None
        return int(rec["shortlist"])

    @classmethod
    def open(cls, run_dir: str | os.PathLike | None, index_path: str | os.PathLike,
             config: ServiceConfig | None = None) -> "SearchService":
        """Load the run (``None``: the one recorded in the index) and the saved index."""
        from fashionhash.pipeline import load_run

        info = IndexInfo.load(index_path)
        run_dir = Path(run_dir) if run_dir is not None else Path(info.run_dir)
        if run_dir.resolve() != Path(info.run_dir).resolve():
            log.warning("%s was built from %s, serving it with %s", index_path, info.run_dir, run_dir)
        run = load_run(run_dir)
        index = HashIndex.open(index_path)
        return cls(run, index, index_path, info, config)

    def warmup(self) -> None:
        """Encode one blank photo so the first real upload does not pay for loading the
        feature extractor (ONNX session, possibly its export)."""
        if self.run is None:
            return
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
        t0 = time.perf_counter()
        self._encode(buf.getvalue(), descriptor=self.shortlist is not None)
        log.info("model warmed up in %.1fs", time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the photo batcher and close the index (every write was already saved)."""
        if self._batcher is not None:
            self._batcher.close()
        self.index.close()

    # ---------------------------------------------------------------- validation

    def check_k(self, k: Any) -> int:
        """k as an int in ``[1, max_k]``; BadRequest otherwise."""
        try:
            value = int(str(k).strip()) if not isinstance(k, (int, np.integer)) else int(k)
        except ValueError:
            value = None
        if value is None or isinstance(k, bool) or not 1 <= value <= self.config.max_k:
            raise BadRequest(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}")
        return value

    def check_filters(self, filters: Filters | None) -> dict[str, list[str]]:
        """Normalised filters ``{key: [values]}``: empty values dropped, unknown keys refused."""
        out: dict[str, list[str]] = {}
        for key, value in (filters or {}).items():
            values = [value] if isinstance(value, (str, int)) else list(value)
            values = [str(v) for v in values if str(v) != ""]
            if values:
                out[str(key)] = values
        unknown = sorted(set(out) - self.index.known_keys())
        if unknown:
            raise BadRequest(f"unknown filter keys {unknown}; known: {sorted(self.index.known_keys())}")
        return out

    def _check_upload(self, data: bytes, *, gif: bool = False) -> str:
        """The upload's file suffix; TooLarge/BadRequest/UnsupportedMedia otherwise.

        ``gif``: accept a GIF too (searches only: Pillow decodes just its first frame, so an
        animated GIF is searched by that frame; added items stay JPEG/PNG/WebP, the formats
        the catalogue and its image endpoint serve)."""
        if len(data) > self.config.max_upload_bytes:
            raise TooLarge(f"upload of {len(data):,} bytes is over the limit of {self.config.max_upload_bytes:,} bytes")
        if not data:
            raise BadRequest("empty upload (0 bytes)")
        suffix = image_suffix(data)
        if suffix is None and gif and data.startswith(_GIF_MAGIC):
            return ".gif"
        if suffix is None:
            kinds = "JPEG, PNG, WebP or GIF" if gif else "JPEG, PNG or WebP"
            hint = " (a GIF can be searched with, not added)" if data.startswith(_GIF_MAGIC) else ""
            raise UnsupportedMedia(f"not a {kinds} image{hint}")
        return suffix

    def _encode(self, data: bytes, *, descriptor: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Packed code ``(1, B)`` of an uploaded photo and, with ``descriptor`` (two-stage
        search or an index that stores descriptors), its float descriptor ``(1, d)``.
        Photo searches go through the batcher; an added item's encode, which may want the
        descriptor when searches do not, does not."""
        from fashionhash.data.transforms import ImageError

        if self.run is None:
            raise Unavailable("this service has no model loaded: photo search is unavailable")
        try:
            if self._batcher is not None and descriptor == self._batch_descriptor:
                return self._batcher(data)
            with self._encode_slots:
                return encode_upload(self.run, data, descriptor=descriptor)
        except ImageError as e:
            raise BadRequest(f"unreadable image: {e.reason}") from None

    # ---------------------------------------------------------------- caches

    def _invalidate(self) -> None:
        with self._cache_lock:
            self._generation += 1
            self._ids_cache.clear()
            self._codes_cache.clear()
            self._facets = None

    def _ids(self, filters: dict[str, list[str]]) -> np.ndarray:
        """Sorted ids matching ``filters`` (cached until the next write)."""
        key = tuple(sorted((k, tuple(sorted(v))) for k, v in filters.items()))
        with self._cache_lock:
            hit = self._ids_cache.get(key)
            if hit is not None:
                self._ids_cache.move_to_end(key)
                return hit
            gen = self._generation
        ids = self.index.filter_ids(filters) if filters else self.index.index.ids()
        with self._cache_lock:
            if gen == self._generation:  # a write in between would make this stale
                self._ids_cache[key] = ids
                while len(self._ids_cache) > 64:
                    self._ids_cache.popitem(last=False)
        return ids

    # ---------------------------------------------------------------- items

    def item_json(self, meta: Mapping[str, Any], distance: int | None = None,
                  score: float | None = None) -> dict[str, Any]:
        """An item as the API returns it: id, name, summary (its catalogue's describing
        attributes, e.g. "Jeans · Blue · Men"), attributes, image URL (+ distance)."""
        item_id = int(meta["id"])
        attrs = {k: v for k, v in meta.items() if k not in ("id", "image_path")}
        name = next((str(attrs[k]) for k in self._name_keys if attrs.get(k)), f"item {item_id}")
        out: dict[str, Any] = {
            "id": item_id,
            "name": name,
            "summary": " · ".join(str(attrs[k]) for k in self.summary_keys if attrs.get(k)),
            "attributes": attrs,
            "image_url": f"/images/{item_id}",
        }
        if distance is not None:
            out["distance"] = int(distance)
        if score is not None:
            out["score"] = round(float(score), 4)
        return out

    def _meta(self, item_id: int) -> dict[str, Any]:
        try:
            return self.index.get(int(item_id))
        except KeyError:
            raise NotFound(f"no item with id {item_id}") from None

    def get_item(self, item_id: int) -> dict[str, Any]:
        """One item; NotFound if absent."""
        return self.item_json(self._meta(item_id))

    def list_items(self, offset: int = 0, limit: int = 48, filters: Filters | None = None) -> dict[str, Any]:
        """A page of items (ascending id) matching ``filters``, and how many match."""
        if not isinstance(offset, int) or offset < 0:
            raise BadRequest(f"offset must be a non-negative integer, got {offset!r}")
        if not isinstance(limit, int) or not 1 <= limit <= self.config.max_page:
            raise BadRequest(f"limit must be an integer from 1 to {self.config.max_page}, got {limit!r}")
        flt = self.check_filters(filters)
        ids = self._ids(flt)
        page = ids[offset:offset + limit].tolist()
        items = [self.item_json(m) for m in self.index.get_many(page) if m is not None]
        return {"total": int(len(ids)), "offset": offset, "limit": limit, "filters": flt, "items": items}

    def facets(self) -> dict[str, list[dict[str, Any]]]:
        """Values (with counts, most frequent first) of the filterable page attributes."""
        with self._cache_lock:
            if self._facets is not None:
                return self._facets
            gen = self._generation
        keys = [k for k in self.facet_keys if k in self.index.known_keys()]
        counts: dict[str, dict[str, int]] = {k: {} for k in keys}
        ids = self.index.index.ids().tolist()
        for start in range(0, len(ids), 5000):
            for meta in self.index.get_many(ids[start:start + 5000]):
                if meta is None:
                    continue
                for k in keys:
                    v = meta.get(k)
                    if v not in (None, ""):
                        counts[k][str(v)] = counts[k].get(str(v), 0) + 1
        out = {k: [{"value": v, "count": n} for v, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))]
               for k, c in counts.items()}
        with self._cache_lock:
            if gen == self._generation:
                self._facets = out
        return out

    # ---------------------------------------------------------------- search

    def _subset_codes(self, filters: dict[str, list[str]], space: BinaryIndex) -> tuple[np.ndarray, np.ndarray]:
        """Sorted ids matching ``filters`` and their packed codes in ``space`` (the hash
        codes' index or the descriptors' sign-code index), cached until a write."""
        name = "codes" if space is self.index.index else "sign"  # the only two spaces there are
        key = (name,) + tuple(sorted((k, tuple(sorted(v))) for k, v in filters.items()))
        with self._cache_lock:
            hit = self._codes_cache.get(key)
            if hit is not None:
                self._codes_cache.move_to_end(key)
                return hit
            gen = self._generation
        ids = self._ids(filters)
        ids = ids[space.contains(ids)] if ids.size else ids
        codes = space.get_codes(ids) if ids.size else np.zeros((0, space.n_bytes), np.uint8)
        with self._cache_lock:
            if gen == self._generation:
                self._codes_cache[key] = (ids, codes)
                while len(self._codes_cache) > 16:
                    self._codes_cache.popitem(last=False)
        return ids, codes

    def _nearest(self, code: np.ndarray, want: int, filters: dict[str, list[str]],
                 space: BinaryIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``want`` nearest (distances, ids) among items matching ``filters`` in
        ``space`` (default: the hash codes), ordered by (distance, id) like the index.

        Unfiltered queries go to the index. Filtered ones scan the cached codes of the
        matching items (one popcount pass over at most the whole catalogue, well under a
        millisecond for 44k 64-bit codes); asking the index instead would map every allowed
        id to its row on every request, which costs more than the scan for broad filters."""
        space = self.index.index if space is None else space
        if not filters:
            dist, ids = space.search(code, want)
            return dist[0], ids[0]
        ids, codes = self._subset_codes(filters, space)
        if ids.size == 0:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        dist = C.hamming(code, codes)[0]
        if ids.size > want:  # everything as close as the want-th item (ties), then exact order
            kth = np.partition(dist, want - 1)[want - 1]
            cand = np.flatnonzero(dist <= kth)
        else:
            cand = np.arange(ids.size)
        order = cand[np.argsort(dist[cand], kind="stable")][:want]  # ids ascending within a distance
        return dist[order].astype(np.int32), ids[order]

    def _search(self, code: np.ndarray, k: int, filters: dict[str, list[str]],
                exclude: int | None = None, descriptor: np.ndarray | None = None
                ) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        """Results, search ms and how they were ranked: by Hamming distance alone, or (with a
        ``descriptor`` and a two-stage index) the Hamming shortlist re-ranked by descriptor."""
        t0 = time.perf_counter()
        extra = 1 if exclude is not None else 0
        two_stage = descriptor is not None and self.shortlist is not None
        by_sign = two_stage and self.index.sign_bits > 0
        want = max(k, self.shortlist) + extra if two_stage else k + extra
        if by_sign:
            dist, ids = self._nearest(self.index.sign_code(descriptor), want, filters, self.index.sign_index)
        else:
            dist, ids = self._nearest(code, want, filters)
        keep = ids >= 0 if exclude is None else (ids >= 0) & (ids != exclude)
        dist, ids = dist[keep], ids[keep]
        scores = None
        if two_stage and ids.size:
            scores, pos = self.index.rerank(descriptor, ids[None], k)
            scores, pos = scores[0], pos[0][pos[0] >= 0]
            dist, ids = dist[pos], ids[pos]
        if by_sign and ids.size:  # the distance shown is always the hash code's
            ids = ids[:k]
            dist = C.hamming(code, self.index.index.get_codes(ids))[0].astype(np.int32)
        ranking = self._ranking(two_stage)
        pairs = list(zip(dist[:k].tolist(), ids[:k].tolist(), strict=True))
        metas = self.index.get_many([i for _, i in pairs])
        results = [self.item_json(m, d, None if scores is None else scores[j])
                   for j, ((d, _), m) in enumerate(zip(pairs, metas, strict=True)) if m is not None]
        return results, (time.perf_counter() - t0) * 1000, ranking

    def _ranking(self, two_stage: bool) -> dict[str, Any]:
        """How results are ranked, for the response and the page."""
        if not two_stage:
            return {"stage": "hamming", "by": "Hamming distance"}
        bits = self.index.sign_bits
        first = (f"top {self.shortlist} by a {bits}-bit sign code of the descriptor" if bits
                 else f"Hamming top {self.shortlist}")
        return {"stage": "two-stage", "shortlist": int(self.shortlist), "sign_bits": bits,
                "by": f"{first}, re-ranked by descriptor cosine"}

    def similar(self, item_id: int, k: int = 10, filters: Filters | None = None) -> dict[str, Any]:
        """Query by example: the k items nearest to an item's stored code (itself excluded)."""
        t0 = time.perf_counter()
        k = self.check_k(k)
        flt = self.check_filters(filters)
        query = self.get_item(item_id)
        try:
            code = self.index.index.get_codes([int(item_id)])
            desc = None if self.shortlist is None else dequantize(self.index.get_descriptors([int(item_id)]))
        except KeyError:  # removed between the two lookups
            raise NotFound(f"no item with id {item_id}") from None
        results, search_ms, ranking = self._search(code, k, flt, exclude=int(item_id), descriptor=desc)
        return {"query": query, "k": k, "filters": flt, "results": results, "ranking": ranking,
                "search_ms": round(search_ms, 3), "took_ms": round((time.perf_counter() - t0) * 1000, 3)}

    def search_image(self, data: bytes, k: int = 10, filters: Filters | None = None) -> dict[str, Any]:
        """The k items nearest to a photo (JPEG/PNG/WebP bytes, or a GIF: its first frame)."""
        t0 = time.perf_counter()
        k = self.check_k(k)
        flt = self.check_filters(filters)
        self._check_upload(data, gif=True)
        code, desc = self._encode(data, descriptor=self.shortlist is not None)
        encode_ms = (time.perf_counter() - t0) * 1000
        results, search_ms, ranking = self._search(code, k, flt, descriptor=desc)
        return {"query": {"code": code[0].tobytes().hex()}, "k": k, "filters": flt, "results": results,
                "ranking": ranking,
                "encode_ms": round(encode_ms, 3), "search_ms": round(search_ms, 3),
                "took_ms": round((time.perf_counter() - t0) * 1000, 3)}

    # ---------------------------------------------------------------- images

    def image(self, item_id: int) -> tuple[Path | None, bytes | None, str]:
        """An item's photo: ``(path, None, media type)`` for a file inside the catalogue
        folder or the index's uploads, ``(None, png bytes, "image/png")`` for an
        array-backed catalogue. NotFound for anything else, including paths outside them."""
        meta = self._meta(item_id)
        raw = meta.get("image_path")
        if raw:
            path = Path(raw).resolve()
            # never serve a file outside the allowed folders, whatever the index says
            if not any(path.is_relative_to(root) for root in self._roots) or not path.is_file():
                raise NotFound(f"no image for item {item_id}")
            return path, None, _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        png = self._pixels_png(int(item_id))
        if png is None:
            raise NotFound(f"no image for item {item_id}")
        return None, png, "image/png"

    def _pixels_png(self, item_id: int) -> bytes | None:
        """PNG of an item of an array-backed catalogue (Fashion-MNIST), upscaled 4x."""
        if self.run is None or self.info.catalogue_root is not None:
            return None
        if self._pixels is None:
            from fashionhash.pipeline import open_data

            cat, _ = open_data(self.run.cfg)
            if cat.pixels is None:
                return None
            self._pixels = cat
        cat = self._pixels
        try:
            pos = int(cat.positions(np.asarray([item_id]))[0])
        except KeyError:
            return None
        from PIL import Image

        img = Image.fromarray(cat.pixels[pos]).resize((112, 112), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    # ---------------------------------------------------------------- writes

    def check_token(self, token: str | None) -> bool:
        """Whether ``token`` is the configured write token (constant-time comparison)."""
        import hmac

        expected = self.config.token
        return bool(expected) and token is not None and hmac.compare_digest(token.encode(), expected.encode())

    @staticmethod
    def _check_attributes(attributes: Mapping[str, Any]) -> tuple[int | None, dict[str, str]]:
        attrs: dict[str, str] = {}
        item_id = None
        if len(attributes) > _MAX_ATTRS:
            raise BadRequest(f"at most {_MAX_ATTRS} attributes")
        for key, value in attributes.items():
            if key == "id":
                try:
                    item_id = int(str(value))
                except ValueError:
                    raise BadRequest(f"id must be an integer, got {value!r}") from None
                if item_id < 0:
                    raise BadRequest("id must be non-negative")
                continue
            if not _ATTR_KEY.match(str(key)) or key == "image_path":
                raise BadRequest(f"invalid attribute name {key!r}")
            value = "" if value is None else str(value)
            if len(value) > _MAX_ATTR_VALUE:
                raise BadRequest(f"attribute {key!r} is longer than {_MAX_ATTR_VALUE} characters")
            if value:
                attrs[str(key)] = value
        return item_id, attrs

    def add_item(self, data: bytes, attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add a product photo with attributes to the index and save it; the new item.

        An ``id`` attribute chooses the id (Conflict if taken), else the next free id."""
        suffix = self._check_upload(data)
        item_id, attrs = self._check_attributes(attributes or {})
        code, desc = self._encode(data, descriptor=self.index.descriptor_dim is not None)
        with self._write_lock:
            if item_id is None:
                item_id = next_id(self.index, self.info.max_catalogue_id + 1)
            elif item_id in self.index.index:
                raise Conflict(f"id {item_id} is already in the index")
            path = store_photo(self.index_path, item_id, data, suffix)
            try:
                self.index.add([item_id], code, [{**attrs, "image_path": str(path)}],
                               descriptors=None if desc is None else quantize(desc))
                self.index.save()
            except BaseException:
                self.index.rollback()
                remove_photo(self.index_path, str(path))
                raise
            finally:
                self._invalidate()
        log.info("added item %d (%s)", item_id, path.name)
        return self.get_item(item_id)

    def delete_item(self, item_id: int) -> dict[str, Any]:
        """Remove an item (and its photo, if it was added through the service) and save."""
        with self._write_lock:
            meta = self._meta(item_id)
            try:
                self.index.remove([int(item_id)])
                self.index.save()
            except BaseException:
                self.index.rollback()
                raise
            finally:
                self._invalidate()
            remove_photo(self.index_path, meta.get("image_path"))
        log.info("deleted item %d", item_id)
        return {"deleted": int(item_id)}

    # ---------------------------------------------------------------- status

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "items": len(self.index)}

    def stats(self) -> dict[str, Any]:
        """Index size, code length, backend, the run that made the codes, limits."""
        run = None
        if self.run is not None:
            m = self.run.cfg
            run = {"path": self.run.path.name, "method": m.method.name, "backbone": m.model.backbone,
                   "mode": m.model.mode, "dataset": m.data.dataset,
                   "checkpoint_epoch": int(self.run.meta.get("checkpoint_epoch", -1))}
        return {
            "items": len(self.index), "n_bits": self.index.n_bits, "backend": self.index.index.name,
            "index_path": self.index_path.name, "index_built": self.info.created,
            "index_run": self.info.run_dir, "run": run,
            "filter_keys": sorted(self.index.known_keys()),
            "facet_keys": [k for k in self.facet_keys if k in self.index.known_keys()],
            "summary_keys": list(self.summary_keys),
            "ranking": ({"stage": "two-stage", "shortlist": self.shortlist, "sign_bits": self.index.sign_bits,
                         "descriptor_bytes": self.index.descriptor_dim} if self.shortlist is not None
                        else {"stage": "hamming"}),
            "writes_enabled": bool(self.config.token), "max_k": self.config.max_k,
            "max_upload_bytes": self.config.max_upload_bytes,
            "uptime_s": round(time.time() - self._started, 1),
        }
