"""A newcomer's own catalogue: `fashionhash demo --data` on a manifest CSV (or a
Kaggle-layout folder), split sizes that scale with a small catalogue, the manifest's
columns as attributes and filters in `search` and the API, and the Fashion-MNIST fallback
only when no data path was named."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fashionhash.cli import main
from fashionhash.data.catalogue import (
    FetchError, catalogue_kind, fetch_fashion_mnist, open_catalogue, read_fashion_mnist, read_manifest,
)
from fashionhash.data.splits import make_split

LABELS = ("shirt", "trousers", "shoe")
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 160, 60)}
# as tests/test_serving.py's tiny run, at the sizes the demo scales to by itself; the demo's
# second stage stays on, at small scales
FAST = ["model.image_size=64", "model.n_bits=32", "train.epochs=1", "train.batch_size=32",
        "train.num_workers=1", "descriptor.scales=[64,48]", "descriptor.dim=32", "descriptor.learn_epochs=2"]


def _photo(label: str, colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A 48x48 drawing whose shape is the label and whose fill is the colour."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(225, 256, 3)))
    d = ImageDraw.Draw(img)
    j = int(rng.integers(-3, 4))
    if label == "shirt":
        d.polygon([(8 + j, 10), (40 + j, 10), (36 + j, 40), (12 + j, 40)], fill=colour)
    elif label == "trousers":
        d.rectangle([14 + j, 6, 22 + j, 44], fill=colour)
        d.rectangle([26 + j, 6, 34 + j, 44], fill=colour)
    else:
        d.ellipse([6, 26 + j, 42, 40 + j], fill=colour)
    return img


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """90 photos (3 labels x 3 colours x 10) under photos/, listed by relative path, plus a
    row whose photo is missing (skipped with a warning)."""
    root = tmp_path_factory.mktemp("own")
    (root / "photos").mkdir()
    rows = []
    for i in range(90):
        label, colour = LABELS[i % 3], list(COLOURS)[(i // 3) % 3]
        name = f"photos/p{i:03d}.jpg"
        _photo(label, COLOURS[colour], i).save(root / name, quality=90)
        rows.append({"path": name, "label": label, "colour": colour})
    rows.append({"path": "photos/gone.jpg", "label": "shirt", "colour": "red"})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "colour"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_demo_on_a_manifest_then_search_by_its_columns(manifest, tmp_path, capsys):
    """The whole path through the CLI: demo (train, evaluate, index) on a 90-photo manifest
    with no split settings, then `search` showing and filtering by label and colour."""
    run = tmp_path / "run"
    assert main(["demo", "--data", str(manifest), "--run-dir", str(run), "--quiet", "--no-serve", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Fashion-MNIST" not in out and f"manifest {manifest}" in out
    assert "indexed 90 items" in out
    split = json.loads((run / "split.json").read_text())
    # scaled with the catalogue: a tenth each for test and val queries, classes of >= 2 kept
    assert len(split["query"]) == 9 and len(split["val"]) == 9 and len(split["database"]) == 72
    assert split["protocol"]["classes"] == sorted(LABELS)

    photo = manifest.parent / "photos" / "p004.jpg"  # a blue trousers
    assert main(["search", str(run / "index"), str(photo), "-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the demo ranks in two stages: a cosine column beside the hash code's distance
    assert lines[0].split() == ["rank", "dist", "cos", "id", "label", "colour", "name"]
    rows = [line.split() for line in lines[1:6]]
    assert rows[0][1] == "0" and rows[0][3:7] == ["4", "trousers", "blue", "trousers"]

    assert main(["search", str(run / "index"), str(photo), "-k", "50", "--filter", "colour=red",
                 "--filter", "label=shoe", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 10  # 90 photos / 3 labels / 3 colours
    assert all(h["attributes"]["colour"] == "red" and h["attributes"]["label"] == "shoe" for h in hits)
    assert all(h["name"] == "shoe" and h["summary"] == "shoe · red" for h in hits)

    assert main(["search", str(run / "index"), str(photo), "--filter", "articleType=Jeans"]) == 2
    assert "unknown filter keys ['articleType']" in capsys.readouterr().err


def test_the_api_offers_the_manifests_columns_as_filters(manifest, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fashionhash.serving import SearchService, ServiceConfig, create_app

    run = tmp_path / "run"
    assert main(["demo", "--data", str(manifest), "--run-dir", str(run), "--quiet", "--no-serve", *FAST]) == 0
    svc = SearchService.open(run, run / "index", ServiceConfig())
    try:
        with TestClient(create_app(svc)) as c:
            facets = c.get("/facets").json()
            assert list(facets) == ["label", "colour"]
            assert {v["value"]: v["count"] for v in facets["colour"]} == {"red": 30, "blue": 30, "green": 30}
            page = c.get("/items", params={"colour": "green", "label": "shirt", "limit": 50}).json()
            assert page["total"] == 10 and {it["summary"] for it in page["items"]} == {"shirt · green"}
            stats = c.get("/stats").json()
            assert stats["facet_keys"] == ["label", "colour"] and stats["summary_keys"] == ["label", "colour"]
    finally:
        svc.close()


def test_a_named_data_path_that_holds_no_catalogue_is_an_error(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr("fashionhash.cli._cmd_train", lambda a: called.append(a) or 0)
    folder = tmp_path / "photos"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad, why in [(tmp_path / "nowhere.csv", "does not exist"), (folder, "folder without styles.csv"),
                     (tmp_path / "notes.txt", "not a .csv file")]:
        assert main(["demo", "--data", str(bad), "--run-dir", str(tmp_path / "run"), "--no-serve"]) == 2
        out, err = capsys.readouterr()
        assert why in err and "manifest CSV" in err and len(err.strip().splitlines()) == 1
        assert "Fashion-MNIST" not in out
    monkeypatch.setenv("FASHIONHASH_DATA", str(tmp_path / "gone"))  # named too, by the environment
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--no-serve"]) == 2
    out, err = capsys.readouterr()
    assert "gone does not exist" in err and "Fashion-MNIST" not in out
    assert not called
    # `train` likewise: a named Kaggle root never becomes Fashion-MNIST
    with pytest.raises(FileNotFoundError, match="no styles.csv"):
        open_catalogue("kaggle", str(folder))


def test_demo_falls_back_to_fashion_mnist_only_without_a_named_path(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.delenv("FASHIONHASH_DATA", raising=False)
    monkeypatch.setattr("fashionhash.data.catalogue.default_data_root", lambda: tmp_path / "absent")
    monkeypatch.setattr("fashionhash.cli._cmd_train", lambda a: called.append(a) or 1)
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--no-serve"]) == 1
    out = capsys.readouterr().out
    assert "training on Fashion-MNIST" in out and "DATA=" in out
    assert called[0].config.name == "fashion_mnist_demo.yaml" and called[0].overrides == []
    # ...and a product config without the photos is refused rather than run on Fashion-MNIST
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--config", "configs/demo.yaml"]) == 2
    assert len(called) == 1


def test_demo_takes_a_kaggle_folder_and_refuses_to_resume_another_catalogues_run(
        manifest, tiny_kaggle, tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr("fashionhash.cli._cmd_train", lambda a: called.append(a) or 1)
    assert main(["demo", "--data", str(tiny_kaggle), "--run-dir", str(tmp_path / "a"), "--no-serve"]) == 1
    assert called[0].overrides[:2] == ["data.dataset=kaggle", f'data.root="{tiny_kaggle.resolve()}"']
    assert main(["demo", "--data", str(manifest), "--run-dir", str(tmp_path / "a"), "--no-serve"]) == 1
    assert "data.label_key=label" in called[1].overrides
    # a run directory that holds a run of the manifest is not resumed on the Kaggle folder
    run = tmp_path / "b"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "config.yaml").write_text(f"data:\n  dataset: manifest\n  root: {manifest}\n")
    assert main(["demo", "--data", str(tiny_kaggle), "--run-dir", str(run), "--no-serve"]) == 2
    assert "holds a run on manifest" in capsys.readouterr().err and len(called) == 2


def test_split_sizes_scale_with_a_small_catalogue_or_name_the_setting(manifest, synthetic_fmnist):
    cat = read_manifest(manifest)
    s = make_split(cat, seed=0)
    assert s.sizes() == {"train": 72, "val": 9, "query": 9, "database": 72}
    assert s.protocol["min_per_class"] == 2 and s.protocol["n_query"] == 9
    with pytest.raises(ValueError, match=r"data\.n_query.*data\.n_val.*lower them, e\.g\. data\.n_query=44"):
        make_split(cat, n_query=1000, n_val=1000)
    with pytest.raises(ValueError, match=r"no class of 'label' has 31 items \(data\.min_per_class\)"):
        make_split(cat, min_per_class=31)
    # Fashion-MNIST-shaped: queries and val from the official test part (100 items here)
    fm = make_split(read_fashion_mnist(synthetic_fmnist), seed=0)
    assert fm.sizes()["query"] == 10 and fm.sizes()["val"] == 10 and fm.sizes()["database"] == 500


def test_the_kaggle_catalogue_keeps_the_protocols_sizes(data_root):
    from fashionhash.data.catalogue import read_kaggle

    s = make_split(read_kaggle(data_root), seed=0)
    assert (s.protocol["min_per_class"], s.protocol["n_query"], s.protocol["n_val"]) == (50, 1000, 1000)
    assert s.protocol["n_classes"] == 68


def test_catalogue_kind(manifest, tiny_kaggle):
    assert catalogue_kind(manifest) == "manifest" and catalogue_kind(tiny_kaggle) == "kaggle"
    # `train data.dataset=manifest` with the Kaggle label column says which setting names it
    with pytest.raises(ValueError, match="'articleType' column .*data.label_key"):
        open_catalogue("manifest", str(manifest))


def test_a_missing_npm_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    import subprocess

    def no_npm(*a, **kw):
        raise FileNotFoundError(2, "No such file or directory: 'npm'")

    monkeypatch.setenv("FASHIONHASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", no_npm)
    with pytest.raises(FetchError, match="apt-get install npm"):
        fetch_fashion_mnist()
    assert main(["train", "--config", "configs/fashion_mnist_demo.yaml", "--run-dir", str(tmp_path / "r"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fashionhash: error: npm") and "apt-get install npm" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
