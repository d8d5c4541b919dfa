"""``PairwiseSimilarityLoss``: the module form of :func:`kdkernels.functional.pairwise_similarity_loss`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import _validation
from kdkernels.functional.pairwise_similarity import PAIRWISE_SIMILARITY_REDUCTIONS, pairwise_similarity_loss


class PairwiseSimilarityLoss(nn.Module):
    """Pair-wise similarity distillation of Liu et al. (CVPR 2019), tiled (no N×N matrix):
    mean over node pairs of ``(a^s_ij − a^t_ij)²``, cosine similarities with detached norms.

    Example::

        criterion = kdkernels.nn.PairwiseSimilarityLoss()
        loss = ce + 1.0 * criterion(student_psp_feat, teacher_psp_feat.detach())  # (B, C, H, W)
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _validation.check_reduction(reduction, PAIRWISE_SIMILARITY_REDUCTIONS)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return pairwise_similarity_loss(student_feat, teacher_feat, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
