"""Typed run configuration: defaults live in dataclasses, YAML files and dotted
``key=value`` overrides change them, and the resolved result is saved into every run."""
from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    dataset: str = "kaggle"  # kaggle | fashion_mnist | manifest
    root: str | None = None  # Kaggle folder / manifest CSV / Fashion-MNIST npz; None = default
    label_key: str = "articleType"  # a manifest's label column is usually "label"
    # None: scaled with the catalogue (50 / 1000 / 1000 on the Kaggle photos and
    # Fashion-MNIST, less on a catalogue of a few hundred photos; see data/splits.py)
    min_per_class: int | None = None
    n_query: int | None = None
    n_val: int | None = None
    split_seed: int = 0
    limit: int | None = None  # subsample the catalogue (tests, smoke runs)
    n_views: int = 1  # augmented views per training item (item-level positives)
    n_damaged: int = 1000  # damaged query copies for the same-product evaluation
    augment_strength: float = 1.0
    # shrink an uploaded photo larger than the catalogue's photos to their size before
    # encoding: a sharp phone photo then looks like the thumbnails the index was made from
    query_shrink: bool = True


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    image_size: int = 128
    # frozen (cached features, the head trains) | partial (cached activations at the input of
    # block train_from, the blocks from there, the head conv and the head train; CPU-friendly)
    # | finetune (end to end on photos; for a machine with an accelerator)
    mode: str = "frozen"
    # partial mode: the first trained block of the EfficientNet-Lite backbone (negative counts
    # from the end; -1 = its last block, on 192x7x7 activations at 224 px for Lite0)
    train_from: int = -1
    n_bits: int = 64
    hidden: int = 1024
    dropout: float = 0.1
    # photo -> features / codes: onnx (fast) | torch | onnx_int8 (frozen EfficientNet-Lite:
    # int8 convolutions, ~2x faster on CPU, its own feature caches; models/quantize.py)
    engine: str = "onnx"
    # onnx_int8: the last blocks of the trunk kept float32 with its head conv (0 = all int8);
    # they feed the second-stage descriptor, the most int8-sensitive output (docs/results.md)
    int8_float_tail: int = 0
    # onnx_int8: the stem and the first blocks kept float32 (0 = all int8): the int8 error of
    # the descriptor comes from these layers, on the largest maps (docs/results.md)
    int8_float_front: int = 0


@dataclass
class MethodConfig:
    name: str = "adversarial"
    params: dict[str, Any] = field(default_factory=dict)  # method-specific hyper-parameters


@dataclass
class TrainConfig:
    epochs: int = 20  # with patience > 0: the most epochs
    # early stopping: stop once select_metric on val has not improved for this many epochs
    # (the best epoch's checkpoint is kept either way); 0 = train all the epochs
    patience: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    lr_disc: float = 1e-3
    lr_backbone: float = 1e-4  # the trained backbone: finetune mode, the tail in partial mode
    weight_decay: float = 1e-5
    seed: int = 0
    # best checkpoint by this val score (never the test queries): map@1000 | top1, and in frozen
    # or partial mode with data.n_damaged > 0 also same_product_top1 | same_product_top10 | graded_ndcg@10
    select_metric: str = "map@1000"
    num_workers: int = 2
    # None: the cores shared by the local processes (fastest on quiet cores; beside another
    # busy process 1 thread is far faster: two spin-waited through 240 s epochs where one took 7 s)
    threads: int | None = None
    # where the networks train: auto (a CUDA GPU when torch sees one and the run has one
    # process, else the CPU) | cpu | cuda. Features are still cached on the CPU (ONNX)
    device: str = "auto"
    # float32 | bfloat16: the heads' matrix products while training (models/heads.py:
    # PRECISIONS); validation and evaluation stay float32
    precision: str = "float32"


@dataclass
class DescriptorConfig:
    """Second stage of search (frozen EfficientNet-Lite runs): a float descriptor of the
    backbone, PCA-whitened on the catalogue and stored as int8, re-ranks the Hamming shortlist."""

    kind: str = "none"  # none | gem (GeM of the last feature map and of the last block)
    scales: list[int] = field(default_factory=list)  # input sizes averaged; [] = model.image_size
    dim: int = 512  # whitened dimensions = int8 bytes stored per item
    shortlist: int = 0  # candidates re-ranked; 0 = chosen on the validation split
    # the code that makes the shortlist: 0 the hash code, B the signs of the descriptor's B
    # leading components (keeps the very product); -1 chosen on val among SIGN_BITS
    sign_bits: int = -1
    # a linear projection trained on augmented views (kept only if it beats the whitening on val)
    learn_epochs: int = 0  # 0 = PCA-whitening only
    learn_items: int = 10000  # training photos whose views it sees
    learn_views: int = 2  # augmented views per photo (besides the photo itself)
    learn_tau: float = 0.05
    # Adam; on val (80 epochs, one view) top-1 0.620 at 1e-3, 0.656 at 3e-3, 0.666 at 1e-2, 0.672 at 3e-2
    learn_lr: float = 0.02


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (a ValueError too, so the CLI reports it cleanly)."""


def _coerce(value: str) -> Any:
    """A command-line value as YAML would read it (numbers, bools, null, lists)."""
    return yaml.safe_load(value)


# YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) as a string; such values are numbers here.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Field name -> the types its annotation allows (``int | None`` -> ``(int, NoneType)``)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
            typing.get_origin(hint) is typing.Union else (hint,)
        out[name] = tuple(typing.get_origin(a) or a for a in args)
    return out


def _typed(value: Any, allowed: tuple[type, ...], key: str, where: str) -> Any:
    """``value`` as the field's declared type, or a TypeError naming the key."""
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigTypeError(f"{where}: {key!r} cannot be null")
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise ConfigTypeError(f"{where}: {key!r} takes true/false, got {value!r}")
    if isinstance(value, bool) and (int in allowed or float in allowed):
        raise ConfigTypeError(f"{where}: {key!r} takes a number, got {value!r}")
    if float in allowed and isinstance(value, (int, float)):
        return float(value)
    if int in allowed:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise ConfigTypeError(f"{where}: {key!r} takes a whole number, got {value!r}")
    if float in allowed:
        raise ConfigTypeError(f"{where}: {key!r} takes a number, got {value!r}")
    if str in allowed and isinstance(value, (str, int, float)):
        return str(value)
    if dict in allowed and isinstance(value, dict):
        return {k: _number(v) for k, v in value.items()}
    if any(isinstance(value, t) for t in allowed):
        return value
    raise ConfigTypeError(f"{where}: {key!r} cannot be {value!r}")


def _apply(obj: Any, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
        elif dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            obj = getattr(obj, part)
        else:
            raise KeyError(f"{where}: unknown config key {'.'.join(parts[:i + 1])!r}")
    last = parts[-1]
    value = _number(value)
    if isinstance(obj, dict):
        obj[last] = value
        return
    names = {f.name for f in dataclasses.fields(obj)}
    if last not in names:
        raise KeyError(f"{where}: unknown config key {key!r}; known here: {sorted(names)}")
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where}: {key!r} takes a mapping")
        for k, v in value.items():
            _apply(current, k, v, where)
        return
    setattr(obj, last, _typed(value, _field_types(type(obj))[last], key, where))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | dict | None = None) -> Config:
    """Defaults <- ``base`` (a resolved dict from a run) <- YAML file <- ``key=value`` overrides."""
    cfg = Config()
    if isinstance(base, Config):
        cfg = base
    elif isinstance(base, dict):
        for k, v in base.items():
            _apply(cfg, k, v, "saved config")
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file is a mapping")
        for k, v in data.items():
            _apply(cfg, k, v, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        _apply(cfg, k.strip(), _coerce(v), "override")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when uncommitted changes exist)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
