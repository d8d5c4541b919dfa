"""Run under ``torch.distributed.run --nproc_per_node 2``: a tiny ``LlamaForCausalLM`` student
sharded by FSDP2 (``fully_shard`` on each decoder layer and on the model), each rank with half of
the batch, trained one SGD step with :func:`kdkernels.llm.hf.causal_lm_fused_linear_distill_loss`
(the student's LM-head weight read after the forward, where FSDP2 leaves the root's parameters
unsharded). Rank 0 saves the loss of each rank, the full gradients and the full parameters after
the step to ``<out>/fsdp2.pt`` (tests/llm/test_fsdp2_fused_linear.py compares them with one process)."""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from kdkernels.llm.hf import causal_lm_fused_linear_distill_loss, final_hidden_states  # noqa: E402
from tests.llm.test_hf_trainer import EXAMPLES, dataset, tiny_llama  # noqa: E402

KWARGS = dict(kd_weight=1.0, ce_weight=0.5, divergence="jsd", beta=0.3, temperature=2.0)
LEARNING_RATE = 0.5


def full_batch():
    rows = dataset()
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def main(out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48, layers=2).requires_grad_(False)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    batch = full_batch()
    items = int((batch["labels"][:, 1:] != -100).sum())  # the global count, as the Trainer gathers it
    mine = slice(rank * EXAMPLES // world, (rank + 1) * EXAMPLES // world)
    inputs = {k: batch[k][mine] for k in ("input_ids", "attention_mask")}
    _, student_hidden = final_hidden_states(student, inputs)
    with torch.no_grad():
        _, teacher_hidden = final_hidden_states(teacher, inputs)
    head = student.get_output_embeddings()
    assert not hasattr(head.weight, "full_tensor"), "the root's parameters should stay unsharded after its forward"
    loss = causal_lm_fused_linear_distill_loss(student_hidden, head, teacher_hidden, teacher.get_output_embeddings(),
                                               batch["labels"][mine], num_items_in_batch=items, chunk_rows=7, **KWARGS)
    (loss * world).backward()  # FSDP2 averages the ranks' gradients; each rank's loss is its share of the sum
    grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}
    torch.optim.SGD(student.parameters(), lr=LEARNING_RATE).step()
    params = {name: p.full_tensor() for name, p in student.named_parameters()}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().float())
    if rank == 0:
        torch.save({"losses": losses, "grads": grads, "params": params}, f"{out}/fsdp2.pt")
    dist.barrier()  # both ranks leave together: a rank that exits first can abort the other's gloo threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
