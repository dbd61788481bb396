"""The architecture figure of docs/method.md is drawn from the code: it must keep rendering."""
from fashionhash.methods.diagram import draw_architecture


def test_architecture_figure_renders(tmp_path):
    path = draw_architecture(tmp_path / "arch.png", n_bits=32, n_classes=10, size=64)
    assert path.stat().st_size > 10_000
