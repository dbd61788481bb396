"""Every shipped config loads, names registered parts and passes the checks that training
runs before anything is computed (a typo in configs/ would otherwise surface minutes into
`make demo`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fashionhash.config import load_config
from fashionhash.methods import METHODS
from fashionhash.models.backbones import BACKBONES
from fashionhash.pipeline import check_descriptor_config, check_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.method.name in METHODS and cfg.model.backbone in BACKBONES
    check_model_config(cfg)
    check_descriptor_config(cfg)


def test_the_demo_searches_in_two_stages():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cfg.descriptor.kind == "gem" and cfg.method.name == "csq"
