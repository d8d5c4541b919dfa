"""The Hugging Face path: ``DistillTrainer`` gives the same loss and parameters after one step with
gradient accumulation (2 × half batch) as with one full batch, for a dense teacher and for a top-k
store; ``causal_lm_distill_loss`` shifts and normalises as documented."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdkernels.llm import distill_loss, write_teacher_topk  # noqa: E402
from kdkernels.llm.hf import causal_lm_distill_loss  # noqa: E402

VOCAB, LENGTH, EXAMPLES = 48, 10, 8


def tiny_llama(seed, hidden=32, layers=1):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def dataset():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(EXAMPLES):
        length = LENGTH - (i % 4)  # right padding of 0–3 tokens
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        attention = (torch.arange(LENGTH) < length).long()
        labels = torch.where(attention.bool(), ids, -100)
        rows.append({"input_ids": ids, "attention_mask": attention, "labels": labels, "example_id": i})
    return rows


def train_one_step(tmp_path, batch, accumulation, ddp_backend=None, **trainer_kwargs):
    from kdkernels.llm.hf import DistillTrainer

    student = tiny_llama(1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run{batch}x{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0, ddp_backend=ddp_backend,
    )
    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset(), **trainer_kwargs)
    trainer.train()
    loss = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
    return loss, [p.detach().clone() for p in student.parameters()]


@pytest.mark.parametrize("source", ["dense", "store"])
def test_gradient_accumulation_equals_one_batch(tmp_path, source):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    torch.set_num_threads(1)
    teacher = tiny_llama(2, hidden=48, layers=2)
    kwargs = dict(kd_weight=1.0, ce_weight=0.5, distill_kwargs=dict(divergence="jsd", beta=0.3, temperature=2.0))
    if source == "dense":
        kwargs["teacher_model"] = teacher
    else:
        rows = dataset()
        batches = [{"input_ids": torch.stack([r["input_ids"] for r in rows]), "attention_mask": torch.stack([r["attention_mask"] for r in rows])}]
        kwargs["teacher_store"] = write_teacher_topk(teacher, batches, tmp_path / "store", k=8, value_dtype=torch.float32, progress=False)
        kwargs["distill_kwargs"]["tail"] = "tail_bucket"
    full_loss, full_params = train_one_step(tmp_path, EXAMPLES, 1, **kwargs)
    accumulated_loss, accumulated_params = train_one_step(tmp_path, EXAMPLES // 2, 2, **kwargs)
    assert full_loss == pytest.approx(accumulated_loss, rel=1e-5)
    before = [p.detach() for p in tiny_llama(1).parameters()]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(full_params, before))
    assert moved > 1e-3  # the step did something
    for a, b in zip(full_params, accumulated_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_causal_lm_distill_loss_shifts_and_normalises():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[1, 4:] = -100
    got = causal_lm_distill_loss(s, labels, teacher_logits=t, kd_weight=2.0, ce_weight=0.5, divergence="reverse_kl")
    counted = labels[:, 1:] != -100
    kd = distill_loss(s[:, :-1], t[:, :-1], mask=counted, divergence="reverse_kl", reduction="sum")
    ce = torch.nn.functional.cross_entropy(s[:, :-1][counted], labels[:, 1:][counted], reduction="sum")
    torch.testing.assert_close(got, (2.0 * kd + 0.5 * ce) / counted.sum())
    with_count = causal_lm_distill_loss(s, labels, teacher_logits=t, num_items_in_batch=torch.tensor(20), divergence="reverse_kl")
    torch.testing.assert_close(with_count, kd / 20)


def test_trainer_needs_exactly_one_teacher(tmp_path):
    pytest.importorskip("accelerate")
    from kdkernels.llm.hf import DistillTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="teacher_model / teacher_store"):
        DistillTrainer(model=tiny_llama(0), args=args)


def test_bf16_autocast_student_and_teacher():
    """Under CPU bf16 autocast the logits are bf16; the loss is accumulated in float32 and stays
    within bf16 rounding of the float32 loss; the student gets finite gradients."""
    student, teacher = tiny_llama(4), tiny_llama(5, hidden=48)
    rows = dataset()
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    losses = {}
    for autocast in (False, True):
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = student(input_ids=ids).logits
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss = causal_lm_distill_loss(logits, labels, teacher_logits=teacher_logits, ce_weight=1.0, divergence="jsd", temperature=2.0)
        assert loss.dtype == torch.float32
        if autocast:
            assert logits.dtype == torch.bfloat16
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        losses[autocast] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_ddp_two_ranks_equal_one_process(tmp_path):
    """torchrun with 2 CPU ranks (gloo) × 4 examples gives the parameters of 1 process × 8 examples
    (num_items_in_batch gathered over ranks, loss × world size against DDP's gradient average)."""
    pytest.importorskip("accelerate")
    from tests.llm._torchrun import run_two_ranks

    run_two_ranks("_ddp_trainer_step.py", str(tmp_path))
    ddp = torch.load(tmp_path / "ddp.pt")
    teacher = tiny_llama(2, hidden=48, layers=2)
    loss, params = train_one_step(tmp_path, EXAMPLES, 1, teacher_model=teacher, kd_weight=1.0, ce_weight=0.5,
                                  distill_kwargs=dict(divergence="jsd", beta=0.3, temperature=2.0))
    for a, b in zip(ddp["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
