"""kdkernels.distill: the documented KD methods on unmodified models, on the fused losses.

    from kdkernels.distill import Distiller, HintonKD, FitNets

    distiller = Distiller(student, teacher, [
        HintonKD(temperature=4.0, alpha=0.9),
        FitNets("layer2", "layer2", student_channels=64, teacher_channels=256, weight=100.0),
    ])
    out = distiller(x, y)          # DistillOutput(student_output, losses, total)
    out.total.backward()

Pieces: :class:`FeatureCapture` (forward hooks by dotted path), connectors, :class:`Distiller`
(offline, frozen teacher), methods (one file each), schemes (mutual learning, BYOT,
born-again), and :func:`calibrate_weights` (each method's loss set to the task loss's size).
"""

from kdkernels.distill import connectors, discriminators
from kdkernels.distill.adversarial import (
    AdversarialMethod,
    AdversarialTrainer,
    discriminator_parameters,
    generator_parameters,
    gradient_penalty,
)
from kdkernels.distill import connectors
from kdkernels.distill.calibration import LossScaleWarning, calibrate_weights
from kdkernels.distill.capture import FeatureCapture, FeatureSpec, find_module, unwrap
from kdkernels.distill.detection import ChenDetectionKD, LocalizationDistillation
from kdkernels.distill.distiller import Distiller, DistillOutput
from kdkernels.distill.method import Method
from kdkernels.distill.methods import (
    FSP,
    OFD,
    RKD,
    AttentionDistributionTransfer,
    AttentionTransfer,
    CrossEntropy,
    FeatureMapTransfer,
    FitNets,
    GANCompressionDistillation,
    HintonKD,
    LayerwiseTransferSchedule,
    MeanVarianceTransfer,
    PretrainingDistillation,
    HolisticDistillation,
    PairWiseDistillation,
    PixelWiseDistillation,
    SimilarityPreserving,
    StructuredKD,
    hint_parameters,
    progressive_transfer_losses,
)
from kdkernels.distill.netaug import NetAug, Supernet
from kdkernels.distill.schemes import (
    BYOT,
    BornAgainEnsemble,
    MutualLearning,
    born_again,
)

__all__ = [
    "BYOT",
    "FSP",
    "OFD",
    "RKD",
    "AdversarialMethod",
    "AdversarialTrainer",
    "AttentionDistributionTransfer",
    "AttentionTransfer",
    "BornAgainEnsemble",
    "ChenDetectionKD",
    "CrossEntropy",
    "DistillOutput",
    "Distiller",
    "FeatureCapture",
    "FeatureMapTransfer",
    "FeatureSpec",
    "FitNets",
    "GANCompressionDistillation",
    "HintonKD",
    "LayerwiseTransferSchedule",
    "LocalizationDistillation",
    "MeanVarianceTransfer",
    "LossScaleWarning",
    "Method",
    "MutualLearning",
    "NetAug",
    "PretrainingDistillation",
    "SimilarityPreserving",
    "Supernet",
    "HolisticDistillation",
    "PairWiseDistillation",
    "PixelWiseDistillation",
    "StructuredKD",
    "born_again",
    "calibrate_weights",
    "connectors",
    "discriminator_parameters",
    "discriminators",
    "find_module",
    "generator_parameters",
    "gradient_penalty",
    "hint_parameters",
    "progressive_transfer_losses",
    "unwrap",
]
