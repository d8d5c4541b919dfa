"""``weighted_soft_ce``: class-weighted soft cross-entropy with temperature, fused."""

from __future__ import annotations

import torch

from kdkernels import _validation
from kdkernels._layout import class_dim_views
from kdkernels.ops._reduction import reduction_code
from kdkernels.ops.weighted_soft_ce import WEIGHTED_SOFT_CE

WEIGHTED_SOFT_CE_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check_class_weight(class_weight, num_classes: int, device: torch.device, name: str = "class_weight") -> None:
    """A (C,) floating tensor of finite, non-negative weights on the logits' device.

    The values are read only where that is free and possible: a CPU tensor outside
    ``torch.compile``. A CUDA weight is not read on every call (that would be a host
    synchronisation); :class:`kdkernels.nn.WeightedSoftCELoss` checks its values once, when built.
    """
    if class_weight is None:
        return
    _validation.check_tensor(class_weight, name)
    if tuple(class_weight.shape) != (num_classes,):
        raise ValueError(f"{name}: expected shape ({num_classes},) (one weight per class), got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"{name}: expected device {device} to match the logits, got {class_weight.device}")
    if class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: the fused loss treats the class weights as constants; pass class_weight.detach()")
    if class_weight.device.type == "cpu" and not torch.compiler.is_compiling():
        check_class_weight_values(class_weight, name)


def check_class_weight_values(class_weight: torch.Tensor, name: str = "class_weight") -> None:
    """Reads the weights (a host synchronisation on a GPU): all finite and >= 0."""
    if class_weight.numel() and not bool(torch.isfinite(class_weight).all() and (class_weight >= 0).all()):
        raise ValueError(f"{name}: expected finite, non-negative weights, got {class_weight.tolist()[:16]}")


def weighted_soft_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    dim: int = -1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Class-weighted soft cross-entropy between teacher and student distributions, in one fused kernel.

    .. math::
        \ell = -\sum_c w_c\, p^T_{t,c} \log p^T_{s,c},\qquad p^T = \mathrm{softmax}(z / T)

    along ``dim``. Chen et al., "Learning Efficient Object Detection Models with Knowledge
    Distillation" (NeurIPS 2017) use it with ``T = 1`` and a background weight of 1.5; with no
    weights it is the pixel-wise term of structured KD (Liu et al., CVPR 2019: ``dim=1`` on
    (N, C, H, W) scores, ``reduction="sum"`` divided by H·W) and MobileBERT's attention transfer.
    Unlike :func:`kd_loss` there is no T² factor, and the teacher's entropy is part of the loss.

    Args:
        student_logits: logits of any shape with the classes along ``dim`` (fp32, fp16 or bf16;
            fp64 on the cpu and torch backends).
        teacher_logits: same shape and device; its dtype may differ. It receives a gradient when it
            requires grad (online / mutual learning); detach it for a frozen teacher.
        class_weight: optional (C,) finite, non-negative weights; None means all ones. A constant:
            it receives no gradient.
        temperature: T > 0, applied to both distributions.
        reduction: ``"mean"`` (over the counted positions), ``"sum"``, ``"batchmean"``
            (sum / size(0)) or ``"none"`` (one loss per position, the logits' shape without ``dim``).
        dim: the class dimension: ``-1`` for (…, C) logits, ``1`` for dense (N, C, H, W) logits
            (read in place, contiguous or channels_last).
        mask: optional bool tensor of the logits' shape without ``dim``; False positions (padding,
            ignored pixels) contribute 0, get zero gradients and are not counted by ``"mean"``.

    Returns:
        The loss in float32 (float64 for float64 logits): 0-d, or per position for ``"none"``.

    Teacher logits of −inf are exact: such classes contribute 0, and a position whose teacher
    logits are all −inf contributes 0.
    """
    _validation.check_tensor(student_logits, "student_logits")
    _validation.check_tensor(teacher_logits, "teacher_logits")
    _validation.check_same_shape_and_device(student_logits, "student_logits", teacher_logits, "teacher_logits")
    dim = _validation.check_dim(dim, student_logits.dim())
    _validation.check_dim_not_empty(student_logits, dim, "student_logits")
    num_classes = student_logits.shape[dim]
    temperature = _validation.check_temperature(temperature)
    reduction = _validation.check_reduction(reduction, WEIGHTED_SOFT_CE_REDUCTIONS)
    check_class_weight(class_weight, num_classes, student_logits.device)
    positions_shape = tuple(student_logits.shape[:dim]) + tuple(student_logits.shape[dim + 1 :])
    _validation.check_mask(mask, positions_shape, student_logits.device)

    views = class_dim_views(student_logits, teacher_logits, dim, mask)
    code, scale = reduction_code(reduction, student_logits.shape[0])
    loss = WEIGHTED_SOFT_CE(
        views.student, views.teacher, class_weight, views.mask, temperature, reduction=code, scale=scale
    )
    if reduction == "none":
        loss = loss.reshape(positions_shape)
    return loss


__all__ = ["weighted_soft_ce", "check_class_weight", "check_class_weight_values", "WEIGHTED_SOFT_CE_REDUCTIONS"]
