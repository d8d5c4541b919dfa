"""``MarginPartialL2Loss``: the module form of :func:`kdkernels.functional.margin_partial_l2`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import _validation
from kdkernels.functional.margin_partial_l2 import (
    MARGIN_PARTIAL_L2_REDUCTIONS,
    margin_partial_l2,
)
from kdkernels.ofd_margin import ofd_margin


class MarginPartialL2Loss(nn.Module):
    """Margin-ReLU partial L2 of Overhaul of Feature Distillation (Heo et al., ICCV 2019), fused.

    ``margin`` (C,) is kept as a buffer (it follows ``.to()`` and ``state_dict``); it can instead be
    passed to ``forward``. The teacher gets no gradient (the paper detaches it).

    Example::

        criterion = kdkernels.nn.MarginPartialL2Loss.from_bn(teacher.layer4[-1].bn3, reduction="batchmean")
        loss = ce + 1e-4 * criterion(connector(student_feature), teacher_feature)
    """

    margin: torch.Tensor | None

    def __init__(self, margin: torch.Tensor | None = None, reduction: str = "sum", channel_dim: int = 1) -> None:
        super().__init__()
        self.reduction = _validation.check_reduction(reduction, MARGIN_PARTIAL_L2_REDUCTIONS)
        self.channel_dim = _validation.check_int(channel_dim, "channel_dim")
        if margin is not None:
            _validation.check_tensor(margin, "margin")
            if margin.numel() == 0:
                raise ValueError(f"margin: expected one value per channel, got an empty tensor of shape {tuple(margin.shape)}")
            if sum(size != 1 for size in margin.shape) > 1:
                raise ValueError(
                    f"margin: expected one value per channel, (C,) or the official (1, C, 1, 1), got shape {tuple(margin.shape)}"
                )
            # Checked once here, on any device (the functional skips it on GPUs to avoid a sync).
            if not bool(torch.isfinite(margin).all()):
                raise ValueError("margin: expected finite values")
            margin = margin.detach().to(torch.float32).reshape(-1).clone()
        self.register_buffer("margin", margin)

    @classmethod
    def from_bn(cls, bn: nn.Module, reduction: str = "sum", channel_dim: int = 1) -> "MarginPartialL2Loss":
        """The loss with the margins of the teacher's BatchNorm ``bn`` (:func:`kdkernels.ofd_margin`)."""
        return cls(ofd_margin(bn), reduction, channel_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
        if margin is None:
            margin = self.margin
        if margin is None:
            raise ValueError("margin: MarginPartialL2Loss was built without margins; pass margin= to forward")
        return margin_partial_l2(student, teacher, margin, self.reduction, self.channel_dim)

    def extra_repr(self) -> str:
        channels = None if self.margin is None else self.margin.numel()
        return f"channels={channels}, reduction={self.reduction!r}, channel_dim={self.channel_dim}"
