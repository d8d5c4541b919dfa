r"""Triton kernel of ``sparse_divergence_rows``: the LLM divergence family against a sparse (top-k)
teacher, per position, with the gradients of the student's logits and the teacher's values.

The formulas are :mod:`kdkernels.ops.reference.divergences`' (``sparse_log_probs``,
``bucket_gradient``, ``student_logit_gradient``); the per-bucket closed forms are the dense
kernel's (:func:`kdkernels.ops.triton.divergences._bucket_terms`), here over ``B`` buckets: the k
classes (``tail="renormalize"``) or the k classes and the tail (``"tail_bucket"``, bucket k).

One program per position, buckets in one ``[BLOCK_B]`` block (``BLOCK_B ≥ k + 1``):

1. the teacher's bucket logits ``w`` (values re-tempered by ``T₀/T``, or transformed logits / T;
   the tail ``log1mexp(lse(values))·T₀/T``) and ``v = log_softmax(w)``;
2. the student's logits gathered at the k ids; for ``tail_bucket`` one pass over the V classes
   (the walker's online softmax on ``[1, BLOCK_C]`` blocks) of the classes *outside* the ids, so
   that the student's tail mass is summed directly, never as ``1 − Σ_k p``. The ids are marked
   from a sorted copy (sorted by the launcher below, O(N·k log k)): a block's ids are the next ones in sorted
   order (counted against the block's end in O(k)), and each is compared with the block's
   classes: O(V/BLOCK_C·k + k·BLOCK_C) work per row, where comparing every id with every class
   was O(V·k) and tied the block to k (``BLOCK_C = 8192/BLOCK_B``: 16 classes at k = 1024);
   ``u = z_K/T − lse`` and ``u_tail = lse_out − lse``;
3. the bucket terms and ``g = ∂D/∂u``, ``h = ∂D/∂v``; the loss ``Σ term`` (× T²);
4. the student's gradient: ``c·slope·e^{z_j/T − lse_out}·(g_tail − Σg·P_tail)`` on every class
   (tail_bucket; renormalize: 0), then, after a barrier, the k ids overwritten with
   ``c·slope·(g_b − p_b Σg)``; the values' gradient ``(h_b − q_b Σh)·∂w_b/∂values`` (+ the tail's
   share through ``lse(values)``).

Masked-out positions and positions whose k values are all −inf get exactly 0 and zero gradients
(their data is selected away, never multiplied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops.triton.two_distribution_row import empty_softmax, row_shift, softmax_block_update
from kdkernels.ops.triton.divergences import (
    FORWARD_KL,
    REVERSE_KL,
    ZERO_STUDENT_REFERENCE,
    ZERO_TEACHER_REFERENCE,
    _bucket_terms,
    _tanh,
    _transform_slope,
    _transformed,
    divergence_kind,
)
from kdkernels.ops.triton.launch import wrap_triton
from kdkernels.ops.triton.nan import joined_float, max_nan, split_float


@triton.jit
def _logsumexp(x):
    """``log Σ e^x`` of a 1-D block: −inf for all −inf, NaN for a NaN or +inf maximum."""
    m = tl.reduce(x, 0, max_nan)
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift + tl.log(tl.sum(tl.exp(x - shift), axis=0))


@triton.jit
def _log1mexp(x):
    """log(1 − e^x) for x < 0, −inf for x ≥ 0 (no mass left). Near 0, 1 − e^x = −expm1(x) =
    −2·tanh(x/2) / (1 − tanh(x/2)) (the dense kernel's tanh: no cancellation; Triton has no
    expm1); below −log 2, 1 − e^x ≥ ½ has none either."""
    safe = tl.where(x >= 0.0, -1.0, x)
    th = _tanh(0.5 * safe)
    near = tl.log(-2.0 * th / (1.0 - th))
    far = tl.log(1.0 - tl.exp(safe))
    value = tl.where(safe > -0.6931471805599453, near, far)
    return tl.where(x >= 0.0, float("-inf"), value)


@triton.jit
def _sparse_terms(u, v, beta, KIND: tl.constexpr):
    """Per bucket ``(term, g, h)``; the KL kinds' terms written out (the dense kernel takes them
    from its statistics instead)."""
    term, g, h = _bucket_terms(u, v, beta, KIND)
    if KIND == FORWARD_KL:
        term = tl.where(v != float("-inf"), tl.exp(v) * (v - u), 0.0)
    elif KIND == REVERSE_KL:
        term = tl.where(u != float("-inf"), tl.exp(u) * (u - v), 0.0)
    elif KIND == ZERO_TEACHER_REFERENCE:
        term = tl.where(v != float("-inf"), tl.exp(v) * (v - v), 0.0)
    elif KIND == ZERO_STUDENT_REFERENCE:
        term = tl.where(u != float("-inf"), tl.exp(u) * (u - u), 0.0)
    return term, g, h


@triton.jit
def _sparse_kernel(
    S, VALS, IDS, SORTED_IDS, MASK, LOSS, GS, GV, GRAD_SCALE,
    n_inner, n_classes, k,
    s_so, s_sc, s_si, v_so, v_sk, v_si, i_so, i_sk, i_si, q_so, q_sk, q_si, gs_so, gs_sc, gs_si, gv_so, gv_sk, gv_si,
    temperature_hi, temperature_lo, stored_hi, stored_lo, beta_hi, beta_lo,
    s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    KIND: tl.constexpr, SCALE_BY_T2: tl.constexpr, TAIL: tl.constexpr, LOGPROBS: tl.constexpr,
    S_SCALE: tl.constexpr, S_CAP: tl.constexpr, T_SCALE: tl.constexpr, T_CAP: tl.constexpr,
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, STUDENT_GRAD: tl.constexpr, VALUES_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_inner
    i = pid % n_inner
    temperature = joined_float(temperature_hi, temperature_lo, ACC)
    inv_t = 1.0 / temperature
    t0_over_t = joined_float(stored_hi, stored_lo, ACC) * inv_t
    beta = joined_float(beta_hi, beta_lo, ACC)
    s_scale = joined_float(s_scale_hi, s_scale_lo, ACC)
    s_cap = joined_float(s_cap_hi, s_cap_lo, ACC)
    t_scale = joined_float(t_scale_hi, t_scale_lo, ACC)
    t_cap = joined_float(t_cap_hi, t_cap_lo, ACC)

    # The teacher's k entries (bucket b < k; bucket k is the tail).
    b = tl.arange(0, BLOCK_B)
    entry = b < k
    raw_values = tl.load(VALS + o * v_so + i * v_si + b * v_sk, mask=entry, other=float("-inf")).to(ACC)
    if LOGPROBS:
        t = raw_values
    else:
        t = _transformed(raw_values, t_scale, t_cap, T_SCALE, T_CAP)
    counted = tl.reduce(t, 0, max_nan) != float("-inf")
    if HAS_MASK:
        counted = counted & (tl.load(MASK + o * n_inner + i) != 0)

    ids = tl.load(IDS + o * i_so + i * i_si + b * i_sk, mask=entry, other=0).to(tl.int64)
    id_ok = entry & (ids >= 0) & (ids < n_classes)  # validated by the front end; never read outside
    s_row = S + o * s_so + i * s_si
    y = _transformed(tl.load(s_row + ids * s_sc, mask=id_ok, other=float("-inf")).to(ACC), s_scale, s_cap, S_SCALE, S_CAP)
    sk = y * inv_t

    # Teacher buckets: w, then v = log_softmax(w).
    if LOGPROBS:
        w = t * t0_over_t
    else:
        w = t * inv_t
    lse_values = _logsumexp(t)
    log_tail_t = _log1mexp(lse_values)
    if TAIL:  # k = V: no tail (what 1 − Σ p_t holds is rounding): w stays −inf there
        w = tl.where((b == k) & (k < n_classes), log_tail_t * t0_over_t, w)
    v = w - _logsumexp(w)

    # Student buckets.
    lse_k = _logsumexp(sk)
    if TAIL:
        m_out, z_out = empty_softmax(1, ACC)
        sorted_row = SORTED_IDS + o * q_so + i * q_si
        sorted_ids = tl.load(sorted_row + b * q_sk, mask=entry, other=0).to(tl.int64)
        first = tl.full([], 0, tl.int32)  # the first sorted id not below this block's start
        for start in range(0, n_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            in_row = cols < n_classes
            raw = tl.load(s_row + cols * s_sc, mask=in_row, other=float("-inf")).to(ACC)
            last = tl.sum(((sorted_ids < start + BLOCK_C) & entry).to(tl.int32), axis=0)
            chosen = cols < 0
            for j in range(first, last):  # the ids in this block (an id outside [0, V) matches no class)
                chosen = chosen | (cols == tl.load(sorted_row + j * q_sk).to(tl.int64))
            first = last
            x = tl.where(chosen, float("-inf"), _transformed(raw, s_scale, s_cap, S_SCALE, S_CAP))
            m_out, z_out, _d, _x, _e = softmax_block_update(m_out, z_out, x[None, :], inv_t)
        lse_out = tl.sum(row_shift(m_out) * inv_t + tl.log(z_out), axis=0)
        lse_all = tl.where(lse_out == float("-inf"), lse_k, tl.where(lse_k == float("-inf"), lse_out,
                  tl.maximum(lse_k, lse_out) + tl.log(1.0 + tl.exp(-tl.abs(lse_k - lse_out)))))
        lse_all = tl.where((lse_k != lse_k) | (lse_out != lse_out), lse_k + lse_out, lse_all)
        u = tl.where(b == k, lse_out - lse_all, sk - lse_all)
        u = tl.where(b <= k, u, float("-inf"))
    else:
        u = sk - lse_k
        lse_out = lse_k  # unused
        lse_all = lse_k

    term, g, h = _sparse_terms(u, v, beta, KIND)
    if SCALE_BY_T2:
        factor = temperature * temperature
    else:
        factor = tl.full([], 1.0, ACC)
    loss = tl.sum(term, axis=0) * factor
    tl.store(LOSS + o * n_inner + i, tl.where(counted, loss, 0.0))
    sum_g = tl.sum(g, axis=0)
    sum_h = tl.sum(h, axis=0)
    c = tl.load(GRAD_SCALE).to(ACC) * factor

    if STUDENT_GRAD:
        gs_row = GS + o * gs_so + i * gs_si
        if TAIL:
            g_tail = tl.sum(tl.where(b == k, g, 0.0), axis=0)
            coef = c * inv_t * (g_tail - sum_g * tl.exp(lse_out - lse_all))
            outside = lse_out != float("-inf")  # else no mass outside the ids: p_j = 0 there
        for start in range(0, n_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            in_row = cols < n_classes
            if TAIL:
                raw = tl.load(s_row + cols * s_sc, mask=in_row, other=float("-inf")).to(ACC)
                yc = _transformed(raw, s_scale, s_cap, S_SCALE, S_CAP)
                dense = coef * tl.exp(yc * inv_t - lse_out) * _transform_slope(yc, s_scale, s_cap, S_SCALE, S_CAP)
                dense = tl.where(counted & outside, dense, 0.0)
            else:
                dense = tl.zeros([BLOCK_C], ACC)
            if KIND == ZERO_TEACHER_REFERENCE:  # KL(q ‖ q) never reads the student: 0 even where it is NaN
                dense = tl.zeros([BLOCK_C], ACC)
            tl.store(gs_row + cols * gs_sc, dense.to(GS.dtype.element_ty), mask=in_row)
        tl.debug_barrier()  # the k ids below overwrite what this program just wrote
        grad_k = c * inv_t * (g - tl.exp(u) * sum_g) * _transform_slope(y, s_scale, s_cap, S_SCALE, S_CAP)
        grad_k = tl.where(counted, grad_k, 0.0)
        if KIND == ZERO_TEACHER_REFERENCE:
            grad_k = tl.zeros([BLOCK_B], ACC)
        counted_b = (tl.zeros([BLOCK_B], tl.int32) + counted.to(tl.int32)) != 0  # the interpreter's & wants one shape
        tl.store(gs_row + ids * gs_sc, grad_k.to(GS.dtype.element_ty), mask=id_ok & counted_b)

    if VALUES_GRAD:
        dw = h - tl.exp(v) * sum_h
        if LOGPROBS:
            d = dw * t0_over_t
        else:
            d = dw * inv_t
        if TAIL:
            dw_tail = tl.sum(tl.where(b == k, dw, 0.0), axis=0)
            share = -t0_over_t * dw_tail * tl.exp(t - log_tail_t)
            d = d + tl.where((lse_values < 0.0) & (k < n_classes), share, 0.0)
        if not LOGPROBS:
            d = d * _transform_slope(t, t_scale, t_cap, T_SCALE, T_CAP)
        d = tl.where(counted, c * d, 0.0)
        if KIND == ZERO_STUDENT_REFERENCE:  # KL(p ‖ p) never reads the teacher
            d = tl.zeros([BLOCK_B], ACC)
        tl.store(GV + o * gv_so + i * gv_si + b * gv_sk, d.to(GV.dtype.element_ty), mask=entry)


def sparse_divergence_rows(
    student, values, indices, mask, divergence, beta, temperature, scale_by_t2, tail, teacher_values,
    stored_temperature, student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale,
    grad_scale, student_grad, values_grad,
):
    """Per-position sparse divergence of (outer, classes, inner) student logits against
    (outer, k, inner) teacher ``values`` at int ``indices``, and the wanted gradients of
    ``grad_scale · Σ loss`` (the kernel signature of ``kdkernels.ops.sparse_divergences``).
    Arguments are assumed validated (the ``kdkernels.llm`` front end does that)."""
    n_outer, n_classes, n_inner = student.shape
    k = values.shape[1]
    acc_dtype = accumulation_dtype(student, values)
    loss = torch.empty((n_outer, n_inner), dtype=acc_dtype, device=student.device)
    grad_student = gradient_buffer(student, student_grad)
    grad_values = gradient_buffer(values, values_grad)
    if n_outer * n_inner == 0:
        return loss, grad_student, grad_values
    if n_classes == 0 or k == 0:
        loss.zero_()
        if student_grad:
            grad_student.zero_()
        if values_grad:
            grad_values.zero_()
        return loss, grad_student, grad_values
    block_b = triton.next_power_of_2(k + 1)
    block_c = min(triton.next_power_of_2(n_classes), 2048)
    # The complement pass finds each block's ids in sorted order (ties keep every copy: a repeated
    # id, which the front end rejects, would still be one class).
    sorted_indices = indices.sort(dim=1).values if tail == "tail_bucket" else indices
    scalars = [temperature, stored_temperature, beta, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap]
    gs_strides = grad_student.stride() if student_grad else (0, 0, 0)
    gv_strides = grad_values.stride() if values_grad else (0, 0, 0)
    wrap_triton(_sparse_kernel)[(n_outer * n_inner,)](
        student, values, indices, sorted_indices, mask if mask is not None else student, loss,
        grad_student if student_grad else student, grad_values if values_grad else values, grad_scale,
        n_inner, n_classes, k,
        *student.stride(), *values.stride(), *indices.stride(), *sorted_indices.stride(), *gs_strides, *gv_strides,
        *[half for x in scalars for half in split_float(1.0 if x is None else float(x))],
        KIND=divergence_kind(divergence, beta), SCALE_BY_T2=bool(scale_by_t2), TAIL=tail == "tail_bucket",
        LOGPROBS=teacher_values == "logprobs",
        S_SCALE=student_logit_scale is not None, S_CAP=student_softcap is not None,
        T_SCALE=teacher_logit_scale is not None, T_CAP=teacher_softcap is not None,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, HAS_MASK=mask is not None,
        STUDENT_GRAD=student_grad, VALUES_GRAD=values_grad, BLOCK_B=block_b, BLOCK_C=block_c,
    )
    return loss, grad_student, grad_values
