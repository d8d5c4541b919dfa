"""The fused pair-wise similarity distillation op, ``kdkernels::pairwise_similarity``, and its kernel ops.

Kernel ops, one schema (``csrc/kdkernels.cpp`` for the extension)::

    pairwise_similarity_batches(Tensor student, Tensor teacher, Tensor grad_scale, bool student_grad,
                                bool teacher_grad) -> (Tensor, Tensor, Tensor)

over (B, N, Cs) and (B, N, Ct) node features of any strides and floating dtypes. They return the
per-batch-element loss ``(1/N²) Σ_ij (a^s_ij − a^t_ij)²`` (B,) in fp32 (fp64 for fp64 inputs) and
the gradients of ``grad_scale * sum(loss)`` with respect to student and teacher (each input's
dtype, contiguous; empty when not asked), computed tile by tile: no N×N matrix, memory O(N·C).

``kdkernels::pairwise_similarity`` is the differentiable op: picks the kernel op by ``backend``,
reduces over the batch, and carries the fake implementation and autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkernels import _extension
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._kernels import kernel_op
from kdkernels.ops._reduction import NONE, grad_scale_and_divisor, reduce_positions
from kdkernels.ops._relational import refuse_double_backward


def _batches_fake(student, teacher, grad_scale, student_grad, teacher_grad):
    loss = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student, teacher))
    grad_s = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t


if _extension.has_extension():
    torch.library.register_fake("kdkernels::pairwise_similarity_batches")(_batches_fake)


@torch.library.triton_op("kdkernels::pairwise_similarity_batches_triton", mutates_args=())
def pairwise_similarity_batches_triton(
    student: Tensor, teacher: Tensor, grad_scale: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from kdkernels.ops.triton.pairwise_similarity import pairwise_similarity_batches

    return pairwise_similarity_batches(student, teacher, grad_scale, student_grad, teacher_grad)


pairwise_similarity_batches_triton.register_fake(_batches_fake)


@torch.library.custom_op("kdkernels::pairwise_similarity", mutates_args=())
def pairwise_similarity(
    student: Tensor, teacher: Tensor, reduction: int, student_grad: bool, teacher_grad: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair-wise similarity loss of (B, N, Cs) / (B, N, Ct) nodes reduced over the batch, and the gradients."""
    grad_scale, divisor = grad_scale_and_divisor(reduction, 1.0, student.shape[0], None, student.device)
    loss, grad_s, grad_t = kernel_op("pairwise_similarity_batches", backend)(
        student, teacher, grad_scale, student_grad, teacher_grad
    )
    return reduce_positions(loss, reduction, 1.0, divisor), grad_s, grad_t


@pairwise_similarity.register_fake
def _pairwise_similarity_fake(student, teacher, reduction, student_grad, teacher_grad, backend):
    acc = accumulation_dtype(student, teacher)
    loss = student.new_empty((student.shape[0],) if reduction == NONE else (), dtype=acc)
    grad_s = student.new_empty(student.shape) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    refuse_double_backward("pairwise_similarity")
    # reduction='none': a per-batch-element grad_output broadcasts over (N, C).
    grad_s, grad_t = _gradients.take_gradients(ctx, pairwise_similarity, grad_loss, lambda g: g.reshape(-1, 1, 1))
    return grad_s, grad_t, None, None, None, None


pairwise_similarity.register_autograd(_backward, setup_context=_gradients.setup_context_saving_gradients)
