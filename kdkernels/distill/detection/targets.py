"""What a detector's target assignment hands to the detection KD methods, as plain tensors.

Any detector can fill one: the GFL/ATSS head of this package does
(:meth:`~kdkernels.distill.detection.gfl_detector.CompactGFL.assign`), and the torchvision
adapter does for the RPN and ROI heads of Faster R-CNN. Shapes use B images and A anchors
(or sampled proposals) per image; the methods flatten the leading dimensions.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class DetectionTargets(NamedTuple):
    """Targets of the student's head for one batch.

    Attributes:
        positive: (B, A) bool, the anchors / proposals matched to a ground-truth box (they get a
            regression loss; LD's main region).
        labels: (B, A) long class targets (Chen's hard-label loss): the background index for
            negatives. None when only LD is used.
        box_targets: (B, A, K) regression targets in the head's own parameterisation (Faster
            R-CNN deltas, GFL edge distances in stride units …); read on positive rows only.
        valid: (B, A) bool, the anchors that count for the classification loss (sampled, not
            ignored); None means all. Chen's regression normaliser is their number.
        vlr_weight: (B, A) float, LD's valuable-localisation-region weight (the IoU with the
            matched box inside the region, 0 outside); None when the VLR term is not used.
        num_level_anchors: anchors per image in each pyramid level, in order, when the anchors
            are concatenated over levels (LD's class-KD term is normalised per level).
    """

    positive: torch.Tensor
    labels: torch.Tensor | None = None
    box_targets: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    vlr_weight: torch.Tensor | None = None
    num_level_anchors: Sequence[int] | None = None


def require(target, field: str, method: str, why: str) -> torch.Tensor:
    """``target.<field>`` as a tensor, or a ValueError naming the field and what needs it."""
    if target is None:
        raise ValueError(f"{method}: target: expected a DetectionTargets (the head's assignment), got None; call distiller(x, targets)")
    value = getattr(target, field, None)
    if value is None:
        raise ValueError(f"{method}: target.{field}: missing; {why}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{method}: target.{field}: expected a tensor, got {type(value).__name__}")
    return value


def check_mask(mask: torch.Tensor, name: str, method: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{method}: {name}: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{method}: {name}: expected shape {tuple(shape)} (the predictions' rows), got {tuple(mask.shape)}")
    return mask
