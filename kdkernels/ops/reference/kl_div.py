"""Reference KL divergence with ``torch.nn.functional.kl_div``'s semantics, in plain PyTorch.

Pointwise ``ℓ = y (log y − x)`` for probabilities y (0 where y = 0), or ``e^y (y − x)`` for
log-probabilities (``log_target=True``); reductions none / sum / mean (÷ numel) / batchmean
(÷ size(0)). Written out rather than calling ``torch.kl_div`` so the tests compare the fused
kernels with an independent formula. Deviations from torch, the same on every backend:

* the gradient w.r.t. a target of exactly 0 is 0 (torch: −inf or NaN, from d/dy of y·log y), or
  NaN where the input there is not finite (the loss is NaN there too, as in torch);
* the ``mean`` of an empty input is 0 (torch: NaN, 0/0).

Negative or NaN targets give a NaN loss and a NaN target gradient, as torch (input gradient −y).
"""

from __future__ import annotations

import torch

from kdkernels.ops.reference.reduction import reduce_losses


def kl_div_pointwise_reference(input: torch.Tensor, target: torch.Tensor, log_target: bool) -> torch.Tensor:
    if log_target:
        return target.exp() * (target - input)
    zero = target == 0
    # log of a where()-guarded target: no NaN gradient flows back from the y = 0 entries. A
    # negative or NaN target keeps its own log: NaN value and NaN target gradient, as torch; the
    # input gradient stays −y, as torch.
    safe_target = torch.where(zero, torch.ones_like(target), target)
    pointwise = target * safe_target.log() - target * input
    # At y = 0 the value is 0·(−x) (NaN for x = −inf, as torch) and, by our convention, the
    # gradient w.r.t. y is 0 (the true derivative, log y + 1 − x, is −∞ there).
    at_zero = -(target.detach() * input)
    return torch.where(zero, at_zero, pointwise)

def kl_div_reference(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False) -> torch.Tensor:
    pointwise = kl_div_pointwise_reference(input, target, log_target)
    return reduce_losses(pointwise, reduction, None, input.shape[0] if input.dim() > 0 else 1)
