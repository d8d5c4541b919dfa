"""``kdkernels::bounded_regression``: the teacher-bounded regression loss of Chen et al. (2017),
declared once.

Inputs are (rows, K) views of one dtype with any strides and an optional (rows,) bool mask;
only the student gets a gradient (the teacher and the target are constants, as in the paper).
"""

from typing import Optional

from torch import Tensor

from kdkernels.ops.fused_loss import leading_index, FusedLoss
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference


def bounded_regression_rows(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    margin: float,
    grad_scale: Tensor,
    reduce: bool,
    student_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per row, ``d_s if d_s + margin > d_t else 0`` with ``d = ‖· − target‖²`` (0 on masked-out
    rows), or partial sums over fixed blocks of rows (``reduce``), in fp32 (fp64 for fp64
    inputs); the student's gradient of ``grad_scale * sum(loss)`` as a contiguous (rows, K)
    tensor of its dtype, ``2 (s − y)`` on active rows."""
    raise NotImplementedError  # a signature: csrc/cpu, csrc/cuda, ops/triton/bounded_regression.py


BOUNDED_REGRESSION = FusedLoss(
    name="bounded_regression",
    kernel=bounded_regression_rows,
    twin=lambda student, teacher, target, mask, margin: bounded_regression_reference(
        student, teacher, target, margin, "none", mask
    ),
    positions=leading_index(trailing_dims=1),  # per row of (rows, K)
    dtype_inputs=("student", "teacher", "target"),
    contiguous_grads=True,
)
