"""The Hugging Face path without logits: ``causal_lm_fused_linear_distill_loss`` equals
``causal_lm_distill_loss`` on the same models' logits (loss and parameter gradients, float64), and
``DistillTrainer(fused_linear=True)`` gives the dense trainer's loss and parameters after one step,
with gradient accumulation (2 × half batch = one full batch) and with 2 DDP ranks; neither model's
LM head sees a row; the heads' own soft-capping (Gemma-2) is applied; bf16 autocast."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdkernels.llm.hf import (  # noqa: E402
    causal_lm_distill_loss,
    causal_lm_fused_linear_distill_loss,
    final_hidden_states,
    lm_head_transform,
)
from tests.llm._torchrun import run_two_ranks  # noqa: E402
from tests.llm.test_hf_trainer import EXAMPLES, dataset, tiny_llama, train_one_step  # noqa: E402

KWARGS = dict(divergence="jsd", beta=0.3, temperature=2.0)


def _batch():
    rows = dataset()
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def _param_grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("items", [None, 37])
def test_functional_equals_the_logits_path(items):
    """float64 student (with a biased LM head) and teacher of another hidden size and a larger,
    padded vocabulary: the same loss and the same gradient of every student parameter."""
    student = tiny_llama(1).double()
    student.lm_head.bias = torch.nn.Parameter(torch.randn(student.lm_head.out_features, dtype=torch.float64))
    teacher = tiny_llama(2, hidden=48).double()
    teacher.resize_token_embeddings(teacher.config.vocab_size + 5)
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    kw = dict(num_items_in_batch=items, kd_weight=0.7, ce_weight=0.4, vocab_size=student.config.vocab_size, **KWARGS)

    dense = causal_lm_distill_loss(student(**inputs).logits, batch["labels"], teacher_logits=teacher(**inputs).logits.detach(), **kw)
    dense.backward()
    dense_grads = _param_grads(student)
    student.zero_grad()

    outputs, student_hidden = final_hidden_states(student, inputs)
    assert outputs.logits.shape[1] == 0  # the head saw no position
    with torch.no_grad():
        _, teacher_hidden = final_hidden_states(teacher, inputs)
    fused = causal_lm_fused_linear_distill_loss(student_hidden, student.lm_head, teacher_hidden, teacher.get_output_embeddings(),
                                                batch["labels"], chunk_rows=7, **kw)
    fused.backward()
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    for a, e in zip(_param_grads(student), dense_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_the_head_transform_of_gemma2_is_applied():
    """A Gemma-2 student soft-caps its logits (final_logit_softcapping): the fused path reads it
    from the config and equals the dense path on the model's (capped) logits."""
    config = transformers.Gemma2Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, final_logit_softcapping=2.0,
    )
    torch.manual_seed(3)
    student = transformers.Gemma2ForCausalLM(config).double()
    with torch.no_grad():
        student.lm_head.weight.mul_(20)  # logits well beyond the cap
    teacher = tiny_llama(2, hidden=48).double()
    assert lm_head_transform(student) == (2.0, None) and lm_head_transform(teacher) == (None, None)
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    dense = causal_lm_distill_loss(student(**inputs).logits, batch["labels"], teacher_logits=teacher(**inputs).logits.detach(),
                                   ce_weight=1.0, **KWARGS)
    _, hs = final_hidden_states(student, inputs)
    _, ht = final_hidden_states(teacher, inputs)
    fused = causal_lm_fused_linear_distill_loss(hs, student.lm_head, ht.detach(), teacher.lm_head, batch["labels"], ce_weight=1.0,
                                                softcap=(2.0, None), **KWARGS)
    uncapped = causal_lm_fused_linear_distill_loss(hs, student.lm_head, ht.detach(), teacher.lm_head, batch["labels"],
                                                   ce_weight=1.0, **KWARGS)
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    assert abs(float((uncapped - dense).detach())) > 1e-3  # the cap matters here


def test_trainer_fused_linear_equals_dense_with_accumulation(tmp_path):
    pytest.importorskip("accelerate")
    torch.set_num_threads(1)
    teacher = tiny_llama(2, hidden=48, layers=2)
    kwargs = dict(teacher_model=teacher, kd_weight=1.0, ce_weight=0.5, distill_kwargs=dict(KWARGS))
    dense_loss, dense_params = train_one_step(tmp_path / "dense", EXAMPLES, 1, **kwargs)
    fused_loss, fused_params = train_one_step(tmp_path / "fused", EXAMPLES, 1, fused_linear=True, **kwargs)
    kwargs["distill_kwargs"] = dict(KWARGS, chunk_rows=5)  # blocks that cut through the sequences
    accumulated_loss, accumulated_params = train_one_step(tmp_path / "accumulated", EXAMPLES // 2, 2, fused_linear=True, **kwargs)
    assert fused_loss == pytest.approx(dense_loss, rel=1e-6)
    assert accumulated_loss == pytest.approx(dense_loss, rel=1e-5)
    before = [p.detach() for p in tiny_llama(1).parameters()]
    assert sum(float((a - b).abs().sum()) for a, b in zip(dense_params, before)) > 1e-3  # the step did something
    for a, b, c in zip(dense_params, fused_params, accumulated_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_trainer_fused_linear_rejects_a_store_and_a_second_transform(tmp_path):
    pytest.importorskip("accelerate")
    from kdkernels.llm.hf import DistillTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="fused_linear: needs a teacher_model"):
        DistillTrainer(model=tiny_llama(0), args=args, teacher_store=object(), fused_linear=True)
    config = transformers.Gemma2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="softcap: the models' heads transform their logits already"):
        DistillTrainer(model=transformers.Gemma2ForCausalLM(config), args=args, teacher_model=tiny_llama(1), fused_linear=True,
                       distill_kwargs=dict(softcap=5.0))


def test_bf16_autocast_close_to_dense():
    """Under CPU bf16 autocast both paths compute bf16 logits (the fused one block by block): the
    losses agree within bf16 rounding and the student's gradients are finite."""
    student, teacher = tiny_llama(4), tiny_llama(5, hidden=48)
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = causal_lm_distill_loss(student(**inputs).logits, batch["labels"], teacher_logits=teacher(**inputs).logits.detach(),
                                       ce_weight=1.0, **KWARGS)
        _, hs = final_hidden_states(student, inputs)
        with torch.no_grad():
            _, ht = final_hidden_states(teacher, inputs)
        fused = causal_lm_fused_linear_distill_loss(hs, student.lm_head, ht, teacher.lm_head, batch["labels"], ce_weight=1.0, **KWARGS)
    assert fused.dtype == torch.float32
    assert float(fused) == pytest.approx(float(dense), rel=2e-2)
    fused.backward()
    assert student.lm_head.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_ddp_two_ranks_fused_linear_equals_one_process_dense(tmp_path):
    """torchrun, 2 CPU ranks (gloo) × 4 examples with fused_linear=True: the parameters of one
    process × 8 examples on the dense path."""
    pytest.importorskip("accelerate")
    run_two_ranks("_ddp_trainer_step.py", str(tmp_path), "fused_linear")
    ddp = torch.load(tmp_path / "ddp.pt")
    teacher = tiny_llama(2, hidden=48, layers=2)
    _, params = train_one_step(tmp_path, EXAMPLES, 1, teacher_model=teacher, kd_weight=1.0, ce_weight=0.5,
                               distill_kwargs=dict(KWARGS))
    for a, b in zip(ddp["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
