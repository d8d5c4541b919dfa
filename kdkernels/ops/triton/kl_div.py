"""Triton kernel of ``kl_div_pointwise``: torch's KL-divergence pointwise loss, its two gradients
and (when reducing) a per-program partial sum, from one read of ``input`` and ``target``.

Pointwise, as ``torch.kl_div``: ``ℓ = xlogy(y, y) − y·x`` (``log_target=False``) or
``ℓ = e^y (y − x)`` (``log_target=True``). Gradients: ``∂ℓ/∂x = −y`` (or ``−e^y``);
``∂ℓ/∂y = log y + 1 − x`` for y > 0 and 0 at y = 0 (or ``e^y (y − x + 1)``).
Partial sums are per fixed block, summed afterwards by ``torch.sum``: bit-for-bit repeatable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops.triton.launch import wrap_triton

BLOCK = 4096


@triton.jit
def _kl_div_kernel(
    X, Y, LOSS, GX, GY, GRAD_SCALE, n,
    ACC: tl.constexpr, LOG_TARGET: tl.constexpr, REDUCE: tl.constexpr,
    INPUT_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(ACC)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(ACC)
    if LOG_TARGET:
        e_y = tl.exp(y)
        loss = e_y * (y - x)
    else:
        # xlogy(y, y): 0 at y = 0 (and NaN for y < 0, like torch)
        loss = tl.where(y == 0.0, 0.0, y * tl.log(y)) - y * x
    loss = tl.where(ok, loss, 0.0)
    if REDUCE:
        tl.store(LOSS + pid, tl.sum(loss, axis=0))
    else:
        tl.store(LOSS + offs, loss, mask=ok)
    if INPUT_GRAD or TARGET_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC)
        if INPUT_GRAD:
            if LOG_TARGET:
                g_x = -e_y * scale
            else:
                g_x = -y * scale
            tl.store(GX + offs, g_x.to(GX.dtype.element_ty), mask=ok)
        if TARGET_GRAD:
            if LOG_TARGET:
                g_y = e_y * (y - x + 1.0) * scale
            else:
                # At y = 0 our convention: 0, or NaN where x is not finite (the loss is NaN there).
                # NaN for a negative or NaN target, like torch.
                g_y = tl.where(y == 0.0, x * 0.0, (tl.log(y) + 1.0 - x) * scale)
            tl.store(GY + offs, g_y.to(GY.dtype.element_ty), mask=ok)


def kl_div_pointwise(input, target, log_target, grad_scale, reduce, input_grad, target_grad):
    n = input.numel()
    acc_dtype = accumulation_dtype(input, target)
    n_blocks = triton.cdiv(n, BLOCK)
    loss = input.new_empty((n_blocks,) if reduce else input.shape, dtype=acc_dtype)
    grad_input = gradient_buffer(input, input_grad)
    grad_target = gradient_buffer(target, target_grad)
    if n == 0:
        return loss, grad_input, grad_target
    wrap_triton(_kl_div_kernel)[(n_blocks,)](
        input, target, loss,
        grad_input if input_grad else input, grad_target if target_grad else target, grad_scale, n,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, LOG_TARGET=log_target, REDUCE=reduce,
        INPUT_GRAD=input_grad, TARGET_GRAD=target_grad, BLOCK=BLOCK, num_warps=8,
    )
    return loss, grad_input, grad_target
