r"""Triton kernel of ``divergence_rows``: the LLM divergence family per position, with gradients.

The divergences, their directions and edge cases are those of
:mod:`kdkernels.ops.reference.divergences` (dense teacher): with ``p = p_s``, ``q = p_t`` the
softmaxes at temperature T of the (scaled, soft-capped) logits, ``u = log p``, ``v = log q``,

* ``forward_kl``  KL(q ‖ p);  ``reverse_kl``  KL(p ‖ q);
* ``jsd``  β KL(q ‖ m) + (1−β) KL(p ‖ m), m = β q + (1−β) p (TRL's β; β = 0 / 1 are forward /
  reverse KL, chosen on the host);
* ``skew_forward_kl``  KL(q ‖ β q + (1−β) p);  ``skew_reverse_kl``  KL(p ‖ β p + (1−β) q)
  (β = 0: the plain KL of that direction; β = 1: exactly 0);
* ``tvd``  ½ Σ |q − p|;

times T² when ``scale_by_t2``.

Built on the two-distribution row walker (``two_distribution_row``; layouts, passes, resident
rows, max-before-scaling). The logit transforms of the reference run on every block as it is
loaded: ``z·logit_scale`` then ``cap·tanh(z / cap)``, −inf kept −inf; the gradient goes back
through them with the slope ``logit_scale·(1 − tanh²)`` (``logit_scale`` at a −inf logit, as
the reference's ``where``).

Passes:

1. the walker's online softmaxes of both rows; the KL divergences also keep their cross term
   (``kl_cross_update``, with the teacher or the student as reference), so their loss is a
   closed form of the statistics;
2. the mixture divergences (JSD, skew KL) and TVD need the normalised probabilities per class:
   one more pass sums, per row, the loss terms and the *bucket gradients*
   ``g = ∂D/∂u`` and ``h = ∂D/∂v`` (closed forms in the reference's :func:`bucket_gradient`;
   ``h`` by the same algebra with the roles swapped);
3. when a gradient is wanted: ``∂D/∂z_s = (g − p Σg) / T`` and ``∂D/∂z_t = (h − q Σh) / T``
   per class, times T² (if), ``grad_scale`` and the transform's slope. For the KL divergences
   ``Σg`` and ``Σh`` are known after pass 1 (−1 and KL + 1), so they read the rows twice, as
   ``kd_loss``.

Terms of a class where the distribution in front is 0 are selected away (never ``0·log 0``);
a NaN anywhere in a counted row makes its loss and gradients NaN. Where the loss is +inf (a
reference distribution with mass where the other has none) the gradients of the other side
may be NaN or infinite, as the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.ops.reference.divergences import DIVERGENCES
from kdkernels.ops.triton import two_distribution_row as walker
from kdkernels.ops.triton.two_distribution_row import (
    block_log_probs,
    counted_positions,
    empty_softmax,
    kl_cross_update,
    load_class_block,
    open_rows,
    revisit_block,
    softmax_block_update,
    store_gradients,
)
from kdkernels.ops.triton.launch import wrap_triton
from kdkernels.ops.triton.nan import joined_float, split_float

# Kernel kinds: the divergence after the host has resolved β's endpoints (constexpr: the kernels
# read them as globals, which compiled Triton allows only for constexpr values).
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
ZERO_TEACHER_REFERENCE = tl.constexpr(6)  # skew_forward_kl at β = 1: KL(q ‖ q)
ZERO_STUDENT_REFERENCE = tl.constexpr(7)  # skew_reverse_kl at β = 1: KL(p ‖ p)


def divergence_kind(divergence: str, beta: float) -> int:
    """The kernel kind of ``divergence`` at ``beta``, with the reference's endpoint conventions."""
    return _kind_constant(divergence, beta).value


def _kind_constant(divergence: str, beta: float) -> tl.constexpr:
    if divergence == "forward_kl":
        return FORWARD_KL
    if divergence == "reverse_kl":
        return REVERSE_KL
    if divergence == "jsd":
        return FORWARD_KL if beta == 0 else REVERSE_KL if beta == 1 else JSD
    if divergence == "skew_forward_kl":
        return FORWARD_KL if beta == 0 else ZERO_TEACHER_REFERENCE if beta == 1 else SKEW_FORWARD_KL
    if divergence == "skew_reverse_kl":
        return REVERSE_KL if beta == 0 else ZERO_STUDENT_REFERENCE if beta == 1 else SKEW_REVERSE_KL
    if divergence == "tvd":
        return TVD
    raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")


@triton.jit
def _tanh(y):
    """tanh in ``y``'s dtype from ``exp`` (Triton has no tanh the interpreter can run): an odd
    Taylor polynomial near 0, where ``1 − e^{−2|y|}`` would cancel, the exponential form elsewhere.
    Compiled, the polynomial's coefficients are float32 literals, so in float64 tanh is good to
    about 1e-10 relative for |y| < 1/16 (to rounding elsewhere)."""
    ay = tl.abs(y)
    e = tl.exp(-2.0 * ay)
    far = (1.0 - e) / (1.0 + e)
    y2 = y * y
    near = ay * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
    t = tl.where(ay < 0.0625, near, far)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def _transformed(raw, scale, cap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
    """``cap·tanh(raw·scale / cap)`` (each step only if configured), −inf kept −inf."""
    z = raw
    if HAS_SCALE:
        z = z * scale
    if HAS_CAP:
        z = tl.where(z == float("-inf"), z, cap * _tanh(z / cap))
    return z


@triton.jit
def _transform_slope(z, scale, cap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
    """d(transformed)/d(raw) from the transformed value ``z``: ``scale·(1 − t)(1 + t)``,
    ``t = z / cap`` (= tanh), and ``scale`` alone at −inf."""
    slope = tl.full(z.shape, 1.0, z.dtype)
    if HAS_CAP:
        t = z / cap
        slope = tl.where(z == float("-inf"), 1.0, (1.0 - t) * (1.0 + t))
    if HAS_SCALE:
        slope = slope * scale
    return slope


@triton.jit
def _log_mixture(m, wx, lx, wy, ly):
    """``log m`` of the mixture ``m = wx·e^{lx} + wy·e^{ly}``: ``log(m)`` where m is a normal
    float32, else in log space. The sum of two tiny probabilities underflows (to 0 even: half the
    smallest subnormal rounds to 0), and there ``log m`` would be −inf and ``x·(lx − log m)``
    infinite. Also returns where the log-space value was taken."""
    tiny = m < 1.1754943508222875e-38
    a = lx + tl.log(wx)  # log 0 = −inf: that side has no weight
    b = ly + tl.log(wy)
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    in_log_space = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
    return tl.where(tiny, in_log_space, tl.log(m)), tiny


@triton.jit
def _skew_terms(x, lx, y, ly, beta):
    """KL(x ‖ β x + (1−β) y) per class: ``(term, ∂/∂log x, ∂/∂log y)`` with x = e^{lx}, y = e^{ly};
    x/m = e^{lx − log m} where the mixture is tiny (m ≥ β x > 0 wherever x has mass, but it may
    underflow). Used both ways round for the two skew KLs."""
    m = beta * x + (1.0 - beta) * y
    lm, tiny = _log_mixture(m, beta, lx, 1.0 - beta, ly)
    x_over_m = tl.where(tiny, tl.exp(lx - lm), x / m)
    term = tl.where(x != 0.0, x * (lx - lm), 0.0)
    d_x = tl.where(x != 0.0, x * (lx - lm + 1.0) - beta * x * x_over_m, 0.0)
    d_y = tl.where(x != 0.0, -(1.0 - beta) * y * x_over_m, 0.0)  # x = 0: x/m = 0
    return term, d_x, d_y


@triton.jit
def _bucket_terms(u, v, beta, KIND: tl.constexpr):
    """Per class: ``(loss term, g = ∂D/∂u, h = ∂D/∂v)``; the loss term only where the loss is
    not a closed form of the statistics (mixtures, TVD)."""
    p = tl.exp(u)
    q = tl.exp(v)
    if KIND == FORWARD_KL:
        term = tl.zeros(u.shape, u.dtype)
        g = -q
        h = tl.where(q != 0.0, q * (v - u + 1.0), 0.0)
    elif KIND == REVERSE_KL:
        term = tl.zeros(u.shape, u.dtype)
        g = tl.where(p != 0.0, p * (u - v + 1.0), 0.0)
        h = -p
    elif KIND == JSD:
        lm, _ = _log_mixture(beta * q + (1.0 - beta) * p, beta, v, 1.0 - beta, u)
        g = (1.0 - beta) * tl.where(p != 0.0, p * (u - lm), 0.0)
        h = beta * tl.where(q != 0.0, q * (v - lm), 0.0)
        term = g + h  # the mixture terms cancel: D = Σ (g + h)
    elif KIND == SKEW_FORWARD_KL:
        term, h, g = _skew_terms(q, v, p, u, beta)
    elif KIND == SKEW_REVERSE_KL:
        term, g, h = _skew_terms(p, u, q, v, beta)
    elif KIND == TVD:
        term = 0.5 * tl.abs(q - p)
        sign = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        # NaN compares false: keep it (p − q is NaN there).
        sign = tl.where(p != p, p, tl.where(q != q, q, sign))
        g = 0.5 * p * sign
        h = -0.5 * q * sign
    else:  # KL(x ‖ x): zero terms, zero gradients
        term = tl.zeros(u.shape, u.dtype)
        g = tl.zeros(u.shape, u.dtype)
        h = tl.zeros(u.shape, u.dtype)
    return term, g, h


@triton.jit
def _load_transformed(
    s_pos, s_sc, t_pos, t_sc, start, n_classes, pos_ok, s_scale, s_cap, t_scale, t_cap,
    S_SCALE: tl.constexpr, S_CAP: tl.constexpr, T_SCALE: tl.constexpr, T_CAP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, ok, a, b = load_class_block(s_pos, s_sc, t_pos, t_sc, start, n_classes, pos_ok, ACC, BLOCK_C)
    return cols, ok, _transformed(a, s_scale, s_cap, S_SCALE, S_CAP), _transformed(b, t_scale, t_cap, T_SCALE, T_CAP)


@triton.jit
def _divergence_block_update(m_a, z_a, m_b, z_b, w, a, b, inv_temperature, KIND: tl.constexpr):
    """Pass 1 on one class block: both softmaxes, and the KL cross term of the KL kinds."""
    z_a_before = z_a
    z_b_before = z_b
    m_a, z_a, d_a, x_a, e_a = softmax_block_update(m_a, z_a, a, inv_temperature)
    m_b, z_b, d_b, x_b, e_b = softmax_block_update(m_b, z_b, b, inv_temperature)
    if KIND == FORWARD_KL:
        w = kl_cross_update(w, z_b_before, d_b, d_a, e_b, x_b, x_a)
    elif KIND == REVERSE_KL:
        w = kl_cross_update(w, z_a_before, d_a, d_b, e_a, x_a, x_b)
    return m_a, z_a, m_b, z_b, w


@triton.jit
def _closed_form_row_sums(w, z_a, z_b, log_z_a, log_z_b, KIND: tl.constexpr):
    """``(D, Σg, Σh)`` per position after pass 1 (``w`` the KL policy's cross term, ``z`` the sums
    of exponentials): the closed forms of the KLs and of the β = 1 skews' KL(x ‖ x), zeros for the
    mixtures (their pass 2 adds the per-class terms). No +inf special case for a student that is
    −inf everywhere: its log-softmax is NaN in the reference, and so is w / z − log z + log 0."""
    zeros = tl.zeros_like(w)
    if KIND == FORWARD_KL:
        divergence = w / z_b - log_z_b + log_z_a
        sum_g = zeros - 1.0
        sum_h = divergence + 1.0
    elif KIND == REVERSE_KL:
        divergence = w / z_a - log_z_a + log_z_b
        sum_g = divergence + 1.0
        sum_h = zeros - 1.0
    elif KIND == ZERO_TEACHER_REFERENCE:
        divergence = 0.0 * log_z_b  # NaN where the teacher's row is
        sum_g = zeros
        sum_h = divergence
    elif KIND == ZERO_STUDENT_REFERENCE:
        divergence = 0.0 * log_z_a
        sum_g = divergence
        sum_h = zeros
    else:
        divergence = zeros
        sum_g = zeros
        sum_h = zeros
    return divergence, sum_g, sum_h


@triton.jit
def _divergence_kernel(
    MASK, LOSS,
    S, T, GS, GT, GRAD_SCALE, n_outer, n_classes, n_inner,
    s_so, s_sc, s_si, t_so, t_sc, t_si,
    gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si,
    temperature_hi, temperature_lo,
    beta_hi, beta_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    KIND: tl.constexpr, SCALE_BY_T2: tl.constexpr,
    S_SCALE: tl.constexpr, S_CAP: tl.constexpr, T_SCALE: tl.constexpr, T_CAP: tl.constexpr,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    ALONG_INNER: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    temperature = joined_float(temperature_hi, temperature_lo, ACC)
    inv_temperature = 1.0 / temperature
    beta = joined_float(beta_hi, beta_lo, ACC)
    s_scale = joined_float(s_scale_hi, s_scale_lo, ACC)
    s_cap = joined_float(s_cap_hi, s_cap_lo, ACC)
    t_scale = joined_float(t_scale_hi, t_scale_lo, ACC)
    t_cap = joined_float(t_cap_hi, t_cap_lo, ACC)

    # Pass 1. The first block is read outside the loop so that a resident row keeps it (raw:
    # the transforms are cheap to redo, and revisit_block hands back raw blocks otherwise).
    m_a, z_a = empty_softmax(BLOCK_P, ACC)
    m_b, z_b = empty_softmax(BLOCK_P, ACC)
    o, i, pos_ok, s_pos, t_pos, a, b = open_rows(
        S, T, n_outer, n_classes, n_inner, s_so, s_sc, s_si, t_so, t_sc, t_si, ACC, ALONG_INNER, BLOCK_P, BLOCK_C
    )
    m_a, z_a, m_b, z_b, w = _divergence_block_update(
        m_a, z_a, m_b, z_b, tl.zeros([BLOCK_P], ACC),
        _transformed(a, s_scale, s_cap, S_SCALE, S_CAP), _transformed(b, t_scale, t_cap, T_SCALE, T_CAP),
        inv_temperature, KIND,
    )
    if not RESIDENT:  # compiled out for resident rows: no second tile pair held in registers
        for start in range(BLOCK_C, n_classes, BLOCK_C):
            cols_c, ok_c, a_c, b_c = _load_transformed(
                s_pos, s_sc, t_pos, t_sc, start, n_classes, pos_ok, s_scale, s_cap, t_scale, t_cap,
                S_SCALE, S_CAP, T_SCALE, T_CAP, ACC, BLOCK_C,
            )
            m_a, z_a, m_b, z_b, w = _divergence_block_update(m_a, z_a, m_b, z_b, w, a_c, b_c, inv_temperature, KIND)

    counted = counted_positions(pos_ok, m_b, MASK, o * n_inner + i, HAS_MASK)
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    n_blocks = tl.cdiv(n_classes, BLOCK_C)
    divergence, sum_g, sum_h = _closed_form_row_sums(w, z_a, z_b, log_z_a, log_z_b, KIND)
    if KIND >= JSD and KIND <= TVD:  # the mixtures. Pass 2: the per-class terms need both normalisers.
        for j in range(0, n_blocks):
            cols_j, ok_j, a_j, b_j = revisit_block(
                j, n_blocks, a, b, s_pos, s_sc, t_pos, t_sc, n_classes, pos_ok, ACC, RESIDENT, BLOCK_C
            )
            u_j = block_log_probs(_transformed(a_j, s_scale, s_cap, S_SCALE, S_CAP), m_a, log_z_a, inv_temperature)
            v_j = block_log_probs(_transformed(b_j, t_scale, t_cap, T_SCALE, T_CAP), m_b, log_z_b, inv_temperature)
            term_j, g_j, h_j = _bucket_terms(u_j, v_j, beta, KIND)
            divergence += tl.sum(term_j, axis=1)
            sum_g += tl.sum(g_j, axis=1)
            sum_h += tl.sum(h_j, axis=1)
    if SCALE_BY_T2:
        factor = temperature * temperature
    else:
        factor = tl.full([], 1.0, ACC)
    tl.store(LOSS + o * n_inner + i, tl.where(counted, divergence * factor, 0.0), mask=pos_ok)

    if STUDENT_GRAD or TEACHER_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) * factor * inv_temperature
        keep = counted[:, None]
        for k in range(0, n_blocks):
            cols_k, ok_k, a_k, b_k = revisit_block(
                k, n_blocks, a, b, s_pos, s_sc, t_pos, t_sc, n_classes, pos_ok, ACC, RESIDENT, BLOCK_C
            )
            a_k = _transformed(a_k, s_scale, s_cap, S_SCALE, S_CAP)
            b_k = _transformed(b_k, t_scale, t_cap, T_SCALE, T_CAP)
            u = block_log_probs(a_k, m_a, log_z_a, inv_temperature)
            v = block_log_probs(b_k, m_b, log_z_b, inv_temperature)
            unused_term, g, h = _bucket_terms(u, v, beta, KIND)
            g_s = (g - tl.exp(u) * sum_g[:, None]) * _transform_slope(a_k, s_scale, s_cap, S_SCALE, S_CAP)
            g_t = (h - tl.exp(v) * sum_h[:, None]) * _transform_slope(b_k, t_scale, t_cap, T_SCALE, T_CAP)
            g_s = tl.where(keep, scale * g_s, 0.0)
            g_t = tl.where(keep, scale * g_t, 0.0)
            store_gradients(
                GS, GT, o, i, gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si, cols_k, ok_k, g_s, g_t, STUDENT_GRAD, TEACHER_GRAD
            )


def _launch_config(student: torch.Tensor, teacher: torch.Tensor, along_inner: bool) -> tuple[int, int, int, bool]:
    """``kd_loss``'s launch configuration: the same walker and the same traffic."""
    return walker.launch_config(student, teacher, along_inner)


def divergence_rows(
    student, teacher, mask, divergence, beta, temperature, scale_by_t2,
    student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale,
    grad_scale, student_grad, teacher_grad,
):
    """Per-position divergence of (outer, classes, inner) logits, and the gradients of
    ``grad_scale · Σ loss`` with respect to the logits that are wanted (the kernel signature of
    ``kdkernels.ops.divergences``).

    ``mask``: (outer, inner) bool or None; each softcap / logit scale: a float, or None for none;
    ``grad_scale``: a one-element tensor. Returns
    ``(loss (outer, inner) in float32, or float64 for float64 logits; grad_student;
    grad_teacher)``, the unwanted gradients as empty placeholders (as ``kd_loss_rows``).
    Arguments are assumed validated (the ``kdkernels.llm`` front end does that).
    """
    kind = divergence_kind(divergence, beta)
    s_cap, t_cap = student_softcap, teacher_softcap
    s_scale, t_scale = student_logit_scale, teacher_logit_scale
    loss, grad_student, grad_teacher, launch = walker.row_outputs(student, teacher, student_grad, teacher_grad)
    if launch:
        along_inner = walker.runs_along_inner(student)
        block_p, block_c, num_warps, resident = _launch_config(student, teacher, along_inner)
        scalars = [beta, s_scale, s_cap, t_scale, t_cap]
        wrap_triton(_divergence_kernel)[walker.position_grid(student, along_inner, block_p)](
            mask if mask is not None else student, loss,
            *walker.walker_arguments(student, teacher, grad_student, grad_teacher, grad_scale, temperature, student_grad, teacher_grad),
            *[half for x in scalars for half in split_float(1.0 if x is None else float(x))],
            KIND=kind, SCALE_BY_T2=bool(scale_by_t2),
            S_SCALE=s_scale is not None, S_CAP=s_cap is not None, T_SCALE=t_scale is not None, T_CAP=t_cap is not None,
            **walker.walker_constexprs(student, teacher, mask, student_grad, teacher_grad, along_inner, resident, block_p, block_c),
            num_warps=num_warps,
        )
    return loss, grad_student, grad_teacher
