"""``kdkernels::margin_partial_l2``: the margin-ReLU partial L2 of Heo et al. (OFD, ICCV 2019),
declared once.

``student`` and ``teacher`` are read as flat arrays in memory order: both non-overlapping and
dense with the same strides (NCHW, channels_last, (N, L, C) tokens, ...), so no layout is copied.
The channel of flat element ``i`` is ``(i // channel_stride) % C`` with ``C = margin.numel()`` and
``channel_stride`` the channel dimension's stride (:func:`dense_channel_stride`). The teacher
never gets a gradient: the paper and the official code detach it.
"""

from torch import Tensor

from kdkernels.ops.fused_loss import ELEMENTS, FusedLoss
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_elements as _reference_elements


def margin_partial_l2_elements(
    student: Tensor,
    teacher: Tensor,
    margin: Tensor,
    channel_stride: int,
    grad_scale: Tensor,
    reduce: bool,
    student_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The elementwise loss ``(max(t, m_c) − s)²`` (0 where ``s ≤ max(t, m_c) ≤ 0``) with the
    student's shape and strides, or partial sums over fixed blocks (``reduce``), in fp32 (fp64 for
    fp64 inputs); ``margin`` is (C,) in that dtype. The student's gradient of
    ``grad_scale * sum(loss)`` has its shape, strides and dtype."""
    raise NotImplementedError  # a signature: csrc/cpu, csrc/cuda, ops/triton/margin_partial_l2.py


def dense_channel_stride(x: Tensor, channel_dim: int) -> int | None:
    """The stride of ``channel_dim`` if ``x`` is non-overlapping and dense (any dimension order),
    so that flat element ``i`` of its memory lies in channel ``(i // stride) % C``; else None."""
    expected = 1
    for d in sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=x.stride):
        if x.stride(d) != expected:
            return None
        expected *= x.shape[d]
    return x.stride(channel_dim) if x.shape[channel_dim] > 1 else 1


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same strides on every dimension longer than 1 (the others are never stepped along)."""
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] > 1)


def _channel_dim(x: Tensor, channel_stride: int, channels: int) -> int | None:
    """The dimension ``margin`` indexes: of length ``channels`` with stride ``channel_stride``."""
    for d in range(x.dim()):
        if x.shape[d] == channels and x.stride(d) == channel_stride:
            return d
    return None


def _elements(student, teacher, margin, channel_stride):
    channels = margin.numel()
    channel_dim = _channel_dim(student, channel_stride, channels) if channels > 1 else None
    if channel_dim is None:  # one channel: the margin is a scalar
        loss = _reference_elements(student.unsqueeze(0), teacher.unsqueeze(0), margin.reshape(1), 0)
        return loss.squeeze(0)
    return _reference_elements(student, teacher, margin, channel_dim)


MARGIN_PARTIAL_L2 = FusedLoss(
    name="margin_partial_l2",
    kernel=margin_partial_l2_elements,
    twin=_elements,
    positions=ELEMENTS,
    dtype_inputs=("student", "teacher"),  # the teacher gets no gradient but sets the dtype
)
