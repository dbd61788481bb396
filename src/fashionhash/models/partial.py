"""Partial mode: an EfficientNet-Lite cut at block ``model.train_from`` into a frozen front
(photos -> activations at the input of that block, computed once and cached as float16) and
a trainable tail (those activations -> pooled features), so that the last blocks of the
backbone learn on a CPU at a fraction of the cost of end-to-end fine-tuning.

* :class:`BackboneFront`: ``embed`` normalised photos ``(B, 3, S, S)`` -> flattened
  activations ``(B, C*h*w)`` (a ``FeatureExtractor`` model: cached, exported to ONNX);
* :class:`BackboneTail`: ``embed`` activations ``(B, C*h*w)`` (any float dtype) -> pooled
  features ``(B, 1280)``; it is the hashing method's ``backbone`` in partial mode, so it
  trains at ``train.lr_backbone`` and its weights live in the run's checkpoints.

Lite0's 16 blocks (stage: blocks, channels at the block's input, map size at 224 px):
1: 0 (32, 112); 2: 1-2 (16, 112); 3: 3-4 (24, 56); 4: 5-7 (40, 28); 5: 8-10 (80, 14);
6: 11-14 (112, 14); 7: 15 (192, 7). ``train_from=15`` (or -1) trains the last block and
the head conv on 192x7x7 activations: 18.8 KB per photo in float16.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone
from .efficientnet import EfficientNetLite


__all__ = ["BackboneFront", "BackboneTail", "tail_start", "activation_shape", "extract_activations"]


def tail_start(backbone: str, train_from: int) -> int:
    """The block index ``model.train_from`` names (negative counts from the end), checked:
    ValueError for a backbone that is not EfficientNet-Lite or a block out of range."""
    if not backbone.startswith("efficientnet_lite"):
        raise ValueError(f"model.mode=partial splits an EfficientNet-Lite backbone, not {backbone!r}: "
                         "use model.mode=frozen or finetune")
    n = _n_blocks(backbone)
    if not -n <= train_from < n:
        raise ValueError(f"model.train_from={train_from}: {backbone} has blocks 0..{n - 1} "
                         f"(or -{n}..-1 from the end; -1 trains the last block and the head conv)")
    return train_from % n


@functools.lru_cache(maxsize=None)
def _n_blocks(backbone: str) -> int:
    return len(build_backbone(backbone, pretrained=False)._blocks)


@functools.lru_cache(maxsize=None)
def activation_shape(backbone: str, image_size: int, start: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the activations at the input of block ``start`` for ``image_size`` photos."""
    net = build_backbone(backbone, pretrained=False)
    with torch.inference_mode():
        return tuple(net.forward_blocks(torch.zeros(1, 3, image_size, image_size), start).shape[1:])


class BackboneFront(nn.Module):
    """The frozen stem and blocks ``[:start]``: photos ``(B, 3, S, S)`` -> ``(B, C*h*w)``."""

    def __init__(self, net: EfficientNetLite, start: int, image_size: int) -> None:
        super().__init__()
        self.net, self.start = net, start
        c, h, w = activation_shape(net.config.name, image_size, start)
        self.feat_dim = c * h * w
        # the same weights for every start: the cached ONNX graph's name must tell them apart
        self.export_key = f"front[:{start}]"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_blocks(x, self.start).flatten(1)


class BackboneTail(nn.Module):
    """Blocks ``[start:]``, head conv and pooling of ``net`` (the modules themselves, so the
    checkpoint holds the tail alone): activations ``(B, C*h*w)`` -> features ``(B, 1280)``.

    Its BatchNorm layers stay in eval mode (ImageNet statistics) even while training: the
    front is frozen, so the tail's inputs keep the distribution those statistics were
    measured on; batch statistics would make a training step compute other features than
    the cached validation pass and the photo encoder do for the same input, and a running
    average at momentum 0.01 would only drift them. Their scale and shift still train.
    Stochastic depth in the residual blocks stays on in training mode (a regulariser).
    """

    def __init__(self, net: EfficientNetLite, start: int, image_size: int) -> None:
        super().__init__()
        self.start = start
        self.shape = activation_shape(net.config.name, image_size, start)
        self.blocks = nn.ModuleList(net._blocks[start:])
        self.conv_head, self.bn_head = net._conv_head, net._bn1
        self.feat_dim = int(net.feat_dim)

    def train(self, mode: bool = True) -> "BackboneTail":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().reshape(-1, *self.shape)
        for block in self.blocks:
            h = block(h)
        return F.relu6(self.bn_head(self.conv_head(h))).mean(dim=(2, 3))


def extract_activations(sources: Sequence, backbone: str, image_size: int, start: int, *,
                        engine: str = "onnx", augment_seed: int | None = None, strength: float = 1.0,
                        progress: Callable[[int], None] | None = None,
                        num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Activations at the input of block ``start`` of the pretrained ``backbone``:
    ``(float16 (N, C*h*w), ok (N,) bool)``, written batch by batch into the float16 array
    (a float32 copy of the catalogue would double the peak memory). Augmented views are
    drawn per item as :func:`~fashionhash.models.features.extract_features` draws them."""
    from .features import FeatureExtractor

    front = BackboneFront(build_backbone(backbone), start, image_size).eval()
    fx = FeatureExtractor(backbone, image_size=image_size, engine=engine, model=front)  # type: ignore[arg-type]
    return fx(list(sources), num_workers=num_workers, augment_seed=augment_seed,
              augment_strength=strength, progress=progress, dtype=np.float16)
