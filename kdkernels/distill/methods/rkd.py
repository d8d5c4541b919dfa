"""Relational KD: Park et al., "Relational Knowledge Distillation" (CVPR 2019).

Distance:  ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ,  μ = mean of the non-zero pairwise distances,
computed separately for teacher and student (the student's μ is not detached).
Angle:     ψ_A(t_i, t_j, t_k) = ⟨e^{ij}, e^{kj}⟩,  e^{ij} = (t_i − t_j)/‖t_i − t_j‖₂, all N³ triples.
Each loss is ``F.smooth_l1_loss`` (Huber, δ = 1) averaged over all N² / N³ entries, zeros
included — lenscloth/RKD ``metric/loss.py`` (``RkdDistance``, ``RKdAngle``) and ``pdist``
(d² clamped at 10⁻¹², zero diagonal). Defaults are the official CIFAR run: w_D = 25, w_A = 50 on
L2-normalised, flattened embeddings (``normalize=True``); the metric-learning examples use 1 and
2 without normalisation, RepDistiller 25 and 50 without.

Scale: 25 / 50 are the official CIFAR run's (``run_distill_classification.py``, with KD). Both
terms are scale-free (distances over their mean, cosines of angles) and averaged over the N² / N³ entries:
they do not grow with the embedding width, the feature size or the batch, and stay below ~1 per
entry, so the defaults keep RKD at or below a few times the CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, check_weight, full_precision, loss_dtype
from kdkernels.functional.rkd_angle import rkd_angle_loss  # tiled: no N³ tensor


def pairwise_distance(embedding: torch.Tensor) -> torch.Tensor:
    squared = embedding.pow(2).sum(1)
    d2 = squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * embedding @ embedding.t()
    d = d2.clamp(min=1e-12).sqrt()
    return d * (1.0 - torch.eye(len(embedding), device=d.device, dtype=d.dtype))


def _over_mean_nonzero(d: torch.Tensor) -> torch.Tensor:
    # sum / count instead of d[d > 0].mean(): same value, no data-dependent shape, no host sync.
    return d / (d.sum() / (d > 0).sum().clamp(min=1))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``student``, ``teacher``: (N, D) embeddings."""
    t = _over_mean_nonzero(pairwise_distance(teacher.detach()))
    s = _over_mean_nonzero(pairwise_distance(student))
    return F.smooth_l1_loss(s, t)


class RKD(Method):
    """``{"distance": w_D·L_D, "angle": w_A·L_A}`` on one embedding layer (a part with weight 0
    is skipped; the angle part runs in the tiled ``rkd_angle_loss``: O(N·D) memory, no N³ tensor).

    Args (numbers keyword-only):
        student_layer, teacher_layer: the embeddings (flattened to (N, D); D may differ).
        distance_weight, angle_weight: w_D (25), w_A (50).
        normalize: L2-normalise both embeddings first (default True, the official CIFAR run).
        weight: factor on both parts (default 1).
    """

    name = "rkd"

    def __init__(
        self,
        student_layer: SpecLike,
        teacher_layer: SpecLike,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        normalize: bool = True,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__([student_layer], [teacher_layer], weight, name)
        self.distance_weight = check_weight(distance_weight, "distance_weight")
        self.angle_weight = check_weight(angle_weight, "angle_weight")
        if not (self.distance_weight or self.angle_weight):
            raise ValueError("rkd: distance_weight and angle_weight are both 0")
        self.normalize = bool(normalize)

    def forward(self, student, teacher, target):
        dtype = loss_dtype(student[0], teacher[0])
        with full_precision(student[0]):
            return self._losses(student[0].to(dtype).flatten(1), teacher[0].detach().to(dtype).flatten(1))

    def _losses(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{self.name}: {self.student_features[0]} vs {self.teacher_features[0]}: the student's embeddings are "
                f"{tuple(s.shape)} and the teacher's {tuple(t.shape)} (flattened); the batch sizes must match"
            )
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        losses = {}
        if self.distance_weight:
            losses["distance"] = self.distance_weight * rkd_distance_loss(s, t)
        if self.angle_weight:
            losses["angle"] = self.angle_weight * rkd_angle_loss(s, t.detach())
        return losses
