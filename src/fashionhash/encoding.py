"""Fast encoding: a run's whole encoder (backbone + hash head, built in
:mod:`fashionhash.models.encoder`) on ONNX Runtime or PyTorch, its ONNX export, and
resumable, shardable batch encoding of a folder or CSV manifest; indexing a finished
encoding is :func:`fashionhash.index.build.index_encoded` (the index sits above this module).

Engines. ``run.encoder(engine)`` maps photos to relaxed codes ``(N, K)`` in [-1, 1] with
the whole encoder in one engine: ``"onnx"`` (the graph is exported once per weights into
``$FASHIONHASH_CACHE/onnx/`` and run by onnxruntime on CPU) or ``"torch"`` (eager,
inference mode). A frozen-mode run's encoder is the ImageNet backbone that made its cached
features followed by its hash head; a finetune run's is its own backbone and head. Both
engines read the same decoded pixels, so their packed codes agree except for a bit whose
relaxed value lies within float rounding (~1e-6) of 0 (``tests/test_encoding.py`` counts
those). ``export_onnx(run, path)`` writes the graph for use elsewhere.

Batch encoding, in one process or one shard per process (e.g. per torchrun rank)::

    from fashionhash.encoding import encode_folder, merge_chunks
    from fashionhash.index.build import index_encoded
    report = encode_folder(run, "photos/", "out/", engine="onnx", shard=(rank, world_size))
    # once every shard has finished (after a barrier, on one process):
    merged = merge_chunks("out/")          # ids (N,), paths, packed (N, B) uint8, real (N, K)
    index = index_encoded("out/", "out/index")  # a saved HashIndex for `fashionhash search`

``sources`` is a folder (every image file below it, sorted by relative path), a CSV
manifest (a ``path`` column, relative to the CSV or absolute; optional integer ``id``;
other columns become item attributes) or an :class:`ImageList`.

Output directory::

    plan.json          the image list (paths, ids, attributes) and the settings that
                       decide the codes (run, weights digest, engine, size, chunk size);
                       written once, and a resumed or sibling shard must match it
    chunks/000042.npz  list positions [42 * chunk_size, 43 * chunk_size): ``positions``
                       (n,), ``packed`` (n, B) uint8, ``real`` (n, K) float32, ``ok`` (n,)
                       and ``errors`` (the reason for each position with ok=False)

Chunk ``c`` belongs to shard ``c % world_size``. A chunk file is written whole (temporary
file, fsync, ``os.replace``) or not at all, so a killed process is restarted with
``resume=True`` and encodes exactly the chunks whose files are missing: no image is
encoded twice into the output or lost. Shards share nothing but the output directory (a
shared filesystem across machines); any process may merge once every chunk exists
(``report.complete``). Unreadable images are not fatal: they get ``ok=False``, a warning,
and are listed by :func:`merge_chunks` (``failed``), never indexed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from fashionhash import codes as C
from fashionhash.files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from fashionhash.models.features import Engine, FeatureExtractor
    from fashionhash.pipeline import PhaseFactory, Run

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageList",
    "list_images",
    "read_image_manifest",
    "image_list",
    "export_onnx",
    "EncodeReport",
    "encode_folder",
    "Encoded",
    "IncompleteEncoding",
    "merge_chunks",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PLAN_NAME, CHUNKS_DIR = "plan.json", "chunks"
_PLAN_VERSION = 1
Sources = Union["ImageList", str, os.PathLike]


# ------------------------------------------------------------------------------ images


@dataclass
class ImageList:
    """Photos to encode: absolute ``paths`` (N), unique int64 ``ids`` (N,), the folder
    they were listed from (``root``, whose files ``serve`` may show) and, from a
    manifest, extra columns as attributes (name -> N strings)."""

    paths: list[str]
    ids: np.ndarray
    root: str
    kind: str  # "folder" | "manifest" | "list"
    attrs: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        if len(self.ids) != len(self.paths) or any(len(v) != len(self.paths) for v in self.attrs.values()):
            raise ValueError("paths, ids and attribute columns must have the same length")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("image ids must be unique")

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """Content key of the list (paths, ids, attributes), to detect a changed input."""
        h = hashlib.sha256(json.dumps([self.paths, sorted(self.attrs.items())]).encode())
        h.update(self.ids.tobytes())
        return h.hexdigest()[:16]

    def to_json(self) -> dict:
        return {"paths": self.paths, "ids": self.ids.tolist(), "root": self.root,
                "kind": self.kind, "attrs": self.attrs}

    @classmethod
    def from_json(cls, d: dict) -> "ImageList":
        return cls(d["paths"], np.asarray(d["ids"], np.int64), d["root"], d["kind"], d.get("attrs", {}))


def _ids_from_names(paths: Sequence[str]) -> np.ndarray:
    """File stems when all are distinct integers (``images/15970.jpg`` -> 15970, the
    Kaggle layout's product id), else positions 0..N-1."""
    stems = [Path(p).stem for p in paths]
    if stems and all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return np.array([int(s) for s in stems], np.int64)
    return np.arange(len(paths), dtype=np.int64)


def list_images(folder: str | os.PathLike) -> ImageList:
    """Every image file (by suffix, any case) below ``folder``, sorted by relative path;
    ids from the file names when they are distinct integers, else positions."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    paths = [str(p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix())]
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return ImageList(paths, _ids_from_names(paths), str(root), "folder")


def read_image_manifest(csv_path: str | os.PathLike, path_col: str = "path", id_col: str = "id") -> ImageList:
    """A CSV with a ``path`` column (relative to the CSV's folder or absolute), an optional
    integer ``id`` column (else ids from the file names, else row numbers) and any other
    columns as attributes. Rows are kept even when their file is missing: such a photo is
    reported as unreadable, not dropped silently."""
    csv_path = Path(csv_path).resolve()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        if path_col not in cols:
            raise ValueError(f"{csv_path}: a manifest needs a {path_col!r} column, has {cols}")
        rows = list(reader)
    paths = []
    for n, rec in enumerate(rows, start=2):
        if not rec[path_col]:
            raise ValueError(f"{csv_path}:{n}: empty {path_col!r}")
        p = Path(rec[path_col])
        paths.append(str(p if p.is_absolute() else csv_path.parent / p))
    if id_col in cols:
        try:
            ids = np.array([int(rec[id_col]) for rec in rows], np.int64)
        except ValueError as e:
            raise ValueError(f"{csv_path}: the {id_col!r} column must hold integers ({e})") from None
    else:
        ids = _ids_from_names(paths)
    extra = [c for c in cols if c not in (path_col, id_col)]
    attrs = {c: [rec[c] or "" for rec in rows] for c in extra}
    return ImageList(paths, ids, str(csv_path.parent), "manifest", attrs)


def image_list(sources: Sources) -> ImageList:
    """An :class:`ImageList`, a folder (:func:`list_images`) or a ``.csv`` manifest."""
    if isinstance(sources, ImageList):
        return sources
    path = Path(sources)
    if path.is_dir():
        return list_images(path)
    if path.suffix.lower() == ".csv":
        return read_image_manifest(path)
    raise ValueError(f"{sources} is neither a folder nor a .csv manifest")


# ------------------------------------------------------------------------------ encoder


def export_onnx(run: "Run", path: str | os.PathLike) -> Path:
    """Write the run's encoder as a standalone ONNX file (atomically) and return its path.

    Graph: input ``input`` float32 ``(B, C, S, S)`` (RGB, letterboxed onto white at
    ``S = model.image_size`` with bicubic resampling, then ``(pixel / 255 - mean) / std``)
    -> output ``codes`` float32 ``(B, K)`` in [-1, 1]; bit j is set when ``codes[:, j] >= 0``
    (pack with ``numpy.packbits``, see :mod:`fashionhash.codes`). The preprocessing
    constants and the run are recorded in the model's ``metadata_props``.
    """
    import onnx

    from fashionhash.models.backbones import preprocessing_for

    # an int8 run's index was made by its int8 backbone: export that graph, not the fp32 one
    fx = run.encoder("onnx_int8" if run.cfg.model.engine == "onnx_int8" else "onnx")
    model = onnx.load(str(fx.onnx_path))
    graph = model.graph
    old = graph.output[0].name
    for node in graph.node:  # the cached graph calls its output "features"
        node.output[:] = ["codes" if o == old else o for o in node.output]
    graph.output[0].name = "codes"
    m = run.cfg.model
    prep = preprocessing_for(m.backbone)
    meta = {
        "fashionhash.run": str(Path(run.path).resolve()),
        "fashionhash.checkpoint_epoch": str(run.meta.get("checkpoint_epoch", -1)),
        "fashionhash.method": run.cfg.method.name,
        "fashionhash.mode": m.mode,
        "fashionhash.backbone": m.backbone,
        "fashionhash.engine": fx.engine,
        "fashionhash.n_bits": str(m.n_bits),
        "fashionhash.image_size": str(m.image_size),
        "fashionhash.channels": str(fx.channels),
        "fashionhash.resize": f"{fx.resize_mode}, bicubic, white padding",
        "fashionhash.mean": json.dumps(list(prep.mean)),
        "fashionhash.std": json.dumps(list(prep.std)),
        "fashionhash.input": "float32 (B, C, S, S) = (pixel / 255 - mean) / std",
        "fashionhash.output": "relaxed codes (B, K) in [-1, 1]; bit = code >= 0",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path = Path(path)
    atomic_write(path, [model.SerializeToString()])
    log.info("exported the encoder of %s to %s", run.path, path)
    return path


# ------------------------------------------------------------------------------ batches


@dataclass
class EncodeReport:
    """What one :func:`encode_folder` call did (for its shard)."""

    out_dir: Path
    n_images: int
    n_chunks: int
    shard: tuple[int, int]
    resumed_chunks: int  # this shard's chunks already on disk at the start
    written_chunks: int
    encoded: int  # photos this call encoded, readable or not
    unreadable: int
    seconds: float
    complete: bool  # every chunk of every shard is on disk: merge_chunks() will succeed

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _chunk_path(out: Path, c: int) -> Path:
    return out / CHUNKS_DIR / f"{c:06d}.npz"


def _plan(run: "Run", fx: "FeatureExtractor", images: ImageList, chunk_size: int) -> dict:
    """What decides the codes (``settings`` + the image list) and, for the index, the run."""
    from fashionhash.models.features import model_digest

    m = run.cfg.model
    settings = {
        "weights": model_digest(fx.model), "engine": fx.engine, "backbone": m.backbone,
        "image_size": fx.image_size, "resize_mode": fx.resize_mode, "n_bits": run.n_bits,
        "chunk_size": int(chunk_size),
    }
    key = hashlib.sha256(json.dumps([settings, images.digest()], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "version": _PLAN_VERSION, "key": key, "settings": settings, "images_digest": images.digest(),
        "run": {"path": str(Path(run.path).resolve()), "dataset": run.cfg.data.dataset,
                "checkpoint_epoch": int(run.meta.get("checkpoint_epoch", -1))},
        "n_images": len(images), "images": images.to_json(),
    }


def _check_or_write_plan(out: Path, plan: dict) -> None:
    path = out / PLAN_NAME
    if not path.is_file():
        # sibling shards may race here: they write identical content, atomically
        atomic_write(path, [json.dumps(plan).encode()])
        return
    old = json.loads(path.read_text())
    diffs = [f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in plan["settings"].items()
             if old.get("settings", {}).get(k) != v]
    if old.get("images_digest") != plan["images_digest"]:
        diffs.append("the list of photos")
    if diffs:
        raise ValueError(f"{out} holds an encoding with other settings ({'; '.join(diffs)}): "
                         "use another output directory, or the same settings to resume")


def _write_chunk(path: Path, positions: np.ndarray, real: np.ndarray, ok: np.ndarray,
                 errors: list[str], key: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, positions=positions, packed=C.pack(real), real=real, ok=ok,
             errors=np.asarray(errors, dtype=str), plan=np.asarray(key))
    atomic_write(path, [buf.getbuffer()])


def encode_folder(
    run: "Run",
    sources: Sources,
    out_dir: str | os.PathLike,
    *,
    engine: "Engine | None" = None,
    shard: tuple[int, int] = (0, 1),
    chunk_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 2,
    resume: bool = False,
    progress: PhaseFactory | None = None,
) -> EncodeReport:
    """Encode the photos of ``sources`` (folder, ``.csv`` manifest or :class:`ImageList`)
    into chunk files under ``out_dir``; see the module docstring for the layout.

    ``shard=(rank, world_size)``: this call encodes chunks ``c`` with ``c % world_size ==
    rank`` (under torchrun: ``(dist.get_rank(), dist.get_world_size())``). ``resume``:
    continue where a killed call stopped (its finished chunks are kept, the rest is
    encoded); without it, finding this shard's chunks already on disk raises
    ``FileExistsError``. Settings that change the codes (weights, engine, size, chunk
    size, the photo list) must match the directory's ``plan.json``, else ``ValueError``.
    ``engine`` defaults to the run's ``model.engine``. Decoding runs in ``num_workers``
    threads overlapped with the model; batches never straddle chunks. ``progress(name,
    total)`` is called once with the number of photos to encode and may return a callable
    told after each batch how many were finished (the CLI draws a bar with images/s).
    Unreadable photos are recorded
    in their chunk (``ok=False`` + reason) with one summarising warning.
    """
    rank, world = (int(v) for v in shard)
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be positive, got {chunk_size}, {batch_size}")
    images = image_list(sources)
    fx = run.encoder(engine)
    out = Path(out_dir)
    (out / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    plan = _plan(run, fx, images, chunk_size)
    _check_or_write_plan(out, plan)

    n = len(images)
    n_chunks = -(-n // chunk_size)
    mine = list(range(rank, n_chunks, world))
    todo = [c for c in mine if not _chunk_path(out, c).is_file()]
    resumed = len(mine) - len(todo)
    if resumed and not resume:
        raise FileExistsError(f"{out} already holds {resumed} chunk(s) of shard {rank}/{world}: "
                              "resume (CLI: --resume) or choose another output directory")
    for c in todo:  # temporary files of chunk writes that a kill interrupted
        name = _chunk_path(out, c).name
        for tmp in (out / CHUNKS_DIR).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    log.info("encoding %d of %d chunks (%d photos) into %s: shard %d/%d, %s engine, %d chunk(s) done before",
             len(todo), n_chunks, sum(min(chunk_size, n - c * chunk_size) for c in todo), out,
             rank, world, fx.engine, resumed)

    ranges = [(a, min(a + batch_size, (c + 1) * chunk_size, n))
              for c in todo for a in range(c * chunk_size, min((c + 1) * chunk_size, n), batch_size)]
    update = progress("encode", sum(b - a for a, b in ranges)) if progress and ranges else None
    t0 = time.perf_counter()
    parts: list[tuple[int, np.ndarray, np.ndarray, list[str]]] = []
    encoded = unreadable = written = 0
    first_error = ""
    for start, real, ok, errs in fx.batches(images.paths, ranges=ranges, num_workers=num_workers):
        parts.append((start, real, ok, errs))
        encoded += len(ok)
        unreadable += len(errs)
        first_error = first_error or (errs[0] if errs else "")
        c = start // chunk_size
        stop = min((c + 1) * chunk_size, n)
        if start + len(ok) == stop:  # the chunk's last batch: batches arrive in order
            _write_chunk(_chunk_path(out, c), np.arange(c * chunk_size, stop, dtype=np.int64),
                         np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                         [e for p in parts for e in p[3]], plan["key"])
            written += 1
            parts = []
            log.debug("wrote chunk %d (%d photos)", c, stop - c * chunk_size)
        if update is not None:
            update(len(ok))
    seconds = time.perf_counter() - t0
    complete = all(_chunk_path(out, c).is_file() for c in range(n_chunks))
    if unreadable:
        log.warning("%d of %d photos could not be read (skipped, listed by merge_chunks); first: %s",
                    unreadable, encoded, first_error)
    log.info("encoded %d photos in %.1fs (%.1f/s); %s", encoded, seconds,
             encoded / seconds if seconds else 0.0,
             "every chunk is done" if complete else "other shards' chunks are still missing")
    return EncodeReport(out, n, n_chunks, (rank, world), resumed, written, encoded, unreadable,
                        seconds, complete)


# ------------------------------------------------------------------------------ merge


class IncompleteEncoding(ValueError):
    """Some chunk files are missing: a shard has not finished (or was killed)."""


@dataclass
class Encoded:
    """Every photo of a finished encoding, in list order: ``packed (N, B)`` uint8,
    ``real (N, K)`` float32 relaxed codes, ``ok (N,)`` and the reasons of unreadable ones."""

    images: ImageList
    packed: np.ndarray
    real: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    n_bits: int
    plan: dict

    @property
    def ids(self) -> np.ndarray:
        return self.images.ids

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every unreadable photo."""
        return [(self.images.paths[i], why) for i, why in sorted(self.errors.items())]

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write an ``.npz`` with ``ids``, ``paths``, ``packed``, ``real``,
        ``ok`` and ``n_bits`` (the keys ``fashionhash encode --out`` writes, plus ids)."""
        buf = io.BytesIO()
        np.savez(buf, ids=self.ids, paths=np.asarray(self.images.paths, dtype=str), packed=self.packed,
                 real=self.real, ok=self.ok, n_bits=self.n_bits)
        atomic_write(path, [buf.getbuffer()])
        return Path(path)


def merge_chunks(out_dir: str | os.PathLike) -> Encoded:
    """Read every chunk of a finished encoding (all shards) into one :class:`Encoded`.

    Checks that each chunk holds exactly its positions and belongs to this directory's
    plan, so every photo appears once. Raises :class:`IncompleteEncoding` naming the
    missing chunks.
    """
    out = Path(out_dir)
    plan_path = out / PLAN_NAME
    if not plan_path.is_file():
        raise FileNotFoundError(f"{out} has no {PLAN_NAME}: is it an output of encode_folder?")
    plan = json.loads(plan_path.read_text())
    images = ImageList.from_json(plan["images"])
    n, cs, n_bits = len(images), int(plan["settings"]["chunk_size"]), int(plan["settings"]["n_bits"])
    n_chunks = -(-n // cs)
    missing = [c for c in range(n_chunks) if not _chunk_path(out, c).is_file()]
    if missing:
        raise IncompleteEncoding(f"{out}: {len(missing)} of {n_chunks} chunks missing (e.g. {missing[:5]}): "
                                 "run the shards that own them again with resume")
    packed = np.zeros((n, C.n_bytes(n_bits)), np.uint8)
    real = np.zeros((n, n_bits), np.float32)
    ok = np.zeros(n, bool)
    errors: dict[int, str] = {}
    for c in range(n_chunks):
        path = _chunk_path(out, c)
        want = np.arange(c * cs, min((c + 1) * cs, n), dtype=np.int64)
        try:
            with np.load(path) as z:
                parts = {k: z[k] for k in ("positions", "packed", "real", "ok", "errors", "plan")}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is unreadable ({e}): delete it and resume") from None
        if str(parts["plan"]) != plan["key"] or not np.array_equal(parts["positions"], want) \
                or parts["packed"].shape != (len(want), packed.shape[1]) or parts["real"].shape != (len(want), n_bits):
            raise ValueError(f"{path} does not belong to {plan_path} (other photos or settings): "
                             "delete it and resume")
        packed[want], real[want], ok[want] = parts["packed"], parts["real"], parts["ok"]
        errors.update(zip(want[~parts["ok"]].tolist(), parts["errors"].tolist(), strict=True))
    return Encoded(images, packed, real, ok, errors, n_bits, plan)
