"""The reductions of the reference losses, written once.

``mean`` divides by the counted positions (all, or ``mask.sum()``, counted in int64) and
``batchmean`` by the batch size; an empty count divides by 1 (a loss of 0, not 0/0), as the fused
ops do (:mod:`kdkernels.ops._reduction`).
"""

from __future__ import annotations

import torch


def reduce_losses(
    per_position: torch.Tensor, reduction: str, mask: torch.Tensor | None = None, batch_size: int = 1
) -> torch.Tensor:
    """Reduce per-position losses; positions outside ``mask`` are 0 whatever they held."""
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(batch_size, 1)
    if mask is None:
        return total / max(per_position.numel(), 1)
    return total / mask.sum(dtype=torch.int64).clamp_min(1).to(total.dtype)
