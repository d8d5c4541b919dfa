"""Triton kernel of ``pairwise_similarity_batches``: the pair-wise similarity distillation loss of
Liu et al. (CVPR 2019) and its gradients, tile by tile, without an N×N matrix.

The launcher forms the unit rows ``u_i = f_i / (‖f_i‖ + 1e-8)`` (detached norms, (B, N, C), in the
accumulation dtype). A program owns (batch element b, a tile of ``BLOCK_I`` rows i, a chunk of
``BLOCK_C`` gradient channels) and walks the column tiles j: it forms the tile of
``D = U_s U_sᵀ − U_t U_tᵀ`` with ``tl.dot`` over the channel chunks (student and teacher channel
counts may differ), adds its squares to a per-program partial sum (chunk 0 only), and ``D U_j``
for its gradient channels — the gradient is ``(4/N²) Σ_j D_ij u_j / (‖f_i‖ + 1e-8)`` (D is
symmetric), applied by the launcher. A program with a later channel chunk recomputes the tile of
D: the price of holding only a (BLOCK_I, BLOCK_C) gradient accumulator. Partial sums are per
fixed tile, summed by ``torch.sum``: repeatable bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.triton.launch import wrap_triton

NORM_EPS = 1e-8


@triton.jit
def _gram_tile(base, rows_i, rows_j, i_ok, j_ok, C, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        a = tl.load(base + rows_i[:, None] * C + c[None, :], mask=i_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(base + rows_j[:, None] * C + c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _pairwise_similarity_kernel(
    US, UT, PARTIAL, GS, GT, N, CS, CT,
    ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pi = tl.program_id(1)
    pc = tl.program_id(2)
    rows_i = pi.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = rows_i < N
    us = US + b * N * CS
    ut = UT + b * N * CT
    gc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    squares = tl.zeros([BLOCK_I], ACC)
    gs = tl.zeros([BLOCK_I, BLOCK_C], ACC)
    gt = tl.zeros([BLOCK_I, BLOCK_C], ACC)
    for j0 in range(0, N, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = rows_j < N
        d = _gram_tile(us, rows_i, rows_j, i_ok, j_ok, CS, BLOCK_I, BLOCK_J, BLOCK_C, ACC)
        d -= _gram_tile(ut, rows_i, rows_j, i_ok, j_ok, CT, BLOCK_I, BLOCK_J, BLOCK_C, ACC)
        squares += tl.sum(d * d, axis=1)
        if STUDENT_GRAD:
            v = tl.load(us + rows_j[:, None] * CS + gc[None, :], mask=j_ok[:, None] & (gc < CS)[None, :], other=0.0)
            gs += tl.dot(d, v, input_precision="ieee", out_dtype=ACC)
        if TEACHER_GRAD:
            v = tl.load(ut + rows_j[:, None] * CT + gc[None, :], mask=j_ok[:, None] & (gc < CT)[None, :], other=0.0)
            gt += tl.dot(d, v, input_precision="ieee", out_dtype=ACC)
    if pc == 0:
        tl.store(PARTIAL + b * tl.num_programs(1) + pi, tl.sum(squares, axis=0))
    if STUDENT_GRAD:
        tl.store(GS + b * N * CS + rows_i[:, None] * CS + gc[None, :], gs, mask=i_ok[:, None] & (gc < CS)[None, :])
    if TEACHER_GRAD:
        tl.store(GT + b * N * CT + rows_i[:, None] * CT + gc[None, :], gt, mask=i_ok[:, None] & (gc < CT)[None, :])


def _unit_rows(feat: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    f = feat.to(dtype)
    inv_norm = (torch.linalg.vector_norm(f, dim=-1, keepdim=True) + NORM_EPS).reciprocal()
    return (f * inv_norm).contiguous(), inv_norm


def pairwise_similarity_batches(student, teacher, grad_scale, student_grad, teacher_grad):
    batch, n, cs = student.shape
    ct = teacher.shape[2]
    acc_dtype = accumulation_dtype(student, teacher)
    us, inv_s = _unit_rows(student, acc_dtype)
    ut, inv_t = _unit_rows(teacher, acc_dtype)
    on_gpu = student.device.type == "cuda"
    block_i = block_j = 64 if on_gpu else 32
    block_c = 32
    tiles = triton.cdiv(n, block_i)
    chunks = triton.cdiv(max(cs, ct), block_c) if (student_grad or teacher_grad) else 1
    partial = torch.empty((batch, tiles), dtype=acc_dtype, device=student.device)
    gs = torch.empty_like(us) if student_grad else us
    gt = torch.empty_like(ut) if teacher_grad else ut
    wrap_triton(_pairwise_similarity_kernel)[(batch, tiles, chunks)](
        us, ut, partial, gs, gt, n, cs, ct,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=block_c,
    )
    loss = partial.sum(dim=1) / float(n * n)
    coef = grad_scale.to(acc_dtype) * (4.0 / float(n * n))
    grad_s = (gs * inv_s * coef).to(student.dtype) if student_grad else student.new_empty(0)
    grad_t = (gt * inv_t * -coef).to(teacher.dtype) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t
