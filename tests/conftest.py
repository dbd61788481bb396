"""Shared fixtures: the real catalogue (skipped when absent), tiny real and synthetic
catalogues built in a temporary folder, and an isolated feature cache."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fashionhash.data.catalogue import KAGGLE_COLUMNS, default_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "styles.csv").is_file():
        pytest.skip(f"real catalogue not found at {root} (set FASHIONHASH_DATA)")
    return root


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session gets its own feature/ONNX cache; nothing leaks into ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FASHIONHASH_CACHE")
    os.environ["FASHIONHASH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FASHIONHASH_CACHE", None)
    else:
        os.environ["FASHIONHASH_CACHE"] = old


def _real_rows(data_root: Path, per_class: int, classes: tuple[str, ...]) -> list[dict]:
    out, counts = [], {c: 0 for c in classes}
    with open(data_root / "styles.csv", newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            c = rec.get("articleType")
            if c in counts and counts[c] < per_class and (data_root / "images" / f"{rec['id']}.jpg").is_file():
                counts[c] += 1
                out.append(rec)
            if all(v >= per_class for v in counts.values()):
                break
    return out


@pytest.fixture(scope="session")
def tiny_kaggle(data_root, tmp_path_factory) -> Path:
    """A Kaggle-layout folder with 4 article types x 40 real photos, plus the quirks:
    a row without an image file, a corrupt JPEG and a row with an empty label."""
    root = tmp_path_factory.mktemp("tiny_kaggle")
    (root / "images").mkdir()
    rows = _real_rows(data_root, 40, ("Tshirts", "Jeans", "Watches", "Casual Shoes"))
    for rec in rows:
        shutil.copy(data_root / "images" / f"{rec['id']}.jpg", root / "images" / f"{rec['id']}.jpg")
    corrupt = dict(rows[0], id="99000001")
    (root / "images" / "99000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = dict(rows[1], id="99000002")  # no image file
    empty_label = dict(rows[2], id="99000003", articleType="")
    shutil.copy(data_root / "images" / f"{rows[2]['id']}.jpg", root / "images" / "99000003.jpg")
    with open(root / "styles.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(KAGGLE_COLUMNS))
        w.writeheader()
        for rec in rows + [corrupt, missing, empty_label]:
            w.writerow({k: rec.get(k, "") for k in KAGGLE_COLUMNS})
    return root


@pytest.fixture(scope="session")
def synthetic_fmnist(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped npz (10 classes of 28x28 patterns + noise), no npm needed."""
    rng = np.random.default_rng(0)
    n_per = 60
    protos = rng.integers(0, 256, size=(10, 28, 28))
    pixels, labels, split = [], [], []
    for c in range(10):
        noise = rng.normal(0, 40, size=(n_per, 28, 28))
        pixels.append(np.clip(protos[c] + noise, 0, 255).astype(np.uint8))
        labels.append(np.full(n_per, c))
        split.append(np.array(["test"] * 10 + ["train"] * (n_per - 10)))
    path = tmp_path_factory.mktemp("fmnist") / "fashion-mnist.npz"
    np.savez(path, pixels=np.concatenate(pixels), labels=np.concatenate(labels),
             split=np.concatenate(split))
    return path


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One real Milvus standalone server for the session (``milvus==2.3.5``, the milvus
    extra), its data under the session's tmp dir; stopped at the end whatever happened."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed (pip install '.[milvus]')")
    pytest.importorskip("milvus", reason="milvus==2.3.5 (the server, in the milvus extra; Linux x86_64 only) is not installed")
    from milvus_server import MilvusServer, ServerError

    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"))
    try:
        server.start()
    except ServerError as exc:
        pytest.skip(f"the Milvus server cannot start here: {exc}")
    try:
        yield server
    finally:
        server.stop()


def assert_same_last_checkpoint(a_run: Path, b_run: Path) -> None:
    """The two runs' last checkpoints hold equal weights (a resumed run against an
    uninterrupted one)."""
    import torch

    a = torch.load(a_run / "checkpoints/last.pt", weights_only=False)["method"]
    b = torch.load(b_run / "checkpoints/last.pt", weights_only=False)["method"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
