"""The results-table script end to end in its --quick form, on the tiny real-photo and
synthetic Fashion-MNIST fixtures: files written, one row per method, finite numbers, and a
second invocation resumes (trains nothing) instead of starting again."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_table():
    spec = importlib.util.spec_from_file_location("run_table", REPO / "benchmarks" / "run_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


SCORES = ("map", "map@1000", "top1", "ndcg@10")


@pytest.mark.slow
def test_quick_table(run_table, tiny_kaggle, synthetic_fmnist, tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    # one method of each kind (adversarial, real-valued SGML, closed-form, naive) keeps it short
    # two runs side by side in child processes (the CLI): the path the full table takes
    argv = ["--quick", "--data", str(tiny_kaggle), "--fmnist", str(synthetic_fmnist), "--jobs", "2",
            "--methods", "adversarial,sgml,lsh,naive", "--runs", str(runs), "--out", str(out),
            "--readme", str(tmp_path / "README.md")]
    (tmp_path / "README.md").write_text("# x\n\n<!-- table:start -->\nSTALE-TABLE\n<!-- table:end -->\n\nafter\n")
    assert run_table.main(argv) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "STALE-TABLE" not in readme and readme.endswith("<!-- table:end -->\n\nafter\n")
    assert "\n### Notes" in readme and "](out/pr_kaggle.png)" in readme
    for name in ("table.md", "table.json", "pr_kaggle.png", "pr_fashion_mnist.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "table.json").read_text())
    sections = (out / "table.md").read_text().split("\n## ")
    expected = {"adversarial", "sgml", "sgml-real", "lsh", "naive-pixels", "naive-features"}
    for ds in ("kaggle", "fashion_mnist"):
        rows = table["datasets"][ds]["rows"]
        md = next(s for s in sections if s.startswith(table["datasets"][ds]["title"]))
        labels = [r["label"] for r in rows]
        assert sorted(labels) == sorted(expected), ds  # one row per method (one bit length)
        for r in rows:
            for key in SCORES:
                v = r["mean"][key]
                assert math.isfinite(v) and 0 <= v <= 1, (ds, r["label"], key, v)
            for key in ("encode_ms", "bytes", "query_ms_flat"):
                assert math.isfinite(r["mean"][key]) and r["mean"][key] >= 0, (ds, r["label"], key)
            if r["label"] not in ("sgml-real", "naive-pixels", "naive-features"):
                assert math.isfinite(r["mean"]["p@h2"]) and r["mean"]["query_ms_mih"] >= 0
            if ds == "kaggle":  # the same-product test exists only for photos
                assert 0 <= r["mean"]["same_product_top1"] <= r["mean"]["same_product_top10"] <= 1
            assert md.count(f"| {r['name']} |") == 1
        # the paper's method is repeated over seeds and reported as mean +- std
        paper = next(r for r in rows if r["label"] == "adversarial")
        assert paper["seeds"] == [0, 1] and math.isfinite(paper["std"]["map"])
        assert " ± " in md
        # every method of a dataset used the one split file
        split = (runs / ds / "split.json").read_text()
        for run_split in (runs / ds).glob("*_s*/split.json"):
            assert run_split.read_text() == split, run_split
        for meta in (runs / ds).glob("*_s*/meta.json"):  # written by the trainer in the child
            assert json.loads(meta.read_text())["threads"] == 1, meta
    # an interrupted or repeated table resumes, whatever --jobs: nothing is trained again
    metrics = sorted(runs.glob("*/*/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in metrics]
    timings = {ds: (runs / ds / "timings.json").read_text() for ds in ("kaggle", "fashion_mnist")}
    capsys.readouterr()
    assert run_table.main([*argv, "--jobs", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in metrics] == stamps
    # ... and a table only rebuilt adds nothing to the measured time
    assert {ds: (runs / ds / "timings.json").read_text() for ds in timings} == timings
    assert "trained in" not in capsys.readouterr().out


def test_table_goes_into_a_page_in_another_folder(run_table, tmp_path):
    """--readme docs/results.md: headings one level down, figure links from docs/."""
    page, out = tmp_path / "docs" / "results.md", tmp_path / "benchmarks" / "results"
    page.parent.mkdir()
    page.write_text("# R\n\n## Peers\n\n<!-- table:start -->\nold\n<!-- table:end -->\n\nreading\n")
    md = "# Results table\n\n`cmd`\n\n## Product photos\n\n| a |\n|---|\n\n![pr](pr_kaggle.png)\n"
    run_table.update_readme(page, md, out)
    text = page.read_text()
    assert "old" not in text and "\n### Product photos\n" in text and "# Results table" not in text
    assert "![pr](../benchmarks/results/pr_kaggle.png)" in text
    assert text.startswith("# R\n\n## Peers\n\n<!-- table:start -->\n`cmd`") and text.endswith("-->\n\nreading\n")
