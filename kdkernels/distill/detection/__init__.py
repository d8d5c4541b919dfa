"""Detection distillation: Chen et al. 2017 and Localization Distillation (Zheng et al. 2022),
as methods for the :class:`~kdkernels.distill.Distiller` and as plain functions on the
tensors of any detector's heads; GFL pieces (integral, DFL, QFL), ATSS assignment with LD's
valuable localization region, a compact GFL detector, and adapters for real detectors
(``adapters.torchvision_faster_rcnn``, imported on demand).
"""

from kdkernels.distill.detection.atss import atss_assign, vlr_weights
from kdkernels.distill.detection.chen import (
    ChenDetectionKD,
    binary_class_logits,
    chen_classification_loss,
    chen_hint_loss,
    chen_regression_loss,
)
from kdkernels.distill.detection.gfl import (
    box_to_distances,
    distances_to_box,
    distribution_focal_loss,
    integral,
    quality_focal_loss,
)
from kdkernels.distill.detection.localization import (
    LocalizationDistillation,
    class_kd_loss,
    ld_box_weights,
    ld_edge_losses,
    localization_distillation_loss,
)
from kdkernels.distill.detection.targets import DetectionTargets

__all__ = [
    "ChenDetectionKD",
    "DetectionTargets",
    "LocalizationDistillation",
    "atss_assign",
    "binary_class_logits",
    "box_to_distances",
    "chen_classification_loss",
    "chen_hint_loss",
    "chen_regression_loss",
    "class_kd_loss",
    "distances_to_box",
    "distribution_focal_loss",
    "integral",
    "ld_box_weights",
    "ld_edge_losses",
    "localization_distillation_loss",
    "quality_focal_loss",
    "vlr_weights",
]
