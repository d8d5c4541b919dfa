r"""Per-channel margins of Overhaul of Feature Distillation (Heo et al., ICCV 2019), from the
teacher's BatchNorm.

The BatchNorm just before the teacher's ReLU makes each channel's pre-activation roughly
:math:`\mathcal N(\mu_c, \sigma_c^2)` with :math:`\mu_c = \beta_c` (BN bias) and
:math:`\sigma_c = |\gamma_c|` (BN weight); running statistics are not used. The margin is the
expected value of the negative responses:

.. math::
    m_c = \mathbb E[x \mid x < 0] = \mu_c - \sigma_c \frac{\phi(\mu_c / \sigma_c)}{\Phi(-\mu_c / \sigma_c)}

and, as in the official code (``get_margin_from_BN``), :math:`m_c = -3\sigma_c` where
:math:`\Phi(-\mu_c/\sigma_c) \le 10^{-3}` (almost no negative mass: the ratio is ill-conditioned).

The ratio is evaluated as ``exp(log φ(u) − log Φ(−u))`` with ``torch.special.log_ndtr``, in
float64, so no tiny number is ever divided by another.

``σ = 0`` (a channel whose BN weight is 0 is the constant μ): the limit ``σ → 0`` of the rule above
is ``min(μ, 0)``. For μ > 0, Φ(−μ/σ) → 0 and the official branch gives −3σ → 0; for μ < 0,
Φ(−μ/σ) → 1 and φ(μ/σ) → 0, so m → μ; for μ = 0, u = 0 and m = −σ·φ(0)/Φ(0) → 0.

The result is float32, clamped to float32's finite range (only float64 parameters beyond ±3.4e38
are affected), so it is finite for every finite input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Φ(−μ/σ) at or below this: margin −3σ (official code).
TAIL_THRESHOLD = 1e-3
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def ofd_margin_from_affine(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Margins ``m_c`` from a BatchNorm's affine parameters (``weight`` = γ, ``bias`` = β).

    Args:
        weight: (C,) BN weight γ; σ = |γ|.
        bias: (C,) BN bias β = μ.

    Returns:
        (C,) float32 margins on the parameters' device, finite for every finite input (≤ 0).
    """
    for value, name in ((weight, "weight"), (bias, "bias")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name}: expected a 1-d (C,) tensor, got shape {tuple(value.shape)}")
    if weight.shape != bias.shape:
        raise ValueError(f"bias: expected shape {tuple(weight.shape)} to match weight, got {tuple(bias.shape)}")
    if weight.device != bias.device:
        raise ValueError(f"bias: expected device {weight.device} to match weight, got {bias.device}")
    # Construction-time only, so reading the values (a host sync on a GPU) is fine here.
    for value, name in ((weight, "weight"), (bias, "bias")):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: expected finite values")

    dtype = torch.float64 if weight.device.type != "mps" else torch.float32
    mu = bias.detach().to(dtype)
    sigma = weight.detach().to(dtype).abs()
    positive = sigma > 0
    safe_sigma = torch.where(positive, sigma, torch.ones_like(sigma))
    u = mu / safe_sigma  # may overflow to ±inf for tiny σ: both limits are handled below
    log_tail = torch.special.log_ndtr(-u)  # log Φ(−u), accurate where Φ(−u) is tiny
    # φ(u) / Φ(−u); u ≤ 3.09 on the branch that uses it, so the exponent never overflows.
    ratio = torch.exp(-0.5 * u * u - _LOG_SQRT_2PI - log_tail)
    conditional_mean = mu - safe_sigma * ratio
    margin = torch.where(log_tail > math.log(TAIL_THRESHOLD), conditional_mean, -3.0 * sigma)
    margin = torch.where(positive, margin, mu.clamp_max(0.0))  # σ = 0: the limit min(μ, 0)
    # fp64 parameters beyond fp32's range would round to -inf: keep the margin finite.
    return margin.clamp_min(torch.finfo(torch.float32).min).to(torch.float32)


def ofd_margin(bn: nn.Module) -> torch.Tensor:
    """Margins ``m_c`` of Overhaul of Feature Distillation from the teacher's BatchNorm ``bn`` (the
    one directly before the ReLU whose input is distilled). See :func:`ofd_margin_from_affine`.

    Args:
        bn: a ``BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) with affine parameters.

    Returns:
        (C,) float32 margins on ``bn``'s device; pass them to
        :func:`kdkernels.functional.margin_partial_l2` or :class:`kdkernels.nn.MarginPartialL2Loss`.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"bn: expected a BatchNorm module (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm), got {type(bn).__name__}")
    if bn.weight is None or bn.bias is None:
        raise ValueError(f"bn: expected a BatchNorm with affine parameters (affine=True), got {bn}")
    if isinstance(bn.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"bn: the lazy BatchNorm {bn} is not initialised yet (run one forward first)")
    return ofd_margin_from_affine(bn.weight, bn.bias)
