"""Hinton KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

    L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))  +  (1 − α) · CE(y, softmax(z_s))

KL summed over classes and averaged over the batch (``batchmean``), CE at T = 1 — the form of
szagoruyko/attention-transfer after commit 4133ac5 and of RepDistiller's ``DistillKL``. The
``loss * (T*T*2.0 + alpha)`` seen in circulating code is a bug (methods.md §1) and is not here.

Scale: T = 4, α = 0.9 were tuned on CIFAR (32×32 images, batch 64–128, 10/100 classes). The loss
reads only logits, so it does not grow with the feature-map size or the batch (KL per sample,
averaged); the T² factor keeps it near the CE's size for any T. It grows with how confident the
teacher is: at initialisation α·T²·KL(p_tᵀ ‖ uniform) is at most α·T²·log C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, require_target, upcast
from kdkernels.functional.kd_loss import kd_loss


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """``{"kd": α·T²·KL, "ce": (1−α)·CE}`` for (…, C) logits (each position one sample);
    ``"ce"`` is left out when α = 1, and then ``target`` may be None."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"hinton_kd: the student's logits have shape {tuple(student_logits.shape)} and the teacher's "
            f"{tuple(teacher_logits.shape)}; they need the same shape (the same classes, last dim, for the same samples): "
            "check the teacher's head, or student_layer / teacher_layer"
        )
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes)
    t = teacher_logits.detach().reshape(-1, classes)
    # kd_loss already carries the T² factor that keeps the soft-target gradient's size independent of T.
    losses = {"kd": alpha * kd_loss(s, t, temperature, reduction="batchmean")}
    if alpha != 1.0:
        target = require_target("hinton_kd", target)
        losses["ce"] = (1.0 - alpha) * F.cross_entropy(upcast(s), target.reshape(-1))
    return losses


class HintonKD(Method):
    """Soft-target KD on logits, plus the label CE.

    Args (numbers keyword-only):
        student_layer, teacher_layer: where the logits are (default ``""``: the model outputs).
        temperature: T (default 4, RepDistiller ``kd_T`` and the AT flag default).
        alpha: soft-target share α in [0, 1] (default 0.9, the AT README's KD run).
        weight: factor on both parts (default 1).
    """

    name = "hinton_kd"

    def __init__(
        self,
        student_layer: SpecLike = "",
        teacher_layer: SpecLike = "",
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__([student_layer], [teacher_layer], weight, name)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student, teacher, target):
        if student[0].shape != teacher[0].shape:
            raise ValueError(
                f"{self.name}: {self.student_features[0]} of the student has shape {tuple(student[0].shape)} and "
                f"{self.teacher_features[0]} of the teacher {tuple(teacher[0].shape)}; Hinton KD needs logits of the same "
                "shape (the same classes, last dim): check the teacher's head or student_layer / teacher_layer"
            )
        return hinton_kd_loss(student[0], teacher[0], target, self.temperature, self.alpha)
