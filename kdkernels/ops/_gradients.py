"""Backward of the fused losses: the forward already computed the gradient, scale it in place.

Every fused op returns ``(loss, grad_a, grad_b)`` where the gradients are those of the returned
loss. The backward multiplies them by ``grad_output`` in place (no second N×V buffer) and skips
even that when ``grad_output`` is exactly 1 (``loss.backward()``): on CUDA a one-element device
test inside a Triton kernel decides, so there is no host synchronisation; on CPU reading the
scalar is free. A second backward through the same graph (``retain_graph=True``) cannot reuse the
scaled buffers, so it recomputes them from the saved inputs.
"""

from __future__ import annotations

import torch


def _eager(*tensors: torch.Tensor) -> bool:
    # Fake / functional tensors (torch.compile, export) must not be read or branched on.
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


def scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_output`` in place; ``grad_output`` is 0-d or broadcasts against ``grad``."""
    if grad.numel() == 0:
        return grad
    if not _eager(grad, grad_output):
        # Traced backward (AOTAutograd) may not mutate saved tensors; the compiler plans memory.
        return grad * grad_output
    if grad_output.dim() != 0:
        return grad.mul_(grad_output)
    if grad.device.type == "cpu":
        if grad_output.item() != 1.0:
            grad.mul_(grad_output)
        return grad
    if grad.device.type == "cuda" and grad.is_contiguous():
        try:
            from kdkernels.ops.triton.scale import scale_unless_one_
        except ImportError:  # no Triton: pay the extra pass
            return grad.mul_(grad_output)
        scale_unless_one_(grad, grad_output)
        return grad
    return grad.mul_(grad_output)


def gradient_buffer(input: torch.Tensor, wanted: bool) -> torch.Tensor:
    """Where a kernel writes the gradient of ``input`` (its dtype and strides), or an empty
    placeholder when that gradient is not wanted (the ops return one tensor either way)."""
    return torch.empty_like(input) if wanted else input.new_empty(0)


def setup_context_saving_gradients(ctx, inputs, output) -> None:
    """``setup_context`` for a fused op whose outputs are ``(loss, *grads)``.

    Keeps the gradients (non-differentiable outputs, so no reference cycle through ``ctx``) and
    the inputs, in case the graph is run backward twice.
    """
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    # The gradient outputs never receive a gradient; without this autograd would build an
    # input-sized zero tensor for each of them on every backward.
    ctx.set_materialize_grads(False)
    ctx.grads = grads
    ctx.num_grads = len(grads)
    ctx.inputs = inputs
    ctx.used = False


def take_gradients(ctx, op, grad_output: torch.Tensor, expand) -> list:
    """Gradients of the op's inputs, scaled by ``grad_output``; ``expand`` reshapes a per-position
    ``grad_output`` (reduction='none') so it broadcasts over the gradient."""
    if grad_output is None:  # the loss itself got no gradient (grads are not materialised)
        return [None] * ctx.num_grads
    grads = ctx.grads
    if ctx.used:  # retain_graph=True: the first backward scaled the buffers in place
        grads = op(*ctx.inputs)[1:]
    ctx.used = True
    # Drop our reference so that AccumulateGrad can adopt the buffer as .grad instead of copying it.
    ctx.grads = None
    if grad_output.dim() != 0:
        grad_output = expand(grad_output)
    # A gradient the op was told not to compute (an empty placeholder) is "no gradient".
    return [
        scale_(g, grad_output) if need and g.shape == inp.shape else None
        for g, inp, need in zip(grads, ctx.inputs, ctx.needs_input_grad)
    ]
