"""Reduction codes shared by the fused ops and their kernels.

The kernels compute per-position losses and gradients already multiplied by ``grad_scale`` (a
one-element fp32 tensor, so that a masked mean needs no host synchronisation). The op then reduces
the per-position losses with ``torch.sum``, which is deterministic.
"""

from __future__ import annotations

import torch

NONE, SUM, MEAN = 0, 1, 2
CODES = {"none": NONE, "sum": SUM, "mean": MEAN}


def reduction_code(reduction: str, batch_size: int) -> tuple[int, float]:
    """``(code, scale)`` for a public reduction name; ``batchmean`` is a sum scaled by
    1 / ``batch_size`` (size(0) of the input, as ``nn.KLDivLoss``; an empty batch sums to 0)."""
    if reduction == "batchmean":
        return SUM, 1.0 / max(batch_size, 1)
    return CODES[reduction], 1.0


def grad_scale_and_divisor(
    reduction: int, scale: float, positions: int, mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(grad_scale, divisor)``: the reduced loss is ``scale * sum(loss) / divisor``.

    ``mean`` divides by the counted positions (all, or ``mask.sum()``); an empty count gives a
    loss of 0 rather than 0/0.
    """
    if reduction == NONE:
        return torch.ones(1, dtype=torch.float32, device=device), 1.0
    if reduction == SUM:
        return torch.full((1,), scale, dtype=torch.float32, device=device), 1.0
    if mask is None:
        divisor = float(max(positions, 1))
        return torch.full((1,), scale / divisor, dtype=torch.float32, device=device), divisor
    divisor = mask.sum(dtype=torch.float32).clamp_min(1.0).reshape(1)
    return scale / divisor, divisor


def reduce_positions(loss: torch.Tensor, reduction: int, scale: float, divisor) -> torch.Tensor:
    if reduction == NONE:
        return loss
    total = loss.sum() * scale
    if isinstance(divisor, torch.Tensor):  # a counted mask: keep the loss's dtype (fp64 stays fp64)
        divisor = divisor.to(total.dtype)
    return (total / divisor).reshape(())
