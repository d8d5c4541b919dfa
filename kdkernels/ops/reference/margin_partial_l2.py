r"""Reference Margin-ReLU partial L2 of "A Comprehensive Overhaul of Feature Distillation".

Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019 (code: clovaai/overhaul-distillation, ``distiller.py``).
With the teacher passed through the margin ReLU, :math:`T = \max(F_t, m_c)` per channel ``c``,
and the student's (connector) feature :math:`S`:

.. math::
    d_p(T, S) = \sum_i \begin{cases} 0 & S_i \le T_i \le 0 \\ (T_i - S_i)^2 & \text{otherwise} \end{cases}

implemented, as in the official code, with the mask ``(S > T) | (T > 0)``, written as its
complement ``not (S ≤ T ≤ 0)`` so that a NaN element counts (and is NaN, as the official
``(S - T)² · mask.float()`` is), see ``kdkernels/ops/reference/__init__.py``. The official loss is the
plain sum over every element (batch, channel, spatial).

The teacher is detached (the official code ``.detach()``-es it): only the student gets a gradient,
``2 (S - T)`` on counted elements and 0 elsewhere.
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.reference.reduction import reduce_losses


def margin_partial_l2_elements(
    student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Elementwise partial L2, in float32 (float64 if an input is float64), the inputs' shape."""
    dtype = accumulation_dtype(student, teacher)
    shape = [1] * student.dim()
    shape[channel_dim] = -1
    s = student.to(dtype)
    t = torch.maximum(teacher.detach().to(dtype), margin.detach().to(dtype).reshape(shape))
    left_out = (s <= t) & (t <= 0)
    return torch.where(left_out, torch.zeros_like(s), (t - s) ** 2)


def margin_partial_l2_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: torch.Tensor,
    reduction: str = "sum",
    channel_dim: int = 1,
) -> torch.Tensor:
    loss = margin_partial_l2_elements(student, teacher, margin, channel_dim % student.dim())
    return reduce_losses(loss, reduction, None, student.shape[0])  # mean: over every element
