"""Triton kernel of ``kd_loss_rows``: T²·KL(softmax(t/T) ‖ softmax(s/T)) per position, with gradients.

Built on the two-distribution row walker (``two_distribution_row``; layouts, passes, resident
rows and non-finite rules are described there). The loss's own parts:

* pass 1 keeps, besides the two online softmaxes, ``w = Σ e^{x_b} (x_b − x_a)`` (teacher ``b`` as
  the reference), so ``KL = w / z_b − log z_b + log z_a`` comes out of a single read of both rows;
* the gradient pass writes ``∂/∂s = T (p_s − p_t)`` and ``∂/∂t = T p_t ((log p_t − log p_s) − KL)``,
  times ``grad_scale``.

A student that is −inf everywhere gives +inf (no mass where the teacher has some); identical
student and teacher logits give exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.ops.triton import two_distribution_row as walker
from kdkernels.ops.triton.two_distribution_row import (
    block_log_probs,
    counted_positions,
    empty_softmax,
    kl_cross_update,
    kl_from_statistics,
    load_class_block,
    open_rows,
    revisit_block,
    softmax_block_update,
    store_gradients,
)
from kdkernels.ops.triton.launch import wrap_triton
from kdkernels.ops.triton.nan import joined_float


@triton.jit
def _kd_block_update(m_a, z_a, m_b, z_b, w, a, b, inv_temperature):
    """Pass 1 on one class block: both softmaxes and the KL(teacher ‖ student) cross term."""
    m_a, z_a, d_a, x_a, _ = softmax_block_update(m_a, z_a, a, inv_temperature)
    z_b_before = z_b
    m_b, z_b, d_b, x_b, e_b = softmax_block_update(m_b, z_b, b, inv_temperature)
    w = kl_cross_update(w, z_b_before, d_b, d_a, e_b, x_b, x_a)
    return m_a, z_a, m_b, z_b, w


@triton.jit
def _kd_block_gradients(a, b, m_a, m_b, log_z_a, log_z_b, kl, counted, scale, inv_temperature):
    """``(∂/∂s, ∂/∂t)`` of one block, 0 in positions that do not count and, for the teacher,
    in classes it excludes (p_t = 0)."""
    log_p_s = block_log_probs(a, m_a, log_z_a, inv_temperature)
    log_p_t = block_log_probs(b, m_b, log_z_b, inv_temperature)
    p_t = tl.exp(log_p_t)
    keep = counted[:, None]
    g_s = tl.where(keep, scale * (tl.exp(log_p_s) - p_t), 0.0)
    g_t = tl.where(keep & (p_t != 0.0), scale * p_t * (log_p_t - log_p_s - kl[:, None]), 0.0)
    return g_s, g_t


@triton.jit
def _kd_loss_kernel(
    MASK, LOSS,
    S, T, GS, GT, GRAD_SCALE, n_outer, n_classes, n_inner,
    s_so, s_sc, s_si, t_so, t_sc, t_si,
    gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si,
    temperature_hi, temperature_lo,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    ALONG_INNER: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    temperature = joined_float(temperature_hi, temperature_lo, ACC)
    inv_temperature = 1.0 / temperature

    # Pass 1. The first block is read outside the loop so that a resident row keeps it.
    m_a, z_a = empty_softmax(BLOCK_P, ACC)
    m_b, z_b = empty_softmax(BLOCK_P, ACC)
    o, i, pos_ok, s_pos, t_pos, a, b = open_rows(
        S, T, n_outer, n_classes, n_inner, s_so, s_sc, s_si, t_so, t_sc, t_si, ACC, ALONG_INNER, BLOCK_P, BLOCK_C
    )
    m_a, z_a, m_b, z_b, w = _kd_block_update(m_a, z_a, m_b, z_b, tl.zeros([BLOCK_P], ACC), a, b, inv_temperature)
    if not RESIDENT:  # compiled out for resident rows: no second tile pair held in registers
        for start in range(BLOCK_C, n_classes, BLOCK_C):
            cols_c, ok_c, a_c, b_c = load_class_block(s_pos, s_sc, t_pos, t_sc, start, n_classes, pos_ok, ACC, BLOCK_C)
            m_a, z_a, m_b, z_b, w = _kd_block_update(m_a, z_a, m_b, z_b, w, a_c, b_c, inv_temperature)

    counted = counted_positions(pos_ok, m_b, MASK, o * n_inner + i, HAS_MASK)
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    kl = tl.where(counted, kl_from_statistics(w, z_b, log_z_b, log_z_a, m_a), 0.0)
    tl.store(LOSS + o * n_inner + i, kl * (temperature * temperature), mask=pos_ok)

    if STUDENT_GRAD or TEACHER_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) * temperature
        n_blocks = tl.cdiv(n_classes, BLOCK_C)
        for k in range(0, n_blocks):
            cols_k, ok_k, a_k, b_k = revisit_block(
                k, n_blocks, a, b, s_pos, s_sc, t_pos, t_sc, n_classes, pos_ok, ACC, RESIDENT, BLOCK_C
            )
            g_s, g_t = _kd_block_gradients(a_k, b_k, m_a, m_b, log_z_a, log_z_b, kl, counted, scale, inv_temperature)
            store_gradients(
                GS, GT, o, i, gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si, cols_k, ok_k, g_s, g_t, STUDENT_GRAD, TEACHER_GRAD
            )


# The walker's whole-row limit, here so that bench/tune_triton.py can move it for kd_loss alone.
RESIDENT_MAX_CLASSES = walker.RESIDENT_MAX_CLASSES


def _launch_config(student: torch.Tensor, teacher: torch.Tensor, along_inner: bool) -> tuple[int, int, int, bool]:
    return walker.launch_config(student, teacher, along_inner, RESIDENT_MAX_CLASSES)


def kd_loss_rows(student, teacher, mask, temperature, grad_scale, student_grad, teacher_grad):
    loss, grad_student, grad_teacher, launch = walker.row_outputs(student, teacher, student_grad, teacher_grad)
    if launch:
        along_inner = walker.runs_along_inner(student)
        block_p, block_c, num_warps, resident = _launch_config(student, teacher, along_inner)
        wrap_triton(_kd_loss_kernel)[walker.position_grid(student, along_inner, block_p)](
            mask if mask is not None else student, loss,
            *walker.walker_arguments(student, teacher, grad_student, grad_teacher, grad_scale, temperature, student_grad, teacher_grad),
            **walker.walker_constexprs(student, teacher, mask, student_grad, teacher_grad, along_inner, resident, block_p, block_c),
            num_warps=num_warps,
        )
    return loss, grad_student, grad_teacher
