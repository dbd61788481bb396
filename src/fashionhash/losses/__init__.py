"""Losses: one small ``nn.Module`` each, hyper-parameters in the constructor, registered by name."""
from fashionhash.losses.core import (
    LOSSES,
    ClassificationLoss,
    ConfusionLoss,
    DiscriminatorLoss,
    ItemContrastLoss,
    PairwiseHammingLoss,
    QuantizationLoss,
    WeightedSum,
    relaxed_hamming,
)
from fashionhash.losses.peers import (  # after core: the peers import from it
    AttributeClassificationLoss, CauchyCrossEntropyLoss, CauchyQuantizationLoss,
    CentralSimilarityLoss, DPSHLikelihoodLoss, DSHContrastiveLoss, DSHRegularizer, HashNetLoss,
    LogCoshQuantizationLoss, SignQuantizationLoss, SoftBinomialDevianceLoss, cauchy_distance,
)

__all__ = [
    "LOSSES", "ClassificationLoss", "ConfusionLoss", "DiscriminatorLoss", "ItemContrastLoss",
    "PairwiseHammingLoss", "QuantizationLoss", "WeightedSum", "relaxed_hamming",
    "AttributeClassificationLoss", "CauchyCrossEntropyLoss", "CauchyQuantizationLoss",
    "CentralSimilarityLoss", "DPSHLikelihoodLoss", "DSHContrastiveLoss", "DSHRegularizer",
    "HashNetLoss", "LogCoshQuantizationLoss", "SignQuantizationLoss", "SoftBinomialDevianceLoss",
    "cauchy_distance",
]
