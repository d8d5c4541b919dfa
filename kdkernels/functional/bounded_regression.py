"""``bounded_regression``: the teacher-bounded box-regression loss of Chen et al. (2017), fused."""

from __future__ import annotations

import math

import torch

from kdkernels import _validation
from kdkernels.ops._reduction import reduction_code
from kdkernels.ops.bounded_regression import BOUNDED_REGRESSION

BOUNDED_REGRESSION_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check_row_mask(mask, rows_shape: tuple[int, ...], device: torch.device) -> None:
    if mask is None:
        return
    _validation.check_tensor(mask, "mask", floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = the row counts, e.g. positive anchors), got {mask.dtype}")
    if tuple(mask.shape) != rows_shape:
        raise ValueError(
            f"mask: expected shape {rows_shape} (the boxes' shape without the coordinate dimension), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask: expected device {device} to match student, got {mask.device}")


def bounded_regression(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Teacher-bounded regression loss of Chen et al., "Learning Efficient Object Detection Models
    with Knowledge Distillation" (NeurIPS 2017), in one fused pass.

    .. math::
        L_b = \begin{cases} \|R_s - y\|_2^2 & \text{if } \|R_s - y\|_2^2 + m > \|R_t - y\|_2^2 \\
        0 & \text{otherwise} \end{cases}

    per row (box): the student is pulled to the ground truth only while it is not better than the
    teacher by the margin ``m``. The paper adds it to the smooth-L1 loss with weight ν (0.5).

    Args:
        student: the student's box regressions, (..., K): any leading shape, K coordinates (4 for
            a box, 4·classes for class-specific regression); fp32, fp16 or bf16 (fp64 on the cpu
            and torch backends). The only input that gets a gradient, ``2 (R_s - y)`` on active rows.
        teacher: the teacher's regressions, same shape and device; a constant (no gradient).
        target: the regression targets y, same shape and device; a constant (no gradient).
        margin: m, a finite real number (the paper gives no value; reimplementations use 0).
        reduction: ``"mean"`` (over the counted rows; 0 if none), ``"sum"``, ``"batchmean"``
            (sum / size(0), 1 for a single row) or ``"none"`` (one value per row, the leading shape).
        mask: optional bool tensor of the leading shape; only True rows (e.g. positive anchors)
            count, the others give 0 and get zero gradients.

    Returns:
        The loss in float32 (float64 if an input is float64): 0-d, or per row for ``"none"``.

    Inputs of different dtypes are computed in their promoted dtype.
    """
    _validation.check_tensor(student, "student")
    _validation.check_tensor(teacher, "teacher")
    _validation.check_tensor(target, "target")
    _validation.check_same_shape_and_device(student, "student", teacher, "teacher")
    _validation.check_same_shape_and_device(student, "student", target, "target")
    if student.dim() == 0:
        raise ValueError("student: expected boxes with a coordinate dimension (..., K), got a 0-d tensor")
    _validation.check_dim_not_empty(student, student.dim() - 1, "student", "coordinate")
    margin = _validation.check_finite_real(margin, "margin")
    reduction = _validation.check_reduction(reduction, BOUNDED_REGRESSION_REDUCTIONS)
    rows_shape = tuple(student.shape[:-1])
    _check_row_mask(mask, rows_shape, student.device)

    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), target.dtype)
    rows, k = math.prod(rows_shape), student.shape[-1]
    student2 = student.to(dtype).reshape(rows, k)
    teacher2 = teacher.detach().to(dtype).reshape(rows, k)
    target2 = target.detach().to(dtype).reshape(rows, k)
    mask2 = None if mask is None else mask.reshape(rows).contiguous()
    code, scale = reduction_code(reduction, rows_shape[0] if rows_shape else 1)
    loss = BOUNDED_REGRESSION(student2, teacher2, target2, mask2, margin, reduction=code, scale=scale)
    if reduction == "none":
        loss = loss.reshape(rows_shape)
    return loss
