"""``KLDivLoss``: a drop-in for ``torch.nn.KLDivLoss`` on the fused kernel."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels.functional.kl_div import kl_div, legacy_reduction


class KLDivLoss(nn.Module):
    """Same constructor and semantics as ``torch.nn.KLDivLoss`` (including the legacy
    ``size_average`` / ``reduce`` arguments and the warning for ``reduction="mean"``).

    For knowledge distillation use ``reduction="batchmean"`` (the true KL averaged over the batch)
    or, better, :class:`kdkernels.nn.KDLoss`, which also fuses the two softmaxes.
    """

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__()
        self.reduction = legacy_reduction(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)
