"""Similarity-preserving KD: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    Q ∈ R^{B×chw},  G = Q Qᵀ,  G̃ = G with each row L2-normalised,
    L_SP = (1/B²) ‖G̃_T − G̃_S‖_F²,  summed over layer pairs

as RepDistiller ``SP.py`` ("verified by original author"); γ = 3000 (``-b 3000``) is the default
weight; the paper's feature is the last conv map before pooling. Shapes may differ between
student and teacher: only the B×B similarities are compared.

Scale: γ = 3000 is RepDistiller's CIFAR-100 value (32×32 images, batch 64, an 8×8 last map).
Each row of G̃ is a unit vector, so ‖G̃_T − G̃_S‖² is at most 4B and the loss is about (mismatch per row)²/B: it does not grow with the feature size or the widths,
and it shrinks as the batch grows (measured on random features: ×0.15 from batch 16 to 64,
×0.18 from 64 to 256). Away from batch 64 the default can be far from the CE in either
direction: calibrate it (``calibrate_weights``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, full_precision, paired, upcast


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    q = upcast(feature).flatten(1)
    with full_precision(q):
        return F.normalize(q @ q.t(), dim=1)


def similarity_preserving_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    batch = student_feature.shape[0]
    g_t, g_s = similarity_matrix(teacher_feature.detach()), similarity_matrix(student_feature)
    dtype = torch.promote_types(g_t.dtype, g_s.dtype)
    diff = g_t.to(dtype) - g_s.to(dtype)
    return diff.pow(2).sum() / (batch * batch)


class SimilarityPreserving(Method):
    """Args: student_layers, teacher_layers (one path or equal-length lists); keyword-only:
    weight γ (3000), name."""

    name = "similarity_preserving"

    def __init__(
        self,
        student_layers: Sequence[SpecLike] | SpecLike,
        teacher_layers: Sequence[SpecLike] | SpecLike,
        *,
        weight: float = 3000.0,
        name: str | None = None,
    ) -> None:
        s, t = paired("similarity_preserving", student_layers, teacher_layers)
        super().__init__(s, t, weight, name)

    def forward(self, student, teacher, target):
        loss = 0.0
        for s, t, s_spec, t_spec in zip(student, teacher, self.student_features, self.teacher_features):
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"{self.name}: {s_spec} vs {t_spec}: batch sizes differ, shapes {tuple(s.shape)} and {tuple(t.shape)}")
            loss = loss + similarity_preserving_loss(s, t)
        return loss
