"""Triton kernel of ``rkd_angle_anchors``: the RKD angle loss of Park et al. (CVPR 2019) and its
gradients without the B×B×B tensor of angles.

A program owns (anchor j, a tile of ``BLOCK_I`` rows i). It forms the unit differences
``e_ij = (t_i − t_j) / max(‖t_i − t_j‖, 1e-12)`` (F.normalize's rule: 0 for i = j and duplicates)
of its rows, then walks the tiles k: the tile of ``G^j_s − G^j_t`` (angles with vertex j) with two
``tl.dot``, its exact Huber (δ = 1) into a per-program partial sum, and ``h'(D) E_k`` into the
gradient of its unit vectors (times 2: G is symmetric). The gradient then goes through the
normalisation — ``(g − e (e·g)) / ‖x‖``, or ``g / 1e-12`` where F.normalize clamps — and, since
``x_ij = t_i − t_j``, is atomically added to rows i and subtracted (summed over i) from the anchor's
row: rows are shared by all anchors, so gradient accumulation order (not the loss) varies run to
run on a GPU. One block holds a whole embedding (``BLOCK_D`` = next power of two ≥ D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.triton.launch import wrap_triton

NORMALIZE_EPS = 1e-12  # F.normalize's default


@triton.jit
def _unit_differences(E, anchor, rows, row_ok, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    t_anchor = tl.load(E + anchor * D + d, mask=d_ok, other=0.0).to(ACC)
    t = tl.load(E + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    x = tl.where(row_ok[:, None] & d_ok[None, :], t - t_anchor[None, :], 0.0)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(norm, 1e-12)[:, None], norm


@triton.jit
def _normalize_backward_and_scatter(G, g, e, norm, anchor, rows, row_ok, D, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    radial = tl.where(norm > 1e-12, tl.sum(e * g, axis=1), 0.0)
    dx = (g - e * radial[:, None]) / tl.maximum(norm, 1e-12)[:, None]
    dx = tl.where(row_ok[:, None] & d_ok[None, :], dx, 0.0)
    tl.atomic_add(G + rows[:, None] * D + d[None, :], dx, mask=row_ok[:, None] & d_ok[None, :])
    tl.atomic_add(G + anchor * D + d, -tl.sum(dx, axis=0), mask=d_ok)


@triton.jit
def _rkd_angle_kernel(
    S, T, PARTIAL, GS, GT, GRAD_SCALE, B, DS, DT,
    ACC: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    anchor = tl.program_id(0).to(tl.int64)
    pi = tl.program_id(1)
    rows_i = pi.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = rows_i < B
    es_i, ns_i = _unit_differences(S, anchor, rows_i, i_ok, DS, BLOCK_DS, ACC)
    et_i, nt_i = _unit_differences(T, anchor, rows_i, i_ok, DT, BLOCK_DT, ACC)
    total = tl.zeros([BLOCK_I], ACC)
    gs = tl.zeros([BLOCK_I, BLOCK_DS], ACC)
    gt = tl.zeros([BLOCK_I, BLOCK_DT], ACC)
    for k0 in range(0, B, BLOCK_K):
        rows_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rows_k < B
        es_k, _ = _unit_differences(S, anchor, rows_k, k_ok, DS, BLOCK_DS, ACC)
        et_k, _ = _unit_differences(T, anchor, rows_k, k_ok, DT, BLOCK_DT, ACC)
        diff = tl.dot(es_i, tl.trans(es_k), input_precision="ieee", out_dtype=ACC)
        diff -= tl.dot(et_i, tl.trans(et_k), input_precision="ieee", out_dtype=ACC)
        a = tl.abs(diff)
        total += tl.sum(tl.where(a < 1.0, 0.5 * diff * diff, a - 0.5), axis=1)
        slope = tl.minimum(tl.maximum(diff, -1.0), 1.0)
        if STUDENT_GRAD:
            gs += tl.dot(slope, es_k, input_precision="ieee", out_dtype=ACC)
        if TEACHER_GRAD:
            gt += tl.dot(slope, et_k, input_precision="ieee", out_dtype=ACC)
    tl.store(PARTIAL + anchor * tl.num_programs(1) + pi, tl.sum(total, axis=0))
    coef = 2.0 * tl.load(GRAD_SCALE).to(ACC)
    if STUDENT_GRAD:
        _normalize_backward_and_scatter(GS, gs * coef, es_i, ns_i, anchor, rows_i, i_ok, DS, BLOCK_DS)
    if TEACHER_GRAD:
        _normalize_backward_and_scatter(GT, gt * -coef, et_i, nt_i, anchor, rows_i, i_ok, DT, BLOCK_DT)


def rkd_angle_anchors(student, teacher, grad_scale, student_grad, teacher_grad):
    batch, ds = student.shape
    dt = teacher.shape[1]
    acc_dtype = accumulation_dtype(student, teacher)
    s, t = student.contiguous(), teacher.contiguous()
    block_ds = max(triton.next_power_of_2(ds), 16)
    block_dt = max(triton.next_power_of_2(dt), 16)
    # Keep a (BLOCK_I, BLOCK_D) tile within registers on a GPU; tl.dot needs 16 at least.
    block = 16 if max(block_ds, block_dt) > 256 or student.device.type != "cuda" else 32
    tiles = triton.cdiv(batch, block)
    partial = torch.empty((batch, tiles), dtype=acc_dtype, device=student.device)
    gs = torch.zeros((batch, ds), dtype=acc_dtype, device=student.device) if student_grad else partial
    gt = torch.zeros((batch, dt), dtype=acc_dtype, device=student.device) if teacher_grad else partial
    wrap_triton(_rkd_angle_kernel)[(batch, tiles)](
        s, t, partial, gs, gt, grad_scale, batch, ds, dt,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad, BLOCK_I=block, BLOCK_K=block, BLOCK_DS=block_ds, BLOCK_DT=block_dt,
    )
    loss = partial.sum(dim=1)
    grad_s = gs.to(student.dtype) if student_grad else student.new_empty(0)
    grad_t = gt.to(teacher.dtype) if teacher_grad else teacher.new_empty(0)
    return loss, grad_s, grad_t
