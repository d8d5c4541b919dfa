"""Hugging Face integration: distil a ``transformers`` causal LM with :func:`kdkernels.llm.distill_loss`.

* :func:`causal_lm_distill_loss`: the loss of one micro-batch from the student's logits, the
  labels and a dense teacher (logits) or a sparse one (top-k), with the causal shift (position i
  predicts label i + 1) and Hugging Face's ``num_items_in_batch`` normalisation.
* :class:`DistillTrainer`: a ``transformers.Trainer`` whose ``compute_loss`` runs the teacher
  (a frozen model, or a :class:`~kdkernels.llm.TopKTeacherStore` read by the batch's
  ``example_id`` column) and returns ``kd_weight · divergence + ce_weight · cross-entropy``.

Gradient accumulation and data parallelism: the ``Trainer`` counts the label tokens that are not
−100 (after the shift) over all micro-batches of an optimizer step, and, with
``average_tokens_across_devices`` (the default), over all ranks; each micro-batch's loss is its *sum*
over counted tokens divided by that global count, so the accumulated gradient is the gradient of
one big batch's mean. Because DDP averages gradients over ranks, the loss is then multiplied by the
number of processes (as ``Trainer.compute_loss`` does for models that take ``num_items_in_batch``).
Without a count (evaluation, or a model that takes no loss kwargs) the loss is the mean over the
micro-batch's counted tokens and the ``Trainer`` divides by the accumulation steps itself.

bf16 autocast: the student and the teacher run under the ``Trainer``'s autocast; the loss upcasts
to float32 inside (the reference, and later the kernels, accumulate in float32).

``transformers`` is imported lazily (at class creation), so ``kdkernels.llm`` does not need it.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkernels.llm.losses import IGNORE_INDEX, distill_loss


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Drop the last position: the prediction after the last token has no label."""
    return x[:, :-1]


def causal_lm_distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    **distill_kwargs: Any,
) -> torch.Tensor:
    """``kd_weight · Σ divergence + ce_weight · Σ CE`` over the counted tokens, ÷ ``num_items_in_batch``
    (or ÷ the counted tokens of this batch when it is None).

    ``student_logits`` (B, L, V); ``labels`` (B, L) as given to a HF causal LM (unshifted, −100 =
    ignored); teacher logits (B, L, V_t) or top-k (B, L, k) aligned with the *logits* (position i
    predicts token i + 1 for both). ``teacher_mask`` (B, L): positions where the teacher has a target
    (e.g. :attr:`TopKBatch.mask`); the counted tokens are labels ≠ ``ignore_index`` (∧ teacher_mask).
    ``distill_kwargs`` go to :func:`distill_loss` (divergence, temperature, beta, tail, ...).
    """
    logits = _shift(student_logits)
    targets = labels[:, 1:]
    counted = targets != ignore_index
    if teacher_mask is not None:
        counted = counted & _shift(teacher_mask)
    if num_items_in_batch is None:
        divisor = counted.sum().clamp_min(1)
    else:
        divisor = num_items_in_batch
    total = logits.new_zeros((), dtype=torch.float32)
    if kd_weight:
        topk = None if teacher_topk is None else (_shift(teacher_topk[0]), _shift(teacher_topk[1]))
        kd_sum = distill_loss(
            logits,
            None if teacher_logits is None else _shift(teacher_logits),
            teacher_topk=topk,
            mask=counted,
            reduction="sum",
            **distill_kwargs,
        )
        total = total + kd_weight * kd_sum
    if ce_weight:
        ce_sum = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            torch.where(counted, targets, ignore_index).reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )
        total = total + ce_weight * ce_sum
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(device=total.device, dtype=total.dtype)
    return total / divisor


def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """``Trainer`` that distils the model it trains from ``teacher_model`` or ``teacher_store``.

        Args (besides the ``Trainer``'s):
            teacher_model: a frozen causal LM run under ``torch.no_grad`` on each batch (dense
                teacher logits); or
            teacher_store: a :class:`~kdkernels.llm.TopKTeacherStore` written with
                ``mask_key="attention_mask"`` over the same examples: each batch must carry an
                ``example_id`` column (kept by the data pipeline even with
                ``remove_unused_columns``); its rows are placed at the batch's ``attention_mask``.
            kd_weight, ce_weight: weights of the divergence and of the label cross-entropy.
            distill_kwargs: for :func:`~kdkernels.llm.distill_loss` (``divergence``, ``temperature``,
                ``beta``, ``tail``, ``vocab_size``, ``softcap``, ...). With a store,
                ``teacher_values="logprobs"`` and ``stored_temperature`` are set from it.
        """

        def __init__(self, *args, teacher_model=None, teacher_store=None, kd_weight=1.0, ce_weight=0.0, distill_kwargs=None, **kwargs):
            if (teacher_model is None) == (teacher_store is None):
                raise ValueError("teacher_model / teacher_store: pass exactly one of them")
            super().__init__(*args, **kwargs)
            self.kd_weight, self.ce_weight = kd_weight, ce_weight
            self.distill_kwargs = dict(distill_kwargs or {})
            self.teacher_store = teacher_store
            self.teacher_model = teacher_model
            if teacher_model is not None:
                teacher_model.eval().requires_grad_(False)
                teacher_model.to(self.args.device)
            else:
                self.distill_kwargs.setdefault("teacher_values", "logprobs")
                self.distill_kwargs.setdefault("stored_temperature", teacher_store.temperature)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "example_id" not in self._signature_columns:
                self._signature_columns.append("example_id")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            example_ids = inputs.pop("example_id", None)
            outputs = model(**inputs)
            teacher = {}
            if self.teacher_model is not None:
                with torch.no_grad():
                    teacher["teacher_logits"] = self.teacher_model(**inputs).logits
            else:
                if example_ids is None:
                    raise ValueError("example_id: a batch must carry the store's example ids when training from teacher_store")
                mask = inputs.get("attention_mask")
                mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
                batch = self.teacher_store.batch(example_ids.tolist(), mask=mask.cpu()).to(labels.device)
                teacher["teacher_topk"] = (batch.indices, batch.values)
                teacher["teacher_mask"] = batch.mask
            loss = causal_lm_distill_loss(
                outputs.logits,
                labels,
                num_items_in_batch=num_items_in_batch,
                kd_weight=self.kd_weight,
                ce_weight=self.ce_weight,
                **teacher,
                **self.distill_kwargs,
            )
            # Normalised by the global count: the Trainer must not divide by the accumulation steps.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages the ranks' gradients
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def __getattr__(name: str):
    if name == "DistillTrainer":
        cls = _trainer_class()
        globals()["DistillTrainer"] = cls
        return cls
    raise AttributeError(name)
