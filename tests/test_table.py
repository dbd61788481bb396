"""``fashionhash table`` end to end in its --quick form, on the tiny real-photo and
synthetic Fashion-MNIST fixtures: files written, one row per method, finite numbers, the
learning rate chosen on val, epochs shown, and a second invocation resumes (trains nothing)
instead of starting again."""
import json
import math
import time

import pytest

from fashionhash.cli import main
from fashionhash.table.build import _Timer
from fashionhash.table.report import update_readme


SCORES = ("map", "map@1000", "top1", "ndcg@10")


@pytest.mark.slow
def test_quick_table(tiny_kaggle, synthetic_fmnist, tmp_path, capsys, caplog):
    runs, out = tmp_path / "runs", tmp_path / "out"
    # one method of each kind (adversarial, real-valued SGML, closed-form, naive) keeps it short
    # two runs side by side in child processes (the CLI): the path the full table takes
    argv = ["table", "--quick", "--data", str(tiny_kaggle), "--fmnist", str(synthetic_fmnist), "--jobs", "2",
            "--methods", "adversarial,adversarial-no-cls,sgml,lsh,naive", "--runs", str(runs), "--out", str(out),
            "--readme", str(tmp_path / "README.md"), "--headline", str(tmp_path / "HEAD.md")]
    (tmp_path / "README.md").write_text("# x\n\n<!-- table:start -->\nSTALE-TABLE\n<!-- table:end -->\n\nafter\n")
    (tmp_path / "HEAD.md").write_text("# y\n<!-- headline:start -->\nSTALE\n<!-- headline:end -->\nafter\n")
    assert main(argv) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "STALE-TABLE" not in readme and readme.endswith("<!-- table:end -->\n\nafter\n")
    assert "\n### Notes" in readme and "](out/pr_kaggle.png)" in readme
    # the summary: one line per method (no ablation, no naive row), every row over seeds
    head = (tmp_path / "HEAD.md").read_text()
    assert "STALE" not in head and head.endswith("<!-- headline:end -->\nafter\n")
    for name in ("adversarial (Singh", "SGML, binarised", "| LSH |"):
        assert head.count(name) == 2, name  # once per dataset
    rows_md = "\n".join(x for x in head.splitlines() if x.startswith("| "))
    assert "no classifier" not in rows_md and "naive" not in rows_md and rows_md.count(" ± ") >= 12
    for name in ("table.md", "table.json", "pr_kaggle.png", "pr_fashion_mnist.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "table.json").read_text())
    sections = (out / "table.md").read_text().split("\n## ")
    expected = {"adversarial", "adversarial-no-cls", "sgml", "sgml-real", "lsh", "naive-pixels", "naive-features"}
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
        # every row is repeated over seeds and reported as mean +- std
        for r in rows:
            if r["label"] not in ("naive-pixels", "naive-features"):
                assert r["seeds"] == [0, 1] and math.isfinite(r["std"]["map"]), (ds, r["label"])
        assert " ± " in md
        # ... and so is the ablation, paired with it by seed, with a plain verdict
        assert next(r for r in rows if r["label"] == "adversarial-no-cls")["seeds"] == [0, 1]
        assert "The paper's method minus 'ablation: no classifier" in md and "paired seeds" in md
        # every learned row trained with the learning rate chosen on val, until early stopping
        chosen = json.loads((runs / ds / "lr" / "chosen_16.json").read_text())
        assert set(chosen["chosen"]) == {"adversarial", "adversarial-no-cls", "sgml"} and chosen["lrs"] == [1e-3, 3e-3]
        # an ablation changes its loss only: the paper's rate, no candidates of its own
        assert chosen["chosen"]["adversarial-no-cls"] == chosen["chosen"]["adversarial"]
        # ... and every candidate's val score is kept beside the choice, the chosen one the best
        for label in ("adversarial", "sgml"):
            val = chosen["val"][label]
            assert set(val) == {"0.001", "0.003"}
            assert val[f"{chosen['chosen'][label]:g}"] == max(val.values())
        assert not list((runs / ds / "lr").glob("adversarial-no-cls_*"))
        for r in rows:
            if r["label"] in ("adversarial", "adversarial-no-cls", "sgml"):
                assert r["mean"]["lr"] == chosen["chosen"][r["label"]]
                assert 1 <= r["mean"]["best_epoch"] <= r["mean"]["epochs"] <= 2
        assert "| lr | epochs | best epoch |" in md
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
    caplog.clear()
    assert main([*argv, "--jobs", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in metrics] == stamps
    # ... and a table only rebuilt adds nothing to the measured time
    assert {ds: (runs / ds / "timings.json").read_text() for ds in timings} == timings
    assert "trained and evaluated" not in caplog.text and "lr candidate" not in caplog.text


def test_table_goes_into_a_page_in_another_folder(tmp_path):
    """--readme docs/results.md: headings one level down, figure links from docs/."""
    page, out = tmp_path / "docs" / "results.md", tmp_path / "benchmarks" / "results"
    page.parent.mkdir()
    page.write_text("# R\n\n## Peers\n\n<!-- table:start -->\nold\n<!-- table:end -->\n\nreading\n")
    md = "# Results table\n\n`cmd`\n\n## Product photos\n\n| a |\n|---|\n\n![pr](pr_kaggle.png)\n"
    update_readme(page, md, out)
    text = page.read_text()
    assert "old" not in text and "\n### Product photos\n" in text and "# Results table" not in text
    assert "![pr](../benchmarks/results/pr_kaggle.png)" in text
    assert text.startswith("# R\n\n## Peers\n\n<!-- table:start -->\n`cmd`") and text.endswith("-->\n\nreading\n")


def test_a_diverged_lr_candidate_counts_as_trained_and_is_never_chosen(tmp_path):
    from fashionhash.config import load_config
    from fashionhash.table.runs import _trained, best_val

    cfg = load_config(None, ["train.epochs=10", "train.patience=2"])

    def run(name, *records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / name

    def epoch(e, score, best):
        return {"event": "epoch", "epoch": e, "val": {"map@1000": score}, "best_epoch": best}

    ok = run("ok", epoch(0, 0.5, 0), epoch(1, 0.4, 0), epoch(2, 0.45, 0))  # 2 epochs past the best
    going = run("going", epoch(0, 0.5, 0), epoch(1, 0.6, 1))
    bad = run("bad", epoch(0, 0.7, 0), {"event": "diverged", "epoch": 1, "step": 3, "parts": {}})
    assert _trained(ok, cfg) and not _trained(going, cfg) and _trained(bad, cfg)
    assert best_val(ok, "map@1000") == 0.5 and best_val(bad, "map@1000") == -math.inf


def test_paired_difference_against_the_textbook_t_test():
    from fashionhash.table.report import paired_difference, paired_notes

    a, b = [0.80, 0.82, 0.81, 0.83, 0.79], [0.78, 0.81, 0.78, 0.80, 0.78]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    p = paired_difference(a, b)
    assert p["mean"] == pytest.approx(mean) and p["sd"] == pytest.approx(sd)
    assert p["t"] == pytest.approx(mean / (sd / math.sqrt(5)))
    assert p["significant"]  # t = 4.81 > 2.78 (4 degrees of freedom)
    # 0.020 is more than either row's own seed std (0.0158, 0.0141)
    assert p["seed_spread"] == pytest.approx(0.015811, abs=1e-5) and p["beyond_spread"]
    noisy = paired_difference([0.80, 0.70, 0.90], [0.81, 0.69, 0.92])
    assert not noisy["significant"] and not noisy["beyond_spread"]

    def row(label, vals):
        return {"label": label, "name": label, "bits": 64, "seeds": list(range(len(vals))),
                "per_seed": {"top1": vals, "map@1000": vals}}
    notes = paired_notes([row("adversarial", a), row("adversarial-no-adv", b)], 64)
    assert len(notes) == 1 and "+0.0200" in notes[0] and "larger than the seed spread" in notes[0] and "5 paired seeds" in notes[0]


def test_a_run_of_a_replaced_learning_rate_is_set_aside_not_deleted(tmp_path):
    """Widening --lrs can change a method's choice: its seed runs trained at the old rate
    are renamed <run>.lr<old> and the row trains again; any other difference still stops."""
    from fashionhash.config import load_config, save_config
    from fashionhash.table.runs import _set_aside_if_lr_changed

    run = tmp_path / "csq_64_s0"
    run.mkdir()
    save_config(load_config(None, ["train.lr=0.001"]), run / "config.yaml")
    (run / "metrics.json").write_text("{}")
    _set_aside_if_lr_changed(run, load_config(None, ["train.lr=0.001", "train.threads=2"]))  # speed only
    assert (run / "metrics.json").is_file()
    _set_aside_if_lr_changed(run, load_config(None, ["train.lr=0.001", "model.n_bits=32"]))  # not the lr
    assert (run / "metrics.json").is_file()
    _set_aside_if_lr_changed(run, load_config(None, ["train.lr=0.0003"]))
    assert not run.exists() and (tmp_path / "csq_64_s0.lr0.001" / "metrics.json").is_file()
    run.mkdir()
    save_config(load_config(None, ["train.lr=0.001"]), run / "config.yaml")
    with pytest.raises(FileExistsError, match="exists"):
        _set_aside_if_lr_changed(run, load_config(None, ["train.lr=0.0003"]))


def _row(label, bits, m1000, top1, seeds=(0,)):
    from fashionhash.table.plan import VARIANTS
    return {"label": label, "name": VARIANTS[label][2], "bits": bits, "seeds": list(seeds),
            "mean": {"map@1000": m1000, "top1": top1, "lr": 1e-3}, "std": {"map@1000": 0.01, "top1": 0.02}}


def test_headline_orders_methods_and_bolds_the_best():
    from fashionhash.table.report import headline
    rows = [_row("csq", 64, 0.86, 0.84, (0, 1, 2)), _row("dch", 64, 0.81, 0.85, (0, 1, 2)),
            _row("csq", 16, 0.80, 0.80), _row("adversarial-no-cls", 64, 0.99, 0.99)]
    md = headline({"k": {"title": "Photos", "rows": rows}}, "made by x")
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert lines[0] == "| method | mAP@1000, 64 bits | mAP@1000, 16 bits | top-1, 64 bits | seeds | lr |"
    # best first by the largest bit length's mAP@1000; the ablation is not a method
    assert lines[1].startswith("| CSQ | **0.860 ± 0.010** | **0.800** | 0.840 ± 0.020 | 3 |")
    assert lines[2] == "| DCH | 0.810 ± 0.010 | – | **0.850 ± 0.020** | 3 | 0.001 |"
    assert len(lines) == 3 and md.startswith("made by x\n")


def test_run_summary_counts_table_runs_only(tmp_path):
    """A run set aside at a replaced learning rate (``<run>.lr<old>``) is not one of the
    table's runs; the pieces are told apart by bit length and seed."""
    from fashionhash.table.report import run_summary
    for name, secs in (("csq_64_s0", 10), ("csq_64_s1", 20), ("csq_64_s1.lr0.001", 99), ("csq_16_s0", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"eval_seconds": 60}))
        (tmp_path / name / "table_extra.json").write_text(json.dumps({"train_seconds": secs * 60}))
    g = run_summary(tmp_path)["groups"]
    assert {k: (v["runs"], v["train_s"] / 60) for k, v in g.items()} == {
        "seed 0, 64 bits": (1, 10), "more seeds": (1, 20), "seed 0, fewer bits": (1, 5)}


def test_protocol_line_says_whether_val_chose_the_rate():
    from fashionhash.table.build import _lr_rule

    assert _lr_rule((3e-4, 1e-3)) == "with the learning rate chosen on val among 0.0003, 0.001 at seed 0"
    one = _lr_rule((1e-3,))  # e.g. a rate chosen by an earlier invocation, given alone
    assert "0.001" in one and "no choice on val" in one and "chosen on val among" not in one


def test_naive_rows_do_not_follow_a_class_sorted_database():
    """The real-valued rows list the database in the evaluation's tie order: 500 items of the
    queries' class then 500 of another, all at the same distance (identical vectors), would
    score mAP@1000 1.0 if ties went by stored index; listed at random, about 0.5."""
    from types import SimpleNamespace

    import numpy as np

    from fashionhash.table.real import _real_eval

    labels = np.r_[np.zeros(500, int), np.ones(500, int), np.zeros(20, int)]
    colour = np.where(labels == 0, "red", "blue").astype(object)
    d = SimpleNamespace(pos_db=np.arange(1000), pos_q=np.arange(1000, 1020), keys=("colour",),
                        labels=lambda pos: labels[pos], attrs=lambda pos: {"colour": colour[pos]})
    q, db = np.ones((20, 4), np.float32), np.zeros((1000, 4), np.float32)
    m = _real_eval(d, q, db, None, None, "l1")
    assert 0.35 < m["map@1000"] < 0.65
    assert m["top1"] == pytest.approx(0.5)  # tie-aware: the order cannot move it


def test_paired_rows_reads_each_row_minus_the_reference():
    """benchmarks/paired_rows.py: a row ahead at every seed is significant and positive, one
    that moves both ways is not; seeds one row lacks are left out of the pair."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_rows.py"
    spec = importlib.util.spec_from_file_location("paired_rows", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(label, top1, seeds=(0, 1, 2)):
        return {"label": label, "name": label, "bits": 64, "seeds": list(seeds),
                "per_seed": {"top1": top1, "map@1000": top1}}

    rows = [row("paper", [0.80, 0.81, 0.82, 0.83], seeds=(0, 1, 2, 3)),
            row("ahead", [0.85, 0.861, 0.869]), row("level", [0.81, 0.80, 0.82])]
    lines = mod.paired_lines(rows, "paper", 64)
    ahead, level = lines[2], lines[3]
    assert ahead.startswith("| ahead | 3 |") and "**+0.0500**" in ahead
    assert "**" not in level and "+0.0000" in level
    with pytest.raises(SystemExit):
        mod.paired_lines(rows, "absent", 64)


def test_edge_notes_name_rates_at_the_grid_ends_and_runs_the_cap_stopped():
    """The probe that found Fashion-MNIST's rows held back by the grid, as a note: rows at
    either end of the grid are named (not the ablations, which take the paper's rate, nor
    SGML's real-valued row), and so is each seed whose last epochs still improved at the cap."""
    from fashionhash.table.report import edge_notes

    def row(label, lr, epochs, best, seeds=(0,)):
        r = _row(label, 64, 0.9, 0.9, seeds)
        r["mean"]["lr"] = lr
        r["per_seed"] = {"epochs": list(epochs), "best_epoch": list(best)}
        return r

    rows = [row("csq", 3e-4, (60, 60), (58, 50), (0, 1)), row("dch", 1e-3, (40,), (35,)),
            row("hashnet", 3e-3, (60,), (55,)), row("adversarial-no-adv", 3e-4, (60,), (56,)),
            row("lsh", None, (0,), (None,))]
    notes = edge_notes(rows, [3e-4, 1e-3, 3e-3], 60, 5)
    assert notes[0] == "Chose the grid's smallest learning rate (0.0003), so a rate beyond it was not tried: CSQ."
    assert notes[1].endswith("largest learning rate (0.003), so a rate beyond it was not tried: HashNet.")
    # csq seed 1 stopped by patience at the cap (60 - 50 >= 5); hashnet's best 55 is 5 back: patience
    assert notes[2] == ("Stopped by the 60-epoch cap, val having improved within the last 5 epochs: "
                        "CSQ (64 bits, seed 0); ablation: no adversary (w_adv=0) (64 bits, seed 0).")
    assert len(notes) == 3 and edge_notes(rows, [1e-3], 60, 5) == [notes[2]]


def test_table_timer_keeps_the_time_of_a_piece_stopped_midway(tmp_path):
    """timings.json is saved while a piece runs and when it ends, even by Ctrl-C, so a
    stopped invocation's time is counted; a piece that trained nothing adds nothing."""
    run = tmp_path / "kaggle" / "csq_64_s0"
    run.mkdir(parents=True)
    path = tmp_path / "kaggle" / "timings.json"
    timer = _Timer(path, every=0.05)
    timer("resumed, nothing to do", time.sleep, 0.1)
    assert not path.exists()
    seen = []

    def train_then_interrupted():
        (run / "log.jsonl").write_text('{"event": "epoch"}\n')
        time.sleep(0.4)
        seen.append(json.loads(path.read_text()))  # saved by the beat, the piece still running
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timer("train", train_then_interrupted)
    assert seen[0]["train"] > 0
    first = json.loads(path.read_text())
    assert first["train"] >= 0.4 and first["resumed, nothing to do"] >= 0.1
    assert first["total"] == pytest.approx(first["train"] + first["resumed, nothing to do"])
    # the next invocation adds its pieces to what the stopped one kept
    again = _Timer(path, every=60)
    (run / "log.jsonl").write_text('{"event": "epoch"}\n{"event": "epoch"}\n')
    again("train", time.sleep, 0.05)
    second = json.loads(path.read_text())
    assert second["train"] >= first["train"] + 0.05 and second["total"] >= first["total"] + 0.05
