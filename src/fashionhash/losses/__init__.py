"""Losses: one small ``nn.Module`` each, hyper-parameters in the constructor, registered by name."""
from fashionhash.losses.core import (
    LOSSES,
    ClassificationLoss,
    ConfusionLoss,
    DiscriminatorLoss,
    PairwiseHammingLoss,
    QuantizationLoss,
    WeightedSum,
    relaxed_hamming,
)

__all__ = [
    "LOSSES", "ClassificationLoss", "ConfusionLoss", "DiscriminatorLoss",
    "PairwiseHammingLoss", "QuantizationLoss", "WeightedSum", "relaxed_hamming",
]
