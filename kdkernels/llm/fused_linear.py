r"""Distillation from hidden states and LM heads without the (N, V) logits.

:func:`fused_linear_distill_loss` computes :func:`kdkernels.llm.distill_loss` of
``z_s = h_s W_sᵀ + b_s`` and ``z_t = h_t W_tᵀ + b_t`` — the same divergences, temperature, T²,
masks / labels, reductions, ``num_items_in_batch``, ``vocab_size``, soft-capping and logit scaling —
but never holds the logits of all positions. Two implementations, by the resolved backend:

**Triton tiles** (backend ``triton``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
:mod:`kdkernels.ops.triton.fused_linear`, the op ``kdkernels::fused_linear_tiles``). Nothing larger
than a ``(BLOCK_M, BLOCK_V)`` tile of logits exists: each tile is ``tl.dot``-accumulated over the
hidden size in ``BLOCK_K`` chunks and recomputed by each of four kernels — the per-row softmax
statistics of both heads (online max / sum-exp over the vocabulary tiles), the per-row divergence
and ``Σ ∂D/∂log p`` (mixture divergences and TVD; the KLs get them from the statistics), the
hidden-state gradient (a program per row block) and the weight / bias gradient (a program per
vocabulary tile), for the student and for a teacher whose tensors require grad. Extra memory:
the fp32 gradient buffers plus 10 floats per row; deterministic. ``chunk_rows`` is ignored there
(the kernels tile instead). The label cross-entropy (``ce_weight``) runs in the same kernels.
With ``process_group`` each rank runs the same kernels on its shard with all-reduces of a few
floats per row between them (not traceable by ``torch.compile`` then: the collectives sit
between kernels).

**Row blocks** (backends ``cpu``, ``cuda``, ``torch``): the positions are
walked in blocks of ``chunk_rows`` (Liger-Kernel's fused-linear losses chunk the same way). Per
block:

1. ``z_s = h_s[block] W_sᵀ (+ b_s)`` and ``z_t`` likewise: two GEMMs, (rows, V) each;
2. the fused divergence kernel of the backend (:data:`kdkernels.ops.divergences.DIVERGENCES`; the
   torch backend its reference formula through autograd) gives the per-position losses and
   ``∂loss/∂z`` of the block, already scaled by the reduction;
3. ``∂/∂h_s[block] = (∂/∂z_s) W_s``, ``∂/∂W_s += (∂/∂z_s)ᵀ h_s[block]``, ``∂/∂b_s += Σ_rows ∂/∂z_s``
   (and the teacher's when its tensors require grad): the block's logits and their gradients are
   freed before the next block.

So the extra memory is the gradients of the hidden states and weights plus O(chunk_rows · V),
and the work is that of the eager composite: the same four GEMMs (two forward, two backward per
head that learns), with the softmax passes fused. (The Triton tiles trade memory for work: the
logits are recomputed by every kernel, 8 to 10 GEMM-sized products instead of 4.)

Deviation from issue 17's CPU design (row blocks × vocabulary tiles): a CPU block holds whole
rows of V. Tiling the vocabulary too needs a second sweep over the tiles, since the weight
gradient of a tile needs each row's final normalisers, so both heads' logits would be computed
twice: at N = 2048, H = 1024, V = 32000 on 2 threads one logit GEMM takes 0.66 s, so that adds
≥ 1.3 s to the eager composite's 3.2 s (≥ 1.4× eager, where the issue asks ≤ 1.2×), while the
whole-row blocks stay bounded (96 rows or 8 MiB per head, whichever is larger) and meet both
numbers. The ``triton`` backend does tile the vocabulary.

In both, the gradients are computed in the forward (as every kdkernels loss);
``reduction="none"`` recomputes them in the backward instead, with each position's incoming
gradient.

With ``labels`` and ``ce_weight`` the label cross-entropy of the student's logits joins the
divergence (its gradient added to the student-logit gradient before the GEMMs), so a causal LM's
``kd_weight · KD + ce_weight · CE`` needs no logits at all
(:func:`kdkernels.llm.hf.causal_lm_fused_linear_distill_loss`).

With ``process_group`` the heads are sharded along the vocabulary over the ranks (a tensor-parallel
LM head): on the row-block backends each block's softmaxes are global through
:mod:`kdkernels.llm.vocab_parallel`; on ``triton`` the tiles' per-row statistics are all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from kdkernels import backends
from kdkernels._dtypes import accumulation_dtype
from kdkernels._validation import check_finite_real, check_int, check_tensor
from kdkernels.llm.losses import IGNORE_INDEX, _validate
from kdkernels.ops._reduction import counted_positions
from kdkernels.ops.divergences import DIVERGENCES as DIVERGENCES_OP


class _VocabParallel:
    """The "backend" of weights sharded along the vocabulary over ``group``: each block's loss by
    :func:`kdkernels.llm.vocab_parallel.vocab_parallel_positions` (PyTorch operations and three
    all-reduces per block), its gradients through autograd; or, with ``tiles`` (the device's
    backend is ``triton``), the Triton tiles with all-reduces between the kernels
    (:func:`kdkernels.ops.triton.fused_linear.fused_linear_rows_vocab_parallel`). ``offset``: the
    first class id of this rank's rows (for the label cross-entropy)."""

    def __init__(self, group, offset: int = 0, tiles: bool = False):
        self.group, self.offset, self.tiles = group, offset, tiles

# The default block: 8 MiB of fp32 logits per head, but never fewer than 96 rows. The two heads'
# logit blocks and the student's gradient block are the O(tile) part of the extra memory (36 MiB
# at N = 2048, V = 32000, H = 1024, against the 133 MiB of the student's hidden-state and weight
# gradients there: 9.7 % of eager's extra memory). Fewer rows make each block's GEMMs re-read the
# whole weight for too little work (CPU, 2 threads, fwd+bwd against eager's: V = 32000: 65 rows
# 1.11×, 96 rows 0.98×; V = 128256, H = 1024, N = 1024: 16 rows, what 8 MiB alone gave, 2.0×,
# 64 rows 1.26×, 96 or 128 rows 1.10×, 256 rows 0.97×).
_DEFAULT_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 96


def _check_head(hidden, weight, bias, positions, who: str) -> None:
    check_tensor(hidden, f"{who}_hidden")
    check_tensor(weight, f"{who}_weight")
    if hidden.dim() < 1:
        raise ValueError(f"{who}_hidden: expected (…, hidden) hidden states, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{who}_weight: expected a (vocabulary, hidden) LM-head weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{who}_weight: hidden size {weight.shape[1]} does not match {who}_hidden's last dimension {hidden.shape[-1]}"
        )
    if positions is not None and tuple(hidden.shape[:-1]) != positions:
        raise ValueError(f"{who}_hidden: expected leading shape {positions} to match student_hidden, got {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{who}_weight: dtype {weight.dtype} differs from {who}_hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{who}_weight: on {weight.device}, expected {who}_hidden's device {hidden.device}")
    if bias is not None:
        check_tensor(bias, f"{who}_bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}_bias: expected shape ({weight.shape[0]},) (the vocabulary), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"{who}_bias: expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")


def _logits(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)


class _Heads:
    """Both heads' tensors, flattened to (N, H) rows and cut to the compared vocabulary ``vocab``
    — except the student's with ``student_whole`` (the label cross-entropy is over the student's
    whole vocabulary, as the model's own loss)."""

    def __init__(self, hs, ws, bs, ht, wt, bt, vocab, student_whole=False):
        self.vocab = vocab
        self.hs, self.ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
        student_rows = slice(None) if student_whole else slice(None, vocab)
        self.ws, self.wt = ws[student_rows], wt[:vocab]
        self.bs = None if bs is None else bs[student_rows]
        self.bt = None if bt is None else bt[:vocab]


def _autograd_block(per_position, zs, zt, grad_scale, student_grad, teacher_grad):
    """``per_position(zs, zt)`` (differentiable PyTorch) and the gradients of
    ``Σ grad_scale · loss`` with respect to the wanted logits, by autograd."""
    with torch.enable_grad():
        s_leaf = zs.detach().requires_grad_(student_grad)
        t_leaf = zt.detach().requires_grad_(teacher_grad)
        loss = per_position(s_leaf, t_leaf)
        weighted = (loss * grad_scale.to(loss.dtype).reshape(-1)).sum()
        wanted = [x for x, w in ((s_leaf, student_grad), (t_leaf, teacher_grad)) if w]
        grads = iter(torch.autograd.grad(weighted, wanted)) if wanted else iter(())
    return loss.detach(), next(grads) if student_grad else None, next(grads) if teacher_grad else None


def _block_losses_and_grads(backend, zs, zt, mask, targets, options, weights, grad_scale, student_grad, teacher_grad, vocab):
    """Per-position losses ``kd_weight · divergence + ce_weight · CE`` of a block of logits and the
    gradients of ``grad_scale · Σ loss`` (or of ``Σ grad_scale_i · loss_i`` for a per-row
    ``grad_scale``) with respect to them. ``zs`` spans the student's whole head when the
    cross-entropy is on (the divergence compares its first ``vocab`` classes), else ``vocab``."""
    kd_weight, ce_weight = weights
    s_softcap, s_scale = options[4], options[6]
    if isinstance(backend, _VocabParallel):
        from kdkernels.llm.vocab_parallel import vocab_parallel_label_cross_entropy, vocab_parallel_positions

        # Every rank walks the same blocks: the collectives of this backward happen in lockstep.
        divergence = lambda s, t: vocab_parallel_positions(s, t, mask, *options, group=backend.group)[0]  # noqa: E731
        cross_entropy = lambda s: vocab_parallel_label_cross_entropy(  # noqa: E731
            s, targets, mask, s_softcap, s_scale, offset=backend.offset, group=backend.group)
    elif backend == "torch":  # the reference formula through autograd
        m2 = None if mask is None else mask.unsqueeze(-1)
        divergence = lambda s, t: DIVERGENCES_OP.twin(s.unsqueeze(-1), t.unsqueeze(-1), m2, *options).squeeze(-1)  # noqa: E731
        # The value alone, differentiable PyTorch: autograd gives its gradient.
        cross_entropy = lambda s: _label_cross_entropy(s, targets, mask, s_softcap, s_scale)[0]  # noqa: E731
    else:
        return _kernel_block(backend, zs, zt, mask, targets, options, weights, grad_scale, student_grad, teacher_grad, vocab)

    def per_position(s, t):
        loss = kd_weight * divergence(s[:, :vocab], t)
        return loss + ce_weight * cross_entropy(s) if ce_weight else loss

    return _autograd_block(per_position, zs, zt, grad_scale, student_grad, teacher_grad)


def _label_cross_entropy(zs, targets, mask, softcap, logit_scale, grad_scale=None, want_grad=False):
    """Per-row label cross-entropy ``−log softmax(z')[label]`` (rows,) of the student's logits after
    its soft-cap / scale (the logits the model outputs; no temperature), 0 where ``mask`` is False;
    and, with ``want_grad``, ``grad_scale_i · ∂CE_i/∂z`` in closed
    form (no autograd inside the op, so that it compiles): ``(softmax(z') − onehot(label)) · dz'/dz``
    with ``z' = cap · tanh(z · scale / cap)``, ``dz'/dz = scale · (1 − tanh²)`` (the logits of a
    linear head are finite). float32 (float64 for float64) inside, the gradient in ``zs``' dtype."""
    z = zs.to(accumulation_dtype(zs))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = softcap * capped
    log_p = torch.log_softmax(z, -1)
    counted = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    safe = torch.where(counted, targets, torch.zeros_like(targets)).unsqueeze(-1)
    ce = torch.where(counted, -log_p.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=z.dtype, device=z.device))
    if not want_grad:
        return ce, None
    grad = log_p.exp_()  # the softmax, in log_p's buffer
    grad.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    row_scale = torch.where(counted, grad_scale.to(grad.dtype).reshape(-1), torch.zeros((), dtype=grad.dtype, device=grad.device))
    grad *= row_scale.unsqueeze(-1)
    if softcap is not None:
        grad *= 1 - capped * capped
    if logit_scale is not None:
        grad *= logit_scale
    return ce, grad


def _kernel_block(backend, zs, zt, mask, targets, options, weights, grad_scale, student_grad, teacher_grad, vocab):
    """:func:`_block_losses_and_grads` through the backend's fused divergence kernel (the
    cross-entropy in closed form on the block)."""
    kd_weight, ce_weight = weights
    # The kernels take one scale: per-row scales (reduction="none"'s backward) multiply the rows after.
    rowwise = grad_scale.numel() > 1
    kd_scale = grad_scale * kd_weight
    kernel_scale = torch.ones((), dtype=torch.float64) if rowwise else kd_scale.reshape(())
    m2 = None if mask is None else mask.unsqueeze(-1)
    loss, gs, gt = DIVERGENCES_OP.kernel_for(backend)(
        zs[:, :vocab].unsqueeze(-1), zt.unsqueeze(-1), m2, *options, kernel_scale, student_grad, teacher_grad
    )
    grads = [g.squeeze(-1) if wanted else None for g, wanted in ((gs, student_grad), (gt, teacher_grad))]
    if rowwise:
        grads = [None if g is None else g * kd_scale.to(g.dtype).reshape(-1, 1) for g in grads]
    loss = kd_weight * loss.squeeze(-1)
    if ce_weight:
        ce, g_ce = _label_cross_entropy(zs, targets, mask, options[4], options[6], grad_scale * ce_weight, student_grad)
        loss = loss + ce_weight * ce
        if student_grad:
            g_ce[:, :vocab] += grads[0]  # the divergence's gradient, over the compared classes
            grads[0] = g_ce.to(zs.dtype)
    return loss, *grads


def _walk_blocks(heads: _Heads, mask, targets, options, weights, grad_scale, wants, chunk_rows, backend):
    """The per-position losses (N,) and the gradients of the ``wants`` = (hs, ws, bs, ht, wt, bt)
    flags, accumulated in float32 (float64 for float64): by the Triton tiles
    (:func:`kdkernels.ops.triton.fused_linear.fused_linear_rows`, or its vocabulary-parallel
    version) on the ``triton`` backend, else by :func:`_walk_row_blocks`."""
    vocab_parallel_tiles = isinstance(backend, _VocabParallel) and backend.tiles
    if backend == "triton" or vocab_parallel_tiles:
        from kdkernels.ops.triton import fused_linear as tiles

        arguments = (heads.hs, heads.ws, heads.bs, heads.ht, heads.wt, heads.bt, mask, targets, options, weights)
        if vocab_parallel_tiles:
            losses, grads = tiles.fused_linear_rows_vocab_parallel(*arguments, grad_scale, wants, backend.group, backend.offset)
        else:
            losses, grads = tiles.fused_linear_rows(*arguments, heads.vocab, grad_scale, wants)
        # The hidden states' gradients in their dtypes, as the block walk's (weights': by _shaped).
        g_hs, g_ht = (None if g is None else g.to(h.dtype) for g, h in ((grads[0], heads.hs), (grads[3], heads.ht)))
        return losses, (g_hs, grads[1], grads[2], g_ht, grads[4], grads[5])
    return _walk_row_blocks(heads, mask, targets, options, weights, grad_scale, wants, chunk_rows, backend)


def _walk_row_blocks(heads: _Heads, mask, targets, options, weights, grad_scale, wants, chunk_rows, backend):
    """One pass over the row blocks: the per-position losses (N,) and the gradients of the
    ``wants`` = (hs, ws, bs, ht, wt, bt) flags, accumulated in float32 (float64 for float64)."""
    n = heads.hs.shape[0]
    acc = torch.float64 if torch.float64 in (heads.hs.dtype, heads.ht.dtype) else torch.float32
    losses = torch.empty(n, dtype=acc, device=heads.hs.device)
    want_hs, want_ws, want_bs, want_ht, want_wt, want_bt = wants
    student_grad = want_hs or want_ws or want_bs
    teacher_grad = want_ht or want_wt or want_bt
    g_hs = torch.empty_like(heads.hs) if want_hs else None
    g_ht = torch.empty_like(heads.ht) if want_ht else None
    g_ws = torch.zeros(heads.ws.shape, dtype=acc, device=heads.ws.device) if want_ws else None
    g_wt = torch.zeros(heads.wt.shape, dtype=acc, device=heads.wt.device) if want_wt else None
    g_bs = torch.zeros(heads.ws.shape[0], dtype=acc, device=heads.ws.device) if want_bs else None
    g_bt = torch.zeros(heads.wt.shape[0], dtype=acc, device=heads.wt.device) if want_bt else None
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(n, r0 + chunk_rows))
        hs, ht = heads.hs[rows], heads.ht[rows]
        zs = _logits(hs, heads.ws, heads.bs)
        zt = _logits(ht, heads.wt, heads.bt)
        scale = grad_scale[rows] if grad_scale.numel() > 1 else grad_scale
        block_mask = None if mask is None else mask[rows]
        block_targets = None if targets is None else targets[rows]
        losses[rows], gzs, gzt = _block_losses_and_grads(
            backend, zs, zt, block_mask, block_targets, options, weights, scale, student_grad, teacher_grad, heads.vocab
        )
        del zs, zt
        for gz, h, w, g_h, g_w, g_b in ((gzs, hs, heads.ws, g_hs, g_ws, g_bs), (gzt, ht, heads.wt, g_ht, g_wt, g_bt)):
            if gz is None:
                continue
            if g_h is not None:
                torch.mm(gz, w, out=g_h[rows])
            if g_w is not None:
                g_w.addmm_(gz.t().to(acc), h.to(acc))
            if g_b is not None:
                g_b += gz.sum(0, dtype=acc)
        del gzs, gzt, gz  # before the next block's logits: one block's tensors alive at a time
    if isinstance(backend, _VocabParallel):
        # The hidden states are replicated over the group and each rank's shard of the head
        # contributes to their gradient: summed here (Megatron's column-parallel input); the
        # weights' and biases' gradients are of this rank's rows only.
        for g in (g_hs, g_ht):
            if g is not None:
                dist.all_reduce(g, op=dist.ReduceOp.SUM, group=backend.group)
    return losses, (g_hs, g_ws, g_bs, g_ht, g_wt, g_bt)


def _shard_offset(rows: int, group, device) -> tuple[int, int]:
    """``(first class id of this rank's shard, classes over all ranks)`` from every rank's row count."""
    counts = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor(rows, dtype=torch.int64, device=device), group=group)
    counts = [int(c) for c in counts]
    return sum(counts[: dist.get_rank(group)]), sum(counts)


def _padded(grad, like):
    """A gradient of the compared vocabulary's rows, back in ``like``'s shape (0 for the padding) and dtype."""
    if grad is None:
        return None
    if grad.shape[0] == like.shape[0]:
        return grad.to(like.dtype)
    full = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    full[: grad.shape[0]] = grad
    return full


def _shaped(grads, like):
    """The walked gradients in the shapes (and, for weights and biases, the full vocabularies and
    dtypes) of the tensors they belong to."""
    return [None if g is None else (_padded(g, x) if k in (1, 2, 4, 5) else g.reshape(x.shape))
            for k, (g, x) in enumerate(zip(grads, like))]


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, mask, targets, grad_scale, options, weights, vocab, chunk_rows, backend, rowwise):
        heads = _Heads(hs, ws, bs, ht, wt, bt, vocab, student_whole=bool(weights[1]))
        wants = tuple(bool(x is not None and flag) for x, flag in zip((hs, ws, bs, ht, wt, bt), ctx.needs_input_grad[:6]))
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, mask, targets)  # references, no copies: for a recomputation
        ctx.recompute = (options, weights, vocab, chunk_rows, backend, wants, grad_scale, rowwise)
        ctx.grads = None
        if rowwise or not any(wants):  # "none" (or no gradient yet): the blocks are recomputed in the backward
            losses, _ = _walk_blocks(heads, mask, targets, options, weights, grad_scale, (False,) * 6, chunk_rows, backend)
            return losses if rowwise else losses.sum() * grad_scale
        losses, grads = _walk_blocks(heads, mask, targets, options, weights, grad_scale, wants, chunk_rows, backend)
        ctx.grads = _shaped(grads, (hs, ws, bs, ht, wt, bt))
        return losses.sum() * grad_scale  # the gradients already carry grad_scale

    @staticmethod
    @once_differentiable  # the gradients are computed, not traced: a double backward raises
    def backward(ctx, grad_out):
        if ctx.grads is not None:
            # The forward's gradients, handed over once and scaled in place: a weight-sized copy
            # here would double the peak memory of the gradients.
            out = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.grads]
            ctx.grads = None
        else:
            # reduction="none" (each row scaled by its incoming gradient), or a second backward
            # through the same loss (retain_graph): the blocks are walked again.
            options, weights, vocab, chunk_rows, backend, wants, grad_scale, rowwise = ctx.recompute
            hs, ws, bs, ht, wt, bt, mask, targets = ctx.saved_tensors
            scale = grad_out.reshape(-1) if rowwise else grad_out.reshape(()).to(grad_scale.dtype) * grad_scale
            heads = _Heads(hs, ws, bs, ht, wt, bt, vocab, student_whole=bool(weights[1]))
            _, grads = _walk_blocks(heads, mask, targets, options, weights, scale, wants, chunk_rows, backend)
            out = _shaped(grads, (hs, ws, bs, ht, wt, bt))
        return (*out, *(None,) * 9)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float | None, float | None] | None = None,
    chunk_rows: int | None = None,
    process_group=None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    r""":func:`kdkernels.llm.distill_loss` of ``z_s = student_hidden @ student_weightᵀ + student_bias``
    and ``z_t = teacher_hidden @ teacher_weightᵀ + teacher_bias`` without the (N, V) logits: by
    Triton ``tl.dot`` tiles on the ``triton`` backend, else in blocks of ``chunk_rows`` positions
    (module docstring).

    Args:
        student_hidden / teacher_hidden: (…, H_s) / (…, H_t) final hidden states, same leading
            shape (the hidden sizes may differ).
        student_weight / teacher_weight: (V_s, H_s) / (V_t, H_t) LM-head weights (``nn.Linear``'s
            layout); ``*_bias``: (V,) or None.
        divergence, beta, temperature, scale_by_t2, mask, labels, ignore_index, reduction,
        num_items_in_batch, vocab_size, softcap, logit_scale: as :func:`distill_loss` (the logits of
            a linear head are finite, so every counted position has a teacher distribution:
            ``mean`` divides by the counted positions).
        chunk_rows: positions per block of the row-block walk (default: about 8 MiB of fp32
            logits per head and block, and at least 96 rows, below which the block's GEMMs run
            slower than eager's); not used by the ``triton`` backend's tiles (module docstring).
        process_group: LM heads sharded along the vocabulary over this ``torch.distributed`` group
            (a tensor-parallel head): each rank passes its rows of both weights (and biases) and
            the full, replicated hidden states; the loss is the whole vocabulary's, the same on
            every rank (row blocks: :mod:`kdkernels.llm.vocab_parallel`, PyTorch operations per
            block; ``triton``: the tiles with all-reduced per-row statistics), the weights'
            gradients are each rank's rows, the hidden states' are summed over the ranks. Every
            rank must call it with the same positions, ``chunk_rows`` and backend.
        kd_weight, ce_weight: the per-position loss is ``kd_weight · divergence + ce_weight · CE``
            where ``CE = −log softmax(z_s)[label]`` is the cross-entropy of the student's logits
            (after its ``softcap`` / ``logit_scale``, without the temperature: the logits the model
            outputs) over its whole vocabulary (``vocab_size`` restricts only the divergence) at
            the counted positions; ``ce_weight > 0`` needs ``labels`` (ids in [0, V_s) where
            counted). Its gradient joins the divergence's in each block before the GEMMs, so no
            logits exist for it either; the reduction applies to the sum.

    Returns:
        The loss: a scalar, or the positions' shape for ``reduction="none"``; float32 (float64
        for float64 inputs). Gradients flow to every hidden state, weight and bias that requires
        grad (the teacher's too, if its tensors do).
    """
    _check_head(student_hidden, student_weight, student_bias, None, "student")
    positions = tuple(student_hidden.shape[:-1])
    _check_head(teacher_hidden, teacher_weight, teacher_bias, positions, "teacher")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: on {teacher_hidden.device}, expected student_hidden's device {student_hidden.device}")
    kd_weight, ce_weight = (check_finite_real(w, name) for w, name in ((kd_weight, "kd_weight"), (ce_weight, "ce_weight")))
    for w, name in ((kd_weight, "kd_weight"), (ce_weight, "ce_weight")):
        if w < 0:
            raise ValueError(f"{name}: expected ≥ 0, got {w}")
    if ce_weight and labels is None:
        raise ValueError("ce_weight: the label cross-entropy needs labels= (the target ids of the positions)")
    if chunk_rows is not None:
        check_int(chunk_rows, "chunk_rows")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: expected ≥ 1, got {chunk_rows}")
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None and v_s != v_t:
        raise ValueError(
            f"teacher_weight: a vocabulary of {v_t} rows differs from student_weight's {v_s}; "
            "pass vocab_size= to compare only the shared leading classes"
        )
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size > min(v_s, v_t):
        raise ValueError(f"vocab_size: expected ≤ {min(v_s, v_t)} (the rows of both weights), got {vocab_size}")
    # The logits' validation, on stand-ins of their shapes (0-d tensors expanded: no memory).
    stand_in_s = student_hidden.new_empty(()).expand(*positions, student_weight.shape[0])
    stand_in_t = teacher_hidden.new_empty(()).expand(*positions, teacher_weight.shape[0])
    kw = _validate(
        stand_in_s, stand_in_t, None, divergence, beta, temperature, scale_by_t2, "renormalize", "logits", 1.0,
        mask, labels, ignore_index, reduction, num_items_in_batch, vocab_size, softcap, logit_scale, "off",
    )
    vocab = kw["vocab_size"] if kw["vocab_size"] is not None else student_weight.shape[0]
    n = stand_in_s[..., 0].numel()
    counted = kw["mask"]
    mask_rows = None if counted is None else counted.reshape(-1)
    acc = torch.float64 if student_hidden.dtype == torch.float64 or teacher_hidden.dtype == torch.float64 else torch.float32
    reduction, items = kw["reduction"], kw["num_items_in_batch"]
    rowwise = reduction == "none"
    if items is not None:
        grad_scale = 1.0 / (items.to(device=student_hidden.device, dtype=acc) if isinstance(items, torch.Tensor) else
                            torch.tensor(float(items), dtype=acc, device=student_hidden.device))
    elif reduction == "batchmean":
        grad_scale = torch.tensor(1.0 / max(positions[0] if positions else 1, 1), dtype=acc, device=student_hidden.device)
    elif reduction == "mean":
        grad_scale = 1.0 / (counted_positions(mask_rows, acc) if mask_rows is not None else
                            torch.tensor(float(max(n, 1)), dtype=acc, device=student_hidden.device))
    else:  # sum, or none (whose backward scales each row by its incoming gradient)
        grad_scale = torch.ones((), dtype=acc, device=student_hidden.device)
    grad_scale = grad_scale.reshape(())
    if chunk_rows is None:
        chunk_rows = max(1, min(max(n, 1), max(_MIN_BLOCK_ROWS, _DEFAULT_BLOCK_BYTES // (4 * (v_s if ce_weight else vocab)))))
    if process_group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group: torch.distributed is not initialised (call init_process_group first)")
        if vocab_size is not None:
            raise ValueError("vocab_size: not supported with process_group (cut the padding off the last rank's rows)")
        offset, classes = _shard_offset(v_s, process_group, student_weight.device) if ce_weight else (0, v_s)
        device_backend = backends.resolve(student_hidden.device, DIVERGENCES_OP.kernel_backends + ("torch",))
        backend = _VocabParallel(process_group, offset, tiles=device_backend == "triton")
    else:
        classes = v_s
        backend = backends.resolve(student_hidden.device, DIVERGENCES_OP.kernel_backends + ("torch",))
    targets = None
    if ce_weight:
        targets = labels.reshape(-1).long()
        outside = (targets < 0) | (targets >= classes)
        if mask_rows is not None:
            outside &= mask_rows
        if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph: a device-side assertion
            torch._assert_async(~outside.any(), "labels: the cross-entropy needs ids in the student's vocabulary")
        elif bool(outside.any()):
            raise ValueError(f"labels: the cross-entropy needs ids in [0, {classes}) (the student's vocabulary) where counted, "
                             f"got {int(targets[outside][0])}")
    options = (kw["divergence"], kw["beta"], kw["temperature"], kw["scale_by_t2"], *kw["softcap"], *kw["logit_scale"])
    losses = _FusedLinearDistill.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        mask_rows, targets, grad_scale, options, (kd_weight, ce_weight), vocab, chunk_rows, backend, rowwise,
    )
    return losses.reshape(positions) if rowwise else losses
