"""Build a searchable catalogue index from a trained run, and add photos to it.

``build_index(run_dir, index_path)`` hashes the run's catalogue (reusing the database and
query codes that evaluation saved in ``RUN_DIR/codes/*.npz`` when they are still those of
the run's best checkpoint, encoding only the rest) and stores codes plus item metadata
(every catalogue attribute, the product name, the absolute image path) in a
:class:`~fashionhash.index.HashIndex` directory.

Next to the index's own files, ``fashionhash-index.json`` records which run made the index
and where its photos may be read from (the catalogue folder, and ``uploads/`` inside the
index directory for photos added later), so ``search`` and ``serve`` need only the index.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence, Union

import numpy as np

from fashionhash import codes as C
from fashionhash.descriptors import quantize
from fashionhash.files import atomic_write

from .base import INDEXES, BinaryIndex
from .catalogue import HashIndex

if TYPE_CHECKING:
    from fashionhash.encoding import Encoded
    from fashionhash.pipeline import PhaseFactory, Progress, Run

log = logging.getLogger(__name__)

INFO_NAME = "fashionhash-index.json"
UPLOADS = "uploads"
#: image files accepted for added items, by their leading bytes
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"))
#: catalogue items encoded per call when no saved codes can be reused (bounds memory)
CHUNK = 1024

ImageInput = Union[str, os.PathLike, bytes]


@dataclass
class IndexInfo:
    """What ``fashionhash-index.json`` records about an index directory."""

    run_dir: str
    n_bits: int
    backend: str
    items: str
    count: int
    dataset: str
    catalogue_root: str | None
    created: str
    checkpoint_epoch: int = -1
    reused_codes: int = 0
    encoded: int = 0
    skipped: int = 0
    #: largest catalogue id (indexed or not): added photos get ids above it, so they never
    #: take the id of a catalogue item that was skipped or removed
    max_catalogue_id: int = -1
    #: how the page and ``search`` show items (the catalogue's Display; None in indexes
    #: built before it was recorded: the service then assumes the Kaggle columns)
    label_key: str | None = None
    facet_keys: list[str] | None = None
    summary_keys: list[str] | None = None
    name_key: str | None = None
    #: the run's descriptor when the index stores one (two-stage search): its width, the
    #: digest of its whitening (a refitted run no longer matches), the shortlist size and
    #: the width of the sign code that makes the shortlist (0: the hash code makes it)
    descriptor: dict | None = None
    extra: dict = field(default_factory=dict)

    def image_roots(self, index_path: str | os.PathLike) -> list[Path]:
        """Folders whose files may be served as item photos."""
        roots = [Path(index_path).resolve() / UPLOADS]
        if self.catalogue_root:
            roots.append(Path(self.catalogue_root).resolve())
        return roots

    def save(self, index_path: str | os.PathLike) -> None:
        atomic_write(Path(index_path) / INFO_NAME, [json.dumps(asdict(self), indent=1).encode()])

    @classmethod
    def load(cls, index_path: str | os.PathLike) -> "IndexInfo":
        path = Path(index_path) / INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} has no {INFO_NAME}: was it made by `fashionhash index build`?")
        data = json.loads(path.read_text())
        known = {k: data.pop(k) for k in list(data) if k in cls.__dataclass_fields__}
        known.setdefault("extra", {}).update(data)
        return cls(**known)


# -------------------------------------------------------------------------------- build


def _saved_codes(run_dir: Path, n_bits: int) -> dict[int, np.ndarray]:
    """id -> packed code from evaluation's ``codes/*.npz``, if they are of the current
    best checkpoint (written after it) and of this code length; else empty."""
    codes_dir = run_dir / "codes"
    best = run_dir / "checkpoints" / "best.pt"
    out: dict[int, np.ndarray] = {}
    if not codes_dir.is_dir() or not best.is_file():
        return out
    for f in sorted(codes_dir.glob("*.npz")):
        # codes older than the checkpoint belong to an earlier model: never mix them in
        if f.stat().st_mtime < best.stat().st_mtime:
            log.info("ignoring %s: older than %s", f, best)
            continue
        try:
            with np.load(f) as z:
                if "ids" not in z or "packed" not in z or int(z["n_bits"]) != n_bits:
                    continue
                ids, packed = z["ids"].astype(np.int64), z["packed"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable %s: %s", f, e)
            continue
        if packed.dtype != np.uint8 or packed.shape != (len(ids), C.n_bytes(n_bits)):
            continue
        out.update(zip(ids.tolist(), packed, strict=True))
    return out


def _saved_codes_match(run: "Run", sources: Sequence, saved: np.ndarray, sample: int = 8) -> bool:
    """Whether a few saved codes equal what the run's model gives for the same photos now
    (evaluation may have used another checkpoint than the one served)."""
    pick = np.unique(np.linspace(0, len(sources) - 1, min(sample, len(sources))).astype(int))
    real, ok = run.encode_sources([sources[i] for i in pick], num_workers=0)
    if not ok.any():
        return True  # nothing readable to compare with: keep what evaluation saved
    # a bit whose relaxed value sits at ~0 may flip between thread counts: allow 5%
    diff = C.hamming(C.pack(real[ok]), saved[pick[ok]]).diagonal()
    return float(diff.mean()) <= 0.05 * run.n_bits


def _encode_catalogue(run: "Run", sources: Sequence, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes and ok mask of catalogue photos, ``CHUNK`` at a time."""
    n_b = C.n_bytes(run.n_bits)
    packed = np.zeros((len(sources), n_b), np.uint8)
    ok = np.zeros(len(sources), bool)
    workers = int(getattr(run.cfg.train, "num_workers", 2))
    for s in range(0, len(sources), CHUNK):
        real, good = run.encode_sources(sources[s:s + CHUNK], progress=progress, num_workers=workers)
        packed[s:s + len(real)] = C.pack(real)
        ok[s:s + len(real)] = good
    return packed, ok


def _item_metadata(cat, i: int) -> dict[str, Any]:
    """Metadata stored for catalogue position ``i``: attributes + absolute image path."""
    meta = cat.metadata(i)
    meta.pop("id", None)  # the id is the index key, not an attribute
    if meta.get("image_path"):
        meta["image_path"] = str(Path(meta["image_path"]).resolve())
    return meta


def descriptor_info(run: "Run") -> dict | None:
    """What an index records of the run's descriptor (None when the run has none)."""
    if run.descriptor is None:
        return None
    whitening, meta = run.descriptor
    return {"dim": whitening.dim, "digest": whitening.digest(), "shortlist": int(meta["shortlist"]),
            "sign_bits": whitening.sign_bits}


def _catalogue_descriptors(run: "Run", cat, split, positions: np.ndarray,
                           progress: PhaseFactory | None) -> np.ndarray:
    """int8 descriptors ``(n, d)`` of catalogue ``positions``: evaluation cached the raw
    descriptors of the split's parts (read back per part, by the same keys); the rest (items
    of classes outside the protocol) are computed here."""
    from fashionhash.pipeline import item_descriptors

    whitening = run.descriptor[0]
    out = np.zeros((len(positions), whitening.dim), np.int8)
    done = np.zeros(len(positions), bool)
    for part in ("database", "val", "query"):
        part_pos = cat.positions(getattr(split, part))
        where = np.flatnonzero(np.isin(positions, part_pos) & ~done)
        if where.size:
            raw, _ = item_descriptors(cat, part_pos, run.cfg)
            by_pos = np.argsort(part_pos)
            out[where] = whitening.quantized(raw[by_pos[np.searchsorted(part_pos, positions[where], sorter=by_pos)]])
            done[where] = True
    rest = np.flatnonzero(~done)
    if rest.size:
        update = progress("descriptors of the other photos", int(rest.size)) if progress else None
        raw, _ = item_descriptors(cat, positions[rest], run.cfg, progress=update)
        out[rest] = whitening.quantized(raw)
    return out


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished index directory into place; an old one is removed only afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _empty_backend(backend: str, n_bits: int, options: Mapping[str, Any], overwrite: bool) -> BinaryIndex:
    """The backend to fill. An outside collection (Milvus) that already holds items is
    another index's data: it is dropped only with ``overwrite``."""
    index = INDEXES.build(backend, n_bits=n_bits, **options)
    if not index.external or len(index) == 0:
        return index
    if not overwrite:
        n = len(index)
        index.close()
        raise FileExistsError(f"the {backend} collection {options} already holds {n} items: "
                              "pass overwrite=True (CLI: --force) to replace it, or choose another collection")
    log.warning("dropping the %s collection %s to rebuild it", backend, options)
    index.drop()
    index.close()
    return INDEXES.build(backend, n_bits=n_bits, **options)


def build_index(
    run_dir: str | os.PathLike,
    index_path: str | os.PathLike,
    *,
    backend: str = "mih",
    backend_options: Mapping[str, Any] | None = None,
    items: Literal["all", "database"] = "all",
    progress: PhaseFactory | None = None,
    overwrite: bool = False,
    reuse_codes: bool = True,
) -> HashIndex:
    """Index a run's catalogue into ``index_path`` and return the opened index.

    ``items``: ``"all"`` (every catalogue photo, what a shop would search) or
    ``"database"`` (the evaluation database only). ``backend_options``: the backend's
    options, e.g. ``{"uri": "http://host:19530", "collection": "shop"}`` for ``milvus``,
    whose codes then live in that collection (replaced only with ``overwrite``, dropped
    again if the build fails). ``progress(name, total)`` may return a
    callable that is told how many photos were encoded (the CLI draws bars with it).
    Unreadable photos are skipped with one warning. The directory appears only when
    complete (built beside it, then renamed); an existing one is replaced only with
    ``overwrite``, else ``FileExistsError``.
    """
    from fashionhash.pipeline import load_run, open_data

    t0 = time.time()
    run_dir, index_path = Path(run_dir), Path(index_path)
    if items not in ("all", "database"):
        raise ValueError(f"items is 'all' or 'database', not {items!r}")
    if index_path.exists() and not overwrite:
        raise FileExistsError(f"{index_path} exists: pass overwrite=True (CLI: --force) to rebuild it")
    run = load_run(run_dir)
    cat, split = open_data(run.cfg, run_dir / "split.json")
    positions = np.arange(len(cat)) if items == "all" else cat.positions(split.database)
    ids = cat.ids[positions]

    saved = _saved_codes(run_dir, run.n_bits) if reuse_codes else {}
    have = np.fromiter((int(i) in saved for i in ids), bool, count=len(ids))
    packed = np.zeros((len(ids), C.n_bytes(run.n_bits)), np.uint8)
    sources = cat.sources()
    if have.any():
        packed[have] = np.stack([saved[int(i)] for i in ids[have]])
        reused = np.flatnonzero(have)
        if not _saved_codes_match(run, [sources[positions[j]] for j in reused], packed[reused]):
            log.warning("%s/codes do not match the run's best checkpoint: encoding every photo", run_dir)
            have[:] = False
    ok = have.copy()
    todo = np.flatnonzero(~have)
    if todo.size:
        update = progress("encode catalogue", int(todo.size)) if progress else None
        enc, good = _encode_catalogue(run, [sources[positions[j]] for j in todo], update)
        packed[todo], ok[todo] = enc, good
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d of %d photos could not be read and are not indexed", n_bad, len(ids))

    keep = np.flatnonzero(ok)
    metadata = [_item_metadata(cat, int(positions[j])) for j in keep]
    desc = _catalogue_descriptors(run, cat, split, positions[keep], progress) if run.descriptor else None
    tmp = index_path.with_name(f".{index_path.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    codes = _empty_backend(backend, run.n_bits, backend_options or {}, overwrite)
    try:
        index = HashIndex(codes, run.n_bits, tmp, descriptor_dim=None if desc is None else desc.shape[1],
                          sign_mean=run.descriptor[0].sign_mean if run.descriptor else None)
        index.add(ids[keep], packed[keep], metadata, descriptors=desc)
        index.save()
        index.close()
        info = IndexInfo(
            run_dir=str(run_dir.resolve()), n_bits=run.n_bits, backend=backend, items=items,
            count=int(keep.size), dataset=run.cfg.data.dataset,
            catalogue_root=str(Path(cat.root).resolve()) if cat.paths is not None and cat.root else None,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            checkpoint_epoch=int(run.meta.get("checkpoint_epoch", -1)),
            reused_codes=int(have.sum()), encoded=int(todo.size), skipped=n_bad,
            max_catalogue_id=int(cat.ids.max()) if len(cat) else -1,
            label_key=cat.label_key, facet_keys=list(cat.display.facets),
            summary_keys=list(cat.display.summary), name_key=cat.display.name_key,
            descriptor=descriptor_info(run),
        )
        info.save(tmp)
        replace_dir(tmp, index_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if codes.external:  # its collection was empty before: leave it so
            with contextlib.suppress(Exception):
                codes.drop()
        raise
    log.info("indexed %d items of %s into %s in %.1fs (%d codes reused, %d encoded)",
             keep.size, run_dir, index_path, time.time() - t0, int(have.sum()), int(todo.size))
    return HashIndex.open(index_path)


# -------------------------------------------------------------------------------- add


def image_suffix(data: bytes) -> str | None:
    """File suffix of a JPEG, PNG or WebP photo from its leading bytes; None otherwise."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def next_id(index: HashIndex, floor: int = 0) -> int:
    """An id above every id in the index (and ``floor``) for a newly added photo."""
    ids = index.index.ids()
    return max(int(ids[-1]) + 1 if ids.size else 0, floor)


def store_photo(index_path: str | os.PathLike, item_id: int, data: bytes, suffix: str) -> Path:
    """Write an added photo into ``INDEX/uploads/<id><suffix>`` atomically; its path."""
    path = Path(index_path).resolve() / UPLOADS / f"{int(item_id)}{suffix}"
    atomic_write(path, [data])
    return path


def remove_photo(index_path: str | os.PathLike, image_path: str | None) -> None:
    """Delete an added photo (only files inside ``INDEX/uploads``; catalogue photos stay)."""
    if not image_path:
        return
    uploads = Path(index_path).resolve() / UPLOADS
    path = Path(image_path).resolve()
    if path.parent == uploads:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _decode_upload(run: "Run", data: bytes):
    """An uploaded photo as a PIL image, shrunk to the catalogue's photo size when it is
    larger and ``data.query_shrink`` is on (the run records that size in meta.json)."""
    from PIL import Image

    from fashionhash.data.transforms import load_image

    # decode once here so a bad photo raises ImageError with its reason; JPEG draft mode
    # decodes big photos straight to about the model's size (faster, less memory)
    img = load_image(data, draft_size=int(run.cfg.model.image_size), name="upload")
    size = run.meta.get("photo_size")
    if run.cfg.data.query_shrink and size and (img.width > size[0] or img.height > size[1]):
        img = img.copy()
        img.thumbnail(tuple(size), Image.LANCZOS)  # keeps the aspect ratio, never enlarges
    return img


def encode_photos(run: "Run", datas: Sequence[bytes], *, descriptor: bool = False) -> list[Any]:
    """Photos' bytes encoded together, one backbone call per scale for all of them (what
    concurrent uploads share). Per photo, in order: its packed code ``(1, B)`` and, with
    ``descriptor`` (two-stage search), its whitened descriptor ``(1, d)`` float32 (else
    None), or the ``ImageError`` its bytes raised (empty, not an image, truncated, too many
    pixels): one bad photo does not fail the others."""
    from fashionhash.data.transforms import ImageError

    out: list[Any] = [None] * len(datas)
    images, where = [], []
    for i, data in enumerate(datas):
        try:
            images.append(_decode_upload(run, data))
            where.append(i)
        except ImageError as e:
            out[i] = e
    if not images:
        return out
    if descriptor:
        real, desc, ok = run.encode_two_stage(images)
    else:
        (real, ok), desc = run.encode_sources(images, num_workers=0), None
    packed = C.pack(real)
    for j, i in enumerate(where):
        # cannot happen for a decoded image, but never index a zero code
        out[i] = ((packed[j:j + 1], None if desc is None else desc[j:j + 1]) if ok[j]
                  else ImageError("upload", "could not be encoded"))
    return out


def encode_upload(run: "Run", data: bytes, *, descriptor: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One photo's bytes -> its packed code ``(1, B)`` and, with ``descriptor``, its
    whitened descriptor ``(1, d)`` float32 (else None). Raises ``ImageError`` when the bytes
    are not a readable image (empty, not an image, truncated, too many pixels)."""
    result = encode_photos(run, [data], descriptor=descriptor)[0]
    if isinstance(result, Exception):
        raise result
    return result


def encode_photo(run: "Run", data: bytes) -> np.ndarray:
    """One photo's bytes -> its packed code ``(1, B)`` (see :func:`encode_upload`)."""
    return encode_upload(run, data)[0]


def encode_photo_two_stage(run: "Run", data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One photo's bytes -> packed code ``(1, B)`` and whitened descriptor ``(1, d)`` float32
    (one backbone pass at the model's size, one more per other descriptor scale)."""
    return encode_upload(run, data, descriptor=True)


def encode_for_index(run: "Run", index: HashIndex, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``index.add`` needs for one photo: its packed code and, when the index stores
    descriptors, its int8 descriptor ``(1, d)``."""
    packed, desc = encode_upload(run, data, descriptor=index.descriptor_dim is not None)
    return packed, None if desc is None else quantize(desc)


def add_images(
    index_path: str | os.PathLike,
    run_dir: str | os.PathLike | None,
    images: Sequence[ImageInput],
    metadata: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    *,
    progress: PhaseFactory | None = None,
) -> list[int]:
    """Hash photos with the run and add them to a saved index; returns their new ids.

    ``images``: paths or bytes of JPEG/PNG/WebP photos; each is copied into
    ``INDEX/uploads/``. ``metadata``: one dict of attributes per photo, or one dict for
    all (an ``id`` key chooses the id). ``run_dir`` None: the run recorded in the index.
    Everything is added and saved at once, or nothing (``ImageError``/``ValueError``).
    """
    from fashionhash.data.transforms import ImageError
    from fashionhash.pipeline import load_run

    index_path = Path(index_path)
    info = IndexInfo.load(index_path)
    run = load_run(run_dir if run_dir is not None else info.run_dir)
    if metadata is None or isinstance(metadata, Mapping):
        metadata = [dict(metadata or {}) for _ in images]
    if len(metadata) != len(images):
        raise ValueError(f"{len(metadata)} metadata entries for {len(images)} images")
    blobs: list[bytes] = []
    for img in images:
        data = bytes(img) if isinstance(img, (bytes, bytearray)) else Path(img).read_bytes()
        if image_suffix(data) is None:
            raise ImageError(str(img) if not isinstance(img, (bytes, bytearray)) else "<bytes>",
                             "not a JPEG, PNG or WebP photo")
        blobs.append(data)
    update = progress("encode photos", len(blobs)) if progress else None
    index = HashIndex.open(index_path)
    packed, descs = [], []
    for data in blobs:
        code, desc = encode_for_index(run, index, data)
        packed.append(code)
        descs.append(desc)
        if update:
            update(1)
    written: list[Path] = []
    try:
        new_ids, metas = [], []
        nxt = next_id(index, info.max_catalogue_id + 1)
        for data, meta in zip(blobs, metadata, strict=True):
            meta = {str(k): v for k, v in meta.items()}
            item_id = int(meta.pop("id")) if "id" in meta else nxt
            if item_id < 0 or item_id in index.index or item_id in new_ids:
                # checked before writing the photo, which would replace an existing one
                raise ValueError(f"id {item_id} is negative or already in the index")
            nxt = max(nxt, item_id + 1)
            path = store_photo(index_path, item_id, data, image_suffix(data) or ".jpg")
            written.append(path)
            new_ids.append(item_id)
            metas.append({**meta, "image_path": str(path)})
        index.add(np.asarray(new_ids, np.int64), np.concatenate(packed), metas,
                  descriptors=None if index.descriptor_dim is None else np.concatenate(descs))
        index.save()
    except BaseException:
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    finally:
        index.close()
    return new_ids


def index_encoded(
    encoded: "Encoded | str | os.PathLike",
    index_path: str | os.PathLike,
    *,
    backend: str = "mih",
    overwrite: bool = False,
) -> "HashIndex":
    """Save the readable photos of a finished encoding (an :class:`Encoded` or its output
    directory) as a searchable index directory and return it opened.

    Metadata per item: ``image_path`` and the manifest's extra columns. The index records
    the run and the photo folder (``fashionhash-index.json``), so ``fashionhash search``
    and ``serve`` work on it as on a catalogue index. The directory appears only when
    complete; an existing one is replaced only with ``overwrite`` (else FileExistsError).
    """
    from fashionhash.data.catalogue import describe_columns
    from fashionhash.encoding import Encoded, merge_chunks

    if not isinstance(encoded, Encoded):
        encoded = merge_chunks(encoded)
    index_path = Path(index_path)
    if index_path.exists() and not overwrite:
        raise FileExistsError(f"{index_path} exists: pass overwrite=True (CLI: --force) to rebuild it")
    images, keep = encoded.images, np.flatnonzero(encoded.ok)
    metadata = [{"image_path": images.paths[i], **{k: v[i] for k, v in images.attrs.items()}} for i in keep]
    tmp = index_path.with_name(f".{index_path.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        index = HashIndex(backend, encoded.n_bits, tmp)
        index.add(images.ids[keep], encoded.packed[keep], metadata)
        index.save()
        index.close()
        run = encoded.plan["run"]
        label = "label" if "label" in images.attrs else None  # the README's manifest format
        display = describe_columns(images.attrs, label)
        IndexInfo(
            run_dir=run["path"], n_bits=encoded.n_bits, backend=backend, items=images.kind,
            count=int(keep.size), dataset=run["dataset"], catalogue_root=images.root,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), checkpoint_epoch=run["checkpoint_epoch"],
            encoded=len(images), skipped=len(images) - int(keep.size),
            max_catalogue_id=int(images.ids.max()) if len(images) else -1,
            label_key=label, facet_keys=list(display.facets), summary_keys=list(display.summary),
            name_key=display.name_key,
        ).save(tmp)
        replace_dir(tmp, index_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("indexed %d photos into %s (%d unreadable left out)", keep.size, index_path,
             len(images) - keep.size)
    return HashIndex.open(index_path)
