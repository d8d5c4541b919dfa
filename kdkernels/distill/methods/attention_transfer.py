"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    Q(A) = vec( (1/C) Σ_c A_c^p ),   Q̂ = Q / ‖Q‖₂ per sample,
    L_AT = Σ_j mean_{b,k} (Q̂ˢ_j − Q̂ᵗ_j)²

as szagoruyko/attention-transfer ``utils.at``/``at_loss``: p = 2, the channel mean, the squared
difference averaged over batch and positions (the paper's β/2·‖·‖_p with β divided by the map
size and batch: the code squares and drops the ½). β = 10³ (README) is the default weight.

Scale: β = 10³ was tuned on CIFAR-10 (WRN, 32×32 images, batch 128, three layer pairs with maps
of 32×32, 16×16 and 8×8). Each Q̂ is a unit vector over H·W positions and the loss averages
over positions, so a pair's loss is ‖Q̂ˢ − Q̂ᵗ‖²/(H·W): it grows as the maps shrink (16×16
maps give 4× the loss of 32×32 maps at the same mismatch) and with the number of pairs, not
with the batch or the channels. On small images the default can dwarf the CE (on the 16×16
digits of ``bench/bench_methods.py``, maps 16×16 to 4×4, it starts at ~18× the CE and costs the
student 10 points): calibrate it (``calibrate_weights``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, paired, upcast


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q̂: (B, C, H, W) → (B, H·W): ``A.pow(p).mean(1)`` (as the code), flattened and
    L2-normalised per sample."""
    return F.normalize(upcast(feature).pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return (attention_map(student_feature, p) - attention_map(teacher_feature.detach(), p)).pow(2).mean()


class AttentionTransfer(Method):
    """Sum over layer pairs of the AT loss. Channel counts may differ; spatial sizes must match
    (the official code), unless ``pool=True``: then the larger map is adaptive-average-pooled to
    the smaller one (RepDistiller).

    Args (numbers keyword-only):
        student_layers, teacher_layers: one path or equal-length lists (WRN groups ``g0,g1,g2``).
        p: the power (default 2).
        weight: β (default 10³).
    """

    name = "attention_transfer"

    def __init__(
        self,
        student_layers: Sequence[SpecLike] | SpecLike,
        teacher_layers: Sequence[SpecLike] | SpecLike,
        *,
        p: float = 2.0,
        pool: bool = False,
        weight: float = 1e3,
        name: str | None = None,
    ) -> None:
        s, t = paired("attention_transfer", student_layers, teacher_layers)
        super().__init__(s, t, weight, name)
        self.p, self.pool = float(p), bool(pool)

    def forward(self, student, teacher, target):
        loss = 0.0
        for s, t, s_spec, t_spec in zip(student, teacher, self.student_features, self.teacher_features):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"{self.name}: {s_spec} vs {t_spec}: expected (B, C, H, W) feature maps, got shapes {tuple(s.shape)} and {tuple(t.shape)}"
                )
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"{self.name}: {s_spec} vs {t_spec}: batch sizes differ, shapes {tuple(s.shape)} and {tuple(t.shape)}")
            if s.shape[-2:] != t.shape[-2:]:
                if not self.pool:
                    raise ValueError(
                        f"{self.name}: {s_spec} vs {t_spec}: spatial sizes {tuple(s.shape[-2:])} and "
                        f"{tuple(t.shape[-2:])} differ; pick layers of equal size or pass pool=True"
                    )
                size = min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1])
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            loss = loss + attention_transfer_loss(s, t, self.p)
        return loss
