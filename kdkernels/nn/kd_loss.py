"""``KDLoss``: the module form of :func:`kdkernels.functional.kd_loss`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import _validation
from kdkernels.functional.kd_loss import KD_REDUCTIONS, kd_loss


class KDLoss(nn.Module):
    """Hinton KD loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` along ``dim``, fused.

    Example::

        criterion = kdkernels.nn.KDLoss(temperature=4.0)
        loss = alpha * criterion(student_logits, teacher_logits.detach()) + (1 - alpha) * ce
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", dim: int = -1, *, process_group=None) -> None:
        super().__init__()
        self.temperature = _validation.check_temperature(temperature)
        self.reduction = _validation.check_reduction(reduction, KD_REDUCTIONS)
        self.dim = _validation.check_int(dim, "dim")
        self.process_group = process_group  # logits sharded along the classes over these ranks (kd_loss's)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, self.reduction, self.dim, mask,
                       process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, dim={self.dim}"
