"""Draw the network of a hashing method from the code itself: the boxes are the modules
of an instantiated model and the shapes are recorded by forward hooks on a dummy batch,
so the figure cannot drift from the implementation.

``python -m fashionhash.methods.diagram docs/architecture.png``
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape[1:]) if torch.is_tensor(t) else "?"


def trace_shapes(model: nn.Module, names: list[str], *inputs) -> dict[str, tuple[str, str]]:
    """Run ``model(*inputs)`` and record ``(input shape, output shape)`` of named submodules."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple[str, str]] = {}

    def hook(name):
        def record(module, args, out) -> None:  # returning None keeps the module's output
            seen.setdefault(name, (_shape(args[0]), _shape(out)))
        return record

    hooks = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def draw_architecture(path: str | Path, n_bits: int = 64, n_classes: int = 68, size: int = 128) -> Path:
    """Render the paper's network (EfficientNet-Lite0 encoder, hash head, classifier,
    discriminator) with the shapes of an actual forward pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    from fashionhash.methods import METHODS
    from fashionhash.models.backbones import BACKBONES

    backbone = BACKBONES.build("efficientnet_lite0", pretrained=False).eval()
    method = METHODS.build("adversarial", backbone.feat_dim, n_bits, n_classes, backbone=backbone).eval()
    x = torch.zeros(1, 3, size, size)
    stages = [n for n, _ in backbone.named_children()]
    bshapes = trace_shapes(backbone, [s for s in ("_conv_stem", "_blocks", "_conv_head") if s in stages], x)
    blocks = list(backbone._blocks)
    block_shapes = trace_shapes(backbone, [f"_blocks.{i}" for i in range(len(blocks))], x)
    feats = backbone.embed(x)
    codes = method.encode(x)
    head_shapes = trace_shapes(method.head, [n for n, m in method.head.net.named_children()
                                            if isinstance(m, nn.Linear) for n in [f"net.{n}"]], feats)
    logits = method.classifier(codes)
    disc = method.discriminator(feats, codes)

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = [("input photo", f"3x{size}x{size}, letterboxed on white", "#eeeeee")]
    rows.append(("EfficientNet-Lite0 stem", f"conv3x3/2 -> {bshapes['_conv_stem'][1]}", "#cfe2f3"))
    # group MBConv blocks by output shape (one row per stage)
    last, start = None, 0
    for i in range(len(blocks) + 1):
        shp = block_shapes[f"_blocks.{i}"][1] if i < len(blocks) else None
        if shp != last and last is not None:
            label = f"MBConv block {start}" if start == i - 1 else f"MBConv blocks {start}-{i - 1}"
            rows.append((label, f"-> {last}", "#cfe2f3"))
            start = i
        last = shp
    rows.append(("head conv1x1 + avg pool", f"{bshapes['_conv_head'][1]} -> {_shape(feats)}  "
                 f"({n_params(backbone) / 1e6:.1f}M params, ImageNet)", "#cfe2f3"))
    lin = list(head_shapes.values())
    rows.append(("hash head (MLP)", " -> ".join([lin[0][0]] + [o for _, o in lin]) +
                 f" -> tanh -> code {_shape(codes)}", "#d9ead3"))
    rows.append(("sign + pack", f"{n_bits} bits -> {(n_bits + 7) // 8} bytes uint8 (search)", "#d9ead3"))

    fig, ax = plt.subplots(figsize=(11.5, 0.62 * (len(rows) + 4)))
    ax.set_xlim(0, 11.5)
    y = len(rows) + 3
    ax.set_ylim(y - len(rows) - 1.2, y + 0.8)
    ax.axis("off")
    for i, (name, desc, colour) in enumerate(rows):
        yy = y - i
        ax.add_patch(FancyBboxPatch((0.3, yy - 0.35), 6.0, 0.7, boxstyle="round,pad=0.02", fc=colour, ec="#444"))
        ax.text(0.45, yy, name, va="center", fontsize=9, weight="bold")
        ax.text(3.0, yy, desc, va="center", fontsize=8)
        if i:
            ax.annotate("", (3.1, yy + 0.35), (3.1, yy + 0.65), arrowprops=dict(arrowstyle="->"))
    code_y = y - (len(rows) - 2)
    feat_y = y - (len(rows) - 3)
    ax.add_patch(FancyBboxPatch((6.9, code_y + 0.9), 4.1, 0.9, boxstyle="round,pad=0.02", fc="#fce5cd", ec="#444"))
    ax.text(7.05, code_y + 1.35, f"classifier: linear {n_bits} -> {logits.shape[1]} clothing types\n"
            "(i) cross-entropy, gradient reaches the encoder", va="center", fontsize=8)
    ax.annotate("", (6.9, code_y + 1.3), (6.3, code_y), arrowprops=dict(arrowstyle="->"))
    ax.add_patch(FancyBboxPatch((6.9, code_y - 2.2), 4.1, 1.6, boxstyle="round,pad=0.02", fc="#f4cccc", ec="#444"))
    ax.text(7.05, code_y - 1.4,
            f"discriminator D(f, h): features {_shape(feats)} + code {n_bits}\n"
            f"-> MLP -> logit {tuple(disc.shape[1:]) or '(1)'}\n"
            "similar pair (q, g): D(f_q, h_q)=1 vs D(f_q, h_g)=0\n"
            "(iii) encoder: confusion target 1/2 for both", va="center", fontsize=8)
    ax.annotate("", (6.9, code_y - 1.0), (6.3, code_y), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", (6.9, code_y - 1.8), (6.3, feat_y), arrowprops=dict(arrowstyle="->", ls="--"))
    ax.text(6.9, code_y + 2.3, "(ii) pairwise Hamming loss on the codes of a batch:\n"
            "same product (two views) -> 0, same type -> within a band, others -> apart",
            fontsize=8, va="center")
    ax.set_title("fashionhash: adversarially trained semantic hashing (Singh et al. 2019), "
                 "shapes from a forward pass", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(draw_architecture(sys.argv[1] if len(sys.argv) > 1 else "docs/architecture.png"))
