"""Distillation methods, one file each: the math of docs/methods.md and nothing else."""

from kdkernels.distill.methods.attention_transfer import AttentionTransfer
from kdkernels.distill.methods.cross_entropy import CrossEntropy
from kdkernels.distill.methods.fitnets import FitNets, hint_parameters
from kdkernels.distill.methods.fsp import FSP
from kdkernels.distill.methods.gan_compression import GANCompressionDistillation
from kdkernels.distill.methods.hinton_kd import HintonKD
from kdkernels.distill.methods.mobilebert import (
    AttentionDistributionTransfer,
    FeatureMapTransfer,
    MeanVarianceTransfer,
)
from kdkernels.distill.methods.mobilebert_pretraining import PretrainingDistillation
from kdkernels.distill.methods.mobilebert_progressive import LayerwiseTransferSchedule, progressive_transfer_losses
from kdkernels.distill.methods.ofd import OFD
from kdkernels.distill.methods.rkd import RKD
from kdkernels.distill.methods.similarity_preserving import SimilarityPreserving
from kdkernels.distill.methods.structured_kd import (
    HolisticDistillation,
    PairWiseDistillation,
    PixelWiseDistillation,
    StructuredKD,
)

__all__ = [
    "AttentionDistributionTransfer",
    "AttentionTransfer",
    "CrossEntropy",
    "FSP",
    "FeatureMapTransfer",
    "FitNets",
    "GANCompressionDistillation",
    "HolisticDistillation",
    "HintonKD",
    "LayerwiseTransferSchedule",
    "MeanVarianceTransfer",
    "OFD",
    "PretrainingDistillation",
    "PairWiseDistillation",
    "PixelWiseDistillation",
    "RKD",
    "SimilarityPreserving",
    "StructuredKD",
    "hint_parameters",
    "progressive_transfer_losses",
]
