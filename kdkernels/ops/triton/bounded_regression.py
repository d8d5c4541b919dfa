"""Triton kernel of ``bounded_regression_rows``: the teacher-bounded regression loss of Chen et al.
(NeurIPS 2017) per row, its student gradient and (when reducing) a per-program partial sum.

Each program owns a tile of ``BLOCK_R`` rows and walks the K coordinates in ``BLOCK_K`` tiles,
accumulating ``d_s = ‖R_s − y‖²`` and ``d_t = ‖R_t − y‖²`` in fp32 (fp64 for fp64 inputs); a row
is active when ``d_s + m > d_t`` (and its mask is set). A second walk, only when a gradient is
wanted, writes ``2 (R_s − y)`` on active rows and 0 elsewhere, times ``grad_scale``. Partial sums
are per fixed tile of rows, summed afterwards by ``torch.sum``: bit-for-bit repeatable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.triton.launch import wrap_triton

TILE = 4096  # elements per program: BLOCK_R * BLOCK_K


@triton.jit
def _bounded_regression_kernel(
    S, T, Y, MASK, LOSS, G, GRAD_SCALE,
    n_rows, K, s_r, s_k, t_r, t_k, y_r, y_k, margin,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, REDUCE: tl.constexpr, STUDENT_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    d_s = tl.zeros([BLOCK_R], ACC)
    d_t = tl.zeros([BLOCK_R], ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        ok = row_ok[:, None] & (cols < K)[None, :]
        y = tl.load(Y + rows[:, None] * y_r + cols[None, :] * y_k, mask=ok, other=0.0).to(ACC)
        e_s = tl.load(S + rows[:, None] * s_r + cols[None, :] * s_k, mask=ok, other=0.0).to(ACC) - y
        e_t = tl.load(T + rows[:, None] * t_r + cols[None, :] * t_k, mask=ok, other=0.0).to(ACC) - y
        d_s += tl.sum(e_s * e_s, axis=1)
        d_t += tl.sum(e_t * e_t, axis=1)
    # Inactive only when d_s + m <= d_t holds: NaN is active; a NaN teacher makes the row NaN.
    teacher_nan = d_t != d_t
    d_s = tl.where(teacher_nan, float("nan"), d_s)
    active = ((d_s + margin > d_t) | (d_s != d_s)) & row_ok
    if HAS_MASK:
        active = active & (tl.load(MASK + rows, mask=row_ok, other=0) != 0)
    loss = tl.where(active, d_s, 0.0)
    if REDUCE:
        tl.store(LOSS + pid, tl.sum(loss, axis=0))
    else:
        tl.store(LOSS + rows, loss, mask=row_ok)
    if STUDENT_GRAD:
        scale = 2.0 * tl.load(GRAD_SCALE).to(ACC)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            ok = row_ok[:, None] & (cols < K)[None, :]
            y = tl.load(Y + rows[:, None] * y_r + cols[None, :] * y_k, mask=ok, other=0.0).to(ACC)
            s = tl.load(S + rows[:, None] * s_r + cols[None, :] * s_k, mask=ok, other=0.0).to(ACC)
            g = tl.where(teacher_nan[:, None], float("nan"), (s - y) * scale)
            g = tl.where(active[:, None], g, 0.0)
            tl.store(G + rows[:, None] * K + cols[None, :], g.to(G.dtype.element_ty), mask=ok)


def bounded_regression_rows(student, teacher, target, mask, margin, grad_scale, reduce, student_grad):
    n_rows, k = student.shape
    acc_dtype = accumulation_dtype(student, teacher, target)
    block_k = min(triton.next_power_of_2(max(k, 1)), 128)
    block_r = TILE // block_k
    n_blocks = triton.cdiv(n_rows, block_r)
    loss = student.new_empty((max(n_blocks, 1),) if reduce else (n_rows,), dtype=acc_dtype)
    grad = student.new_empty((n_rows, k)) if student_grad else student.new_empty(0)
    if n_rows == 0:
        return loss.zero_(), grad
    wrap_triton(_bounded_regression_kernel)[(n_blocks,)](
        student, teacher, target, mask if mask is not None else student, loss, grad if student_grad else student,
        grad_scale, n_rows, k, *student.stride(), *teacher.stride(), *target.stride(), margin,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, HAS_MASK=mask is not None, REDUCE=reduce,
        STUDENT_GRAD=student_grad, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=8,
    )
    return loss, grad
