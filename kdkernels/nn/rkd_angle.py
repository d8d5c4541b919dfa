"""``RKDAngleLoss``: the module form of :func:`kdkernels.functional.rkd_angle_loss`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels.functional.rkd_angle import rkd_angle_loss


class RKDAngleLoss(nn.Module):
    """RKD angle loss of Park et al. (CVPR 2019) without the B³ tensor: Huber mean over all
    ordered triples of the angle differences.

    Example::

        criterion = kdkernels.nn.RKDAngleLoss()
        loss = ce + 50.0 * criterion(student_emb, teacher_emb.detach())  # (B, D)
    """

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        return rkd_angle_loss(student_emb, teacher_emb)
