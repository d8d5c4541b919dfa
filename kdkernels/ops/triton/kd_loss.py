"""Triton kernels of ``kd_loss_rows``: T²·KL(softmax(t/T) ‖ softmax(s/T)) per position, with gradients.

Rows of at most ``RESIDENT_MAX_CLASSES`` classes are held whole in one program's registers: one
read of each input, the gradient written from the same registers. Otherwise one program owns
``BLOCK_P`` positions and walks the class dimension in ``BLOCK_C`` tiles:

* pass 1 keeps an online softmax for the student and the teacher (running raw maxima ``m``,
  ``x = (logit − m) / T``, rescaled sums ``z = Σ e^x``) and the running
  ``w = Σ e^{x_b} (x_b − x_a)``, moved onto new maxima as they grow, so that
  ``KL = w / z_b − log z_b + log z_a`` comes out of a single read of both rows;
* pass 2, only when a gradient is wanted, walks the tiles in reverse so that the tiles read last in
  pass 1 — the ones most likely still in L2 — are read again first, and writes
  ``∂/∂s = T (p_s − p_t)`` and ``∂/∂t = T p_t ((log p_t − log p_s) − KL)``, times ``grad_scale``.

Non-finite values (rules in ``kdkernels/ops/reference/__init__.py``): maxima propagate NaN, and
the shift is taken on the raw logits before scaling, ``(x − max x) · (1/T)``, so every exponent is
≤ 0 (no overflow for any finite logits), the maximum's is exactly 0 (V = 1 and identical inputs
give exactly 0), and a NaN or +inf logit makes its position NaN through the arithmetic.

The same kernel serves the two layouts of ``kdkernels._layout``: rows (``BLOCK_P = 1``, wide
``BLOCK_C``, loads contiguous along classes) and channels-first dense maps (``BLOCK_P = 64``
positions contiguous in memory, narrow ``BLOCK_C``), so neither needs a permuted copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops.triton.nan import joined_float, max_nan, split_float


@triton.jit
def _kd_loss_kernel(
    S, T, MASK, LOSS, GS, GT, GRAD_SCALE,
    n_positions, n_classes, inner,
    s_so, s_sc, s_si, t_so, t_sc, t_si,
    gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si,
    temperature_hi, temperature_lo,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_ok = pos < n_positions
    outer_idx = pos // inner
    inner_idx = pos % inner
    s_row = S + (outer_idx * s_so + inner_idx * s_si)[:, None]
    t_row = T + (outer_idx * t_so + inner_idx * t_si)[:, None]
    neg_inf = float("-inf")
    temperature = joined_float(temperature_hi, temperature_lo, ACC)
    inv_temperature = 1.0 / temperature

    m_a = tl.full([BLOCK_P], neg_inf, ACC)
    m_b = tl.full([BLOCK_P], neg_inf, ACC)
    shift_a = tl.zeros([BLOCK_P], ACC)  # the maxima, 0 while a row has seen only -inf
    shift_b = tl.zeros([BLOCK_P], ACC)
    z_a = tl.zeros([BLOCK_P], ACC)
    z_b = tl.zeros([BLOCK_P], ACC)
    w = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, n_classes, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        ok = pos_ok[:, None] & (cols < n_classes)[None, :]
        a = tl.load(s_row + cols[None, :] * s_sc, mask=ok, other=neg_inf).to(ACC)
        b = tl.load(t_row + cols[None, :] * t_sc, mask=ok, other=neg_inf).to(ACC)
        new_m_a = max_nan(m_a, tl.reduce(a, 1, max_nan))
        new_m_b = max_nan(m_b, tl.reduce(b, 1, max_nan))
        new_shift_a = tl.where(new_m_a == neg_inf, 0.0, new_m_a)
        new_shift_b = tl.where(new_m_b == neg_inf, 0.0, new_m_b)
        # Moving the running sums onto the new shifts: every x changes by d (<= 0). Sums that are
        # still empty (max -inf, placeholder shift 0) are not moved: d = 0, no overflow.
        d_a = tl.where(m_a == neg_inf, 0.0, (shift_a - new_shift_a) * inv_temperature)
        d_b = tl.where(m_b == neg_inf, 0.0, (shift_b - new_shift_b) * inv_temperature)
        f_b = tl.exp(d_b)
        x_a = (a - new_shift_a[:, None]) * inv_temperature
        x_b = (b - new_shift_b[:, None]) * inv_temperature
        e_b = tl.exp(x_b)
        z_a = z_a * tl.exp(d_a) + tl.sum(tl.exp(x_a), axis=1)
        # Old terms whose teacher weight underflowed are gone (0), even if they were infinite.
        w = tl.where(f_b == 0.0, 0.0, (w + (d_b - d_a) * z_b) * f_b)
        z_b = z_b * f_b + tl.sum(e_b, axis=1)
        # Classes the teacher excludes (p_t = 0) add exactly 0, whatever the student says.
        w = w + tl.sum(tl.where(e_b != 0.0, e_b * (x_b - x_a), 0.0), axis=1)
        shift_a = new_shift_a
        shift_b = new_shift_b
        m_a = new_m_a
        m_b = new_m_b

    counted = pos_ok & (m_b != neg_inf)  # NaN counts (and is NaN)
    if HAS_MASK:
        counted = counted & (tl.load(MASK + pos, mask=pos_ok, other=0) != 0)
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    # A student that is -inf everywhere gives 0 probability where the teacher has mass: +inf.
    kl = tl.where(m_a == neg_inf, float("inf"), w / z_b - log_z_b + log_z_a)
    kl = tl.where(counted, kl, 0.0)
    tl.store(LOSS + pos, kl * (temperature * temperature), mask=pos_ok)

    if STUDENT_GRAD or TEACHER_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) * temperature
        n_tiles = tl.cdiv(n_classes, BLOCK_C)
        for k in range(0, n_tiles):
            cols = ((n_tiles - 1 - k) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
            ok = pos_ok[:, None] & (cols < n_classes)[None, :]
            a = tl.load(s_row + cols[None, :] * s_sc, mask=ok, other=neg_inf).to(ACC)
            b = tl.load(t_row + cols[None, :] * t_sc, mask=ok, other=neg_inf).to(ACC)
            log_p_s = (a - shift_a[:, None]) * inv_temperature - log_z_a[:, None]
            log_p_t = (b - shift_b[:, None]) * inv_temperature - log_z_b[:, None]
            p_t = tl.exp(log_p_t)
            keep = counted[:, None]
            if STUDENT_GRAD:
                g_s = tl.where(keep, scale * (tl.exp(log_p_s) - p_t), 0.0)
                gs_ptr = GS + (outer_idx * gs_so + inner_idx * gs_si)[:, None] + cols[None, :] * gs_sc
                tl.store(gs_ptr, g_s.to(GS.dtype.element_ty), mask=ok)
            if TEACHER_GRAD:
                g_t = tl.where(keep & (p_t != 0.0), scale * p_t * (log_p_t - log_p_s - kl[:, None]), 0.0)
                gt_ptr = GT + (outer_idx * gt_so + inner_idx * gt_si)[:, None] + cols[None, :] * gt_sc
                tl.store(gt_ptr, g_t.to(GT.dtype.element_ty), mask=ok)


@triton.jit
def _kd_loss_resident_rows_kernel(
    S, T, MASK, LOSS, GS, GT, GRAD_SCALE,
    n_classes, s_stride, t_stride, gs_stride, gt_stride,
    temperature_hi, temperature_lo,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows of at most ``BLOCK_C`` classes: the whole row stays in registers, so each input is read
    once and the gradient is written from the same registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < n_classes
    neg_inf = float("-inf")
    temperature = joined_float(temperature_hi, temperature_lo, ACC)
    inv_temperature = 1.0 / temperature
    a = tl.load(S + row * s_stride + cols, mask=ok, other=neg_inf).to(ACC)
    b = tl.load(T + row * t_stride + cols, mask=ok, other=neg_inf).to(ACC)
    m_a = tl.reduce(a, 0, max_nan)
    m_b = tl.reduce(b, 0, max_nan)
    shift_a = tl.where(m_a == neg_inf, 0.0, m_a)
    shift_b = tl.where(m_b == neg_inf, 0.0, m_b)
    x_a = (a - shift_a) * inv_temperature
    x_b = (b - shift_b) * inv_temperature
    z_a = tl.sum(tl.exp(x_a), axis=0)
    e_b = tl.exp(x_b)
    z_b = tl.sum(e_b, axis=0)
    w = tl.sum(tl.where(e_b != 0.0, e_b * (x_b - x_a), 0.0), axis=0)

    counted = m_b != neg_inf  # NaN counts (and is NaN)
    if HAS_MASK:
        # scalar & scalar trips the interpreter; an int product is the same test
        counted = ((m_b != neg_inf).to(tl.int32) * tl.load(MASK + row).to(tl.int32)) != 0
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    kl = tl.where(m_a == neg_inf, float("inf"), w / z_b - log_z_b + log_z_a)
    kl = tl.where(counted, kl, 0.0)
    tl.store(LOSS + row, kl * (temperature * temperature))
    if STUDENT_GRAD or TEACHER_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) * temperature
        log_p_s = x_a - log_z_a
        log_p_t = x_b - log_z_b
        p_t = tl.exp(log_p_t)
        if STUDENT_GRAD:
            g_s = tl.where(counted, scale * (tl.exp(log_p_s) - p_t), 0.0)
            tl.store(GS + row * gs_stride + cols, g_s.to(GS.dtype.element_ty), mask=ok)
        if TEACHER_GRAD:
            g_t = tl.where(p_t != 0.0, scale * p_t * (log_p_t - log_p_s - kl), 0.0)
            g_t = tl.where(counted, g_t, 0.0)
            tl.store(GT + row * gt_stride + cols, g_t.to(GT.dtype.element_ty), mask=ok)


# Rows up to this many classes are kept whole in one program's registers (one read of each
# input). Longer rows use the two-pass kernel: on an H100 (bench/results/tune_triton_h100.json) a
# variant that split long rows over several programs exchanging softmax statistics was within 4 %
# of the two-pass kernel, not worth its inter-program waiting.
RESIDENT_MAX_CLASSES = 4096


def _resident_config(student: torch.Tensor, n_classes: int) -> tuple[int, int] | None:
    """(BLOCK_C, num_warps) for the one-read rows kernel, or None for the two-pass kernel."""
    if n_classes > RESIDENT_MAX_CLASSES:
        return None
    block_c = triton.next_power_of_2(n_classes)
    return block_c, 8 if block_c >= 2048 else 4


def _launch_config(student: torch.Tensor, n_classes: int, rows: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): wide class tiles for rows, position tiles for dense maps."""
    if rows:
        cap = 8192 if student.element_size() <= 2 else 4096
        block_c = min(triton.next_power_of_2(n_classes), cap)
        num_warps = 16 if block_c >= 8192 else 8 if block_c >= 2048 else 4
        return 1, block_c, num_warps
    return 64, min(triton.next_power_of_2(n_classes), 32), 4


def kd_loss_rows(student, teacher, mask, temperature, grad_scale, student_grad, teacher_grad):
    outer, n_classes, inner = student.shape
    acc_dtype = accumulation_dtype(student, teacher)
    loss = torch.empty((outer, inner), dtype=acc_dtype, device=student.device)
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    n_positions = outer * inner
    if n_positions == 0:
        return loss, grad_student, grad_teacher
    rows = inner == 1 and student.stride(1) == 1 and teacher.stride(1) == 1
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    resident = _resident_config(student, n_classes) if rows else None
    if resident is not None:
        block_c, num_warps = resident
        wrap_triton(_kd_loss_resident_rows_kernel)[(outer,)](
            student, teacher, mask if mask is not None else student, loss,
            grad_student if student_grad else student, grad_teacher if teacher_grad else teacher, grad_scale,
            n_classes, student.stride(0), teacher.stride(0),
            grad_student.stride(0) if student_grad else 0, grad_teacher.stride(0) if teacher_grad else 0,
            *split_float(temperature),
            ACC=acc, HAS_MASK=mask is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            BLOCK_C=block_c, num_warps=num_warps,
        )
        return loss, grad_student, grad_teacher
    block_p, block_c, num_warps = _launch_config(student, n_classes, rows)
    gs_strides = grad_student.stride() if student_grad else (0, 0, 0)
    gt_strides = grad_teacher.stride() if teacher_grad else (0, 0, 0)
    grid = (triton.cdiv(n_positions, block_p),)
    wrap_triton(_kd_loss_kernel)[grid](
        student, teacher, mask if mask is not None else student, loss,
        grad_student if student_grad else student, grad_teacher if teacher_grad else teacher, grad_scale,
        n_positions, n_classes, inner,
        *student.stride(), *teacher.stride(), *gs_strides, *gt_strides,
        *split_float(temperature),
        ACC=acc, HAS_MASK=mask is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss, grad_student, grad_teacher
