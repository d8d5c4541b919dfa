"""``margin_partial_l2``: the Margin-ReLU partial L2 of Overhaul of Feature Distillation, fused."""

from __future__ import annotations

import torch

from kdkernels import _validation
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import margin_partial_l2 as _ops
from kdkernels.ops._reduction import reduction_code

MARGIN_PARTIAL_L2_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check_margin(margin, student: torch.Tensor, channel_dim: int, name: str = "margin") -> torch.Tensor:
    """``margin`` as a (C,) tensor: it may be (C,) or, as the official buffers, the student's rank
    with C on ``channel_dim`` and 1 elsewhere (e.g. (1, C, 1, 1)).

    Finiteness is checked where it costs no host synchronisation: CPU tensors, outside
    ``torch.compile``. The margins of :func:`kdkernels.ofd_margin` are always finite, and
    :class:`kdkernels.nn.MarginPartialL2Loss` checks its buffer once, on any device.
    """
    _validation.check_tensor(margin, name)
    channels = student.shape[channel_dim]
    broadcast_shape = [1] * student.dim()
    broadcast_shape[channel_dim] = channels
    if tuple(margin.shape) not in ((channels,), tuple(broadcast_shape)):
        raise ValueError(
            f"{name}: expected one value per channel, shape ({channels},) or {tuple(broadcast_shape)} "
            f"(channel_dim={channel_dim} of the student has {channels} channels), got {tuple(margin.shape)}"
        )
    if margin.device != student.device:
        raise ValueError(f"{name}: expected device {student.device} to match student, got {margin.device}")
    if margin.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(margin).all()):
        raise ValueError(f"{name}: expected finite values, got {margin.reshape(-1).tolist()[:8]}...")
    return margin.reshape(channels)


def margin_partial_l2(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: torch.Tensor,
    reduction: str = "sum",
    channel_dim: int = 1,
) -> torch.Tensor:
    r"""Partial L2 distance of Heo et al., "A Comprehensive Overhaul of Feature Distillation"
    (ICCV 2019), with the teacher through the margin ReLU, in one fused pass.

    .. math::
        T = \max(F_t, m_c),\qquad
        d_p = \sum_i \begin{cases} 0 & S_i \le T_i \le 0 \\ (T_i - S_i)^2 & \text{otherwise} \end{cases}

    with the official code's mask ``(S > T) | (T > 0)``. The teacher is treated as a constant, as in
    the paper and its code (``.detach()``): a teacher that requires grad gets no gradient; the
    student gets ``2 (S - T)`` on counted elements.

    Args:
        student: the student's (connector-transformed) pre-ReLU feature, e.g. (N, C, H, W) — read in
            place, contiguous or channels_last — or (N, L, C) tokens with ``channel_dim=-1``;
            fp32, fp16 or bf16 (fp64 on the cpu and torch backends).
        teacher: the teacher's pre-ReLU feature, same shape and device; its dtype may differ.
        margin: per-channel margins, shape (C,) (or the official (1, C, 1, 1) buffer), e.g. from
            :func:`kdkernels.ofd_margin`; finite. It never gets a gradient.
        reduction: ``"sum"`` (the official loss: a plain sum over every element), ``"batchmean"``
            (sum / size(0)), ``"mean"`` (over every element) or ``"none"`` (elementwise, the
            student's shape).
        channel_dim: the channel dimension the margins index.

    Returns:
        The loss in float32 (float64 for float64 inputs): 0-d, or elementwise for ``"none"``.

    The official training divides the summed loss by ``B · 1000`` (CIFAR) or ``B · 10⁴``
    (ImageNet): use ``reduction="batchmean"`` and scale by ``1e-3`` / ``1e-4``.
    """
    _validation.check_tensor(student, "student")
    _validation.check_tensor(teacher, "teacher")
    _validation.check_same_shape_and_device(student, "student", teacher, "teacher")
    if student.dim() == 0:
        raise ValueError("student: expected a tensor with a channel dimension, got a 0-d tensor")
    channel_dim = _validation.check_dim(channel_dim, student.dim(), "channel_dim")
    _validation.check_dim_not_empty(student, channel_dim, "student", "channel")
    reduction = _validation.check_reduction(reduction, MARGIN_PARTIAL_L2_REDUCTIONS)
    margin = check_margin(margin, student, channel_dim)

    # Read both features in their memory order; copy only a layout the kernels cannot walk
    # (overlapping or gapped strides), and the teacher only if its layout differs from the student's.
    channel_stride = _ops.dense_channel_stride(student, channel_dim)
    if channel_stride is None:
        student = student.contiguous()
        channel_stride = _ops.dense_channel_stride(student, channel_dim)
    teacher = teacher.detach()
    if not _ops.same_layout(student, teacher):
        teacher = torch.empty_like(student, dtype=teacher.dtype).copy_(teacher)
    margin = margin.detach().to(accumulation_dtype(student, teacher)).contiguous()

    code, scale = reduction_code(reduction, student.shape[0])
    return _ops.MARGIN_PARTIAL_L2(student, teacher, margin, channel_stride, reduction=code, scale=scale)
