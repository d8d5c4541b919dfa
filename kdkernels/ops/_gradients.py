"""Autograd of the fused losses: first-order gradients from the forward pass, everything else
through a differentiable twin.

Every fused op returns ``(loss, grad_a[, grad_b])`` where the gradients are those of the returned
loss with respect to the op's first one or two arguments. The backward multiplies them by
``grad_output`` in place (no second N×V buffer) and skips even that when ``grad_output`` is
exactly 1 (``loss.backward()``): on CUDA a one-element device test inside a Triton kernel decides,
so there is no host synchronisation; on CPU reading the scalar is free. A second backward through
the same graph (``retain_graph=True``) cannot reuse the scaled buffers, so it recomputes them from
the saved inputs.

The precomputed gradient is a constant: it cannot give second-order gradients, tangents, or
per-sample gradients. So each op also has a *twin*, the same loss written with differentiable
torch operations on the op's own arguments (``kdkernels.ops.reference.twins``), and

* a backward run with grad mode on (``create_graph=True``: double backward, gradient penalties,
  ``gradgradcheck``) differentiates the twin instead, so the gradients it returns are themselves
  differentiable;
* a call with forward-mode tangents (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``)
  or under a functorch transform (``torch.func.grad``/``vjp``/``jacrev``, ``vmap`` over those)
  runs the twin in place of the kernel, so the transform sees ordinary torch operations.
  (``vmap`` alone runs the kernel once per sample: torch's fallback for custom ops.)

Saved inputs go through ``ctx.save_for_backward``: an input modified in place after the forward
makes the backward raise torch's version-counter error, as a composite implementation would,
instead of silently using gradients of the old values or recomputing with the new ones.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad


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
    saves the inputs, for a second backward or a differentiable (twin) one.
    """
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    # The gradient outputs never receive a gradient; without this autograd would build an
    # input-sized zero tensor for each of them on every backward.
    ctx.set_materialize_grads(False)
    ctx.grads = grads
    ctx.num_grads = len(grads)
    tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    ctx.tensor_positions = tensor_positions
    ctx.other_inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]
    ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
    ctx.used = False


def _saved_inputs(ctx) -> list:
    # ctx.saved_tensors checks the version counters: an input changed in place since the forward
    # raises here, exactly as for torch's own saved tensors.
    inputs = list(ctx.other_inputs)
    for i, x in zip(ctx.tensor_positions, ctx.saved_tensors):
        inputs[i] = x
    return inputs


def _twin_gradients(ctx, twin: Callable, inputs: list, grad_output: torch.Tensor) -> list:
    """Gradients of ``twin(*inputs)`` (the op's loss) with a graph, for higher-order autograd."""
    wanted = [i for i in range(ctx.num_grads) if ctx.needs_input_grad[i]]
    grads: list = [None] * ctx.num_grads
    if not wanted:
        return grads
    with torch.enable_grad():
        loss = twin(*inputs)
        found = torch.autograd.grad(
            loss, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True
        )
    for i, g in zip(wanted, found):
        grads[i] = g
    return grads


def take_gradients(ctx, op, grad_output: torch.Tensor, expand, twin: Callable | None = None) -> list:
    """Gradients of the op's inputs, scaled by ``grad_output``; ``expand`` reshapes a per-position
    ``grad_output`` (reduction='none') so it broadcasts over the gradient. With grad mode on
    (``create_graph=True``) they come from the differentiable ``twin``."""
    inputs = _saved_inputs(ctx)
    if grad_output is None:  # the loss itself got no gradient (grads are not materialised)
        return [None] * ctx.num_grads
    if twin is not None and torch.is_grad_enabled():
        return _twin_gradients(ctx, twin, inputs, grad_output)
    grads = ctx.grads
    if ctx.used:  # retain_graph=True: the first backward scaled the buffers in place
        grads = op(*inputs)[1:]
    ctx.used = True
    # Drop our reference so that AccumulateGrad can adopt the buffer as .grad instead of copying it.
    ctx.grads = None
    if grad_output.dim() != 0:
        grad_output = expand(grad_output)
    # A gradient the op was told not to compute (an empty placeholder) is "no gradient".
    return [
        scale_(g, grad_output) if need and g.shape == inp.shape else None
        for g, inp, need in zip(grads, inputs, ctx.needs_input_grad)
    ]


def _needs_twin(args) -> bool:
    """True when a transform the precomputed gradient cannot serve is watching this call:
    forward-mode tangents on an input, or functorch's wrappers (torch.func.grad, jvp, ...)."""
    if torch.compiler.is_compiling():
        return False
    dual_level_active = _forward_ad._current_level >= 0
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(a):
            return True
        if dual_level_active and _forward_ad.unpack_dual(a).tangent is not None:
            return True
    return False


def register_autograd(op, backward: Callable, twin: Callable) -> None:
    """Register ``backward`` (built on :func:`take_gradients`) as ``op``'s autograd, and route
    forward-mode AD and functorch transforms through ``twin`` (see the module docstring)."""
    op.register_autograd(backward, setup_context=setup_context_saving_gradients)
    # The autograd kernel custom_op itself registers (an autograd.Function around the op).
    fused_autograd = torch._library.autograd.make_autograd_impl(op._opoverload, op)
    num_outputs = len(op._opoverload._schema.returns)

    def autograd_kernel(keyset, *args):
        if _needs_twin(args):
            loss = twin(*args)
            # The gradient outputs are placeholders here (the public functions discard them).
            return (loss, *(args[0].new_empty(0) for _ in range(num_outputs - 1)))
        return fused_autograd(keyset, *args)

    with warnings.catch_warnings():
        # Replacing the kernel custom_op registered (ours too) warns once per process.
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
        # Older torch (2.11) refuses to replace a Python kernel unless told to (2.13 allows it by
        # default); torch before the flag existed replaced it silently.
        override = {"allow_override": True} if "allow_override" in inspect.signature(op._lib.impl).parameters else {}
        op._lib.impl(op._name, autograd_kernel, "Autograd", with_keyset=True, **override)
