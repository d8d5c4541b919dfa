"""Reference Hinton KD loss: T² · Σ_c p_t,c (log p_t,c − log p_s,c), p = softmax(z / T).

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015). The T² factor keeps
the soft-target gradient's magnitude independent of T (the gradient of the KL scales as 1/T²).

Edge cases (NaN, ±inf, masks) are decided once, for every loss and backend, in
``kdkernels/ops/reference/__init__.py``.
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.reference.reduction import reduce_losses


def counted_inputs(student, teacher, dim: int, mask: torch.Tensor | None):
    """``(s, t, counted)``: the logits in the accumulation dtype, replaced by 0 at positions that
    do not count (masked out, or no teacher distribution: all teacher logits −inf), so that those
    positions get exactly zero gradients whatever they hold (NaN included); ``counted`` keeps
    ``dim`` (size 1). A NaN teacher row has a maximum of NaN, not −inf: it counts (and is NaN)."""
    dtype = accumulation_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.to(dtype)
    counted = t.amax(dim, keepdim=True) != float("-inf") if t.shape[dim] > 0 else t.new_zeros(()).bool()
    if mask is not None:
        counted = counted & mask.unsqueeze(dim)
    return torch.where(counted, s, 0.0), torch.where(counted, t, 0.0), counted


def kd_loss_positions(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position T²·KL(p_t ‖ p_s) along ``dim``, in float32 (float64 if an input is float64);
    0 (with zero gradients) at positions outside ``mask``."""
    s, t, has_distribution = counted_inputs(student, teacher, dim, mask)
    s = s / temperature
    t = t / temperature
    log_p_s = torch.log_softmax(s, dim)
    log_p_t = torch.log_softmax(t, dim)
    p_t = log_p_t.exp()
    # Select before multiplying so that p_t = 0 entries give neither NaN values nor NaN gradients
    # (a NaN p_t is selected: NaN value and gradients, as the composite without the select).
    support = p_t != 0
    pointwise = p_t * (torch.where(support, log_p_t, 0.0) - torch.where(support, log_p_s, 0.0))
    per_position = pointwise.sum(dim) * temperature**2
    return torch.where(has_distribution.squeeze(dim), per_position, torch.zeros_like(per_position))


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    dim: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    per_position = kd_loss_positions(student_logits, teacher_logits, temperature, dim, mask)
    return reduce_losses(per_position, reduction, mask, student_logits.shape[0])
