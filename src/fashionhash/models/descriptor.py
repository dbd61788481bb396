"""Instance descriptors of a frozen EfficientNet-Lite: what the second stage of search ranks by.

Average pooling of the last feature map keeps what a photo's *type* looks like; finding the
very product needs more of what the backbone saw. Measured on the validation split's damaged
copies (docs/results.md, "Finding the very product"): generalised-mean (GeM, p=3) pooling,
which weighs the strongest local responses, and adding the GeM of the last MBConv block's
output (320 channels, before the 1x1 head conv mixes them) each find the original more often
than the average pool; so does averaging the descriptor over two input sizes.

:class:`DescriptorNet` computes, in one backbone pass, optionally the average-pooled features
the hash head reads (so cached features and descriptors of the catalogue cost one pass), then
the raw descriptor ``[l2(GeM(head map)), l2(GeM(relu(last block)))]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEM_P", "DescriptorNet", "gem", "descriptor_dim"]

GEM_P = 3.0


def gem(x: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """Generalised-mean pooling ``(B, C, h, w) -> (B, C)`` of a non-negative map."""
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def descriptor_dim(backbone: nn.Module) -> int:
    """Width of the raw descriptor of ``backbone`` (head channels + last block channels)."""
    _require_blocks(backbone)
    return int(backbone.feat_dim) + int(backbone._blocks[-1]._project_conv.out_channels)


def _require_blocks(backbone: nn.Module) -> None:
    if not all(hasattr(backbone, a) for a in ("forward_blocks", "forward_head", "_blocks")):
        raise ValueError(f"{type(backbone).__name__} has no MBConv blocks: descriptors need an "
                         "EfficientNet-Lite backbone")


class DescriptorNet(nn.Module):
    """Normalised photos ``(B, 3, S, S)`` -> ``[pooled (F) | descriptor (D)]`` (``pooled``)
    or ``descriptor (D)``; exposes ``embed``/``feat_dim`` for a ``FeatureExtractor``.

    ``head`` (optional): a module applied to the pooled features (a run's hash head), so the
    same pass yields relaxed codes instead of features for query photos.
    """

    def __init__(self, backbone: nn.Module, *, pooled: bool = False, head: nn.Module | None = None) -> None:
        super().__init__()
        _require_blocks(backbone)
        self.backbone = backbone
        self.pooled = bool(pooled or head is not None)
        self.head = head
        # a flag in the state dict: graphs with and without the pooled part get distinct
        # ONNX cache names (the digest hashes weights and code, not attributes)
        self.register_buffer("_layout", torch.tensor([int(self.pooled), int(head is not None)]))
        lead = 0
        if self.pooled:
            lead = int(head.n_bits) if head is not None else int(backbone.feat_dim)
        self.lead_dim = lead
        self.feat_dim = lead + descriptor_dim(backbone)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        blocks = b.forward_blocks(x)
        return self.embed_maps(blocks, b.forward_head(blocks, len(b._blocks)))

    def embed_maps(self, blocks: torch.Tensor, head_map: torch.Tensor) -> torch.Tensor:
        """The output from the last block's map ``(B, C, h, w)`` and the head map
        ``(B, F, h, w)``: what follows the backbone, float32 in the int8 engine too."""
        parts = [_unit(gem(head_map)), _unit(gem(F.relu(blocks)))]
        if self.pooled:
            pooled = self.backbone.pool(head_map)
            parts.insert(0, pooled if self.head is None else self.head.encode(pooled))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)
