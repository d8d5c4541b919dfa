"""The fused class-weighted soft cross-entropy op, ``kdkernels::weighted_soft_ce``, and its kernel ops.

Two levels, as for ``kdkernels::kd_loss``:

* kernel ops, one per backend, with one schema::

      weighted_soft_ce_rows(Tensor student, Tensor teacher, Tensor? class_weight, Tensor? mask,
                            float temperature, Tensor grad_scale, bool student_grad,
                            bool teacher_grad) -> (Tensor, Tensor, Tensor)

  ``kdkernels::weighted_soft_ce_rows`` is the compiled extension (CPU and CUDA kernels, schema in
  ``csrc/kdkernels.cpp``); ``kdkernels::weighted_soft_ce_rows_triton`` is the Triton kernel.
  ``student`` and ``teacher`` are (outer, classes, inner) views of any strides, ``class_weight`` is
  (classes,) floating (None = ones), ``mask`` is (outer, inner) bool. They return the per-position
  loss −Σ_c w_c p_t,c log p_s,c as (outer, inner) fp32 — fp64 if a logit tensor is fp64 — (0 where
  masked out) and, when asked, the gradients of ``grad_scale * sum(loss)`` with the inputs'
  shapes, strides and dtypes (empty tensors when not asked):

      ∂ℓ/∂s_j = (S·p_s,j − w_j p_t,j) / T,   ∂ℓ/∂t_j = −p_t,j (ℓ + w_j log p_s,j) / T,   S = Σ_c w_c p_t,c

  (the teacher gradient of a class with p_t,j = 0 is exactly 0). ``class_weight`` gets no gradient.

* ``kdkernels::weighted_soft_ce``: the differentiable op the public API calls. It picks the kernel op
  by ``backend``, reduces, and registers a fake implementation and autograd.
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
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_positions


def _rows_fake(student, teacher, class_weight, mask, temperature, grad_scale, student_grad, teacher_grad):
    loss = student.new_empty((student.shape[0], student.shape[2]), dtype=accumulation_dtype(student, teacher))
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    return loss, grad_student, grad_teacher


if _extension.has_extension() and hasattr(torch.ops.kdkernels, "weighted_soft_ce_rows"):
    torch.library.register_fake("kdkernels::weighted_soft_ce_rows")(_rows_fake)


@torch.library.triton_op("kdkernels::weighted_soft_ce_rows_triton", mutates_args=())
def weighted_soft_ce_rows_triton(
    student: Tensor,
    teacher: Tensor,
    class_weight: Optional[Tensor],
    mask: Optional[Tensor],
    temperature: float,
    grad_scale: Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from kdkernels.ops.triton.weighted_soft_ce import weighted_soft_ce_rows

    return weighted_soft_ce_rows(student, teacher, class_weight, mask, temperature, grad_scale, student_grad, teacher_grad)


@torch.library.custom_op("kdkernels::weighted_soft_ce", mutates_args=())
def weighted_soft_ce(
    student: Tensor,
    teacher: Tensor,
    class_weight: Optional[Tensor],
    mask: Optional[Tensor],
    temperature: float,
    reduction: int,
    scale: float,
    student_grad: bool,
    teacher_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced −Σ_c w_c softmax(t/T)_c log softmax(s/T)_c over (outer, classes, inner) views, and its gradients."""
    positions = student.shape[0] * student.shape[2]
    grad_scale, divisor = grad_scale_and_divisor(
        reduction, scale, positions, mask, student.device, accumulation_dtype(student, teacher)
    )
    loss, grad_student, grad_teacher = kernel_op("weighted_soft_ce_rows", backend)(
        student, teacher, class_weight, mask, temperature, grad_scale, student_grad, teacher_grad
    )
    return reduce_positions(loss, reduction, scale, divisor), grad_student, grad_teacher


@weighted_soft_ce.register_fake
def _weighted_soft_ce_fake(
    student, teacher, class_weight, mask, temperature, reduction, scale, student_grad, teacher_grad, backend
):
    loss_shape = (student.shape[0], student.shape[2]) if reduction == NONE else ()
    loss = student.new_empty(loss_shape, dtype=accumulation_dtype(student, teacher))
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    return loss, grad_student, grad_teacher


def _twin(student, teacher, class_weight, mask, temperature, reduction, scale, *_):
    """``kdkernels::weighted_soft_ce``'s loss in differentiable torch operations."""
    weight = None if class_weight is None else class_weight.detach()
    per_position = weighted_soft_ce_positions(student, teacher, weight, temperature, 1, mask)
    positions = student.shape[0] * student.shape[2]
    return reduce_differentiable(per_position, reduction, scale, positions, mask)


def _backward(ctx, grad_loss, _grad_student, _grad_teacher):
    # (outer, inner) per-position grad_output broadcasts over the class dimension of (outer, C, inner).
    grads = _gradients.take_gradients(ctx, weighted_soft_ce, grad_loss, lambda g: g.unsqueeze(1), _twin)
    # class_weight is a constant of the loss: the public function refuses one that requires grad.
    return grads[0], grads[1], None, None, None, None, None, None, None, None


_gradients.register_autograd(weighted_soft_ce, _backward, _twin)
