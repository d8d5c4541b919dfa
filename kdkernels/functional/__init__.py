"""Loss functions. Inputs are validated here, in Python, before any kernel runs."""

from kdkernels.functional.bounded_regression import bounded_regression
from kdkernels.functional.kd_loss import kd_loss
from kdkernels.functional.kl_div import kl_div
from kdkernels.functional.margin_partial_l2 import margin_partial_l2
from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss
from kdkernels.functional.rkd_angle import rkd_angle_loss
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce
from kdkernels.llm.fused_linear import fused_linear_distill_loss
from kdkernels.llm.losses import distill_loss, generalized_jsd_loss

__all__ = [
    "bounded_regression",
    "distill_loss",
    "fused_linear_distill_loss",
    "generalized_jsd_loss",
    "kd_loss",
    "kl_div",
    "margin_partial_l2",
    "pairwise_similarity_loss",
    "rkd_angle_loss",
    "weighted_soft_ce",
]
