"""Similarity-preserving KD: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    Q ∈ R^{B×chw},  G = Q Qᵀ,  G̃ = G with each row L2-normalised,
    L_SP = (1/B²) ‖G̃_T − G̃_S‖_F²,  summed over layer pairs

as RepDistiller ``SP.py`` ("verified by original author"); γ = 3000 (``-b 3000``) is the default
weight; the paper's feature is the last conv map before pooling. Shapes may differ between
student and teacher: only the B×B similarities are compared.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, full_precision, paired


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    q = feature.float().flatten(1)
    with full_precision(q):
        return F.normalize(q @ q.t(), dim=1)


def similarity_preserving_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    batch = student_feature.shape[0]
    diff = similarity_matrix(teacher_feature.detach()) - similarity_matrix(student_feature)
    return diff.pow(2).sum() / (batch * batch)


class SimilarityPreserving(Method):
    """Args: student_layers, teacher_layers (one path or equal-length lists); weight γ (3000)."""

    name = "similarity_preserving"

    def __init__(
        self,
        student_layers: Sequence[SpecLike] | SpecLike,
        teacher_layers: Sequence[SpecLike] | SpecLike,
        weight: float = 3000.0,
        name: str | None = None,
    ) -> None:
        s, t = paired("similarity_preserving", student_layers, teacher_layers)
        super().__init__(s, t, weight, name)

    def forward(self, student, teacher, target):
        loss = 0.0
        for s, t in zip(student, teacher):
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"{self.name}: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
            loss = loss + similarity_preserving_loss(s, t)
        return loss
