"""A trained run's whole encoder, photos -> relaxed codes ``(N, K)``: the backbone (the
frozen run's ImageNet one, the finetuned run's own, or for a partial run the ImageNet front
up to block ``train_from`` then the run's trained tail) then the method's hash head, run as a
:class:`~fashionhash.models.features.FeatureExtractor` on ONNX Runtime or PyTorch.

Built from the method and the model config alone (no run folder), so that the pipeline's
``Run`` uses it without importing what sits above the pipeline.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from fashionhash.config import ModelConfig
from fashionhash.models.backbones import build_backbone
from fashionhash.models.descriptor import DescriptorNet
from fashionhash.models.device import device_of
from fashionhash.models.features import Engine, FeatureExtractor

if TYPE_CHECKING:  # pragma: no cover
    from fashionhash.models.quantize import Calibration


class EncoderNet(nn.Module):
    """Normalised photos ``(B, C, S, S)`` -> relaxed codes ``(B, K)``: ``backbone.embed``
    (the frozen run's ImageNet backbone, the partial run's frozen front; None for finetune
    runs, whose method holds its own) then ``method.encode`` (a partial run's method holds the
    trained tail). Exposes ``embed``/``feat_dim`` so that a
    :class:`~fashionhash.models.features.FeatureExtractor` runs and exports it."""

    def __init__(self, method: nn.Module, backbone: nn.Module | None) -> None:
        super().__init__()
        self.method = method
        self.backbone = backbone
        self.feat_dim = int(method.n_bits)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.encode(x if self.backbone is None else self.backbone.embed(x))

    def embed_maps(self, blocks: torch.Tensor, head_map: torch.Tensor) -> torch.Tensor:
        """The codes from the backbone's maps (int8 engine: the head stays float32)."""
        if self.backbone is None:
            raise ValueError("a finetune run's encoder has no separate backbone maps")
        return self.method.encode(self.backbone.embed_maps(blocks, head_map))


def build_encoder(method: nn.Module, m: ModelConfig, engine: Engine, **options: Any) -> FeatureExtractor:
    """A run's whole encoder (its trained ``method``, model config ``m``) in ``engine`` as a
    ``FeatureExtractor`` whose "features" are relaxed codes: ``fx(photos) -> (real (N, K)
    float32, ok (N,) bool)``, with the same decoding (letterbox at ``model.image_size``) for
    both engines. ``options`` go to ``FeatureExtractor`` (``threads``, ``parallel_batches``,
    ``channels_last``: on by default for the torch engine, the faster layout on CPU;
    ``calibration``: required by ``onnx_int8``, which frozen runs alone can use).
    Prefer ``run.encoder(engine)``, which builds it once."""
    if engine == "onnx_int8" and m.mode != "frozen":
        raise ValueError(f"engine onnx_int8 needs model.mode=frozen (a {m.mode} run's backbone is "
                         "not quantized): use engine onnx or torch")
    front = _front(m)
    if front is not None:  # beside the trained head, on its device
        front.to(device_of(method))
    net = EncoderNet(method, front).eval()
    options.setdefault("channels_last", engine == "torch")
    return FeatureExtractor(m.backbone, image_size=m.image_size, engine=engine, model=net, **options)


def _front(m: ModelConfig) -> nn.Module | None:
    """What runs before the method: the pretrained backbone whose features a frozen run was
    trained on, the pretrained front whose activations a partial run's tail was trained on."""
    if m.mode == "frozen":
        return build_backbone(m.backbone)
    if m.mode == "partial":
        from fashionhash.models.partial import BackboneFront, tail_start

        return BackboneFront(build_backbone(m.backbone), tail_start(m.backbone, m.train_from), m.image_size)
    return None


def build_descriptor_encoders(method: nn.Module, m: ModelConfig, engine: Engine,
                              scales: Sequence[int], calibration: "Calibration | None" = None,
                              ) -> list[FeatureExtractor]:
    """Extractors for two-stage queries (frozen runs): at ``scales[0]`` (the model's size)
    photos -> ``[relaxed code | raw descriptor]``, at each other scale photos -> raw
    descriptor; see :meth:`fashionhash.pipeline.Run.encode_two_stage`."""
    backbone = build_backbone(m.backbone).to(device_of(method))
    nets = [DescriptorNet(backbone, head=method)] + [DescriptorNet(backbone) for _ in scales[1:]]
    return [FeatureExtractor(m.backbone, image_size=int(size), engine=engine, model=net.eval(),
                             calibration=calibration)
            for size, net in zip(scales, nets)]
