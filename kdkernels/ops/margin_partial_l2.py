"""The fused Margin-ReLU partial L2 op, ``kdkernels::margin_partial_l2``, and its kernel ops.

Kernel ops, one schema (``csrc/kdkernels.cpp`` for the extension)::

    margin_partial_l2_elements(Tensor student, Tensor teacher, Tensor margin, int channel_stride,
                               Tensor grad_scale, bool reduce, bool student_grad) -> (Tensor, Tensor)

``student`` and ``teacher`` are read as flat arrays in memory order: both non-overlapping and dense
with the same strides (NCHW, channels_last, (N, L, C) tokens, ...), so no layout is copied. The
channel of flat element ``i`` is ``(i // channel_stride) % C`` with ``C = margin.numel()`` and
``channel_stride`` the channel dimension's stride (:func:`dense_channel_stride`); ``margin`` is
(C,) in the accumulation dtype (fp32, fp64 for fp64 inputs). They return the elementwise loss
(``reduce=False``, the student's shape and strides) or partial sums over fixed blocks
(``reduce=True``), in the accumulation dtype, and the gradient of ``grad_scale * sum(loss)`` with
respect to the student (its shape, strides and dtype; empty when not asked). The teacher never
gets a gradient: the paper and the official code detach it.

``kdkernels::margin_partial_l2`` is the differentiable op: picks the kernel op by ``backend``,
reduces with ``torch.sum`` (deterministic), and carries the fake implementation and autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkernels import _extension
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops._kernels import kernel_op
from kdkernels.ops._reduction import NONE, grad_scale_and_divisor, reduce_differentiable, reduce_positions
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_elements


def dense_channel_stride(x: Tensor, channel_dim: int) -> int | None:
    """The stride of ``channel_dim`` if ``x`` is non-overlapping and dense (any dimension order),
    so that flat element ``i`` of its memory lies in channel ``(i // stride) % C``; else None."""
    expected = 1
    for d in sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=x.stride):
        if x.stride(d) != expected:
            return None
        expected *= x.shape[d]
    return x.stride(channel_dim) if x.shape[channel_dim] > 1 else 1


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same strides on every dimension longer than 1 (the others are never stepped along)."""
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] > 1)


def _elements_fake(student, teacher, margin, channel_stride, grad_scale, reduce, student_grad):
    acc = accumulation_dtype(student, teacher)
    if reduce:  # the number of partial sums is a backend detail; callers only sum them
        loss = student.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=acc)
    else:
        loss = torch.empty_like(student, dtype=acc)
    grad = gradient_buffer(student, student_grad)
    return loss, grad


if _extension.has_extension():
    torch.library.register_fake("kdkernels::margin_partial_l2_elements")(_elements_fake)


@torch.library.triton_op("kdkernels::margin_partial_l2_elements_triton", mutates_args=())
def margin_partial_l2_elements_triton(
    student: Tensor,
    teacher: Tensor,
    margin: Tensor,
    channel_stride: int,
    grad_scale: Tensor,
    reduce: bool,
    student_grad: bool,
) -> tuple[Tensor, Tensor]:
    from kdkernels.ops.triton.margin_partial_l2 import margin_partial_l2_elements

    return margin_partial_l2_elements(student, teacher, margin, channel_stride, grad_scale, reduce, student_grad)


@torch.library.custom_op("kdkernels::margin_partial_l2", mutates_args=())
def margin_partial_l2(
    student: Tensor,
    teacher: Tensor,
    margin: Tensor,
    channel_stride: int,
    reduction: int,
    scale: float,
    student_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Reduced partial L2 of ``max(teacher, margin_c)`` and ``student`` (same dense layout), and the
    student's gradient."""
    grad_scale, divisor = grad_scale_and_divisor(
        reduction, scale, student.numel(), None, student.device, accumulation_dtype(student, teacher)
    )
    loss, grad_student = kernel_op("margin_partial_l2_elements", backend)(
        student, teacher, margin, channel_stride, grad_scale, reduction != NONE, student_grad
    )
    return reduce_positions(loss, reduction, scale, divisor), grad_student


@margin_partial_l2.register_fake
def _margin_partial_l2_fake(student, teacher, margin, channel_stride, reduction, scale, student_grad, backend):
    acc = accumulation_dtype(student, teacher)
    loss = torch.empty_like(student, dtype=acc) if reduction == NONE else student.new_empty((), dtype=acc)
    grad_student = gradient_buffer(student, student_grad)
    return loss, grad_student


def _channel_dim(x: Tensor, channel_stride: int, channels: int) -> int | None:
    """The dimension ``margin`` indexes: of length ``channels`` with stride ``channel_stride``."""
    for d in range(x.dim()):
        if x.shape[d] == channels and x.stride(d) == channel_stride:
            return d
    return None


def _twin(student, teacher, margin, channel_stride, reduction, scale, *_):
    """``kdkernels::margin_partial_l2``'s loss in differentiable torch operations."""
    channels = margin.numel()
    channel_dim = _channel_dim(student, channel_stride, channels) if channels > 1 else None
    if channel_dim is None:  # one channel: the margin is a scalar
        student_, teacher_ = student.unsqueeze(0), teacher.unsqueeze(0)
        loss = margin_partial_l2_elements(student_, teacher_, margin.reshape(1), 0).squeeze(0)
    else:
        loss = margin_partial_l2_elements(student, teacher, margin, channel_dim)
    return reduce_differentiable(loss, reduction, scale, student.numel(), None)


def _backward(ctx, grad_loss, _grad_student):
    # reduction='none': grad_output has the student's shape already.
    (grad,) = _gradients.take_gradients(ctx, margin_partial_l2, grad_loss, lambda g: g, _twin)
    return grad, None, None, None, None, None, None, None


_gradients.register_autograd(margin_partial_l2, _backward, _twin)
