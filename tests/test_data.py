"""Catalogue readers, manifest, splits and the config system."""
import csv
import logging
import os
import shutil

import numpy as np
import pytest

from fashionhash.config import load_config
from fashionhash.data.catalogue import read_fashion_mnist, read_kaggle, read_manifest
from fashionhash.data.splits import Split, make_split


def test_real_catalogue_reads_with_one_warning(data_root, caplog):
    with caplog.at_level(logging.WARNING):
        cat = read_kaggle(data_root)
    assert len(cat) == 44072
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "374 rows without an image file" in warnings[0].getMessage()
    assert set(cat.attrs) >= {"gender", "articleType", "baseColour", "productDisplayName"}


def test_tiny_catalogue_skips_quirks(tiny_kaggle, caplog):
    with caplog.at_level(logging.WARNING):
        cat = read_kaggle(tiny_kaggle)
    # the corrupt JPEG is listed (it is caught when decoded); the missing file and empty label are not
    assert 99000001 in cat.ids and 99000002 not in cat.ids and 99000003 not in cat.ids
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "1 rows without an image file" in msg and "1 rows with no articleType" in msg


def test_cache_fingerprint_is_the_photos_content(tiny_kaggle, tmp_path, monkeypatch):
    absolute = read_kaggle(tiny_kaggle).fingerprint()
    monkeypatch.chdir(tiny_kaggle.parent)
    assert read_kaggle(tiny_kaggle.name).fingerprint() == absolute
    # a copy elsewhere (new paths and times) and a touched file keep the key: a remount or a
    # `cp -r` of the catalogue reuses its cached features
    copy = tmp_path / "copy"
    shutil.copytree(tiny_kaggle, copy)
    assert read_kaggle(copy).fingerprint() == absolute
    photo = next((copy / "images").glob("*.jpg"))
    st = photo.stat()
    os.utime(photo, (st.st_atime, st.st_mtime + 10))
    assert read_kaggle(copy).fingerprint() == absolute
    # ...but not what the photos are: other bytes give another key
    photo.write_bytes(photo.read_bytes() + b"\0")
    assert read_kaggle(copy).fingerprint() != absolute
    photo.unlink()
    assert read_kaggle(copy).fingerprint() != absolute


def test_manifest(tiny_kaggle, tmp_path, caplog):
    src = read_kaggle(tiny_kaggle)
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "colour"])
        for p, lab, col in zip(src.paths[:10], src.labels[:10], src.attrs["baseColour"][:10]):
            w.writerow([p, lab, col])
        w.writerow([str(tmp_path / "nope.jpg"), "Jeans", "Blue"])
    with caplog.at_level(logging.WARNING):
        cat = read_manifest(path)
    assert len(cat) == 10 and cat.label_key == "label"
    assert list(cat.attrs["colour"]) == list(src.attrs["baseColour"][:10])
    assert "1 rows without an image file" in caplog.text


def test_manifest_needs_its_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ValueError, match="'path' column"):
        read_manifest(path)


def test_split_is_seeded_disjoint_and_saved(tiny_kaggle, tmp_path):
    cat = read_kaggle(tiny_kaggle)
    s1 = make_split(cat, seed=3, n_query=10, n_val=8, min_per_class=5)
    s2 = make_split(cat, seed=3, n_query=10, n_val=8, min_per_class=5)
    assert np.array_equal(s1.query, s2.query) and np.array_equal(s1.val, s2.val)
    assert not set(s1.query) & set(s1.database) and not set(s1.val) & set(s1.database)
    assert not set(s1.query) & set(s1.val)
    assert np.array_equal(s1.train, s1.database)
    assert len(s1.query) + len(s1.val) + len(s1.database) == len(cat)
    s1.save(tmp_path / "split.json")
    back = Split.load(tmp_path / "split.json")
    assert np.array_equal(back.query, s1.query) and back.protocol["classes"] == s1.protocol["classes"]
    assert make_split(cat, seed=4, n_query=10, n_val=8, min_per_class=5).query.tolist() != s1.query.tolist()


def test_split_drops_small_classes(tiny_kaggle):
    cat = read_kaggle(tiny_kaggle)
    s = make_split(cat, seed=0, n_query=5, n_val=5, min_per_class=41)
    assert s.protocol["classes"] == [] or len(s.protocol["classes"]) < 4


def test_fashion_mnist_split_uses_official_parts(synthetic_fmnist):
    cat = read_fashion_mnist(synthetic_fmnist)
    s = make_split(cat, seed=0, n_query=50, n_val=30, min_per_class=1)
    parts = cat.attrs["split"]
    assert set(parts[cat.positions(s.query)]) == {"test"}
    assert set(parts[cat.positions(s.database)]) == {"train"}


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(None, ["model.n_bits=32", "train.lr=0.01", "method.params.w_adv=0"])
    assert cfg.model.n_bits == 32 and cfg.train.lr == 0.01 and cfg.method.params == {"w_adv": 0}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(None, ["model.nbits=32"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert load_config(path).train.epochs == 3


def test_config_values_take_the_declared_types(tmp_path):
    # YAML 1.1 reads 1e-3 as a string: it crashed deep inside Adam before
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  threads: 1\nmethod:\n  params:\n    item_tau: 5e-2\n")
    cfg = load_config(path, ["train.lr_disc=2e-3", "method.params.w_item=1e-1", "data.limit=null"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.lr_disc == 2e-3
    assert cfg.method.params == {"item_tau": 0.05, "w_item": 0.1} and cfg.data.limit is None
    assert load_config(None, ["train.epochs=1e2", "train.weight_decay=0"]).train.epochs == 100
    for bad, msg in [("train.lr=fast", "takes a number"), ("train.epochs=2.5", "whole number"),
                     ("train.epochs=true", "takes a number"), ("model.n_bits=null", "cannot be null"),
                     ("model.mode=[1]", "cannot be")]:
        with pytest.raises(TypeError, match=msg):
            load_config(None, [bad])


def test_cli_reports_a_bad_config_value_without_a_traceback(tmp_path, capsys):
    from fashionhash.cli import main

    assert main(["train", "--run-dir", str(tmp_path / "run"), "train.lr=fast"]) == 2
    assert "'train.lr' takes a number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything
