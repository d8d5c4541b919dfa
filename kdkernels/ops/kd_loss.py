"""``kdkernels::kd_loss``: T²·KL(softmax(t/T) ‖ softmax(s/T)) along the classes, declared once.

Inputs are (outer, classes, inner) views of any strides (``kdkernels._layout.class_dim_views``)
and an optional (outer, inner) bool mask; a position is one class vector.
"""

from typing import Optional

from torch import Tensor

from kdkernels.ops.fused_loss import CLASS_ROWS, FusedLoss
from kdkernels.ops.reference.kd_loss import kd_loss_positions


def kd_loss_rows(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    grad_scale: Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, T²·KL(p_t ‖ p_s) as (outer, inner) fp32 (fp64 if an input is fp64), 0 where
    masked out; the gradients of ``grad_scale * sum(loss)`` with the inputs' shapes, strides and
    dtypes: ``∂/∂s = T (p_s − p_t)``, ``∂/∂t = T p_t (log p_t − log p_s − KL/T²)``."""
    raise NotImplementedError  # a signature: csrc/cpu/kd_loss.cpp, csrc/cuda, ops/triton/kd_loss.py


def _positions(student, teacher, mask, temperature):
    # Classes last, as the public (…, V) logits usually are: torch then reduces along the
    # contiguous dimension, in the same order as a composite on the caller's tensor.
    return kd_loss_positions(student.movedim(1, -1), teacher.movedim(1, -1), temperature, -1, mask)


KD_LOSS = FusedLoss(
    name="kd_loss",
    kernel=kd_loss_rows,
    twin=_positions,
    positions=CLASS_ROWS,
)
