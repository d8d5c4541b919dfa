"""The task loss: cross-entropy on the student's logits with the labels.

The "CE" term of every method's total in methods.md (FitNets, AT, FSP, RKD, SP, OFD); Hinton KD
carries its own (1 − α)·CE. It is the task loss that ``calibrate_weights`` scales the other
methods against, and is itself never calibrated.
"""

from __future__ import annotations

import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, require_target, upcast


class CrossEntropy(Method):
    """``weight · CE(y, softmax(z_s))``, mean over positions; reads no teacher feature.

    Args (numbers keyword-only):
        student_layer: where the logits are (default ``""``: the student's output).
        label_smoothing: as in ``F.cross_entropy`` (default 0).
    """

    name = "ce"

    def __init__(self, student_layer: SpecLike = "", *, weight: float = 1.0, label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__([student_layer], [], weight, name)
        self.label_smoothing = float(label_smoothing)

    def forward(self, student, teacher, target):
        logits = student[0]
        target = require_target(self.name, target)
        if logits.shape[:-1].numel() != target.numel():
            raise ValueError(
                f"{self.name}: the student's logits ({self.student_features[0]}) have shape {tuple(logits.shape)} and the "
                f"labels {tuple(target.shape)}; expected one label per row of logits (classes on the last dim)"
            )
        return F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=self.label_smoothing)
