"""Run under ``torch.distributed.run --nproc_per_node 2`` with ``TRITON_INTERPRET=1``: LM heads of
40 classes split by rows over the ranks (23 and 17), the hidden states replicated; each rank runs
``fused_linear_distill_loss(..., process_group=WORLD)`` on the ``triton`` backend (the tiles,
16³, with their all-reduces; the row-block walk made to raise) and saves its loss and gradients to
``<out>/rank<r>.pt``. tests/llm/test_fused_linear_triton.py compares them with the materialised
formula on the whole heads in one process."""

import sys

import torch
import torch.distributed as dist

import kdkernels
import kdkernels.ops.triton.fused_linear as tiles
from kdkernels.functional import fused_linear_distill_loss
from kdkernels.llm import fused_linear

SPLIT = 23  # rank 0: classes [0, 23), rank 1: [23, 40)


def heads():
    """float64 (2, 9, H) hidden states and (40, H) weights and biases of both models, a mask, labels."""
    g = torch.Generator().manual_seed(30)
    student = [torch.randn(2, 9, 20, generator=g, dtype=torch.float64), torch.randn(40, 20, generator=g, dtype=torch.float64) * 0.4,
               torch.randn(40, generator=g, dtype=torch.float64)]
    teacher = [torch.randn(2, 9, 24, generator=g, dtype=torch.float64), torch.randn(40, 24, generator=g, dtype=torch.float64) * 0.4,
               torch.randn(40, generator=g, dtype=torch.float64)]
    mask = torch.rand(2, 9, generator=g) > 0.2
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, 0], labels[1, 3], labels[1, 4] = -100, SPLIT, SPLIT - 1  # ignored; the first of rank 1's, the last of rank 0's
    return student, teacher, mask, labels


def cases():
    """(name, teacher learns, kwargs)."""
    _, _, mask, labels = heads()
    yield "forward_kl-batchmean", False, dict(divergence="forward_kl", temperature=1.5, mask=mask)
    yield "jsd-none-teacher", True, dict(divergence="jsd", beta=0.3, temperature=2.0, reduction="none", mask=mask)
    yield "tvd-mean-ce", False, dict(divergence="tvd", reduction="mean", labels=labels, ce_weight=0.6, softcap=(5.0, None))
    yield "skew_reverse_kl-items-ce-teacher", True, dict(divergence="skew_reverse_kl", beta=0.2, reduction="sum",
                                                          num_items_in_batch=7, labels=labels, ce_weight=0.4, kd_weight=0.8)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def refuse(*args, **kwargs):
        raise AssertionError("the row-block walk ran instead of the Triton tiles")

    fused_linear._walk_row_blocks = refuse
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    student, teacher, _, _ = heads()
    results = {}
    for name, teacher_learns, kw in cases():
        s = [student[0].clone().requires_grad_(), student[1][rows].clone().requires_grad_(), student[2][rows].clone().requires_grad_()]
        t = [teacher[0].clone(), teacher[1][rows].clone(), teacher[2][rows].clone()]
        if teacher_learns:
            t = [x.requires_grad_() for x in t]
        with kdkernels.use_backend("triton"), tiles.tile_sizes(16, 16, 16):
            loss = fused_linear_distill_loss(s[0], s[1], t[0], t[1], s[2], t[2], process_group=dist.group.WORLD, **kw)
            weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            leaves = s + (t if teacher_learns else [])
            grads = torch.autograd.grad((loss * weights).sum(), leaves)
        results[name] = (loss.detach(), [g.detach() for g in grads])
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
