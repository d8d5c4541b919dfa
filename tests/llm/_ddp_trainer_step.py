"""Run under ``torchrun --nproc_per_node 2``: one DistillTrainer step with 2 ranks × 4 examples;
rank 0 saves the loss and parameters to argv[1] (compared with one process × 8 examples).
``argv[2] == "fused_linear"``: the trainer's fused-linear mode (no logits)."""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.llm.test_hf_trainer import train_one_step, tiny_llama  # noqa: E402


class _Path(str):
    def __truediv__(self, other):
        return _Path(f"{self}/{other}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    fused_linear = sys.argv[2:] == ["fused_linear"]
    teacher = tiny_llama(2, hidden=48, layers=2)
    loss, params = train_one_step(
        _Path(out), 4, 1, teacher_model=teacher, kd_weight=1.0, ce_weight=0.5,
        distill_kwargs=dict(divergence="jsd", beta=0.3, temperature=2.0), ddp_backend="gloo", fused_linear=fused_linear,
    )
    if torch.distributed.get_rank() == 0:
        torch.save({"loss": loss, "params": params}, f"{out}/ddp.pt")
    torch.distributed.barrier()  # both ranks leave together: a rank that exits first can abort the other's gloo threads
    torch.distributed.destroy_process_group()
