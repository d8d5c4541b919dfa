"""``BoundedRegressionLoss``: the module form of :func:`kdkernels.functional.bounded_regression`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import _validation
from kdkernels.functional.bounded_regression import BOUNDED_REGRESSION_REDUCTIONS, bounded_regression


class BoundedRegressionLoss(nn.Module):
    """Teacher-bounded regression loss of Chen et al. (NeurIPS 2017), fused: ``‖R_s − y‖²`` on rows
    where ``‖R_s − y‖² + m > ‖R_t − y‖²``, else 0.

    Example::

        criterion = kdkernels.nn.BoundedRegressionLoss(margin=0.0)
        loss_reg = smooth_l1 + 0.5 * criterion(student_deltas, teacher_deltas.detach(), targets, mask=positive)
    """

    def __init__(self, margin: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = _validation.check_finite_real(margin, "margin")
        self.reduction = _validation.check_reduction(reduction, BOUNDED_REGRESSION_REDUCTIONS)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return bounded_regression(student, teacher, target, self.margin, self.reduction, mask)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"
