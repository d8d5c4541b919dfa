r"""Reference teacher-bounded regression loss of Chen et al., "Learning Efficient Object Detection
Models with Knowledge Distillation" (NeurIPS 2017).

Each row (the last dimension) is one box regression: student :math:`R_s`, teacher :math:`R_t`,
ground truth :math:`y`. With :math:`d_s = \|R_s - y\|_2^2` and :math:`d_t = \|R_t - y\|_2^2`,

.. math::
    L_b(R_s, R_t, y) = \begin{cases} d_s & \text{if } d_s + m > d_t \\ 0 & \text{otherwise} \end{cases}

so the student is only pushed towards the ground truth while it is not better than the teacher by a
margin ``m``. Only the student gets a gradient, ``2 (R_s - y)`` on active rows; the teacher and the
target are constants (the selection itself has no gradient).

A row is inactive only when ``d_s + m ≤ d_t`` holds: a NaN student or target makes it active and
NaN; a NaN teacher makes the row's loss and gradient NaN (``kdkernels/ops/reference/__init__.py``).

Rows outside ``mask`` (e.g. negative anchors) contribute 0. ``mean`` divides by the number of
counted rows (all rows, or ``mask.sum()``), and is 0 when no row is counted; ``batchmean`` divides
the sum by the size of the first leading dimension (1 for a single row).
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.reference.reduction import reduce_losses


def bounded_regression_rows(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per-row loss (the inputs' shape without the last dimension) in float32 (float64 if an input is)."""
    dtype = accumulation_dtype(student, teacher, target)
    y = target.detach().to(dtype)
    d_t = ((teacher.detach().to(dtype) - y) ** 2).sum(-1)
    # A NaN teacher poisons the row (value and gradient); + 0 elsewhere changes nothing.
    poison = torch.where(torch.isnan(d_t), float("nan"), 0.0).unsqueeze(-1)
    d_s = ((student.to(dtype) - y + poison) ** 2).sum(-1)
    return torch.where(d_s + margin <= d_t, torch.zeros_like(d_s), d_s)


def bounded_regression_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    if mask is not None:  # masked-out rows: zero gradients whatever they hold
        keep = mask.unsqueeze(-1)
        student = torch.where(keep, student, 0)
        teacher = torch.where(keep, teacher.detach(), 0)
        target = torch.where(keep, target.detach(), 0)
    loss = bounded_regression_rows(student, teacher, target, margin)
    return reduce_losses(loss, reduction, mask, student.shape[0] if student.dim() > 1 else 1)
