"""Hugging Face integration: distil a ``transformers`` causal LM with :func:`kdkernels.llm.distill_loss`.

* :func:`causal_lm_distill_loss`: the loss of one micro-batch from the student's logits, the
  labels and a dense teacher (logits) or a sparse one (top-k), with the causal shift (position i
  predicts label i + 1) and Hugging Face's ``num_items_in_batch`` normalisation.
* :func:`causal_lm_fused_linear_distill_loss`: the same loss from the models' final hidden states
  and LM heads, through :func:`kdkernels.llm.fused_linear_distill_loss`: neither model's logits
  exist (divergence and cross-entropy are computed in row blocks).
* :class:`DistillTrainer`: a ``transformers.Trainer`` whose ``compute_loss`` runs the teacher
  (a frozen model, or a :class:`~kdkernels.llm.TopKTeacherStore` read by the batch's
  ``example_id`` column) and returns ``kd_weight · divergence + ce_weight · cross-entropy``;
  with ``fused_linear=True`` it runs both models without their LM heads (``logits_to_keep`` of no
  position, the final hidden state taken from the decoder) and calls the fused-linear loss.

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

from kdkernels._dtypes import accumulation_dtype
from kdkernels.llm.fused_linear import fused_linear_distill_loss
from kdkernels.llm.losses import IGNORE_INDEX, distill_loss


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Drop the last position: the prediction after the last token has no label."""
    return x[:, :-1]


def _normalise(total: torch.Tensor, counted: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """``total`` ÷ ``num_items_in_batch``, or ÷ the counted tokens of this batch when it is None."""
    divisor = counted.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(device=total.device, dtype=total.dtype)
    return total / divisor


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
            logits.to(accumulation_dtype(logits)).reshape(-1, logits.shape[-1]),  # float32, float64 for float64
            torch.where(counted, targets, ignore_index).reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )
        total = total + ce_weight * ce_sum
    return _normalise(total, counted, num_items_in_batch)


def _head_tensors(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of an LM head given as a module with ``.weight`` (e.g. ``nn.Linear``), a
    ``(weight, bias)`` pair or a weight tensor."""
    if isinstance(head, torch.Tensor):
        return head, None
    if isinstance(head, (tuple, list)) and len(head) == 2:
        return head[0], head[1]
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"head: expected an LM head module with a .weight, a (weight, bias) pair or a weight tensor, got {type(head).__name__}")
    return weight, getattr(head, "bias", None)


def causal_lm_fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_head,
    teacher_hidden: torch.Tensor,
    teacher_head,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    **distill_kwargs: Any,
) -> torch.Tensor:
    """:func:`causal_lm_distill_loss` with a dense teacher, from the final hidden states and the LM
    heads instead of the logits: ``kd_weight · Σ divergence + ce_weight · Σ CE`` over the counted
    tokens ÷ ``num_items_in_batch`` (or ÷ the counted tokens of this batch), the same shift and
    masks, computed by :func:`~kdkernels.llm.fused_linear_distill_loss` (``reduction="sum"``, the
    cross-entropy in the same row blocks): no (B, L, V) tensor for either model.

    ``student_hidden`` (B, L, H_s) / ``teacher_hidden`` (B, L, H_t): the hidden states the LM heads
    take (after the final norm; ``output.last_hidden_state`` of ``model.get_decoder()``);
    ``student_head`` / ``teacher_head``: ``model.get_output_embeddings()`` (or a ``(weight, bias)``
    pair, or a weight). ``distill_kwargs`` go to the fused loss (divergence, temperature, beta,
    vocab_size, softcap, logit_scale, chunk_rows, process_group). Under autocast the hidden states
    and heads are cast to the autocast dtype first, as ``nn.Linear`` would for the logits.
    """
    counted = labels[:, 1:] != ignore_index
    (ws, bs), (wt, bt) = _head_tensors(student_head), _head_tensors(teacher_head)
    hs, ht = _shift(student_hidden), _shift(teacher_hidden)
    device_type = hs.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hs, ws, ht, wt = (x.to(dtype) for x in (hs, ws, ht, wt))
        bs, bt = (None if b is None else b.to(dtype) for b in (bs, bt))
    with torch.autocast(device_type, enabled=False):
        total = fused_linear_distill_loss(
            hs, ws, ht, wt, bs, bt, labels=labels[:, 1:], ignore_index=ignore_index, reduction="sum",
            kd_weight=kd_weight, ce_weight=ce_weight, **distill_kwargs,
        )
    return _normalise(total, counted, num_items_in_batch)


def lm_head_transform(model) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` that a ``transformers`` causal LM applies to its head's output
    (read from its config): Gemma-2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``
    (× it), Granite's ``logits_scaling`` (÷ it). The fused-linear path computes logits from the
    head's weight, so it has to apply them itself; None where the model applies none."""
    config = getattr(model, "config", None)
    scale = 1.0
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return (None if softcap is None else float(softcap)), (None if scale == 1.0 else scale)


def final_hidden_states(model, inputs: dict, unwrapped=None):
    """Run ``model`` (possibly a DDP wrapper of ``unwrapped``) on ``inputs`` without its LM head
    (``logits_to_keep`` of no position: the head sees zero rows) and return ``(outputs, the
    decoder's last hidden state)`` — the tensor the head would take, captured by a forward hook
    on ``get_decoder()``. Calling through the wrapper keeps DDP's and FSDP's hooks."""
    import inspect

    unwrapped = model if unwrapped is None else unwrapped
    parameters = inspect.signature(unwrapped.forward).parameters
    keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
    if keep is None:
        raise ValueError(f"fused_linear: {type(unwrapped).__name__}.forward takes no logits_to_keep; its logits cannot be skipped")
    captured = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    device = next(unwrapped.parameters()).device
    handle = unwrapped.get_decoder().register_forward_hook(hook)
    try:
        outputs = model(**inputs, **{keep: torch.zeros(0, dtype=torch.long, device=device)})
    finally:
        handle.remove()
    return outputs, captured[-1]


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
            fused_linear: no logits for either model: both run without their LM heads and the loss
                is :func:`causal_lm_fused_linear_distill_loss` of their final hidden states and
                heads (a dense ``teacher_model`` only; ``distill_kwargs`` may add ``chunk_rows``).
                The heads' own soft-cap / scaling (Gemma-2, Cohere, Granite;
                :func:`lm_head_transform`) is applied in the loss, so ``softcap`` / ``logit_scale``
                may then not be given. ``return_outputs`` gives outputs with empty logits.
        """

        def __init__(self, *args, teacher_model=None, teacher_store=None, kd_weight=1.0, ce_weight=0.0, distill_kwargs=None,
                     fused_linear=False, **kwargs):
            if (teacher_model is None) == (teacher_store is None):
                raise ValueError("teacher_model / teacher_store: pass exactly one of them")
            if fused_linear and teacher_model is None:
                raise ValueError("fused_linear: needs a teacher_model (its hidden states and LM head), not a teacher_store")
            super().__init__(*args, **kwargs)
            self.kd_weight, self.ce_weight = kd_weight, ce_weight
            self.fused_linear = fused_linear
            self.distill_kwargs = dict(distill_kwargs or {})
            if fused_linear:
                transforms = [lm_head_transform(m) for m in (self.model, teacher_model)]
                if any(x is not None for pair in transforms for x in pair):
                    for name in ("softcap", "logit_scale"):
                        if self.distill_kwargs.get(name) is not None:
                            raise ValueError(f"{name}: the models' heads transform their logits already (their configs); "
                                             "with fused_linear the loss applies those, pass no other")
                    self.distill_kwargs["softcap"] = (transforms[0][0], transforms[1][0])
                    self.distill_kwargs["logit_scale"] = (transforms[0][1], transforms[1][1])
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
            if self.fused_linear:
                loss, outputs = self._fused_linear_loss(model, inputs, labels, num_items_in_batch)
                return self._scaled_for_ranks(loss, num_items_in_batch, outputs, return_outputs)
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
            return self._scaled_for_ranks(loss, num_items_in_batch, outputs, return_outputs)

        def _fused_linear_loss(self, model, inputs, labels, num_items_in_batch):
            student = self.accelerator.unwrap_model(model)
            outputs, student_hidden = final_hidden_states(model, inputs, student)
            with torch.no_grad():
                _, teacher_hidden = final_hidden_states(self.teacher_model, inputs)
            loss = causal_lm_fused_linear_distill_loss(
                student_hidden, student.get_output_embeddings(), teacher_hidden, self.teacher_model.get_output_embeddings(),
                labels, num_items_in_batch=num_items_in_batch, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                **self.distill_kwargs,
            )
            return loss, outputs

        def _scaled_for_ranks(self, loss, num_items_in_batch, outputs, return_outputs):
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
