"""The fused RKD angle op, ``kdkernels::rkd_angle``, and its kernel ops.

Kernel ops, one schema (``csrc/kdkernels.cpp`` for the extension)::

    rkd_angle_anchors(Tensor student, Tensor teacher, Tensor grad_scale, bool student_grad,
                      bool teacher_grad) -> (Tensor, Tensor, Tensor)

over (B, Ds) and (B, Dt) embeddings of any floating dtypes. They return, per anchor j, the Huber
(δ = 1) sum over all (i, k) of the angle differences ``⟨e^s_ij, e^s_kj⟩ − ⟨e^t_ij, e^t_kj⟩``
((B,), fp32 or fp64) and the gradients of ``grad_scale * sum(loss)`` with respect to student and
teacher (each input's dtype; empty when not asked), computed per anchor and tile: no B³ tensor.

``kdkernels::rkd_angle`` is the differentiable op: the mean over the B³ triples (the official
``F.smooth_l1_loss`` mean), with the fake implementation and autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkernels import _extension
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._kernels import kernel_op
from kdkernels.ops._relational import refuse_double_backward


def _anchors_fake(student, teacher, grad_scale, student_grad, teacher_grad):
    loss = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student, teacher))
    grad_s = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t


if _extension.has_extension():
    torch.library.register_fake("kdkernels::rkd_angle_anchors")(_anchors_fake)


@torch.library.triton_op("kdkernels::rkd_angle_anchors_triton", mutates_args=())
def rkd_angle_anchors_triton(
    student: Tensor, teacher: Tensor, grad_scale: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from kdkernels.ops.triton.rkd_angle import rkd_angle_anchors

    return rkd_angle_anchors(student, teacher, grad_scale, student_grad, teacher_grad)


rkd_angle_anchors_triton.register_fake(_anchors_fake)


@torch.library.custom_op("kdkernels::rkd_angle", mutates_args=())
def rkd_angle(
    student: Tensor, teacher: Tensor, student_grad: bool, teacher_grad: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean Huber loss over the B³ angle triples of (B, Ds) / (B, Dt) embeddings, and the gradients."""
    triples = float(student.shape[0]) ** 3
    grad_scale = torch.full((1,), 1.0 / triples, dtype=torch.float32, device=student.device)
    loss, grad_s, grad_t = kernel_op("rkd_angle_anchors", backend)(
        student, teacher, grad_scale, student_grad, teacher_grad
    )
    return (loss.sum() / triples).reshape(()), grad_s, grad_t


@rkd_angle.register_fake
def _rkd_angle_fake(student, teacher, student_grad, teacher_grad, backend):
    loss = student.new_empty((), dtype=accumulation_dtype(student, teacher))
    grad_s = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    refuse_double_backward("rkd_angle")
    grad_s, grad_t = _gradients.take_gradients(ctx, rkd_angle, grad_loss, lambda g: g)
    return grad_s, grad_t, None, None, None


rkd_angle.register_autograd(_backward, setup_context=_gradients.setup_context_saving_gradients)
