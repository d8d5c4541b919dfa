r"""The two-distribution row walker shared by the softmax-pair Triton kernels (``kd_loss``,
``weighted_soft_ce``, and the divergences that build on them).

A *row* is the class vector of one position: student logits ``a`` and teacher logits ``b`` at one
``(outer, inner)`` index of an ``(outer, classes, inner)`` view of any strides. A program owns
``BLOCK_P`` positions, an arithmetic run along one axis (:func:`position_block`): along ``inner``
for channels-first dense maps (positions contiguous in memory), along ``outer`` for rows (classes
contiguous), so loads are coalesced in both layouts with no permuted copy. Offsets are int64.

**Pass 1, statistics.** The classes are read in ``BLOCK_C`` blocks (:func:`load_class_block`) and
each distribution keeps an online softmax (:func:`softmax_block_update`): the running maximum
``m`` of the *raw* logits (NaN-propagating), the shift ``row_shift(m)`` (``m``, or 0 while the row
has seen only −inf) and ``z = Σ e^x`` with ``x = (logit − shift) · (1/T)``. Taking the maximum
before scaling keeps every exponent ≤ 0 (logits of 1e10 stay finite at any T), the maximum's
exactly 0 (V = 1 gives exactly 0), and lets a NaN or +inf logit reach the loss through the
arithmetic (rules in ``kdkernels/ops/reference/__init__.py``). When a maximum grows, the sums move
by ``e^d`` with ``d = (m_old − shift_new) / T ≤ 0`` (0 for a sum still empty: no ``−inf − −inf``).
A loss adds its cross terms from the block's ``x``, ``e^x`` and the two ``d``;
:func:`kl_cross_update` keeps ``w = Σ e^{x_r} (x_r − x_o)``, from which
:func:`kl_from_statistics` gives ``KL(r ‖ o) = w / z_r − log z_r + log z_o`` from a single read.
Accumulation is in ``ACC`` (float32, or float64 for float64 inputs).

**Pass 2, gradients** (only when one is wanted): :func:`revisit_block` hands the blocks back,
the last read first (the most likely still in cache). A row that fits in one block
(``RESIDENT``: ``n_classes ≤ BLOCK_C``) is not read again: the logits loaded in pass 1 are still in
registers, so each input is read once and the gradient is written from the same registers.
:func:`block_log_probs` gives ``log p`` of a block from the statistics, :func:`store_gradients`
writes the gradient blocks (any strides).

A kernel on this walker is therefore (``kd_loss.py`` is the shortest example):
``position_block``; the first block loaded outside the class loop, so that a resident row keeps
it, and the rest in a loop under ``if not RESIDENT`` (a loop that never runs still holds
registers: ptxas gave ``kd_loss`` at 4096 classes on 8 warps 128 registers and a spill with it,
117 and none without, sm_90), each block through the loss's own block update (two
``softmax_block_update`` calls plus its cross terms); ``counted_positions``; the loss from the
statistics; then one loop over ``revisit_block`` computing and storing each block's gradients.
A divergence whose loss is a closed form of ``(m, z)`` and KL cross terms (reverse KL:
``kl_cross_update`` with the student as ``r``) is a block update and a gradient formula; one that
needs normalised probabilities per class (JSD's mixture, TVD's ``|p_t − p_s|``) adds a pass over
``revisit_block`` summing its terms with ``block_log_probs`` (``divergences.py`` does both).

Kernels import these jit helpers by name (``from ….two_distribution_row import empty_softmax``),
never as ``walker.empty_softmax``: under ``torch.compile`` Inductor copies a kernel's source with
the jit functions it names but not module attributes (``tests/test_triton_kernel_sources.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops._gradients import gradient_buffer
from kdkernels.ops.triton.nan import max_nan, split_float

# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def position_block(n_outer, n_inner, ALONG_INNER: tl.constexpr, BLOCK_P: tl.constexpr):
    """``(o, i, ok)``: the outer and inner indices (int64, ``[BLOCK_P]``) of this program's
    positions and which of them exist. One grid axis covers every (run block, other index) pair
    (:func:`position_grid`), so no axis is limited to CUDA's 65535 programs of grid axes 1 and 2."""
    pid = tl.program_id(0).to(tl.int64)
    if ALONG_INNER:  # channels-first: a run of inner positions of one outer index
        n_run_blocks = tl.cdiv(n_inner, BLOCK_P)
        o = pid // n_run_blocks + tl.zeros([BLOCK_P], tl.int64)
        i = (pid % n_run_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = i < n_inner
    else:  # rows: a run of outer positions at one inner index
        n_run_blocks = tl.cdiv(n_outer, BLOCK_P)
        i = pid // n_run_blocks + tl.zeros([BLOCK_P], tl.int64)
        o = (pid % n_run_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = o < n_outer
    return o, i, ok


@triton.jit
def open_rows(
    S, T, n_outer, n_classes, n_inner, s_so, s_sc, s_si, t_so, t_sc, t_si,
    ACC: tl.constexpr, ALONG_INNER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``(o, i, pos_ok, s_pos, t_pos, a, b)``: this program's positions (:func:`position_block`),
    the ``[BLOCK_P, 1]`` pointers to their student and teacher rows, and their first class block
    (raw logits), read before the class loop so that a resident row keeps it."""
    o, i, pos_ok = position_block(n_outer, n_inner, ALONG_INNER, BLOCK_P)
    s_pos = S + (o * s_so + i * s_si)[:, None]
    t_pos = T + (o * t_so + i * t_si)[:, None]
    cols, ok, a, b = load_class_block(s_pos, s_sc, t_pos, t_sc, 0, n_classes, pos_ok, ACC, BLOCK_C)
    return o, i, pos_ok, s_pos, t_pos, a, b


@triton.jit
def class_block(start, n_classes, pos_ok, BLOCK_C: tl.constexpr):
    """``(cols, ok)``: the class indices ``start … start + BLOCK_C`` (int64) and the
    ``[BLOCK_P, BLOCK_C]`` mask of the elements that exist."""
    cols = (start + tl.arange(0, BLOCK_C)).to(tl.int64)
    return cols, pos_ok[:, None] & (cols < n_classes)[None, :]


@triton.jit
def load_class_block(s_pos, s_sc, t_pos, t_sc, start, n_classes, pos_ok, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(cols, ok, a, b)``: classes ``start … start + BLOCK_C`` of the student and teacher rows at
    ``s_pos``/``t_pos`` (``[BLOCK_P, 1]`` pointers), raw logits in ``ACC``, −inf where absent (a
    class that is not there has no mass and does not move a maximum)."""
    cols, ok = class_block(start, n_classes, pos_ok, BLOCK_C)
    a = tl.load(s_pos + cols[None, :] * s_sc, mask=ok, other=float("-inf")).to(ACC)
    b = tl.load(t_pos + cols[None, :] * t_sc, mask=ok, other=float("-inf")).to(ACC)
    return cols, ok, a, b


@triton.jit
def empty_softmax(BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """``(m, z)`` of rows that have seen no class: maximum −inf, sum 0."""
    return tl.full([BLOCK_P], float("-inf"), ACC), tl.zeros([BLOCK_P], ACC)


@triton.jit
def row_shift(m):
    """What the logits are shifted by: the raw maximum, or 0 while it is −inf (so an all −inf
    block gives ``e^x = 0`` rather than ``e^{−inf − −inf} = NaN``)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def softmax_block_update(m, z, raw, inv_temperature):
    """One block of an online softmax over the class axis (axis 1 of ``raw``).

    Returns ``(m, z, d, x, e)``: the new maximum and sum, the log of the factor the old sum was
    moved by (``d ≤ 0``; 0 for a sum that was still empty), and the block's scaled shifted logits
    ``x`` and their exponentials ``e``.
    """
    new_m = max_nan(m, tl.reduce(raw, 1, max_nan))
    shift = row_shift(new_m)
    d = tl.where(m == float("-inf"), 0.0, (m - shift) * inv_temperature)
    x = (raw - shift[:, None]) * inv_temperature
    e = tl.exp(x)
    return new_m, z * tl.exp(d) + tl.sum(e, axis=1), d, x, e


@triton.jit
def kl_cross_update(w, z_ref, d_ref, d_other, e_ref, x_ref, x_other):
    """``w = Σ e^{x_r} (x_r − x_o)`` after one more block, for ``KL(r ‖ o)``.

    ``z_ref`` is the reference's sum *before* this block (the ``d``'s are from this block's
    updates). Moving onto the new shifts changes every old ``x_r − x_o`` by ``d_r − d_o`` and
    every old weight by ``e^{d_r}``; old terms whose weight underflowed to 0 are dropped, even if
    they were infinite. Classes the reference excludes (weight exactly 0) add exactly 0, whatever
    the other distribution says there.
    """
    f_ref = tl.exp(d_ref)
    w = tl.where(f_ref == 0.0, 0.0, (w + (d_ref - d_other) * z_ref) * f_ref)
    return w + tl.sum(tl.where(e_ref != 0.0, e_ref * (x_ref - x_other), 0.0), axis=1)


@triton.jit
def kl_from_statistics(w, z_ref, log_z_ref, log_z_other, m_other):
    """``KL(r ‖ o) = w / z_r − log z_r + log z_o``; +inf where the other distribution is −inf
    everywhere (it has no mass where the reference has some)."""
    return tl.where(m_other == float("-inf"), float("inf"), w / z_ref - log_z_ref + log_z_other)


@triton.jit
def counted_positions(pos_ok, m_b, MASK, pos, HAS_MASK: tl.constexpr):
    """Positions that count: they exist, the teacher has some mass (``m_b ≠ −inf``; NaN counts,
    and is NaN), and the mask (if any) is set."""
    counted = pos_ok & (m_b != float("-inf"))
    if HAS_MASK:
        counted = counted & (tl.load(MASK + pos, mask=pos_ok, other=0) != 0)
    return counted


@triton.jit
def revisit_block(
    k, n_blocks, a, b, s_pos, s_sc, t_pos, t_sc, n_classes, pos_ok,
    ACC: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``(cols, ok, a, b)`` of the ``k``-th block of a later pass: block ``n_blocks − 1 − k`` read
    again (the last read first), or, for a ``RESIDENT`` row, the logits ``a``, ``b`` of pass 1
    still in registers (``n_blocks`` is 1; the indices and mask are recomputed, not held)."""
    if RESIDENT:
        cols_k, ok_k = class_block(0, n_classes, pos_ok, BLOCK_C)
        a_k = a
        b_k = b
    else:
        cols_k, ok_k, a_k, b_k = load_class_block(
            s_pos, s_sc, t_pos, t_sc, (n_blocks - 1 - k) * BLOCK_C, n_classes, pos_ok, ACC, BLOCK_C
        )
    return cols_k, ok_k, a_k, b_k


@triton.jit
def block_log_probs(raw, m, log_z, inv_temperature):
    """``log softmax(logits / T)`` of a block from the row's statistics ``(m, log z)``."""
    return (raw - row_shift(m)[:, None]) * inv_temperature - log_z[:, None]


@triton.jit
def store_gradients(
    GS, GT, o, i, gs_so, gs_sc, gs_si, gt_so, gt_sc, gt_si, cols, ok, g_s, g_t,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
):
    """Write the wanted gradient blocks, in the gradient buffers' dtypes and strides."""
    if STUDENT_GRAD:
        gs_ptr = GS + (o * gs_so + i * gs_si)[:, None] + cols[None, :] * gs_sc
        tl.store(gs_ptr, g_s.to(GS.dtype.element_ty), mask=ok)
    if TEACHER_GRAD:
        gt_ptr = GT + (o * gt_so + i * gt_si)[:, None] + cols[None, :] * gt_sc
        tl.store(gt_ptr, g_t.to(GT.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def row_outputs(student: torch.Tensor, teacher: torch.Tensor, student_grad: bool, teacher_grad: bool):
    """``(loss, grad_student, grad_teacher, launch)``: the per-position loss (``(outer, inner)``, in
    the accumulation dtype), the gradient buffers (empty placeholders for unwanted ones), and
    whether a kernel is needed. No position: nothing to do; no class: no teacher mass, every
    loss is 0 (and the gradients are empty)."""
    n_outer, n_classes, n_inner = student.shape
    acc_dtype = accumulation_dtype(student, teacher)
    loss = torch.empty((n_outer, n_inner), dtype=acc_dtype, device=student.device)
    grad_student = gradient_buffer(student, student_grad)
    grad_teacher = gradient_buffer(teacher, teacher_grad)
    if n_classes == 0:
        loss.zero_()
    return loss, grad_student, grad_teacher, n_outer * n_inner > 0 and n_classes > 0


# Rows up to this many classes are kept whole in one program's registers (one read of each
# input). Longer rows are read twice: on an H100 (bench/results/tune_triton_h100.json) a variant
# that split long rows over several programs exchanging softmax statistics was within 4 % of the
# two-pass kernel, not worth its inter-program waiting.
RESIDENT_MAX_CLASSES = 4096


def launch_config(
    student: torch.Tensor, teacher: torch.Tensor, along_inner: bool, resident_max_classes: int = RESIDENT_MAX_CLASSES
) -> tuple[int, int, int, bool]:
    """``(BLOCK_P, BLOCK_C, num_warps, RESIDENT)`` tuned for ``kd_loss`` (H100,
    bench/tune_triton.py): rows whose classes are contiguous get one position per program and
    the whole row (up to ``resident_max_classes``) or wide class blocks; other layouts get
    64-position blocks of at most 32 classes."""
    n_outer, n_classes, n_inner = student.shape
    if not along_inner and student.stride(1) == 1 and teacher.stride(1) == 1:
        if n_classes <= resident_max_classes:
            block_c = triton.next_power_of_2(n_classes)
            return 1, block_c, 8 if block_c >= 2048 else 4, True
        cap = 8192 if student.element_size() <= 2 else 4096
        block_c = min(triton.next_power_of_2(n_classes), cap)
        return 1, block_c, 16 if block_c >= 8192 else 8 if block_c >= 2048 else 4, False
    block_c = min(triton.next_power_of_2(n_classes), 32)
    run = n_inner if along_inner else n_outer
    return min(64, triton.next_power_of_2(run)), block_c, 4, n_classes <= min(block_c, resident_max_classes)


def runs_along_inner(student: torch.Tensor) -> bool:
    """Whether a program's positions run along ``inner`` (channels-first maps: inner is the
    faster axis) rather than along ``outer`` (rows, or classes-last views)."""
    n_inner = student.shape[2]
    return n_inner > 1 and student.stride(2) <= student.stride(1)


def position_grid(student: torch.Tensor, along_inner: bool, block_p: int) -> tuple[int]:
    """The one-axis grid of :func:`position_block`."""
    n_outer, _, n_inner = student.shape
    if along_inner:
        return (triton.cdiv(n_inner, block_p) * n_outer,)
    return (triton.cdiv(n_outer, block_p) * n_inner,)


def walker_arguments(student, teacher, grad_student, grad_teacher, grad_scale, temperature, student_grad, teacher_grad):
    """The walker's share of a kernel's positional arguments, in the order the kernels take them:
    ``S, T, GS, GT, GRAD_SCALE, n_outer, n_classes, n_inner``, the strides of student, teacher and
    the two gradients (zeros for an unwanted one, whose pointer is then the input's, never
    written), and the temperature split for float64 (:func:`kdkernels.ops.triton.nan.split_float`)."""
    return (
        student, teacher,
        grad_student if student_grad else student, grad_teacher if teacher_grad else teacher, grad_scale,
        *student.shape, *launch_strides(student), *launch_strides(teacher),
        *(launch_strides(grad_student) if student_grad else (0, 0, 0)),
        *(launch_strides(grad_teacher) if teacher_grad else (0, 0, 0)),
        *split_float(temperature),
    )


def launch_strides(x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s strides, 0 for a dimension of size 1.

    The index along such a dimension is always 0, so its stride changes nothing, but Triton's JIT
    sees it: it specialises each integer argument that is a multiple of 16, and only then can it
    prove a row's start aligned and load a block of classes in 16-byte vectors. Rows are
    ``(N, V, 1)`` views whose inner stride is 1; passed as is, the row offset
    ``o·s_so + i·s_si`` had unknown alignment and every load and store was scalar (SASS of the
    two-pass bf16 kd_loss at 8192-class blocks: 32 loads and 16 stores per block and thread
    instead of 4 and 2; about 1.3× the instructions per element)."""
    return tuple(0 if n == 1 else st for n, st in zip(x.shape, x.stride()))


def walker_constexprs(student, teacher, mask, student_grad, teacher_grad, along_inner, resident, block_p, block_c):
    """The walker's compile-time arguments of a kernel."""
    acc_dtype = accumulation_dtype(student, teacher)
    return dict(
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, HAS_MASK=mask is not None,
        STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, ALONG_INNER=along_inner, RESIDENT=resident,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
