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

from kdkernels.distill import connectors
from kdkernels.distill.calibration import LossScaleWarning, calibrate_weights
from kdkernels.distill.capture import FeatureCapture, FeatureSpec, find_module, unwrap
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
    HintonKD,
    SimilarityPreserving,
    hint_parameters,
)
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
    "AttentionDistributionTransfer",
    "AttentionTransfer",
    "BornAgainEnsemble",
    "CrossEntropy",
    "DistillOutput",
    "Distiller",
    "FeatureCapture",
    "FeatureMapTransfer",
    "FeatureSpec",
    "FitNets",
    "HintonKD",
    "LossScaleWarning",
    "Method",
    "MutualLearning",
    "SimilarityPreserving",
    "born_again",
    "calibrate_weights",
    "connectors",
    "find_module",
    "hint_parameters",
    "unwrap",
]
