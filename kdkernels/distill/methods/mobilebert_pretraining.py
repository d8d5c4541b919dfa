"""MobileBERT's pre-training distillation (stage 2): Sun et al., ACL 2020; code google-research
``mobilebert/run_pretraining.py`` (``distill_ground_truth_ratio``, ``get_masked_lm_output``).

    L_PD = α · L_MLM + (1 − α) · L_KD + L_NSP,       α = 0.5

implemented, as the code does, as one MLM cross-entropy against the mixed label

    q = α · onehot(y) + (1 − α) · softmax(z_teacher)

summed over the masked positions and divided by (their number + 10⁻⁵), plus the next-sentence CE
when NSP logits are given.

Deviation: the official ``distill_temperature`` multiplies the teacher's final hidden state before
its MLM head; here the teacher's MLM logits are used as they are (the official default, T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, check_same_shape, require_target
from kdkernels.distill.methods.mobilebert import at_least_float32
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce

LABEL_WEIGHT_EPS = 1e-5  # the official denominator: sum(masked_lm_weights) + 1e-5


def pretraining_distillation_loss(
    student_mlm_logits: torch.Tensor,
    teacher_mlm_logits: torch.Tensor,
    mlm_labels: torch.Tensor,
    *,
    ground_truth_ratio: float = 0.5,
    student_nsp_logits: torch.Tensor | None = None,
    nsp_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """``{"mlm": CE(q, softmax(z_s)) over masked positions[, "nsp": CE]}`` for (…, V) MLM logits and
    (…) labels where ``ignore_index`` marks the positions that are not masked (Hugging Face's
    convention)."""
    if not 0.0 <= ground_truth_ratio <= 1.0:
        raise ValueError(f"pretraining_distillation: ground_truth_ratio: expected a number in [0, 1], got {ground_truth_ratio!r}")
    check_same_shape("pretraining_distillation", "MLM logits", student_mlm_logits, teacher_mlm_logits, "student and teacher need the same vocabulary")
    if mlm_labels.shape != student_mlm_logits.shape[:-1]:
        raise ValueError(
            f"pretraining_distillation: mlm_labels: expected shape {tuple(student_mlm_logits.shape[:-1])} (the logits without the "
            f"vocabulary axis), got {tuple(mlm_labels.shape)}"
        )
    vocab = student_mlm_logits.shape[-1]
    s = at_least_float32(student_mlm_logits.reshape(-1, vocab))
    t = teacher_mlm_logits.detach().reshape(-1, vocab)
    labels = mlm_labels.reshape(-1)
    masked = labels != ignore_index
    count = masked.sum().to(s.dtype) + LABEL_WEIGHT_EPS
    loss = 0.0
    if ground_truth_ratio > 0:
        loss = ground_truth_ratio * F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum")
    if ground_truth_ratio < 1:
        loss = loss + (1.0 - ground_truth_ratio) * weighted_soft_ce(s, t, reduction="sum", mask=masked)
    losses = {"mlm": loss / count}
    if student_nsp_logits is not None:
        if nsp_labels is None:
            raise ValueError("pretraining_distillation: nsp_labels: needed when NSP logits are given")
        losses["nsp"] = F.cross_entropy(at_least_float32(student_nsp_logits), nsp_labels.reshape(-1))
    return losses


class PretrainingDistillation(Method):
    """MobileBERT stage 2: MLM CE against ``α·onehot + (1 − α)·softmax(teacher MLM logits)``, plus
    the student's NSP CE when ``student_nsp`` is given.

    Args:
        student_mlm, teacher_mlm: where the MLM logits (B, S, V) are (Hugging Face
            ``BertForPreTraining`` / ``MobileBertForPreTraining``: ``"cls.predictions"``).
        student_nsp: where the student's NSP logits (B, 2) are (``"cls.seq_relationship"``), or None.
        ground_truth_ratio: α (README ``distill_ground_truth_ratio=0.5``).
        weight: factor on every part (default 1; the loss is a CE of O(log V), the scale of the
            plain MLM loss it replaces, so no re-tuning is needed).
        ignore_index: the label of unmasked positions (-100).

    The target is the MLM labels (B, S), or ``(mlm_labels, nsp_labels)`` with ``student_nsp``.
    """

    name = "pretraining_distillation"

    def __init__(
        self,
        student_mlm: SpecLike = "cls.predictions",
        teacher_mlm: SpecLike = "cls.predictions",
        student_nsp: SpecLike | None = None,
        *,
        ground_truth_ratio: float = 0.5,
        weight: float = 1.0,
        ignore_index: int = -100,
        name: str | None = None,
    ) -> None:
        student = [student_mlm] + ([student_nsp] if student_nsp is not None else [])
        super().__init__(student, [teacher_mlm], weight, name)
        if isinstance(ground_truth_ratio, bool) or not isinstance(ground_truth_ratio, (int, float)) or not 0.0 <= ground_truth_ratio <= 1.0:
            raise ValueError(f"pretraining_distillation: ground_truth_ratio: expected a number in [0, 1], got {ground_truth_ratio!r}")
        self.ground_truth_ratio = float(ground_truth_ratio)
        self.ignore_index = int(ignore_index)
        self.with_nsp = student_nsp is not None

    def forward(self, student, teacher, target):
        target = require_target(self.name, target)
        if self.with_nsp:
            if not isinstance(target, (tuple, list)) or len(target) != 2:
                raise ValueError("pretraining_distillation: with student_nsp the target must be (mlm_labels, nsp_labels)")
            mlm_labels, nsp_labels = target
            nsp = student[1]
        else:
            mlm_labels, nsp_labels, nsp = target, None, None
        return pretraining_distillation_loss(
            student[0], teacher[0], mlm_labels, ground_truth_ratio=self.ground_truth_ratio,
            student_nsp_logits=nsp, nsp_labels=nsp_labels, ignore_index=self.ignore_index,
        )
