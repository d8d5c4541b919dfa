r"""Triton ``tl.dot`` kernels of :func:`kdkernels.llm.fused_linear_distill_loss`: the divergence of
two LM heads (and the student's label cross-entropy) from hidden states and weights, by tiles.

With ``z_s = h_s W_sᵀ + b_s``, ``z_t = h_t W_tᵀ + b_t`` (each head its own hidden size), the
logit transforms of the divergence kernel (``z·logit_scale``, then ``cap·tanh(z / cap)``) and
``u = log p``, ``v = log q`` the log-softmaxes at temperature T of the first ``vocab`` classes,
the per-position loss is ``kd_weight · D(p, q) · T²`` (if ``scale_by_t2``) plus, with
``ce_weight``, ``ce_weight · (log Σ_{V_s} e^{z'_s} − z'_s[label])`` at T = 1 over the student's
whole head. The formulas, directions and edge cases are those of
:mod:`kdkernels.ops.triton.divergences` (whose ``@triton.jit`` helpers run here unchanged): the
same per-class terms and bucket gradients ``g = ∂D/∂u`` (:func:`_bucket_terms`), the same
``∂D/∂z_s = (g − p Σg) / T`` times T², the reduction's scale and the transform's slope.

No program holds more than a ``(BLOCK_M, BLOCK_V)`` tile of logits (and its gradient); a tile
is ``Σ_k h[rows, k] W[tile, k]ᵀ`` over ``BLOCK_K`` chunks of the hidden size with ``tl.dot``
(float32 accumulation; float64 for float64 heads). Four kernels, each recomputing the tiles it
needs rather than storing them:

1. :func:`_stats_kernel`, a program per ``BLOCK_M`` rows walking the vocabulary tiles: the online
   max and sum-exp of both heads (the divergence walker's :func:`softmax_block_update`), for the
   KL divergences also their cross term (so their loss and ``Σg`` are closed forms, as in the
   divergence kernel), with cross-entropy the student's log-sum-exp at T = 1 over its whole
   vocabulary and the label's logit. Output: 9 floats per row.
2. :func:`_terms_kernel` (mixture divergences and TVD only): the tiles again; per element the
   terms, ``g`` and ``h`` of :func:`_bucket_terms` summed per row → the divergence, ``Σg``
   and ``Σh``.
3. :func:`_hidden_grad_kernel`, a program per row block: for each vocabulary tile the
   ``(BLOCK_M, BLOCK_V)`` logit gradient ``dz`` of one head in registers, and
   ``dh[rows] += dz W[tile]`` over the hidden size in ``BLOCK_K`` chunks, read-modify-write of
   the program's own rows of a float32 buffer.
4. :func:`_weight_grad_kernel`, a program per vocabulary tile: for each row block ``dz`` again,
   ``dW[tile] += dzᵀ h[rows]`` (``BLOCK_K`` chunks) and ``db[tile] += Σ_rows dz``, the program's
   own rows of ``dW``.

Kernels 3 and 4 run for the student and, when its tensors require grad, for the teacher
(``∂D/∂z_t = (h − q Σh) / T``, ``h = ∂D/∂v``, as the divergence kernel; the stats and terms
kernels keep ``Σh`` too). The read-modify-writes of kernels 3 and 4 are separated by a
block-wide barrier per tile (the next tile may read an element in another thread than the one
that stored it).

Every output element is written by one program, in a fixed order: the result is deterministic
(no atomics). The work is 2 logit GEMMs per head and pass (stats, terms for the mixture
divergences, each gradient kernel) plus one GEMM per gradient: 8 GEMM-sized products for a KL
with the student's ``dh`` and ``dW`` (10 for JSD / skew KL / TVD; 6 more for a teacher that
learns) against the eager composite's 4; the read-modify-writes of ``dh`` / ``dW`` add ``8·H``
bytes per row (per column) and tile. The default tile sizes (:func:`default_tile_sizes`) are
the largest that compile for sm_90 without register spills; none of this has been timed on a GPU
yet. Under ``TRITON_INTERPRET=1`` bfloat16 operands are widened to float32 before ``tl.dot``
(the interpreter's bfloat16 ``tl.dot`` is wrong; :func:`_dot_settings`).

Vocabulary-parallel heads (``process_group``): :func:`fused_linear_rows_vocab_parallel` runs the
same kernels on each rank's shard with all-reduces of the per-row statistics between them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from kdkernels.backends import triton_interpreted
from kdkernels.ops.triton.two_distribution_row import (
    block_log_probs,
    empty_softmax,
    row_shift,
    softmax_block_update,
)
from kdkernels.ops.triton.divergences import (
    FORWARD_KL,
    REVERSE_KL,
    ZERO_STUDENT_REFERENCE,
    ZERO_TEACHER_REFERENCE,
    _bucket_terms,
    _closed_form_row_sums,
    _divergence_block_update,
    _transform_slope,
    _transformed,
    divergence_kind,
)
from kdkernels.ops.triton.launch import wrap_triton
from kdkernels.ops.triton.nan import joined_float, split_float

# Columns of the per-row statistics (one (N, _N_STATS) tensor in the accumulation dtype).
_M_S, _LZ_S, _M_T, _LZ_T, _DIV, _SUM_G, _LSE_CE, _CE, _SUM_H = range(9)
_N_STATS = 9
STATS_WIDTH = tl.constexpr(_N_STATS)  # for the kernels (globals they read must be constexpr)

# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    X, W, B, rows, row_ok, cols, col_ok, n_hidden, x_s0, x_s1, w_s0, w_s1, b_s0,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``X[rows] W[cols]ᵀ (+ B[cols])`` as a ``(BLOCK_M, BLOCK_V)`` tile in ``ACC``: ``tl.dot``
    over the hidden size in ``BLOCK_K`` chunks (masked loads read 0 past every edge)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_V], DOT_ACC)
    for k0 in range(0, n_hidden, BLOCK_K):
        k = k0 + ks
        k_ok = k < n_hidden
        x = tl.load(X + rows[:, None] * x_s0 + k[None, :] * x_s1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * w_s0 + k[:, None] * w_s1, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # out_dtype names the accumulator's dtype: Triton 3.6 compiling for a GPU asserts that an
        # accumulator passed in has it (float64 for float64 heads; seen on an H200). Neither the
        # interpreter nor Triton 3.9 checks it.
        acc = tl.dot(x.to(OPERAND), w.to(OPERAND), acc, input_precision=PRECISION, out_dtype=DOT_ACC)
    z = acc.to(ACC)
    if HAS_BIAS:
        z += tl.load(B + cols * b_s0, mask=col_ok, other=0.0).to(ACC)[None, :]
    return z


@triton.jit
def _tile_pair(
    HS, WS, BS, HT, WT, BT, rows, row_ok, cols, n_student_cols, vocab, h_s, h_t,
    hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0,
    s_scale, s_cap, t_scale, t_cap,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr,
    S_DOT_ACC: tl.constexpr, T_DOT_ACC: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    S_OPERAND: tl.constexpr, T_OPERAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The transformed logits of both heads on one tile: the student's over its
    ``n_student_cols`` columns, the teacher's over ``vocab`` (columns past them hold finite junk:
    the callers mask them)."""
    a = _logit_tile(
        HS, WS, BS, rows, row_ok, cols, cols < n_student_cols, h_s, hs_s0, hs_s1, ws_s0, ws_s1, bs_s0,
        S_BIAS, ACC, S_DOT_ACC, S_PRECISION, S_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
    )
    b = _logit_tile(
        HT, WT, BT, rows, row_ok, cols, cols < vocab, h_t, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0,
        T_BIAS, ACC, T_DOT_ACC, T_PRECISION, T_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
    )
    return _transformed(a, s_scale, s_cap, S_SCALE, S_CAP), _transformed(b, t_scale, t_cap, T_SCALE, T_CAP)


@triton.jit
def _compared(x, cols, vocab):
    """``x`` on the compared classes, −inf past them (no mass in either softmax)."""
    return tl.where(cols[None, :] < vocab, x, float("-inf"))


@triton.jit
def _transform_scalars(
    temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi,
    t_cap_lo, ACC: tl.constexpr,
):
    """``(1/T, student scale, student cap, teacher scale, teacher cap)`` from their (hi, lo) halves
    (:func:`kdkernels.ops.triton.nan.split_float`)."""
    return (
        1.0 / joined_float(temperature_hi, temperature_lo, ACC),
        joined_float(s_scale_hi, s_scale_lo, ACC), joined_float(s_cap_hi, s_cap_lo, ACC),
        joined_float(t_scale_hi, t_scale_lo, ACC), joined_float(t_cap_hi, t_cap_lo, ACC),
    )


@triton.jit
def _stats_kernel(
    HS, WS, BS, HT, WT, BT, LABELS, STATS,
    n_rows, n_student_cols, vocab, h_s, h_t,
    hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0,
    temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    KIND: tl.constexpr, CE: tl.constexpr,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr,
    S_DOT_ACC: tl.constexpr, T_DOT_ACC: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    S_OPERAND: tl.constexpr, T_OPERAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    inv_temperature, s_scale, s_cap, t_scale, t_cap = _transform_scalars(
        temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo,
        t_cap_hi, t_cap_lo, ACC,
    )
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_a, z_a = empty_softmax(BLOCK_M, ACC)
    m_b, z_b = empty_softmax(BLOCK_M, ACC)
    w = tl.zeros([BLOCK_M], ACC)
    m_c, z_c = empty_softmax(BLOCK_M, ACC)
    label_logit = tl.zeros([BLOCK_M], ACC)
    if CE:
        labels = tl.load(LABELS + rows, mask=row_ok, other=-1)
    # n_student_cols ≥ vocab: the cross-entropy's columns past the compared ones add −inf (no
    # mass) to the divergence's softmaxes.
    for v0 in range(0, n_student_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64 offsets: V·H may pass 2³¹
        a, b = _tile_pair(
            HS, WS, BS, HT, WT, BT, rows, row_ok, cols, n_student_cols, vocab, h_s, h_t,
            hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, s_scale, s_cap, t_scale, t_cap,
            S_BIAS, T_BIAS, S_SCALE, S_CAP, T_SCALE, T_CAP, ACC, S_DOT_ACC, T_DOT_ACC, S_PRECISION, T_PRECISION,
            S_OPERAND, T_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
        )
        if CE:
            m_c, z_c, _d, _x, _e = softmax_block_update(m_c, z_c, _compared(a, cols, n_student_cols), 1.0)
            label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], a, 0.0), axis=1)
        m_a, z_a, m_b, z_b, w = _divergence_block_update(
            m_a, z_a, m_b, z_b, w, _compared(a, cols, vocab), _compared(b, cols, vocab), inv_temperature, KIND
        )
    log_z_a = tl.log(z_a)
    log_z_b = tl.log(z_b)
    # The closed forms of the divergence kernel; the other kinds' come from _terms_kernel.
    divergence, sum_g, sum_h = _closed_form_row_sums(w, z_a, z_b, log_z_a, log_z_b, KIND)
    out = STATS + rows * STATS_WIDTH
    tl.store(out + 0, m_a, mask=row_ok)
    tl.store(out + 1, log_z_a, mask=row_ok)
    tl.store(out + 2, m_b, mask=row_ok)
    tl.store(out + 3, log_z_b, mask=row_ok)
    tl.store(out + 4, divergence, mask=row_ok)
    tl.store(out + 5, sum_g, mask=row_ok)
    tl.store(out + 8, sum_h, mask=row_ok)
    if CE:
        lse = row_shift(m_c) + tl.log(z_c)
        tl.store(out + 6, lse, mask=row_ok)
        tl.store(out + 7, lse - label_logit, mask=row_ok)


@triton.jit
def _row_stats(STATS, rows, row_ok):
    """``(m_s, log z_s, m_t, log z_t, Σg, Σh, lse_ce)`` of the rows (0 past the last row)."""
    at = STATS + rows * STATS_WIDTH
    return (
        tl.load(at + 0, mask=row_ok, other=0.0), tl.load(at + 1, mask=row_ok, other=0.0),
        tl.load(at + 2, mask=row_ok, other=0.0), tl.load(at + 3, mask=row_ok, other=0.0),
        tl.load(at + 5, mask=row_ok, other=0.0), tl.load(at + 8, mask=row_ok, other=0.0),
        tl.load(at + 6, mask=row_ok, other=0.0),
    )


@triton.jit
def _gradient_row_inputs(STATS, COEF, LABELS, rows, row_ok, CE: tl.constexpr):
    """What the gradient kernels read per row: :func:`_row_stats`, the divergence's and the
    cross-entropy's gradient coefficients, and the labels (the rows themselves, unused, without
    cross-entropy)."""
    m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse = _row_stats(STATS, rows, row_ok)
    coef = tl.load(COEF + rows * 2, mask=row_ok, other=0.0)
    ce_coef = tl.load(COEF + rows * 2 + 1, mask=row_ok, other=0.0)
    labels = rows
    if CE:
        labels = tl.load(LABELS + rows, mask=row_ok, other=-1)
    return m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef, labels


@triton.jit
def _terms_kernel(
    HS, WS, BS, HT, WT, BT, LABELS, STATS,
    n_rows, n_student_cols, vocab, h_s, h_t,
    hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0,
    temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    beta_hi, beta_lo,
    KIND: tl.constexpr, CE: tl.constexpr, KL_TERMS: tl.constexpr,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr,
    S_DOT_ACC: tl.constexpr, T_DOT_ACC: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    S_OPERAND: tl.constexpr, T_OPERAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row: Σ terms, Σg, Σh over the tiles (``KL_TERMS``: the KL divergences' terms too,
    for a vocabulary shard, whose closed form needs the other shards')."""
    inv_temperature, s_scale, s_cap, t_scale, t_cap = _transform_scalars(
        temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo,
        t_cap_hi, t_cap_lo, ACC,
    )
    beta = joined_float(beta_hi, beta_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_a, log_z_a, m_b, log_z_b, _sum_g, _sum_h, _lse = _row_stats(STATS, rows, row_ok)
    divergence = tl.zeros([BLOCK_M], ACC)
    sum_g = tl.zeros([BLOCK_M], ACC)
    sum_h = tl.zeros([BLOCK_M], ACC)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64 offsets: V·H may pass 2³¹
        a, b = _tile_pair(
            HS, WS, BS, HT, WT, BT, rows, row_ok, cols, n_student_cols, vocab, h_s, h_t,
            hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, s_scale, s_cap, t_scale, t_cap,
            S_BIAS, T_BIAS, S_SCALE, S_CAP, T_SCALE, T_CAP, ACC, S_DOT_ACC, T_DOT_ACC, S_PRECISION, T_PRECISION,
            S_OPERAND, T_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
        )
        u = block_log_probs(_compared(a, cols, vocab), m_a, log_z_a, inv_temperature)
        v = block_log_probs(_compared(b, cols, vocab), m_b, log_z_b, inv_temperature)
        term, g, h = _bucket_terms(u, v, beta, KIND)
        if KL_TERMS:
            if KIND == FORWARD_KL:
                q = tl.exp(v)
                term = tl.where(q != 0.0, q * (v - u), 0.0)
            elif KIND == REVERSE_KL:
                p = tl.exp(u)
                term = tl.where(p != 0.0, p * (u - v), 0.0)
        divergence += tl.sum(term, axis=1)
        sum_g += tl.sum(g, axis=1)
        sum_h += tl.sum(h, axis=1)
    out = STATS + rows * STATS_WIDTH
    tl.store(out + 4, divergence, mask=row_ok)
    tl.store(out + 5, sum_g, mask=row_ok)
    tl.store(out + 8, sum_h, mask=row_ok)


@triton.jit
def _logit_grad(
    a, b, cols, row_ok, labels, m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef,
    n_student_cols, vocab, inv_temperature, beta, s_scale, s_cap, t_scale, t_cap,
    KIND: tl.constexpr, CE: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, TEACHER: tl.constexpr,
):
    """``∂loss/∂z`` of one head on a tile (raw logits, before the transforms), exactly 0 outside
    its rows and columns. The student's (``TEACHER`` False): the divergence kernel's
    ``coef · (g − p Σg)`` on the compared classes (``coef`` = reduction scale · kd_weight · T² / T,
    0 for rows that do not count), plus ``ce_coef · (softmax(z') − onehot(label))`` over the
    student's columns, times the transform's slope. The teacher's: ``coef · (h − q Σh)`` times
    its slope (h = ∂D/∂v)."""
    u = block_log_probs(_compared(a, cols, vocab), m_a, log_z_a, inv_temperature)
    v = block_log_probs(_compared(b, cols, vocab), m_b, log_z_b, inv_temperature)
    _term, g, h = _bucket_terms(u, v, beta, KIND)
    live = row_ok & ((coef != 0.0) | (ce_coef != 0.0))
    if TEACHER:
        dz = coef[:, None] * (h - tl.exp(v) * sum_h[:, None]) * _transform_slope(b, t_scale, t_cap, T_SCALE, T_CAP)
        n_cols = vocab
    else:
        dz = coef[:, None] * (g - tl.exp(u) * sum_g[:, None])
        if CE:
            softmax = tl.exp(_compared(a, cols, n_student_cols) - lse[:, None])
            dz += ce_coef[:, None] * (softmax - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0))
        dz = dz * _transform_slope(a, s_scale, s_cap, S_SCALE, S_CAP)
        n_cols = n_student_cols
    return tl.where(live[:, None] & (cols[None, :] < n_cols), dz, 0.0)


@triton.jit
def _hidden_grad_kernel(
    HS, WS, BS, HT, WT, BT, LABELS, STATS, COEF, GH, WG,
    n_rows, n_student_cols, vocab, h_s, h_t, n_grad_cols, h_g,
    hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, wg_s0, wg_s1,
    temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    beta_hi, beta_lo,
    KIND: tl.constexpr, CE: tl.constexpr, TEACHER: tl.constexpr,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr,
    S_DOT_ACC: tl.constexpr, T_DOT_ACC: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    S_OPERAND: tl.constexpr, T_OPERAND: tl.constexpr,
    G_DOT_ACC: tl.constexpr, G_PRECISION: tl.constexpr, G_OPERAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``GH[rows] = Σ_tiles dz W_g[tile]`` for one head ``g`` (``WG`` its weight, ``h_g`` its
    hidden size, ``n_grad_cols`` its columns)."""
    inv_temperature, s_scale, s_cap, t_scale, t_cap = _transform_scalars(
        temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo,
        t_cap_hi, t_cap_lo, ACC,
    )
    beta = joined_float(beta_hi, beta_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef, labels = _gradient_row_inputs(
        STATS, COEF, LABELS, rows, row_ok, CE
    )
    ks = tl.arange(0, BLOCK_K)
    for v0 in range(0, n_grad_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64 offsets: V·H may pass 2³¹
        a, b = _tile_pair(
            HS, WS, BS, HT, WT, BT, rows, row_ok, cols, n_student_cols, vocab, h_s, h_t,
            hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, s_scale, s_cap, t_scale, t_cap,
            S_BIAS, T_BIAS, S_SCALE, S_CAP, T_SCALE, T_CAP, ACC, S_DOT_ACC, T_DOT_ACC, S_PRECISION, T_PRECISION,
            S_OPERAND, T_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
        )
        dz = _logit_grad(
            a, b, cols, row_ok, labels, m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef,
            n_student_cols, vocab, inv_temperature, beta, s_scale, s_cap, t_scale, t_cap,
            KIND, CE, S_SCALE, S_CAP, T_SCALE, T_CAP, TEACHER,
        )
        dz = dz.to(WG.dtype.element_ty).to(G_OPERAND)  # rounded as the weight's dtype first
        col_ok = cols < n_grad_cols
        for k0 in range(0, h_g, BLOCK_K):
            k = k0 + ks
            k_ok = k < h_g
            w = tl.load(WG + cols[:, None] * wg_s0 + k[None, :] * wg_s1, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(dz, w.to(G_OPERAND), input_precision=G_PRECISION, out_dtype=G_DOT_ACC)
            at = GH + rows[:, None] * h_g + k[None, :]
            here = row_ok[:, None] & k_ok[None, :]
            tl.store(at, tl.load(at, mask=here, other=0.0) + part.to(GH.dtype.element_ty), mask=here)
        # The next tile reads back what this one stored, maybe in other threads of the program
        # (another layout, or a pipelined load): a block-wide barrier orders the two.
        tl.debug_barrier()


@triton.jit
def _weight_grad_kernel(
    HS, WS, BS, HT, WT, BT, LABELS, STATS, COEF, GW, GB, XG,
    n_rows, n_student_cols, vocab, h_s, h_t, n_grad_cols, h_g,
    hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, xg_s0, xg_s1,
    temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo, t_cap_hi, t_cap_lo,
    beta_hi, beta_lo,
    KIND: tl.constexpr, CE: tl.constexpr, TEACHER: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr,
    S_BIAS: tl.constexpr, T_BIAS: tl.constexpr, S_SCALE: tl.constexpr, S_CAP: tl.constexpr,
    T_SCALE: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr,
    S_DOT_ACC: tl.constexpr, T_DOT_ACC: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    S_OPERAND: tl.constexpr, T_OPERAND: tl.constexpr,
    G_DOT_ACC: tl.constexpr, G_PRECISION: tl.constexpr, G_OPERAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``GW[tile] = Σ_row blocks dzᵀ X_g[rows]`` and ``GB[tile] = Σ_rows dz`` for one head ``g``
    (``XG`` its hidden states)."""
    inv_temperature, s_scale, s_cap, t_scale, t_cap = _transform_scalars(
        temperature_hi, temperature_lo, s_scale_hi, s_scale_lo, s_cap_hi, s_cap_lo, t_scale_hi, t_scale_lo,
        t_cap_hi, t_cap_lo, ACC,
    )
    beta = joined_float(beta_hi, beta_lo, ACC)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_grad_cols
    ks = tl.arange(0, BLOCK_K)
    bias_grad = tl.zeros([BLOCK_V], ACC)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < n_rows
        m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef, labels = _gradient_row_inputs(
            STATS, COEF, LABELS, rows, row_ok, CE
        )
        a, b = _tile_pair(
            HS, WS, BS, HT, WT, BT, rows, row_ok, cols, n_student_cols, vocab, h_s, h_t,
            hs_s0, hs_s1, ws_s0, ws_s1, bs_s0, ht_s0, ht_s1, wt_s0, wt_s1, bt_s0, s_scale, s_cap, t_scale, t_cap,
            S_BIAS, T_BIAS, S_SCALE, S_CAP, T_SCALE, T_CAP, ACC, S_DOT_ACC, T_DOT_ACC, S_PRECISION, T_PRECISION,
            S_OPERAND, T_OPERAND, BLOCK_M, BLOCK_V, BLOCK_K,
        )
        dz = _logit_grad(
            a, b, cols, row_ok, labels, m_a, log_z_a, m_b, log_z_b, sum_g, sum_h, lse, coef, ce_coef,
            n_student_cols, vocab, inv_temperature, beta, s_scale, s_cap, t_scale, t_cap,
            KIND, CE, S_SCALE, S_CAP, T_SCALE, T_CAP, TEACHER,
        )
        if WANT_B:
            bias_grad += tl.sum(dz, axis=0)
        if WANT_W:
            dz_t = tl.trans(dz.to(XG.dtype.element_ty).to(G_OPERAND))
            for k0 in range(0, h_g, BLOCK_K):
                k = k0 + ks
                k_ok = k < h_g
                x = tl.load(XG + rows[:, None] * xg_s0 + k[None, :] * xg_s1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                part = tl.dot(dz_t, x.to(G_OPERAND), input_precision=G_PRECISION, out_dtype=G_DOT_ACC)
                at = GW + cols[:, None] * h_g + k[None, :]
                here = col_ok[:, None] & k_ok[None, :]
                tl.store(at, tl.load(at, mask=here, other=0.0) + part.to(GW.dtype.element_ty), mask=here)
            tl.debug_barrier()  # as in _hidden_grad_kernel: the next row block reads these stores back
    if WANT_B:
        tl.store(GB + cols, bias_grad.to(GB.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

_TILE_OVERRIDE: tuple[int, int, int] | None = None


@contextlib.contextmanager
def tile_sizes(block_m: int, block_v: int, block_k: int) -> Iterator[None]:
    """Use these ``(BLOCK_M, BLOCK_V, BLOCK_K)`` (powers of two, ≥ 16: ``tl.dot``'s minimum) in
    this block instead of :func:`default_tile_sizes` (the tests walk several small tiles)."""
    global _TILE_OVERRIDE
    for name, x in (("block_m", block_m), ("block_v", block_v), ("block_k", block_k)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"{name}: expected a power of two ≥ 16, got {x}")
    enclosing, _TILE_OVERRIDE = _TILE_OVERRIDE, (block_m, block_v, block_k)
    try:
        yield
    finally:
        _TILE_OVERRIDE = enclosing


def default_tile_sizes(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_V, BLOCK_K, num_warps)`` for heads of ``dtype`` (the wider of the two).
    Not timed on a GPU yet: the largest tiles whose heaviest variant (JSD with cross-entropy and
    soft-cap) compiles for sm_90 without register spills (ptxas -v through
    :mod:`kdkernels.ops.triton.ahead_of_time`; 64 × 128 × 64 bf16 tiles spilled on 8 warps)."""
    if _TILE_OVERRIDE is not None:
        return (*_TILE_OVERRIDE, 4)
    if dtype in (torch.float16, torch.bfloat16):
        return 64, 64, 64, 8
    if dtype == torch.float32:
        return 32, 64, 32, 8
    return 32, 32, 16, 8


_TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_settings(x: torch.Tensor) -> tuple[tl.dtype, str, tl.dtype]:
    """``tl.dot``'s accumulator dtype, input precision and operand dtype for a head of ``x``'s
    dtype: float64 stays float64; float32 operands use TF32 only where torch's own matmuls would
    (``torch.backends.cuda.matmul.allow_tf32``), so the loss matches the eager composite;
    16-bit operands accumulate in float32.
    bfloat16 operands are widened to float32 under ``TRITON_INTERPRET=1``, whose ``tl.dot`` of
    bfloat16 returns garbage (Triton 3.9; float16 is fine): the products of bfloat16 values are
    exact in float32, so this is what the tensor cores compute."""
    operand = _TL_DTYPES[x.dtype]
    if x.dtype == torch.bfloat16 and triton_interpreted():
        operand = tl.float32
    if x.dtype == torch.float64:
        return tl.float64, "ieee", operand
    if x.dtype == torch.float32 or operand == tl.float32:
        return tl.float32, "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee", operand
    return tl.float32, None, operand  # 16-bit operands: the precision setting does not apply


def fused_linear_rows(hs, ws, bs, ht, wt, bt, mask, targets, options, weights, vocab, grad_scale, wants):
    """Per-position losses (N,) and the gradients of ``Σ grad_scale_i · loss_i``.

    ``hs`` (N, H_s), ``ws`` (C_s, H_s) with C_s = ``vocab`` or, with cross-entropy, the student's
    whole head; ``ht`` (N, H_t), ``wt`` (``vocab``, H_t); biases or None; ``mask`` (N,) bool or
    None; ``targets`` (N,) int64 (with ``ce_weight``); ``options`` = (divergence, β, T,
    scale_by_t2, student / teacher soft-cap, student / teacher logit scale); ``weights`` =
    (kd_weight, ce_weight); ``grad_scale`` a 0-d or (N,) tensor; ``wants`` = whether the
    gradients of (hs, ws, bs, ht, wt, bt) are wanted. Returns ``(losses, (g_hs, g_ws, g_bs,
    g_ht, g_wt, g_bt))`` in the accumulation dtype (float32, float64 for float64 heads), None for
    unwanted ones. Runs the custom op ``kdkernels::fused_linear_tiles`` (opaque to
    ``torch.compile``).
    """
    divergence, beta, temperature, scale_by_t2, s_cap, t_cap, s_scale, t_scale = options
    optional = [None if x is None else float(x) for x in (s_cap, t_cap, s_scale, t_scale)]
    losses, *grads = fused_linear_tiles(
        hs, ws, bs, ht, wt, bt, mask, targets, divergence, float(beta), float(temperature), bool(scale_by_t2),
        *optional, float(weights[0]), float(weights[1]), int(vocab), grad_scale, [bool(w) for w in wants],
    )
    return losses, tuple(g if w else None for g, w in zip(grads, wants))


def _accumulation(hs: torch.Tensor, ht: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (hs.dtype, ht.dtype) else torch.float32


class _Launch:
    """The arguments the kernels of one loss share, and their launches."""

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, divergence, beta, temperature, scale_by_t2,
                 s_cap, t_cap, s_scale, t_scale, vocab, has_ce):
        self.acc = acc = _accumulation(hs, ht)
        self.device = hs.device
        self.n = n = hs.shape[0]
        self.n_student_cols = ws.shape[0]
        self.vocab = vocab
        self.heads = ((hs, ws), (ht, wt))
        self.kind = divergence_kind(divergence, beta)
        wide = hs.dtype if hs.element_size() >= ht.element_size() else ht.dtype
        block_m, self.block_v, block_k, num_warps = default_tile_sizes(wide)
        self.stats = torch.zeros(n, _N_STATS, dtype=acc, device=self.device)
        self.labels = labels.contiguous() if has_ce else self.stats
        self.settings = (_dot_settings(hs), _dot_settings(ht))
        (s_dot, s_precision, s_operand), (t_dot, t_precision, t_operand) = self.settings
        self.tensors = (hs, ws, hs if bs is None else bs, ht, wt, ht if bt is None else bt)
        self.sizes = (n, self.n_student_cols, vocab, hs.shape[1], ht.shape[1])
        self.strides = (*hs.stride(), *ws.stride(), 0 if bs is None else bs.stride(0), *ht.stride(), *wt.stride(),
                        0 if bt is None else bt.stride(0))
        self.scalars = [half for x in (temperature, s_scale, s_cap, t_scale, t_cap)
                        for half in split_float(1.0 if x is None else float(x))]
        self.beta_halves = split_float(float(beta))
        self.constexprs = dict(
            KIND=self.kind, CE=has_ce, S_BIAS=bs is not None, T_BIAS=bt is not None,
            S_SCALE=s_scale is not None, S_CAP=s_cap is not None, T_SCALE=t_scale is not None, T_CAP=t_cap is not None,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            S_DOT_ACC=s_dot, T_DOT_ACC=t_dot, S_PRECISION=s_precision, T_PRECISION=t_precision,
            S_OPERAND=s_operand, T_OPERAND=t_operand,
            BLOCK_M=block_m, BLOCK_V=self.block_v, BLOCK_K=block_k, num_warps=num_warps,
        )
        self.row_grid = (triton.cdiv(n, block_m),)

    def closed_form(self) -> bool:
        """Whether the statistics give the divergence and Σg, Σh (the KLs) without the terms pass."""
        return self.kind in (FORWARD_KL.value, REVERSE_KL.value, ZERO_TEACHER_REFERENCE.value, ZERO_STUDENT_REFERENCE.value)

    def run_stats(self):
        wrap_triton(_stats_kernel)[self.row_grid](
            *self.tensors, self.labels, self.stats, *self.sizes, *self.strides, *self.scalars, **self.constexprs
        )

    def run_terms(self, kl_terms: bool = False):
        wrap_triton(_terms_kernel)[self.row_grid](
            *self.tensors, self.labels, self.stats, *self.sizes, *self.strides, *self.scalars, *self.beta_halves,
            KL_TERMS=kl_terms, **self.constexprs,
        )

    def losses_and_coefficients(self, mask, temperature, scale_by_t2, kd_weight, ce_weight, grad_scale):
        """The per-row losses from the statistics, and per row the divergence gradient's
        coefficient (the reduction's scale · kd_weight · T² / T, as the divergence kernel's
        ``scale``) and the cross-entropy's; 0 where the row does not count."""
        n, acc, device = self.n, self.acc, self.device
        counted = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask
        zero = torch.zeros((), dtype=acc, device=device)
        factor = float(temperature) ** 2 if scale_by_t2 else 1.0
        losses = kd_weight * torch.where(counted, self.stats[:, _DIV] * factor, zero)
        if ce_weight:
            losses = losses + ce_weight * torch.where(counted, self.stats[:, _CE], zero)
        row_scale = grad_scale.to(device=device, dtype=acc).expand(n)
        coef = torch.stack((torch.where(counted, row_scale * (kd_weight * factor / float(temperature)), zero),
                            torch.where(counted, row_scale * ce_weight, zero)), dim=1).contiguous()
        return losses, coef

    def run_gradients(self, coef, grads, wants):
        """The wanted gradients of both heads into ``grads`` (hs, ws, bs, ht, wt, bt buffers)."""
        common = (*self.tensors, self.labels, self.stats, coef)
        for teacher in (False, True):
            x, w = self.heads[teacher]
            g_x, g_w, g_b = grads[3 * teacher: 3 * teacher + 3]
            want_x, want_w, want_b = wants[3 * teacher: 3 * teacher + 3]
            # The student's columns: its whole head with cross-entropy; the teacher's: vocab.
            n_cols = self.vocab if teacher else self.n_student_cols
            dot, precision, operand = self.settings[teacher]
            side = dict(TEACHER=teacher, G_DOT_ACC=dot, G_PRECISION=precision, G_OPERAND=operand)
            if want_x:
                wrap_triton(_hidden_grad_kernel)[self.row_grid](
                    *common, g_x, w, *self.sizes, n_cols, x.shape[1], *self.strides, *w.stride(), *self.scalars,
                    *self.beta_halves, **side, **self.constexprs,
                )
            if want_w or want_b:
                wrap_triton(_weight_grad_kernel)[(triton.cdiv(n_cols, self.block_v),)](
                    *common, g_w if want_w else self.stats, g_b if want_b else self.stats, x,
                    *self.sizes, n_cols, x.shape[1], *self.strides, *x.stride(), *self.scalars, *self.beta_halves,
                    WANT_W=want_w, WANT_B=want_b, **side, **self.constexprs,
                )


def _gradient_buffers(hs, ws, ht, wt, wants, acc):
    n = hs.shape[0]
    shapes = ((n, hs.shape[1]), ws.shape, (ws.shape[0],), (n, ht.shape[1]), wt.shape, (wt.shape[0],))
    return [torch.zeros(shape if w else (0,), dtype=acc, device=hs.device) for w, shape in zip(wants, shapes)]


@torch.library.custom_op("kdkernels::fused_linear_tiles", mutates_args=())
def fused_linear_tiles(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], targets: Optional[torch.Tensor],
    divergence: str, beta: float, temperature: float, scale_by_t2: bool,
    s_cap: Optional[float], t_cap: Optional[float], s_scale: Optional[float], t_scale: Optional[float],
    kd_weight: float, ce_weight: float, vocab: int, grad_scale: torch.Tensor, wants: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_linear_rows` as an op: ``(losses, g_hs, g_ws, g_bs, g_ht, g_wt, g_bt)``, an
    unwanted gradient an empty tensor."""
    acc = _accumulation(hs, ht)
    grads = _gradient_buffers(hs, ws, ht, wt, wants, acc)
    if hs.shape[0] == 0 or vocab == 0:
        return (torch.zeros(hs.shape[0], dtype=acc, device=hs.device), *grads)
    launch = _Launch(hs, ws, bs, ht, wt, bt, targets, divergence, beta, temperature, scale_by_t2,
                     s_cap, t_cap, s_scale, t_scale, vocab, bool(ce_weight))
    launch.run_stats()
    if not launch.closed_form():
        launch.run_terms()
    losses, coef = launch.losses_and_coefficients(mask, temperature, scale_by_t2, kd_weight, ce_weight, grad_scale)
    if any(wants):
        launch.run_gradients(coef, grads, wants)
    return (losses, *grads)


def fused_linear_rows_vocab_parallel(hs, ws, bs, ht, wt, bt, mask, targets, options, weights, grad_scale, wants,
                                     group, offset):
    """:func:`fused_linear_rows` for LM heads sharded along the vocabulary over ``group`` (each
    rank its rows of both weights and biases, the hidden states replicated; ``offset``: the first
    class id of this rank's rows). The same kernels on the rank's shard, with all-reduces of a few
    floats per row between them: the statistics (max, then the rescaled sum-exp, of both heads
    and of the cross-entropy's log-sum-exp; the label's logit, from the rank that holds it), then
    the per-row sums of the terms, ``g`` and ``h`` (the KL divergences too: their closed form
    would need every shard's cross term), and at the end the hidden states' gradients (every
    shard contributes; Megatron's column-parallel input). The weights' and biases' gradients are
    the rank's rows. Not an op (the collectives run between the kernels): not traceable by
    ``torch.compile``."""
    import torch.distributed as dist

    divergence, beta, temperature, scale_by_t2, s_cap, t_cap, s_scale, t_scale = options
    kd_weight, ce_weight = weights
    acc = _accumulation(hs, ht)
    grads = _gradient_buffers(hs, ws, ht, wt, wants, acc)
    vocab = wt.shape[0]
    # Labels as this shard's column ids: those of other shards (and ignored ones) match no column.
    labels = targets - offset if ce_weight else None
    launch = _Launch(hs, ws, bs, ht, wt, bt, labels, divergence, beta, temperature, scale_by_t2,
                     s_cap, t_cap, s_scale, t_scale, vocab, bool(ce_weight))
    stats = launch.stats
    if hs.shape[0] > 0 and vocab > 0:
        launch.run_stats()

    def all_reduce(x, op=dist.ReduceOp.SUM):
        dist.all_reduce(x, op=op, group=group)
        return x

    def global_softmax(m_col, log_z_col, inv_temperature):
        # Each shard's sum-exp is relative to its own shift (row_shift): move it onto the
        # global one before summing.
        m = stats[:, m_col]
        shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        top = all_reduce(m.clone(), dist.ReduceOp.MAX)
        top_shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
        total = all_reduce(torch.exp(stats[:, log_z_col] + (shift - top_shift) * inv_temperature))
        stats[:, m_col] = top
        stats[:, log_z_col] = torch.log(total)

    inv_t = 1.0 / float(temperature)
    global_softmax(_M_S, _LZ_S, inv_t)
    global_softmax(_M_T, _LZ_T, inv_t)
    if ce_weight:
        lse = stats[:, _LSE_CE]
        label_logit = all_reduce(lse - stats[:, _CE])  # 0 on the ranks without the label's class
        top = all_reduce(lse.clone(), dist.ReduceOp.MAX)
        stats[:, _LSE_CE] = top + torch.log(all_reduce(torch.exp(lse - top)))
        stats[:, _CE] = stats[:, _LSE_CE] - label_logit
    stats[:, [_DIV, _SUM_G, _SUM_H]] = 0
    if hs.shape[0] > 0 and vocab > 0:
        launch.run_terms(kl_terms=True)
    stats[:, [_DIV, _SUM_G, _SUM_H]] = all_reduce(stats[:, [_DIV, _SUM_G, _SUM_H]].contiguous())
    losses, coef = launch.losses_and_coefficients(mask, temperature, scale_by_t2, kd_weight, ce_weight, grad_scale)
    if any(wants) and hs.shape[0] > 0 and vocab > 0:
        launch.run_gradients(coef, grads, wants)
    for k in (0, 3):
        if wants[k]:
            all_reduce(grads[k])
    return losses, tuple(g if w else None for g, w in zip(grads, wants))


@fused_linear_tiles.register_fake
def _(hs, ws, bs, ht, wt, bt, mask, targets, divergence, beta, temperature, scale_by_t2, s_cap, t_cap, s_scale, t_scale,
      kd_weight, ce_weight, vocab, grad_scale, wants):
    acc = _accumulation(hs, ht)

    def buffer(wanted, *shape):
        return hs.new_empty(shape if wanted else (0,), dtype=acc)

    n = hs.shape[0]
    shapes = ((n, hs.shape[1]), ws.shape, (ws.shape[0],), (n, ht.shape[1]), wt.shape, (wt.shape[0],))
    return (buffer(True, n), *(buffer(w, *shape) for w, shape in zip(wants, shapes)))
