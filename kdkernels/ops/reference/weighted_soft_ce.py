"""Reference class-weighted soft cross-entropy: −Σ_c w_c · p_t,c · log p_s,c, p = softmax(z / T).

Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation" (NeurIPS
2017) weight the background class by 1.5 in the soft term; with w = 1 it is the pixel-wise term of
structured KD (Liu et al., CVPR 2019, ``dim=1`` on N,C,H,W scores) and MobileBERT's attention
transfer (Sun et al., ACL 2020). A cross-entropy, not a KL: there is no T² factor and the teacher's
entropy is included.

Edge cases (NaN, ±inf, masks) are decided once, for every loss and backend, in
``kdkernels/ops/reference/__init__.py``.
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.reference.kd_loss import counted_inputs
from kdkernels.ops.reference.reduction import reduce_losses


def weighted_soft_ce_positions(
    student: torch.Tensor,
    teacher: torch.Tensor,
    class_weight: torch.Tensor | None,
    temperature: float,
    dim: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position −Σ_c w_c p_t,c log p_s,c along ``dim``, in float32 (float64 if a logit tensor is);
    0 (with zero gradients) at positions outside ``mask``."""
    dtype = accumulation_dtype(student, teacher)
    s, t, has_distribution = counted_inputs(student, teacher, dim, mask)
    s = s / temperature
    t = t / temperature
    log_p_s = torch.log_softmax(s, dim)
    p_t = torch.softmax(t, dim)
    if class_weight is not None:
        # (C,) weights broadcast along ``dim`` of the logits.
        shape = [1] * student.dim()
        shape[dim % student.dim()] = -1
        p_t = p_t * class_weight.to(dtype).reshape(shape)
    # Select before multiplying so that p_t = 0 entries give neither NaN values nor NaN gradients
    # (a NaN p_t is selected: NaN value and gradients, as the composite without the select).
    support = p_t != 0
    pointwise = p_t * torch.where(support, log_p_s, 0.0)
    per_position = -pointwise.sum(dim)
    return torch.where(has_distribution.squeeze(dim), per_position, torch.zeros_like(per_position))


def weighted_soft_ce_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    dim: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    per_position = weighted_soft_ce_positions(student_logits, teacher_logits, class_weight, temperature, dim, mask)
    return reduce_losses(per_position, reduction, mask, student_logits.shape[0] if student_logits.dim() else 1)
