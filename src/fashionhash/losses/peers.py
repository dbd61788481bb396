"""The peer methods' losses in one import (DPSH, HashNet, DCH, DSH, CSQ, SGML)."""
from fashionhash.losses.metric import (
    AttributeClassificationLoss,
    CentralSimilarityLoss,
    LogCoshQuantizationLoss,
    SoftBinomialDevianceLoss,
)
from fashionhash.losses.pairwise import (
    CauchyCrossEntropyLoss,
    CauchyQuantizationLoss,
    DPSHLikelihoodLoss,
    DSHContrastiveLoss,
    DSHRegularizer,
    HashNetLoss,
    SignQuantizationLoss,
    cauchy_distance,
)

__all__ = [
    "AttributeClassificationLoss", "CauchyCrossEntropyLoss", "CauchyQuantizationLoss",
    "CentralSimilarityLoss", "DPSHLikelihoodLoss", "DSHContrastiveLoss", "DSHRegularizer",
    "HashNetLoss", "LogCoshQuantizationLoss", "SignQuantizationLoss", "SoftBinomialDevianceLoss",
    "cauchy_distance",
]
