"""The fused teacher-bounded regression op, ``kdkernels::bounded_regression``, and its kernel ops.

Kernel ops, one schema (``csrc/kdkernels.cpp`` for the extension)::

    bounded_regression_rows(Tensor student, Tensor teacher, Tensor target, Tensor? mask, float margin,
                            Tensor grad_scale, bool reduce, bool student_grad) -> (Tensor, Tensor)

over (rows, K) views of one dtype with any strides and an optional (rows,) bool mask. They return
the per-row loss ``d_s if d_s + margin > d_t else 0`` (0 on masked-out rows; ``reduce=False``) or
partial sums over fixed blocks of rows (``reduce=True``), in fp32 (fp64 for fp64 inputs), and the
gradient of ``grad_scale * sum(loss)`` with respect to the student as a contiguous (rows, K)
tensor of its dtype (empty when not asked). Teacher and target never get a gradient.

``kdkernels::bounded_regression`` is the differentiable op: picks the kernel op by ``backend``,
reduces with ``torch.sum`` (deterministic), and carries the fake implementation and autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import _extension
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._kernels import kernel_op
from kdkernels.ops._reduction import NONE, grad_scale_and_divisor, reduce_differentiable, reduce_positions
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference


def _rows_fake(student, teacher, target, mask, margin, grad_scale, reduce, student_grad):
    acc = accumulation_dtype(student, teacher, target)
    rows = torch.library.get_ctx().new_dynamic_size() if reduce else student.shape[0]
    loss = student.new_empty((rows,), dtype=acc)
    grad = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    return loss, grad


if _extension.has_extension():
    torch.library.register_fake("kdkernels::bounded_regression_rows")(_rows_fake)


@torch.library.triton_op("kdkernels::bounded_regression_rows_triton", mutates_args=())
def bounded_regression_rows_triton(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    margin: float,
    grad_scale: Tensor,
    reduce: bool,
    student_grad: bool,
) -> tuple[Tensor, Tensor]:
    from kdkernels.ops.triton.bounded_regression import bounded_regression_rows

    return bounded_regression_rows(student, teacher, target, mask, margin, grad_scale, reduce, student_grad)


@torch.library.custom_op("kdkernels::bounded_regression", mutates_args=())
def bounded_regression(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    margin: float,
    reduction: int,
    scale: float,
    student_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Reduced teacher-bounded regression loss over (rows, K) boxes, and the student's gradient."""
    grad_scale, divisor = grad_scale_and_divisor(
        reduction, scale, student.shape[0], mask, student.device, accumulation_dtype(student, teacher, target)
    )
    loss, grad_student = kernel_op("bounded_regression_rows", backend)(
        student, teacher, target, mask, margin, grad_scale, reduction != NONE, student_grad
    )
    return reduce_positions(loss, reduction, scale, divisor), grad_student


@bounded_regression.register_fake
def _bounded_regression_fake(student, teacher, target, mask, margin, reduction, scale, student_grad, backend):
    acc = accumulation_dtype(student, teacher, target)
    loss = student.new_empty((student.shape[0],) if reduction == NONE else (), dtype=acc)
    grad_student = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    return loss, grad_student


def _twin(student, teacher, target, mask, margin, reduction, scale, *_):
    """``kdkernels::bounded_regression``'s loss in differentiable torch operations."""
    loss = bounded_regression_reference(student, teacher, target, margin, "none", mask)
    return reduce_differentiable(loss, reduction, scale, student.shape[0], mask)


def _backward(ctx, grad_loss, _grad_student):
    # reduction='none': a per-row grad_output broadcasts over the K coordinates.
    (grad,) = _gradients.take_gradients(ctx, bounded_regression, grad_loss, lambda g: g.unsqueeze(-1), _twin)
    return grad, None, None, None, None, None, None, None, None


_gradients.register_autograd(bounded_regression, _backward, _twin)
