"""The fused KL-divergence op behind the drop-in ``kl_div`` / ``KLDivLoss``: ``kdkernels::kl_div``.

Kernel ops, one schema (``csrc/kdkernels.cpp`` for the extension)::

    kl_div_pointwise(Tensor input, Tensor target, bool log_target, Tensor grad_scale, bool reduce,
                     bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)

over contiguous tensors of one shape: the pointwise loss (``reduce=False``) or partial sums over
fixed blocks (``reduce=True``), in fp32 (fp64 for fp64 inputs), and the gradients of
``grad_scale * sum(loss)`` in each input's dtype (empty when not asked).
``kdkernels::kl_div`` is the differentiable op: picks the kernel op by ``backend``, reduces, and
carries the fake implementation and autograd.
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
from kdkernels.ops.reference.kl_div import kl_div_pointwise_reference


def _pointwise_fake(input, target, log_target, grad_scale, reduce, input_grad, target_grad):
    # The number of partial sums is a backend detail; callers only sum them.
    loss_shape = (torch.library.get_ctx().new_dynamic_size(),) if reduce else input.shape
    loss = input.new_empty(loss_shape, dtype=accumulation_dtype(input, target))
    grad_input = gradient_buffer(input, input_grad)
    grad_target = gradient_buffer(target, target_grad)
    return loss, grad_input, grad_target


if _extension.has_extension():
    torch.library.register_fake("kdkernels::kl_div_pointwise")(_pointwise_fake)


@torch.library.triton_op("kdkernels::kl_div_pointwise_triton", mutates_args=())
def kl_div_pointwise_triton(
    input: Tensor, target: Tensor, log_target: bool, grad_scale: Tensor, reduce: bool, input_grad: bool, target_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from kdkernels.ops.triton.kl_div import kl_div_pointwise

    return kl_div_pointwise(input, target, log_target, grad_scale, reduce, input_grad, target_grad)


@torch.library.custom_op("kdkernels::kl_div", mutates_args=())
def kl_div(
    input: Tensor,
    target: Tensor,
    log_target: bool,
    reduction: int,
    scale: float,
    input_grad: bool,
    target_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced torch-semantics KL divergence of contiguous same-shape tensors, and its gradients."""
    grad_scale, divisor = grad_scale_and_divisor(
        reduction, scale, input.numel(), None, input.device, accumulation_dtype(input, target)
    )
    loss, grad_input, grad_target = kernel_op("kl_div_pointwise", backend)(
        input, target, log_target, grad_scale, reduction != NONE, input_grad, target_grad
    )
    return reduce_positions(loss, reduction, scale, divisor), grad_input, grad_target


@kl_div.register_fake
def _kl_div_fake(input, target, log_target, reduction, scale, input_grad, target_grad, backend):
    loss = input.new_empty(input.shape if reduction == NONE else (), dtype=accumulation_dtype(input, target))
    grad_input = gradient_buffer(input, input_grad)
    grad_target = gradient_buffer(target, target_grad)
    return loss, grad_input, grad_target


def _twin(input, target, log_target, reduction, scale, *_):
    """``kdkernels::kl_div``'s loss in differentiable torch operations."""
    acc = accumulation_dtype(input, target)
    pointwise = kl_div_pointwise_reference(input.to(acc), target.to(acc), log_target)
    return reduce_differentiable(pointwise, reduction, scale, input.numel(), None)


def _backward(ctx, grad_loss, _grad_input, _grad_target):
    grads = _gradients.take_gradients(ctx, kl_div, grad_loss, lambda g: g, _twin)
    return grads[0], grads[1], None, None, None, None, None, None


_gradients.register_autograd(kl_div, _backward, _twin)
