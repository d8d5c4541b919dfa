"""Reduction codes shared by the fused ops and their kernels.

The kernels compute per-position losses and gradients already multiplied by ``grad_scale``: a
one-element tensor in the accumulation dtype (fp32, fp64 for fp64 inputs: a float64 gradient is
scaled in float64), on the inputs' device, so that a masked mean needs no host synchronisation.
The op then reduces the per-position losses with ``torch.sum``, which is deterministic.
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


def counted_positions(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``max(mask.sum(), 1)`` as a one-element ``dtype`` tensor. Counted in int64 (exact at any
    size; a float32 sum stops growing at 2²⁴), converted once."""
    return mask.sum(dtype=torch.int64).clamp_min(1).to(dtype).reshape(1)


def grad_scale_and_divisor(
    reduction: int,
    scale: float,
    positions: int,
    mask: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(grad_scale, divisor)``: the reduced loss is ``scale * sum(loss) / divisor``.

    ``dtype`` is the accumulation dtype of the op (:func:`kdkernels._dtypes.accumulation_dtype`);
    ``grad_scale`` is a one-element tensor of it. ``mean`` divides by the counted positions (all,
    or ``mask.sum()``); an empty count gives a loss of 0 rather than 0/0.
    """
    if reduction == NONE:
        return torch.ones(1, dtype=dtype, device=device), 1.0
    if reduction == SUM:
        return torch.full((1,), scale, dtype=dtype, device=device), 1.0
    if mask is None:
        divisor = float(max(positions, 1))
        return torch.full((1,), scale / divisor, dtype=dtype, device=device), divisor
    divisor = counted_positions(mask, dtype)
    return scale / divisor, divisor


def reduce_positions(loss: torch.Tensor, reduction: int, scale: float, divisor) -> torch.Tensor:
    if reduction == NONE:
        return loss
    total = loss.sum() * scale
    if isinstance(divisor, torch.Tensor):  # a counted mask: keep the loss's dtype (fp64 stays fp64)
        divisor = divisor.to(total.dtype)
    return (total / divisor).reshape(())


def reduce_differentiable(loss: torch.Tensor, reduction: int, scale: float, positions: int, mask) -> torch.Tensor:
    """:func:`reduce_positions` written with differentiable operations only (the ops' twins)."""
    if reduction == NONE:
        return loss
    total = loss.sum() * scale
    if reduction == SUM:
        return total
    if mask is None:
        return total / max(positions, 1)
    return total / counted_positions(mask, total.dtype).reshape(())
