"""benchmarks/bench_ceilings.py: the cut backbone reassembles to the backbone, and the
script runs end to end on the tiny real-photo catalogue (with its corrupt JPEG)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fashionhash.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ceilings():
    spec = importlib.util.spec_from_file_location("bench_ceilings", REPO / "benchmarks" / "bench_ceilings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_trunk_then_tail_is_the_backbone(ceilings):
    net = build_backbone("efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    trunk = ceilings._Trunk(net, 192, 4)
    tail = ceilings._Tail(net, (192, 2, 2)).eval()
    with torch.inference_mode():
        acts = trunk.embed(x)
        assert acts.shape == (2, 192 * 4)
        torch.testing.assert_close(tail(acts), net.embed(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_quick_run(ceilings, tiny_kaggle, tmp_path):
    out = tmp_path / "ceilings.md"
    result = ceilings.main(["--quick", "--last-block", "--bits", "16,32", "--out", str(out),
                            f"data.root={tiny_kaggle}", "data.n_query=24", "data.n_val=12",
                            "data.n_damaged=24", "data.min_per_class=5"])
    names = [r["what"] for r in result["rows"]]
    assert names[:3] == ["linear probe", "MLP probe (1,024 wide)", "last block + head conv fine-tuned, MLP probe"]
    assert names[3:] == ["raw features, cosine (no hashing)", "sign of PCA, 16 bits, Hamming",
                         "sign of PCA, 32 bits, Hamming"]
    for row in result["rows"]:
        for key in ("class_val", "class_query", "sp1", "sp10"):
            if key in row:
                assert 0.0 <= row[key] <= 1.0, (row, key)
    cosine = result["rows"][3]
    # a damaged copy's raw features still point at its original among ~150 photos
    assert cosine["sp10"] >= cosine["sp1"] > 0.2
    assert result["n_damaged"] == 24
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == result["rows"]
    assert "| sign of PCA, 32 bits, Hamming |" in out.read_text()
