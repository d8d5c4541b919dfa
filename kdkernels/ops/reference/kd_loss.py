"""Reference Hinton KD loss: T² · Σ_c p_t,c (log p_t,c − log p_s,c), p = softmax(z / T).

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015). The T² factor keeps
the soft-target gradient's magnitude independent of T (the gradient of the KL scales as 1/T²).

Edge cases, decided once here and followed by every backend:
* a class the teacher gives probability 0 (logit −inf) contributes 0, even where the student's
  logit is −inf too (0·log 0 = 0);
* a position whose teacher logits are all −inf has no distribution: it contributes 0 and gets
  zero gradients (as a masked-out position does);
* ``mean`` over zero counted positions, and any reduction of an empty batch, is 0.
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype


def kd_loss_positions(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """Per-position T²·KL(p_t ‖ p_s) along ``dim``, in float32 (float64 if an input is float64)."""
    dtype = accumulation_dtype(student, teacher)
    s = student.to(dtype) / temperature
    t = teacher.to(dtype) / temperature
    has_distribution = t.amax(dim, keepdim=True) > float("-inf")
    t = torch.where(has_distribution, t, torch.zeros_like(t))
    log_p_s = torch.log_softmax(s, dim)
    log_p_t = torch.log_softmax(t, dim)
    p_t = log_p_t.exp()
    # Select before multiplying so that p_t = 0 entries give neither NaN values nor NaN gradients.
    support = p_t > 0
    pointwise = p_t * (torch.where(support, log_p_t, 0.0) - torch.where(support, log_p_s, 0.0))
    per_position = pointwise.sum(dim) * temperature**2
    return torch.where(has_distribution.squeeze(dim), per_position, torch.zeros_like(per_position))


def reduce_losses(per_position: torch.Tensor, reduction: str, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(batch_size, 1)
    counted = per_position.numel() if mask is None else mask.sum()
    return total / (counted.clamp_min(1) if mask is not None else max(counted, 1))


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    dim: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    per_position = kd_loss_positions(student_logits, teacher_logits, temperature, dim)
    return reduce_losses(per_position, reduction, mask, student_logits.shape[0])
