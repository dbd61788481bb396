"""Glue between data, models and codes, shared by training, evaluation, the CLI and the
service: open a run's data, compute (cached) backbone features, build and load a run's
model, and turn items or photos into codes.

Data flows one way: photos -> data -> models -> codes. Nothing here imports training.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from fashionhash.config import Config, ModelConfig, load_config
from fashionhash.data.cache import array_digest, cache_has, cached_array
from fashionhash.data.catalogue import GRADED_ATTRIBUTES, Catalogue, open_catalogue
from fashionhash.data.splits import Split, make_split
from fashionhash.methods import METHODS, HashingMethod
from fashionhash.models.backbones import BACKBONES, preprocessing_for
from fashionhash.models.device import device_of, resolve_device

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from fashionhash.descriptors import Whitening
    from fashionhash.models.features import FeatureExtractor
    from fashionhash.models.quantize import Calibration


Progress = Callable[[int], None]
#: (phase name, total) -> its progress callback or None: what the CLI's bars provide
PhaseFactory = Callable[[str, int], "Progress | None"]
PARTS = ("train", "val", "query")
#: seeds of the augmentation streams: training views, damaged test-query and val copies differ
VIEW_SEED, DAMAGED_SEED, VAL_DAMAGED_SEED = 1_000, 9_000, 9_500
#: the int8 engine's calibration: this many training photos, drawn with this seed
INT8_CALIBRATION_PHOTOS, INT8_CALIBRATION_SEED = 64, 12_000


def open_data(cfg: Config, split_path: Path | None = None) -> tuple[Catalogue, Split]:
    """The catalogue and the split: loaded from ``split_path`` when it exists (every
    method of a comparison uses the same file), else drawn from the config and saved there."""
    d = cfg.data
    cat = open_catalogue(d.dataset, d.root, label_key=d.label_key)
    if d.limit:
        # a seeded, class-stratified-enough subsample: random items, fixed seed
        rng = np.random.default_rng(d.split_seed + 7)
        keep = np.sort(rng.choice(len(cat), size=min(d.limit, len(cat)), replace=False))
        cat = cat.subset(keep)
    if split_path is not None and Path(split_path).is_file():
        split = Split.load(split_path)
    else:
        split = make_split(cat, seed=d.split_seed, n_query=d.n_query, n_val=d.n_val,
                           min_per_class=d.min_per_class)
        if split_path is not None:
            split.save(split_path)
    return cat, split


@dataclass
class Labels:
    """Class indices and attribute indices of catalogue items (positions)."""

    classes: list[str]
    y: np.ndarray  # (N,) int64, -1 for items of excluded classes
    attrs: np.ndarray  # (N, A) int64 attribute value indices (-1 = missing)
    attr_keys: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def build(cls, cat: Catalogue, classes: Sequence[str]) -> "Labels":
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.array([lookup.get(v, -1) for v in cat.labels], dtype=np.int64)
        keys = tuple(k for k in GRADED_ATTRIBUTES if k in cat.attrs and k != cat.label_key)
        cols = []
        for k in keys:
            vals = cat.attrs[k]
            uniq, inv = np.unique(vals, return_inverse=True)
            inv = inv.astype(np.int64)
            inv[vals == ""] = -1
            cols.append(inv)
        attrs = np.stack(cols, axis=1) if cols else np.zeros((len(cat), 0), np.int64)
        return cls(list(classes), y, attrs, keys)

    def attr_sizes(self) -> list[int]:
        """Number of values of each attribute column (max index + 1), for attribute heads."""
        return [int(col.max()) + 1 if col.size and col.max() >= 0 else 1 for col in self.attrs.T]


def check_engine(m: ModelConfig) -> None:
    """Refuse an engine this model cannot use, before anything is computed."""
    from fashionhash.models.features import ENGINES

    if m.engine not in ENGINES:
        raise ValueError(f"model.engine is one of {', '.join(ENGINES)}, not {m.engine!r}")
    if m.engine == "onnx_int8" and (m.mode != "frozen" or not m.backbone.startswith("efficientnet")):
        # partial mode would need an int8 front cut at block train_from and its own activation
        # caches (and the tail trained on int8 activations): not built
        raise ValueError("model.engine=onnx_int8 quantizes a frozen EfficientNet-Lite backbone: it needs "
                         f"model.mode=frozen and an efficientnet_lite backbone, not {m.mode}/{m.backbone} "
                         "(partial and finetune runs: model.engine=onnx or torch)")
    if m.engine == "onnx_int8":
        from fashionhash.models.partial import _n_blocks

        n = _n_blocks(m.backbone)
        if not 0 <= m.int8_float_tail <= n:
            raise ValueError(f"model.int8_float_tail={m.int8_float_tail}: the number of final blocks of "
                             f"{m.backbone} the int8 engine keeps float32, 0..{n}")
        if not 0 <= m.int8_float_front < n or m.int8_float_front + m.int8_float_tail > n:
            raise ValueError(f"model.int8_float_front={m.int8_float_front}: the number of first blocks of "
                             f"{m.backbone} the int8 engine keeps float32 with the stem, 0..{n - 1}, and "
                             f"with int8_float_tail={m.int8_float_tail} at most {n} blocks in all")


_CALIBRATIONS: dict[str, "Calibration"] = {}


def int8_calibration(cfg: Config) -> "Calibration | None":
    """The int8 engine's calibration photos for ``cfg`` (None for the fp32 engines): a
    seeded sample of the training split of ``cfg.data``'s catalogue, whatever catalogue is
    being encoded, so that the catalogue's features and the run's query encoder are made by
    the same int8 backbone, with ``model.int8_float_tail`` / ``int8_float_front`` (the last /
    first blocks kept float32).
    The photos are drawn once per process and data config."""
    check_engine(cfg.model)
    if cfg.model.engine != "onnx_int8":
        return None
    from fashionhash.models.quantize import Calibration

    key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)
    if key not in _CALIBRATIONS:
        cat, split = open_data(cfg)
        train = cat.positions(split.train)
        rng = np.random.default_rng(INT8_CALIBRATION_SEED)
        pick = np.sort(rng.choice(train, size=min(INT8_CALIBRATION_PHOTOS, len(train)), replace=False))
        if cat.paths is not None:
            _CALIBRATIONS[key] = Calibration.from_files(cat.paths[pick])
        else:  # pixel catalogues: PNG-encode the arrays so the calibration is bytes as well
            _CALIBRATIONS[key] = Calibration(tuple(_png(cat.pixels[i]) for i in pick))
    return dataclasses.replace(_CALIBRATIONS[key], float_tail=cfg.model.int8_float_tail,
                               float_front=cfg.model.int8_float_front)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _sources(cat: Catalogue, positions: np.ndarray) -> list:
    # cat.sources() builds a list of every item: once, not once per position
    return list(cat.paths[positions]) if cat.paths is not None else [cat.pixels[i] for i in positions]


def _extract(cat: Catalogue, positions: np.ndarray, mcfg: ModelConfig, *, augment_seed: int | None,
             strength: float, progress: Progress | None, num_workers: int,
             calibration: "Calibration | None") -> tuple[np.ndarray, np.ndarray]:
    from fashionhash.models.features import extract_features

    return extract_features(
        _sources(cat, positions), mcfg.backbone, image_size=mcfg.image_size, engine=mcfg.engine,
        augment_seed=augment_seed, augment_strength=strength, progress=progress,
        num_workers=num_workers, calibration=calibration,
    )


def _feature_key(cat: Catalogue, positions: np.ndarray, backbone: str, size: int,
                 augment_seed: int | None, strength: float, output: str = "pooled",
                 calibration: "Calibration | None" = None) -> dict:
    key = {
        "catalogue": cat.fingerprint(), "positions": array_digest(positions),
        "backbone": backbone, "size": size,
        "augment_seed": augment_seed, "strength": strength if augment_seed is not None else None,
        "version": 1,
    }
    if output != "pooled":  # pooled entries keep the key they always had
        key["output"] = output
    if calibration is not None:  # int8 features; the fp32 engines agree to ~1e-5 and share keys
        key["engine"] = "onnx_int8"
        key["int8"] = calibration.tag  # the photos and the recipe's version
    return key


def _extract_descriptors(cat: Catalogue, positions: np.ndarray, backbone: str, size: int, *,
                         pooled: bool, augment_seed: int | None, strength: float,
                         progress: Progress | None, num_workers: int,
                         calibration: "Calibration | None" = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One backbone pass: ``(pooled (N, F) or None, raw descriptors (N, D), ok (N,))``, on
    the int8 engine when ``calibration`` is given, else on ONNX fp32."""
    from fashionhash.models.descriptor import DescriptorNet
    from fashionhash.models.features import extract_features

    net = DescriptorNet(BACKBONES.build(backbone), pooled=pooled).eval()
    out, ok = extract_features(_sources(cat, positions), backbone, image_size=size, model=net,
                               augment_seed=augment_seed, augment_strength=strength,
                               progress=progress, num_workers=num_workers,
                               engine="onnx" if calibration is None else "onnx_int8",
                               calibration=calibration)
    return (out[:, :net.lead_dim] if pooled else None), out[:, net.lead_dim:], ok


def item_features(cat: Catalogue, positions: np.ndarray, mcfg: ModelConfig, *,
                  augment_seed: int | None = None, strength: float = 1.0,
                  progress: Progress | None = None, num_workers: int = 2,
                  descriptors: bool = False,
                  calibration: "Calibration | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Cached backbone features of catalogue items: ``(n, F)`` float32 and ``(n,)`` ok mask.

    With ``augment_seed``, of an augmented copy of each item (deterministic per item).
    ``descriptors``: when the features must be computed, compute the items' raw descriptors
    at this size in the same pass and cache them too (see :func:`item_descriptors`).
    ``calibration``: required with ``mcfg.engine == "onnx_int8"``, from
    :func:`int8_calibration` of the run's config."""
    positions = np.asarray(positions, dtype=np.int64)
    check_engine(mcfg)
    if (mcfg.engine == "onnx_int8") != (calibration is not None):
        raise ValueError("item_features: pass calibration=int8_calibration(cfg) with model.engine=onnx_int8, "
                         "and only then")
    key = _feature_key(cat, positions, mcfg.backbone, mcfg.image_size, augment_seed, strength,
                       calibration=calibration)
    if descriptors and not cache_has(key):
        dkey = _feature_key(cat, positions, mcfg.backbone, mcfg.image_size, augment_seed, strength,
                            "descriptor", calibration)
        pooled, desc, ok = _extract_descriptors(
            cat, positions, mcfg.backbone, mcfg.image_size, pooled=True, augment_seed=augment_seed,
            strength=strength, progress=progress, num_workers=num_workers, calibration=calibration)
        cached_array(dkey, lambda: (desc, ok))
        return cached_array(key, lambda: (pooled, ok))
    return cached_array(key, lambda: _extract(cat, positions, mcfg, augment_seed=augment_seed,
                                              strength=strength, progress=progress,
                                              num_workers=num_workers, calibration=calibration))


def item_activations(cat: Catalogue, positions: np.ndarray, mcfg: ModelConfig, *,
                     augment_seed: int | None = None, strength: float = 1.0,
                     progress: Progress | None = None, num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Partial mode: cached activations of catalogue items at the input of block
    ``model.train_from``, ``(n, C*h*w)`` float16 and ``(n,)`` ok mask (augmented copies with
    ``augment_seed``, drawn as :func:`item_features` draws them)."""
    from fashionhash.models.partial import extract_activations, tail_start

    check_engine(mcfg)  # no int8 front: its activations would share the fp32 entries' keys
    positions = np.asarray(positions, dtype=np.int64)
    start = tail_start(mcfg.backbone, mcfg.train_from)
    # the block, not train_from: -1 and 15 of Lite0 share one entry
    key = _feature_key(cat, positions, mcfg.backbone, mcfg.image_size, augment_seed, strength,
                       f"blocks[:{start}] float16")
    return cached_array(key, lambda: extract_activations(
        _sources(cat, positions), mcfg.backbone, mcfg.image_size, start, engine=mcfg.engine,
        augment_seed=augment_seed, strength=strength, progress=progress, num_workers=num_workers),
        dtype=np.float16)


def item_inputs(cat: Catalogue, positions: np.ndarray, cfg: Config, *, augment_seed: int | None = None,
                strength: float = 1.0, progress: Progress | None = None, num_workers: int = 2,
                descriptors: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What a frozen or partial run's method encodes, cached: pooled features ``(n, F)``
    (frozen; with ``descriptors``, the raw descriptors are cached in the same pass, see
    :func:`item_features`) or activations ``(n, C*h*w)`` float16 (partial), and the
    ``(n,)`` ok mask."""
    if cfg.model.mode == "partial":
        return item_activations(cat, positions, cfg.model, augment_seed=augment_seed, strength=strength,
                                progress=progress, num_workers=num_workers)
    return item_features(cat, positions, cfg.model, augment_seed=augment_seed, strength=strength,
                         progress=progress, num_workers=num_workers, descriptors=descriptors,
                         calibration=int8_calibration(cfg))


def descriptor_scales(cfg: Config) -> list[int]:
    """Input sizes the descriptor averages over (the model's own size first)."""
    sizes = [int(s) for s in cfg.descriptor.scales] or [cfg.model.image_size]
    return sorted(set(sizes), key=lambda s: (s != cfg.model.image_size, s))


def check_descriptor_config(cfg: Config) -> None:
    """Refuse descriptor settings this run cannot use, before anything is computed."""
    d = cfg.descriptor
    if d.kind == "none":
        return
    if d.kind != "gem":
        raise ValueError(f"descriptor.kind is none or gem, not {d.kind!r}")
    if cfg.model.mode != "frozen" or not cfg.model.backbone.startswith("efficientnet"):
        # partial mode would need the descriptor of the trained tail (not built yet)
        raise ValueError(f"descriptors need model.mode=frozen with an EfficientNet-Lite backbone, not "
                         f"model.mode={cfg.model.mode} with {cfg.model.backbone}: set descriptor.kind=none "
                         "for the single-stage codes")
    if d.dim <= 0 or d.shortlist < 0 or any(int(s) < 32 for s in d.scales):
        raise ValueError("descriptor.dim must be > 0, descriptor.shortlist >= 0 and every scale >= 32 px")
    if d.sign_bits != -1 and (d.sign_bits < 0 or d.sign_bits % 8 or d.sign_bits > d.dim):
        raise ValueError(f"descriptor.sign_bits is -1 (chosen on val), 0 (the hash code) or a multiple "
                         f"of 8 up to descriptor.dim={d.dim}, not {d.sign_bits}")


def combine_scales(per_scale: Sequence[np.ndarray]) -> np.ndarray:
    """Raw descriptors at several input sizes ``[(N, D), ...]`` -> ``(N, D)`` unit rows of
    their sum: one descriptor that is less sensitive to the photo's scale."""
    total = np.sum([np.asarray(d, np.float32) for d in per_scale], axis=0)
    return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)


def item_descriptors(cat: Catalogue, positions: np.ndarray, cfg: Config, *,
                     augment_seed: int | None = None, strength: float = 1.0,
                     progress: Progress | None = None, num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Cached raw (not yet whitened) descriptors of catalogue items over the configured
    scales: ``(n, D)`` float32 unit rows and ``(n,)`` ok mask."""
    positions = np.asarray(positions, dtype=np.int64)
    m = cfg.model
    calibration = int8_calibration(cfg)
    per_scale, ok_all = [], np.ones(len(positions), bool)
    for size in descriptor_scales(cfg):
        if size == m.image_size:  # shares the pass with the pooled features when both are missing
            item_features(cat, positions, m, augment_seed=augment_seed, strength=strength,
                          progress=progress, num_workers=num_workers, descriptors=True,
                          calibration=calibration)
        key = _feature_key(cat, positions, m.backbone, size, augment_seed, strength, "descriptor",
                           calibration)

        def compute(size: int = size) -> tuple[np.ndarray, np.ndarray]:
            _, desc, ok = _extract_descriptors(cat, positions, m.backbone, size, pooled=False,
                                               augment_seed=augment_seed, strength=strength,
                                               progress=progress, num_workers=num_workers,
                                               calibration=calibration)
            return desc, ok
        desc, ok = cached_array(key, compute)
        per_scale.append(desc)
        ok_all &= ok
    return combine_scales(per_scale), ok_all


DESCRIPTOR_FILES = ("descriptor.npz", "descriptor.json")


def save_descriptor(run_dir: str | Path, whitening: "Whitening", **meta) -> None:
    """Save a run's fitted descriptor whitening and its settings (shortlist, val scores)."""
    run_dir = Path(run_dir)
    whitening.save(run_dir / DESCRIPTOR_FILES[0])
    meta = dict(meta, dim=whitening.dim, digest=whitening.digest())
    (run_dir / DESCRIPTOR_FILES[1]).write_text(json.dumps(meta, indent=1))


def image_array(source, spec, size: int, rng: np.random.Generator | None = None,
                strength: float = 1.0) -> np.ndarray:
    """One photo (path, PIL image or ``(H, W)`` uint8 array) -> model input ``(C, S, S)``,
    augmented when ``rng`` is given. Raises ``ImageError`` for an unreadable photo."""
    from PIL import Image

    from fashionhash.data.transforms import augment, load_image, preprocess

    if isinstance(source, np.ndarray):
        img = Image.fromarray(source).convert("RGB")
    elif isinstance(source, Image.Image):
        img = source.convert("RGB")
    else:
        img = load_image(source)
    if rng is not None:
        img = augment(img, rng, strength)
    return preprocess(img, size, spec.mean, spec.std, channels=spec.channels)


@functools.lru_cache(maxsize=None)
def feature_dim(backbone: str) -> int:
    """Width of a backbone's pooled features."""
    return int(BACKBONES.build(backbone, pretrained=False).feat_dim)


MODES = ("frozen", "partial", "finetune")


def check_model_config(cfg: Config) -> None:
    """Refuse a model mode this run cannot train, before anything is written: an unknown
    mode or engine, ``model.engine=onnx_int8`` outside frozen mode (no int8 front for partial
    mode's activations); in partial mode a backbone that is not EfficientNet-Lite, a block out
    of range, or a method fitted in closed form (it has no gradient to give the tail)."""
    m = cfg.model
    if m.mode not in MODES:
        raise ValueError(f"model.mode is one of {', '.join(MODES)}, not {m.mode!r}")
    check_engine(m)  # onnx_int8: frozen EfficientNet-Lite runs only
    if m.mode != "partial":
        return
    from fashionhash.models.partial import tail_start

    tail_start(m.backbone, m.train_from)
    if hasattr(METHODS.get(cfg.method.name), "fit"):
        raise ValueError(f"{cfg.method.name} is fitted in closed form on cached features, with "
                         "nothing to train in a backbone tail: use model.mode=frozen")


def _backbone(m: ModelConfig) -> torch.nn.Module | None:
    """The method's own backbone: the whole network (finetune), its tail from block
    ``train_from`` with ImageNet weights (partial), none on cached features (frozen)."""
    if m.mode == "finetune":
        return BACKBONES.build(m.backbone)
    if m.mode == "partial":
        from fashionhash.models.partial import BackboneTail, tail_start

        return BackboneTail(BACKBONES.build(m.backbone), tail_start(m.backbone, m.train_from), m.image_size)
    return None


def build_method(cfg: Config, n_classes: int, attr_sizes: Sequence[int] | None = None) -> HashingMethod:
    """The configured method, with a backbone inside in finetune mode (the whole network)
    and partial mode (the tail)."""
    check_model_config(cfg)
    m = cfg.model
    backbone = _backbone(m)
    # frozen mode trains on cached features: the backbone is only built to read its width
    feat_dim = backbone.feat_dim if backbone is not None else feature_dim(m.backbone)
    factory = METHODS.get(cfg.method.name)
    params = dict(cfg.method.params)
    # methods with attribute heads (SGML) are told how many values each attribute has
    if attr_sizes is not None and "attr_sizes" not in params \
            and "attr_sizes" in inspect.signature(factory).parameters:
        params["attr_sizes"] = [int(n) for n in attr_sizes]
    return factory(feat_dim, m.n_bits, n_classes, hidden=m.hidden, dropout=m.dropout,
                   backbone=backbone, **params)


@dataclass
class Run:
    """A trained run loaded for inference (best checkpoint, eval mode)."""

    path: Path
    cfg: Config
    method: HashingMethod
    classes: list[str]
    meta: dict
    _encoders: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def n_bits(self) -> int:
        return self.cfg.model.n_bits

    @torch.no_grad()
    def codes_from_inputs(self, x: np.ndarray | torch.Tensor, batch: int = 4096) -> np.ndarray:
        """Features (frozen), activations (partial) or preprocessed images (finetune)
        ``(N, ...)`` -> relaxed ``(N, K)``."""
        self.method.eval()
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        if x.shape[1:].numel() > 4096:  # activations or images: their maps, not the rows, weigh
            batch = min(batch, 256)
        device = device_of(self.method)
        out = [self.method.encode(x[i:i + batch].float().to(device)).cpu() for i in range(0, len(x), batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_bits), np.float32)

    def _engine(self, engine: str | None) -> str:
        """``engine`` or the run's; refuses mixing int8 and fp32: the catalogue's features
        (the index) were made by one of them, and codes of the other differ in a few bits."""
        own = self.cfg.model.engine
        engine = engine or own
        if (engine == "onnx_int8") != (own == "onnx_int8"):
            raise ValueError(f"{self.path} was made with model.engine={own}: photos must be encoded with "
                             f"{'onnx_int8' if own == 'onnx_int8' else 'onnx or torch'}, not {engine}")
        return engine

    def encoder(self, engine: str | None = None) -> "FeatureExtractor":
        """The whole encoder (photos -> relaxed codes ``(N, K)``) in ``engine`` (``"onnx"``,
        ``"torch"`` or, for int8 runs only, ``"onnx_int8"``; default ``model.engine``), built
        once per engine and kept; see :func:`fashionhash.models.encoder.build_encoder`."""
        from fashionhash.models.encoder import build_encoder

        engine = self._engine(engine)
        with self._lock:  # the service may encode from several threads at once
            if engine not in self._encoders:
                options = {"calibration": int8_calibration(self.cfg)} if engine == "onnx_int8" else {}
                self._encoders[engine] = build_encoder(self.method, self.cfg.model, engine, **options)
            return self._encoders[engine]

    @functools.cached_property
    def descriptor(self) -> "tuple[Whitening, dict] | None":
        """The fitted descriptor (whitening, settings) when the run has one (evaluation fits
        it on the catalogue), else None."""
        from fashionhash.descriptors import Whitening

        npz, meta = (self.path / f for f in DESCRIPTOR_FILES)
        if self.cfg.descriptor.kind == "none" or not npz.is_file() or not meta.is_file():
            return None
        return Whitening.load(npz), json.loads(meta.read_text())

    def descriptor_encoders(self, engine: str | None = None) -> "list[FeatureExtractor]":
        """Extractors of the two-stage query encoding, built once: at the model's input size
        photos -> ``[relaxed code (K) | raw descriptor (D)]`` in one pass, then at each other
        descriptor scale photos -> raw descriptor."""
        from fashionhash.models.encoder import build_descriptor_encoders

        engine = self._engine(engine)
        with self._lock:
            key = ("descriptor", engine)
            if key not in self._encoders:
                self._encoders[key] = build_descriptor_encoders(
                    self.method, self.cfg.model, engine, descriptor_scales(self.cfg),
                    int8_calibration(self.cfg) if engine == "onnx_int8" else None)
            return self._encoders[key]

    def encode_two_stage(self, sources: Sequence, *, num_workers: int = 0,
                         engine: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Photos -> relaxed codes ``(N, K)``, whitened descriptors ``(N, d)`` float32 and ok
        mask ``(N,)``. Raises ValueError when the run has no fitted descriptor."""
        if self.descriptor is None:
            raise ValueError(f"{self.path} has no fitted descriptor: set descriptor.kind and run "
                             "`fashionhash evaluate` on it")
        sources = list(sources)
        first, *others = self.descriptor_encoders(engine)
        out, ok = first(sources, num_workers=num_workers)
        k = self.n_bits
        per_scale = [out[:, k:]]
        for fx in others:
            desc, good = fx(sources, num_workers=num_workers)
            per_scale.append(desc)
            ok &= good
        return out[:, :k], self.descriptor[0](combine_scales(per_scale)), ok

    def encode_sources(self, sources: Sequence, *, augment_seed: int | None = None,
                       strength: float = 1.0, progress: Progress | None = None,
                       num_workers: int = 2, engine: str | None = None,
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Photos (paths, bytes, PIL images or arrays) -> relaxed codes ``(N, K)`` and ok
        mask ``(N,)``, with the whole encoder in ``engine`` (default ``model.engine``).

        Unreadable photos get a zero code and ``ok=False`` (one summarising warning)."""
        return self.encoder(engine)(list(sources), batch_size=batch_size, num_workers=num_workers,
                                    augment_seed=augment_seed, augment_strength=strength,
                                    progress=progress)


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Load a run directory written by :func:`fashionhash.training.train`, its networks on
    ``device`` (``cpu`` | ``cuda`` | ``auto``, as ``train.device``). On a GPU the run's
    encoder uses the torch engine: ONNX Runtime here runs on the CPU."""

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(cfg_path)
    meta = json.loads((run_dir / "meta.json").read_text())
    ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path} missing: has the run finished an epoch?")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    method = build_method(cfg, len(meta["classes"]), meta.get("attr_sizes"))
    method.load_state_dict(state["method"])
    dev = resolve_device(device)
    method.to(dev).eval()
    # int8 runs keep their engine on ONNX Runtime's CPU: fp32 codes would not match the index
    if dev.type == "cuda" and cfg.model.engine == "onnx":
        log.info("%s on %s: photos are encoded with the torch engine", run_dir, dev)
        cfg.model.engine = "torch"
    meta = dict(meta, checkpoint=checkpoint, checkpoint_epoch=int(state.get("epoch", -1)))
    return Run(run_dir, cfg, method, meta["classes"], meta)
