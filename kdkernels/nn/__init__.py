"""nn.Module wrappers of kdkernels.functional."""

from kdkernels.nn.bounded_regression import BoundedRegressionLoss
from kdkernels.nn.kd_loss import KDLoss
from kdkernels.nn.kl_div import KLDivLoss
from kdkernels.nn.margin_partial_l2 import MarginPartialL2Loss
from kdkernels.nn.pairwise_similarity import PairwiseSimilarityLoss
from kdkernels.nn.rkd_angle import RKDAngleLoss
from kdkernels.nn.weighted_soft_ce import WeightedSoftCELoss
from kdkernels.llm.modules import DistillLoss, FusedLinearDistillLoss, GeneralizedJSDLoss

__all__ = [
    "BoundedRegressionLoss",
    "DistillLoss",
    "FusedLinearDistillLoss",
    "GeneralizedJSDLoss",
    "KDLoss",
    "KLDivLoss",
    "MarginPartialL2Loss",
    "PairwiseSimilarityLoss",
    "RKDAngleLoss",
    "WeightedSoftCELoss",
]
