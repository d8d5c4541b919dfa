"""``nn.Module`` wrappers of :func:`kdkernels.llm.distill_loss`, the TRL-compatible JSD and
:func:`kdkernels.llm.fused_linear_distill_loss`."""

from __future__ import annotations

import torch
from torch import nn

from kdkernels.llm.fused_linear import fused_linear_distill_loss
from kdkernels.llm.losses import IGNORE_INDEX, distill_loss, generalized_jsd_loss


class _ConfiguredLoss(nn.Module):
    """A loss module holding its function's keyword options in ``config`` (shown in its repr) and
    a process group (kept apart: it has no useful repr)."""

    def __init__(self, process_group=None, **config) -> None:
        super().__init__()
        self.process_group = process_group
        self.config = config

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class DistillLoss(_ConfiguredLoss):
    """Holds the configuration of :func:`~kdkernels.llm.distill_loss`; ``forward(student_logits,
    teacher_logits=None, *, teacher_topk=None, mask=None, labels=None, num_items_in_batch=None)``."""

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        tail: str = "renormalize",
        teacher_values: str = "logits",
        stored_temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "batchmean",
        vocab_size: int | None = None,
        softcap=None,
        logit_scale=None,
        check_indices: str = "sync",
        process_group=None,
    ) -> None:
        super().__init__(
            process_group, divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2, tail=tail,
            teacher_values=teacher_values, stored_temperature=stored_temperature, ignore_index=ignore_index,
            reduction=reduction, vocab_size=vocab_size, softcap=softcap, logit_scale=logit_scale, check_indices=check_indices,
        )

    def forward(self, student_logits, teacher_logits=None, *, teacher_topk=None, mask=None, labels=None, num_items_in_batch=None):
        return distill_loss(
            student_logits,
            teacher_logits,
            teacher_topk=teacher_topk,
            mask=mask,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
            **self.config,
        )


class GeneralizedJSDLoss(nn.Module):
    """TRL's generalized JSD (β = 0 → KL(p_t‖p_s), β = 1 → KL(p_s‖p_t)) as a module."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.beta, self.temperature, self.reduction = beta, temperature, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, num_items_in_batch=None):
        return generalized_jsd_loss(student_logits, teacher_logits, labels, self.beta, self.temperature, self.reduction, num_items_in_batch)


class FusedLinearDistillLoss(_ConfiguredLoss):
    """Holds the configuration of :func:`~kdkernels.llm.fused_linear_distill_loss`;
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
    teacher_bias=None, *, mask=None, labels=None, num_items_in_batch=None)`` — e.g. with the models'
    final hidden states and ``model.lm_head.weight``: no logits are computed. ``ce_weight > 0`` adds
    the label cross-entropy (``labels`` required)."""

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "batchmean",
        vocab_size: int | None = None,
        softcap=None,
        logit_scale=None,
        chunk_rows: int | None = None,
        process_group=None,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
    ) -> None:
        super().__init__(
            process_group, divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2,
            ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size, softcap=softcap, logit_scale=logit_scale,
            chunk_rows=chunk_rows, kd_weight=kd_weight, ce_weight=ce_weight,
        )

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None,
                *, mask=None, labels=None, num_items_in_batch=None):
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
            mask=mask, labels=labels, num_items_in_batch=num_items_in_batch, process_group=self.process_group,
            **self.config,
        )
