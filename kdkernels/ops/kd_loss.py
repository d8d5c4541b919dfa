"""The fused temperature-softmax KL op, ``kdkernels::kd_loss``, and its kernel ops.

Two levels:

* kernel ops, one per backend, with one schema::

      kd_loss_rows(Tensor student, Tensor teacher, Tensor? mask, float temperature,
                   Tensor grad_scale, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)

  ``kdkernels::kd_loss_rows`` is the compiled extension (CPU and CUDA kernels, schema in
  ``csrc/kdkernels.cpp``); ``kdkernels::kd_loss_rows_triton`` is the Triton kernel. ``student`` and
  ``teacher`` are (outer, classes, inner) views of any strides, ``mask`` is (outer, inner) bool.
  They return the per-position loss T²·KL(p_t ‖ p_s) as (outer, inner) fp32 — fp64 if an input
  is fp64 — (0 where masked out)
  and, when asked, the gradients of ``grad_scale * sum(loss)`` with the inputs' shapes, strides
  and dtypes (empty tensors when not asked).

* ``kdkernels::kd_loss``: the differentiable op the public API calls. It picks the kernel op by
  ``backend``, reduces, and registers a fake implementation and autograd, so
  ``torch.compile(fullgraph=True)`` and ``opcheck`` see one op whatever backend runs it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import _extension
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops._kernels import kernel_op
from kdkernels.ops._reduction import NONE, grad_scale_and_divisor, reduce_differentiable, reduce_positions
from kdkernels.ops.reference.kd_loss import kd_loss_positions


def _rows_fake(student, teacher, mask, temperature, grad_scale, student_grad, teacher_grad):
    loss = student.new_empty((student.shape[0], student.shape[2]), dtype=accumulation_dtype(student, teacher))
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    return loss, grad_student, grad_teacher


if _extension.has_extension():
    torch.library.register_fake("kdkernels::kd_loss_rows")(_rows_fake)


@torch.library.triton_op("kdkernels::kd_loss_rows_triton", mutates_args=())
def kd_loss_rows_triton(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    grad_scale: Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from kdkernels.ops.triton.kd_loss import kd_loss_rows

    return kd_loss_rows(student, teacher, mask, temperature, grad_scale, student_grad, teacher_grad)


@torch.library.custom_op("kdkernels::kd_loss", mutates_args=())
def kd_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    reduction: int,
    scale: float,
    student_grad: bool,
    teacher_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced T²·KL(softmax(t/T) ‖ softmax(s/T)) over (outer, classes, inner) views, and its gradients."""
    positions = student.shape[0] * student.shape[2]
    grad_scale, divisor = grad_scale_and_divisor(
        reduction, scale, positions, mask, student.device, accumulation_dtype(student, teacher)
    )
    loss, grad_student, grad_teacher = kernel_op("kd_loss_rows", backend)(
        student, teacher, mask, temperature, grad_scale, student_grad, teacher_grad
    )
    return reduce_positions(loss, reduction, scale, divisor), grad_student, grad_teacher


@kd_loss.register_fake
def _kd_loss_fake(student, teacher, mask, temperature, reduction, scale, student_grad, teacher_grad, backend):
    loss_shape = (student.shape[0], student.shape[2]) if reduction == NONE else ()
    loss = student.new_empty(loss_shape, dtype=accumulation_dtype(student, teacher))
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    return loss, grad_student, grad_teacher


def _twin(student, teacher, mask, temperature, reduction, scale, *_):
    """``kdkernels::kd_loss``'s loss in differentiable torch operations (higher-order autograd)."""
    per_position = kd_loss_positions(student, teacher, temperature, 1, mask)
    positions = student.shape[0] * student.shape[2]
    return reduce_differentiable(per_position, reduction, scale, positions, mask)


def _backward(ctx, grad_loss, _grad_student, _grad_teacher):
    # (outer, inner) per-position grad_output broadcasts over the class dimension of (outer, C, inner).
    grads = _gradients.take_gradients(ctx, kd_loss, grad_loss, lambda g: g.unsqueeze(1), _twin)
    return grads[0], grads[1], None, None, None, None, None, None, None


_gradients.register_autograd(kd_loss, _backward, _twin)
