"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with the fused-linear loss, 2 CPU ranks (gloo):
a tiny Llama student sharded per decoder layer and at the root, each rank with half of the batch,
one SGD step of ``causal_lm_fused_linear_distill_loss`` (divergence + label cross-entropy, global
token count) gives the gradients and parameters of one process training on the whole batch with
the dense (logits) loss."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdkernels.llm.hf import causal_lm_distill_loss  # noqa: E402
from tests.llm import _fsdp2_ranks as ranks  # noqa: E402
from tests.llm._torchrun import run_two_ranks  # noqa: E402
from tests.llm.test_hf_trainer import tiny_llama  # noqa: E402


def test_fully_shard_two_ranks_equal_one_process(tmp_path):
    run_two_ranks("_fsdp2_ranks.py", str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp2.pt")

    torch.set_num_threads(1)
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48, layers=2)
    batch = ranks.full_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    loss = causal_lm_distill_loss(student(**inputs).logits, batch["labels"], teacher_logits=teacher_logits, **ranks.KWARGS)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters()}
    torch.optim.SGD(student.parameters(), lr=ranks.LEARNING_RATE).step()

    assert float(sum(sharded["losses"])) == pytest.approx(float(loss), rel=1e-5)
    assert set(sharded["grads"]) == set(grads)
    assert float(grads["lm_head.weight"].abs().max()) > 1e-4  # the head learns
    for name, param in student.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(sharded["params"][name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
