"""``WeightedSoftCELoss``: the module form of :func:`kdkernels.functional.weighted_soft_ce`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import _validation
from kdkernels.functional.weighted_soft_ce import (
    WEIGHTED_SOFT_CE_REDUCTIONS,
    check_class_weight_values,
    weighted_soft_ce,
)


class WeightedSoftCELoss(nn.Module):
    """Class-weighted soft cross-entropy ``−Σ_c w_c softmax(t/T)_c log softmax(s/T)_c`` along ``dim``, fused.

    Chen et al. (NeurIPS 2017) distil detectors with a background weight of 1.5; ``class_weight``
    is registered as a buffer, so it follows ``.to(device)`` and is saved in the ``state_dict``.

    Example::

        weight = torch.ones(num_classes)
        weight[0] = 1.5  # background
        soft = kdkernels.nn.WeightedSoftCELoss(class_weight=weight)
        loss_cls = mu * hard_ce + (1 - mu) * soft(student_logits, teacher_logits.detach())
    """

    class_weight: torch.Tensor | None

    def __init__(
        self,
        class_weight: torch.Tensor | None = None,
        temperature: float = 1.0,
        reduction: str = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__()
        if class_weight is not None:
            _validation.check_tensor(class_weight, "class_weight")
            if class_weight.dim() != 1:
                raise ValueError(f"class_weight: expected a 1-d tensor (one weight per class), got shape {tuple(class_weight.shape)}")
            if class_weight.numel() == 0:
                raise ValueError("class_weight: expected one weight per class, got an empty tensor (a softmax needs at least one class)")
            check_class_weight_values(class_weight)  # once, here, rather than on every call
            class_weight = class_weight.detach().clone()
        self.register_buffer("class_weight", class_weight)
        self.temperature = _validation.check_temperature(temperature)
        self.reduction = _validation.check_reduction(reduction, WEIGHTED_SOFT_CE_REDUCTIONS)
        self.dim = _validation.check_int(dim, "dim")

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return weighted_soft_ce(
            student_logits, teacher_logits, self.class_weight, self.temperature, self.reduction, self.dim, mask
        )

    def extra_repr(self) -> str:
        classes = None if self.class_weight is None else self.class_weight.numel()
        return f"classes={classes}, temperature={self.temperature}, reduction={self.reduction!r}, dim={self.dim}"
