"""``kdkernels::weighted_soft_ce``: −Σ_c w_c softmax(t/T)_c log softmax(s/T)_c, declared once.

Inputs are (outer, classes, inner) views of any strides, an optional (classes,) floating class
weight (None = ones; a constant: it gets no gradient) and an optional (outer, inner) bool mask.
"""

from typing import Optional

from torch import Tensor

from kdkernels.ops.fused_loss import CLASS_ROWS, FusedLoss
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_positions


def weighted_soft_ce_rows(
    student: Tensor,
    teacher: Tensor,
    class_weight: Optional[Tensor],
    mask: Optional[Tensor],
    temperature: float,
    grad_scale: Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, ``ℓ = −Σ_c w_c p_t,c log p_s,c`` as (outer, inner) fp32 (fp64 if a logit
    tensor is fp64), 0 where masked out; the gradients of ``grad_scale * sum(loss)`` with the
    inputs' shapes, strides and dtypes: ``∂ℓ/∂s_j = (S·p_s,j − w_j p_t,j) / T`` and
    ``∂ℓ/∂t_j = −p_t,j (ℓ + w_j log p_s,j) / T`` with ``S = Σ_c w_c p_t,c`` (exactly 0 where
    ``p_t,j = 0``)."""
    raise NotImplementedError  # a signature: csrc/cpu, csrc/cuda, ops/triton/weighted_soft_ce.py


def _positions(student, teacher, class_weight, mask, temperature):
    weight = None if class_weight is None else class_weight.detach()
    # Classes last, as for kd_loss's twin.
    return weighted_soft_ce_positions(student.movedim(1, -1), teacher.movedim(1, -1), weight, temperature, -1, mask)


WEIGHTED_SOFT_CE = FusedLoss(
    name="weighted_soft_ce",
    kernel=weighted_soft_ce_rows,
    twin=_positions,
    positions=CLASS_ROWS,
)
