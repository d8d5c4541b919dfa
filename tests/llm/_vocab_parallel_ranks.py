"""Run under ``torch.distributed.run --nproc_per_node 2``: each rank holds a slice of the
vocabulary (unequal: 17 and 14 of 31 classes) of the same student and teacher logits, computes
``vocab_parallel_distill_loss`` for every divergence and reduction, and saves its loss and the
gradients of its slices to ``<out>/rank<r>.pt`` (tests/llm/test_vocab_parallel.py compares them
with one process holding the whole vocabulary)."""

import sys

import torch
import torch.distributed as dist

from kdkernels.functional import kd_loss
from kdkernels.llm.fused_linear import fused_linear_distill_loss
from kdkernels.llm.losses import distill_loss
from kdkernels.llm.vocab_parallel import vocab_parallel_distill_loss

SPLIT = 17  # rank 0: classes [0, 17), rank 1: [17, 31)


def cases():
    """(name, kwargs); the logits come from logits()."""
    for divergence, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_forward_kl", 0.2),
                             ("skew_reverse_kl", 0.1), ("tvd", 0.5)]:
        for reduction in ("batchmean", "mean", "none"):
            yield f"{divergence}-{reduction}", dict(divergence=divergence, beta=beta, temperature=1.7, reduction=reduction)
    yield "softcap-items", dict(divergence="jsd", beta=0.4, softcap=(5.0, None), reduction="sum", num_items_in_batch=9)


def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 31, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, 4, 31, generator=g, dtype=torch.float64) * 3
    t[0, 1] = float("-inf")  # no teacher distribution: not counted
    t[1, 2, 20:] = float("-inf")  # the teacher's mass only on rank 0's classes here
    mask = torch.rand(3, 4, generator=g) > 0.2
    return s, t, mask


def heads():
    """Hidden states (3, 4, H) of both models (replicated on every rank) and (31, H) LM heads with biases."""
    g = torch.Generator().manual_seed(1)
    h_s, w_s, b_s = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64), torch.randn(31, 6, generator=g, dtype=torch.float64),
                     torch.randn(31, generator=g, dtype=torch.float64))
    h_t, w_t = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(31, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=g) > 0.2
    return h_s, w_s, b_s, h_t, w_t, mask


def fused_linear_cases():
    for divergence, beta in [("forward_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]:
        for reduction in ("batchmean", "none"):
            yield f"fused-{divergence}-{reduction}", dict(divergence=divergence, beta=beta, temperature=1.5, reduction=reduction)
    # The label cross-entropy too: each label's log-probability from the rank holding its class.
    labels = torch.randint(0, 31, (3, 4), generator=torch.Generator().manual_seed(2))
    labels[0, 0], labels[2, 3] = -100, SPLIT  # an ignored label; the first class of rank 1
    for reduction in ("mean", "none"):
        yield f"fused-ce-{reduction}", dict(divergence="jsd", beta=0.3, temperature=1.5, reduction=reduction, labels=labels,
                                            ce_weight=0.6, softcap=(6.0, None))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    s, t, mask = logits()
    cols = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    results = {}
    for name, kw in cases():
        s_shard = s[..., cols].clone().requires_grad_()
        t_shard = t[..., cols].clone().requires_grad_()
        if name.startswith("jsd"):  # through distill_loss's process_group= as well
            loss = distill_loss(s_shard, t_shard, mask=mask, process_group=dist.group.WORLD, **kw)
        else:
            loss = vocab_parallel_distill_loss(s_shard, t_shard, mask=mask, **kw)
        g_s, g_t = torch.autograd.grad(loss.sum(), (s_shard, t_shard))
        results[name] = (loss.detach(), g_s, g_t)
    h_s, w_s, b_s, h_t, w_t, head_mask = heads()
    for name, kw in fused_linear_cases():
        hs = h_s.clone().requires_grad_()
        ws, bs = w_s[cols].clone().requires_grad_(), b_s[cols].clone().requires_grad_()
        # Blocks of 5 of the 12 positions: the last one short, every rank walking the same blocks.
        loss = fused_linear_distill_loss(hs, ws, h_t, w_t[cols], bs, mask=head_mask, chunk_rows=5,
                                         process_group=dist.group.WORLD, **kw)
        results[name] = (loss.detach(), *torch.autograd.grad(loss.sum(), (hs, ws, bs)))
    # kd_loss: classes along dim 1 of (3, 31, 4) maps, every reduction.
    for reduction in ("batchmean", "mean", "sum", "none"):
        s_shard = s.movedim(-1, 1)[:, cols].clone().requires_grad_()
        t_shard = t.movedim(-1, 1)[:, cols].clone().requires_grad_()
        loss = kd_loss(s_shard, t_shard, 1.7, reduction, dim=1, mask=mask, process_group=dist.group.WORLD)
        results[f"kd_loss-{reduction}"] = (loss.detach(), *torch.autograd.grad(loss.sum(), (s_shard, t_shard)))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
