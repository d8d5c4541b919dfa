"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning" (CVPR 2017).

For the feature maps F¹ (h×w×m) and F² (h×w×n) at the two ends of a section,

    G_ij = (1/hw) Σ_{s,t} F¹_{s,t,i} F²_{s,t,j},     L_FSP = Σ_k ‖Gᵀ_k − Gˢ_k‖²

as RepDistiller ``FSP.py`` (the reference code): the larger map of a pair is adaptive-average-
pooled to the smaller size, and the loss is the mean over (B, m, n) (``reduction="mean"``,
default); ``"paper"`` sums over (m, n) and averages over the batch, all λ_k = 1. Student and
teacher channels must match. The method has two stages: minimise L_FSP alone first
(``Distiller(student, teacher, [FSP(...)])``), then train on the task loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, check_same_shape, full_precision

REDUCTIONS = ("mean", "paper")


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, m, H, W), (B, n, H', W') → (B, m, n), pooling the larger map to the smaller size."""
    first, second = first.float(), second.float()
    if first.shape[-2:] != second.shape[-2:]:
        size = min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1])
        first, second = F.adaptive_avg_pool2d(first, size), F.adaptive_avg_pool2d(second, size)
    hw = first.shape[-2] * first.shape[-1]
    with full_precision(first):
        return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / hw


def fsp_loss(student_gram: torch.Tensor, teacher_gram: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    diff2 = (student_gram - teacher_gram.detach()).pow(2)
    return diff2.mean() if reduction == "mean" else diff2.sum() / diff2.shape[0]


class FSP(Method):
    """Sum over sections of the FSP loss.

    Args:
        student_pairs, teacher_pairs: equal-length lists of ``(start_layer, end_layer)``.
        reduction: ``"mean"`` (default, RepDistiller) or ``"paper"``.
        weight: default 1 (RepDistiller's init stage sums the pair losses unweighted).
    """

    name = "fsp"

    def __init__(
        self,
        student_pairs: Sequence[tuple[SpecLike, SpecLike]],
        teacher_pairs: Sequence[tuple[SpecLike, SpecLike]],
        reduction: str = "mean",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        student_pairs, teacher_pairs = list(student_pairs), list(teacher_pairs)
        if len(student_pairs) != len(teacher_pairs) or not student_pairs:
            raise ValueError(f"fsp: expected as many student pairs as teacher pairs (at least one), got {len(student_pairs)} and {len(teacher_pairs)}")
        if any(len(pair) != 2 for pair in student_pairs + teacher_pairs):
            raise ValueError("fsp: every pair must be (start_layer, end_layer)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        super().__init__([p for pair in student_pairs for p in pair], [p for pair in teacher_pairs for p in pair], weight, name)
        self.reduction = reduction

    def forward(self, student, teacher, target):
        loss = 0.0
        for k in range(0, len(student), 2):
            g_s = fsp_matrix(student[k], student[k + 1])
            g_t = fsp_matrix(teacher[k].detach(), teacher[k + 1].detach())
            what = f"FSP matrix of ({self.student_features[k]}, {self.student_features[k + 1]})"
            check_same_shape(self.name, what, g_s, g_t, "student and teacher channels must match")
            loss = loss + fsp_loss(g_s, g_t, self.reduction)
        return loss
