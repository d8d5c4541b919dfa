"""Triton kernel of ``margin_partial_l2_elements``: the Margin-ReLU partial L2 of Heo et al. (ICCV
2019), its student gradient and (when reducing) a per-program partial sum, from one read of the
student and the teacher.

``T = max(F_t, m_c)``, counted where ``(S > T) | (T > 0)``: ``ℓ = (T − S)²`` and ``∂ℓ/∂S = 2 (S − T)``
there, 0 elsewhere. Each program owns one 1-D block of the flat memory of student and teacher
(same dense layout, any dimension order) and finds each element's channel as
``(i // channel_stride) % C``, so NCHW, channels_last and (N, L, C) run without a copy. Partial sums
are per fixed block, summed afterwards by ``torch.sum``: bit-for-bit repeatable.
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
def _margin_partial_l2_kernel(
    S, T, M, LOSS, G, GRAD_SCALE, n, channels, channel_stride,
    ACC: tl.constexpr, REDUCE: tl.constexpr, STUDENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = tl.load(S + offs, mask=ok, other=0.0).to(ACC)
    t = tl.load(T + offs, mask=ok, other=0.0).to(ACC)
    m = tl.load(M + (offs // channel_stride) % channels, mask=ok, other=0.0).to(ACC)
    t = tl.maximum(t, m, propagate_nan=tl.PropagateNan.ALL)
    d = t - s
    # Left out only when S <= T <= 0 holds: a NaN element counts and is NaN (reference rules).
    counted = ((s > t) | (t > 0.0) | (d != d)) & ok
    loss = tl.where(counted, d * d, 0.0)
    if REDUCE:
        tl.store(LOSS + pid, tl.sum(loss, axis=0))
    else:
        tl.store(LOSS + offs, loss, mask=ok)
    if STUDENT_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC)
        g = tl.where(counted, d * (-2.0 * scale), 0.0)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=ok)


def margin_partial_l2_elements(student, teacher, margin, channel_stride, grad_scale, reduce, student_grad):
    n = student.numel()
    acc_dtype = accumulation_dtype(student, teacher)
    n_blocks = triton.cdiv(n, BLOCK)
    if reduce:
        loss = student.new_empty((max(n_blocks, 1),), dtype=acc_dtype)
    else:
        loss = torch.empty_like(student, dtype=acc_dtype)  # the student's strides: same flat order
    grad = gradient_buffer(student, student_grad)
    if n == 0:
        return loss.zero_(), grad
    wrap_triton(_margin_partial_l2_kernel)[(n_blocks,)](
        student, teacher, margin, loss, grad if student_grad else student, grad_scale,
        n, margin.numel(), channel_stride,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, REDUCE=reduce, STUDENT_GRAD=student_grad,
        BLOCK=BLOCK, num_warps=8,
    )
    return loss, grad
