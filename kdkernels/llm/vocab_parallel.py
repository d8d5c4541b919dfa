r"""Vocabulary-parallel distillation: student and teacher logits sharded along the vocabulary across
the ranks of a process group, as a tensor-parallel (Megatron column-parallel) LM head leaves them.

Each rank holds ``(…, V_r)`` — its slice of the classes, the same positions on every rank — and
gets the gradient of its own slice; no rank ever sees the full vocabulary. The softmaxes are
global through three all-reduces of a few numbers per position (Megatron's vocab-parallel
cross-entropy does the same for CE):

1. the maximum of each row (``MAX``; a constant shift, so outside autograd);
2. the sum of exponentials under it (``SUM``): ``log p = x − m − log Σ_ranks Σ_local e^{x − m}``;
3. each rank's partial sum of the divergence's per-class terms (``SUM``): every divergence of
   :mod:`kdkernels.ops.reference.divergences` is a sum over classes of terms of (log p, log q).

Every rank computes the same replicated loss. In the backward, the divergence's sum passes its
gradient unchanged to each rank's terms, and the normalisers' gradients — to which every rank's
terms contribute — are all-reduced, so each rank gets exactly its shard's gradient. The formula per class
is the reference's; this path runs in PyTorch operations (no fused kernel), with (…, V_r)
temporaries per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kdkernels._dtypes import accumulation_dtype
from kdkernels.llm.losses import IGNORE_INDEX, _validate
from kdkernels.ops.reference.divergences import (
    NEG_INF,
    divergence_from_log_probs,
    reduce_distill,
    transform_logits,
    zero_uncounted,
)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward. The backward depends on what the sum feeds:
    ``replicated_after=True`` — the replicated loss: every rank holds the whole of it, so the
    gradient passes unchanged (an all-reduce would count it once per rank);
    ``False`` — a statistic each rank's own terms use (the softmax normaliser): the gradient is
    the sum of every rank's, all-reduced."""

    @staticmethod
    def forward(ctx, x, group, replicated_after):
        ctx.group, ctx.replicated_after = group, replicated_after
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        if not ctx.replicated_after:
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None, None


def _global_max(x: torch.Tensor, group) -> torch.Tensor:
    """The row maxima of the whole vocabulary (−inf for rows that are −inf everywhere)."""
    m = x.detach().amax(-1, keepdim=True) if x.shape[-1] > 0 else x.new_full((*x.shape[:-1], 1), NEG_INF)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def _global_log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    m = _global_max(x, group)
    m = torch.where(m == NEG_INF, torch.zeros_like(m), m)  # an empty row: any finite shift
    z = _SumOverRanks.apply(torch.exp(x - m).sum(-1, keepdim=True), group, False)
    return x - m - torch.log(z)


def vocab_parallel_positions(
    student_logits, teacher_logits, mask, divergence, beta, temperature, scale_by_t2, student_softcap, teacher_softcap,
    student_logit_scale, teacher_logit_scale, *, group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-position loss, counted)`` of this rank's vocabulary shards (arguments validated; the
    loss is the whole vocabulary's, 0 where not counted): what
    :func:`kdkernels.ops.reference.divergences.distill_loss_positions` gives for unsharded logits."""
    dtype = accumulation_dtype(student_logits, teacher_logits)
    s = transform_logits(student_logits.to(dtype), student_logit_scale, student_softcap)
    t = transform_logits(teacher_logits.to(dtype), teacher_logit_scale, teacher_softcap)
    # A position counts where the mask says so and the teacher has mass somewhere in the vocabulary.
    s, t, counted = zero_uncounted(s, t, _global_max(t, group).squeeze(-1), mask)
    log_p_s = _global_log_softmax(s / temperature, group)
    log_p_t = _global_log_softmax(t / temperature, group)
    loss = _SumOverRanks.apply(divergence_from_log_probs(log_p_t, log_p_s, divergence, beta), group, True)
    if scale_by_t2:
        loss = loss * temperature**2
    return torch.where(counted, loss, torch.zeros_like(loss)), counted


def vocab_parallel_label_cross_entropy(student_logits, targets, mask, softcap, logit_scale, *, offset, group=None) -> torch.Tensor:
    """Per-position ``−log softmax(z)[label]`` of logits sharded along the vocabulary (this rank's
    classes start at ``offset``), after the student's soft-cap / scale: the global normaliser as
    above, the label's log-probability from the rank that holds it (Megatron's vocab-parallel
    cross-entropy). 0 where ``mask`` is False; identical on every rank."""
    z = transform_logits(student_logits.to(accumulation_dtype(student_logits)), logit_scale, softcap)
    log_p = _global_log_softmax(z, group)
    local = targets - offset
    here = (local >= 0) & (local < z.shape[-1])
    if mask is not None:
        here = here & mask
    if z.shape[-1] > 0:
        picked = log_p.gather(-1, torch.where(here, local, torch.zeros_like(local)).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(here, picked, torch.zeros_like(picked))
    else:
        picked = z.new_zeros(z.shape[:-1])
    return -_SumOverRanks.apply(picked, group, True)


def vocab_parallel_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    process_group=None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float | None, float | None] | None = None,
) -> torch.Tensor:
    r""":func:`kdkernels.llm.distill_loss` of logits sharded along the vocabulary over
    ``process_group`` (default: the world): this rank's ``student_logits`` / ``teacher_logits`` are
    ``(…, V_r)``, the same classes of both models and the same positions on every rank (shards may
    differ in size between ranks). Returns the loss of the whole vocabulary, identical on every
    rank; the gradient reaches this rank's shards only. Every rank must call it (collectives).

    The arguments are :func:`distill_loss`'s, without ``vocab_size`` (cut the padding off the last
    rank's shard) and the sparse teacher."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialised (call init_process_group first)")
    if process_group is None:
        process_group = dist.group.WORLD
    kw = _validate(
        student_logits, teacher_logits, None, divergence, beta, temperature, scale_by_t2, "renormalize", "logits", 1.0,
        mask, labels, ignore_index, reduction, num_items_in_batch, None, softcap, logit_scale, "off",
    )
    loss, counted = vocab_parallel_positions(
        student_logits, teacher_logits, kw["mask"], kw["divergence"], kw["beta"], kw["temperature"], kw["scale_by_t2"],
        *kw["softcap"], *kw["logit_scale"], group=process_group,
    )
    return reduce_distill(loss, counted, kw["reduction"], kw["num_items_in_batch"])
