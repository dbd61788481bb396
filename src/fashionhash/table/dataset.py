"""One dataset of the table, opened once: its config, the split every run shares, the
positions the evaluation uses, the cached backbone features and the backbone's time."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionhash.config import Config, load_config
from fashionhash.data.catalogue import GRADED_ATTRIBUTES
from fashionhash.files import atomic_write
from fashionhash.pipeline import DAMAGED_SEED, VIEW_SEED, PhaseFactory, int8_calibration, item_features, open_data
from fashionhash.table.plan import Plan

log = logging.getLogger(__name__)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> None:
    atomic_write(path, [json.dumps(obj, indent=1).encode()])


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: a != b`` for every dotted key where two config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


@dataclass
class Data:
    """A dataset opened once: catalogue, shared split, positions and labels of the parts
    the evaluation uses (same filtering as ``evaluate_run``)."""

    plan: Plan
    cfg: Config
    runs: Path  # <runs>/<dataset>
    split_path: Path
    cat: object
    split: object
    keys: tuple[str, ...]  # graded attributes of this catalogue
    pos_q: np.ndarray = None
    pos_db: np.ndarray = None
    pos_dam: np.ndarray = None
    backbone_ms: float = 0.0  # per photo (decode + resize + backbone)
    phase: PhaseFactory | None = None  # progress of the feature computation (the CLI's bars)

    def attrs(self, pos: np.ndarray) -> dict:
        return {k: self.cat.attrs[k][pos] for k in self.keys}

    def labels(self, pos: np.ndarray) -> np.ndarray:
        return self.cat.labels[pos]

    def features(self, pos: np.ndarray, augment_seed: int | None = None,
                 label: str = "features") -> tuple[np.ndarray, np.ndarray]:
        """``(N, F)`` backbone features of catalogue positions (from the cache) and their ok mask."""
        return item_features(self.cat, pos, self.cfg.model, augment_seed=augment_seed,
                             strength=self.cfg.data.augment_strength if augment_seed is not None else 1.0,
                             num_workers=self.cfg.train.num_workers, calibration=int8_calibration(self.cfg),
                             progress=self.phase(f"{self.plan.key} {label}", len(pos)) if self.phase else None)


def open_dataset(plan: Plan, runs: Path, n_views: int, phase: PhaseFactory | None = None) -> Data:
    """Open ``plan``'s dataset under ``runs``: the split (written once, reused after) and
    every cached feature array the runs need (``n_views`` augmented views of the training
    items), computed once up front (``phase``: progress bars for those computed)."""
    cfg = load_config(plan.config, plan.overrides)
    if cfg.model.mode != "frozen":  # every row reads the same cached features
        raise ValueError(f"{plan.key}: the table runs on frozen backbone features, not {cfg.model.mode!r}")
    ds_dir = runs / plan.key
    ds_dir.mkdir(parents=True, exist_ok=True)
    split_path = ds_dir / "split.json"
    existed = split_path.is_file()
    # the shared split belongs to one data config (subset, query counts...): never mix
    data_cfg = {"data": cfg.to_dict()["data"]}
    saved = read_json(ds_dir / "data_config.json")
    if saved is not None and saved != data_cfg:
        raise FileExistsError(f"{ds_dir} holds runs of another data config "
                              f"({'; '.join(config_diff(saved, data_cfg))}): delete it or pass another --runs")
    write_json(ds_dir / "data_config.json", data_cfg)
    cat, split = open_data(cfg, split_path)  # writes the split once; later runs reuse the file
    log.info("%s: split %s at %s (%d queries, %d val, %d database, %d classes)", plan.key,
             "reused" if existed else "written", split_path, len(split.query), len(split.val),
             len(split.database), len(split.protocol["classes"]))
    keys = tuple(k for k in GRADED_ATTRIBUTES if k in cat.attrs)
    d = Data(plan, cfg, ds_dir, split_path, cat, split, keys, phase=phase)
    t0 = time.time()
    _cache_features(d, n_views)
    log.info("%s: backbone features ready in %.0fs (cached in the feature cache)", plan.key, time.time() - t0)
    d.backbone_ms = backbone_ms_per_photo(d)
    return d


def _cache_features(d: Data, n_views: int) -> None:
    """Compute (or read back) every feature array of the runs; set the query, database and
    damaged positions the evaluation keeps (``evaluate_run`` drops unreadable photos before
    taking the damaged copies: the same here)."""
    split = d.split
    train = d.cat.positions(split.train)
    d.features(train, label="features train")
    d.features(d.cat.positions(split.val), label="features val")
    for v in range(n_views):
        d.features(train, augment_seed=VIEW_SEED + v, label=f"features view {v + 1}")
    pos_q, pos_db = d.cat.positions(split.query), d.cat.positions(split.database)
    d.pos_q = pos_q[d.features(pos_q, label="features queries")[1]]
    d.pos_db = pos_db[d.features(pos_db, label="features database")[1]]
    d.pos_dam = d.pos_q[:min(d.cfg.data.n_damaged, len(d.pos_q))]
    if len(d.pos_dam):
        d.features(d.pos_dam, augment_seed=DAMAGED_SEED, label="features damaged queries")


def backbone_ms_per_photo(d: Data) -> float:
    """Throughput of photo -> backbone features (JPEG decode, letterbox, EfficientNet-Lite0
    through ONNX Runtime), measured once per dataset on uncached query photos into
    ``backbone_timing.json`` (delete it to measure again on a quiet machine)."""
    saved = read_json(d.runs / "backbone_timing.json")
    if saved:
        return saved["ms_per_photo"]
    from fashionhash.models.features import extract_features

    m = d.cfg.model
    sources = d.cat.sources()
    paths = [sources[i] for i in d.pos_q[:288]]
    cal = int8_calibration(d.cfg)
    extract_features(paths[:32], m.backbone, image_size=m.image_size, engine=m.engine,
                     num_workers=d.cfg.train.num_workers, calibration=cal)  # warm-up: sessions, worker pool
    t0 = time.time()
    extract_features(paths[32:], m.backbone, image_size=m.image_size, engine=m.engine,
                     num_workers=d.cfg.train.num_workers, calibration=cal)
    ms = 1000 * (time.time() - t0) / max(1, len(paths) - 32)
    write_json(d.runs / "backbone_timing.json", {"ms_per_photo": ms, "n": len(paths) - 32,
                                                 "load": os.getloadavg()})
    log.info("%s: backbone %.2f ms per photo (decode + ONNX, %d photos)", d.plan.key, ms, len(paths) - 32)
    return ms
