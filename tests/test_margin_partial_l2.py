"""margin_partial_l2 / MarginPartialL2Loss (Overhaul of Feature Distillation): the CPU kernel's
layout paths, known values, the margin's forms and the module.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch

from kdkernels.functional.margin_partial_l2 import margin_partial_l2
from kdkernels.nn.margin_partial_l2 import MarginPartialL2Loss
from kdkernels.ofd_margin import ofd_margin
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]

# name -> (shape, channel_dim, memory format); together they take every path of the CPU kernel:
# runs of one channel (channel stride >= 1024), a periodic margin table (short channel stride or
# channels_last) and the margin read in place (channel stride 1, >= 1024 channels).
LAYOUTS = {
    "nchw": ((2, 6, 5, 3), 1, None),
    "nchw_long_runs": ((2, 3, 32, 40), 1, None),
    "channels_last": ((2, 6, 5, 3), 1, torch.channels_last),
    "tokens": ((2, 5, 7), -1, None),
    "tokens_wide": ((2, 3, 1100), -1, None),
    "multi_chunk": ((3, 5, 37, 41), 1, None),
    "multi_chunk_channels_last": ((3, 5, 37, 41), 1, torch.channels_last),
}


def _features(layout, device, dtype=torch.float32, teacher_dtype=None):
    shape, channel_dim, memory_format = LAYOUTS[layout]
    student = torch.randn(shape, dtype=torch.float64)
    teacher = torch.randn(shape, dtype=torch.float64)
    # Negative margins around the teacher's range: both T = F_t and T = m occur, and so do the
    # uncounted elements (S <= T <= 0).
    margin = -torch.rand(shape[channel_dim], dtype=torch.float64) * 1.5
    student = student.to(device, dtype)
    teacher = teacher.to(device, teacher_dtype or dtype)
    if memory_format is not None:
        student = student.contiguous(memory_format=memory_format)
        teacher = teacher.contiguous(memory_format=memory_format)
    return student, teacher, margin.to(device, torch.float32), channel_dim


def _reference(student, teacher, margin, reduction, channel_dim):
    s64 = student.detach().cpu().double().requires_grad_()
    expected = margin_partial_l2_reference(s64, teacher.cpu().double(), margin.cpu().double(), reduction, channel_dim)
    return s64, expected


def _assert_matches_reference(student, teacher, margin, reduction, channel_dim):
    """The fused loss and its student gradient (of ``loss.backward()``) against the float64
    reference; ``student`` is a leaf that requires grad."""
    loss = margin_partial_l2(student, teacher, margin, reduction, channel_dim)
    loss.backward()
    s64, expected = _reference(student, teacher, margin, reduction, channel_dim)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.float32, "student grad")


def _backward(loss, expected):
    """Backward of both with one random upstream gradient (exercises grad_output != 1)."""
    weights = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    (expected * weights).sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["nchw_long_runs", "tokens_wide", "multi_chunk", "multi_chunk_channels_last"])
def test_matches_reference_values_and_gradients(device_backend, layout, reduction):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features(layout, device)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, reduction, channel_dim)
    s64, expected = _reference(student, teacher, margin, reduction, channel_dim)
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    _backward(loss, expected)
    assert student.grad.stride() == student.stride()
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.float32, "student grad")


def test_test_data_exercise_both_branches():
    student, teacher, margin, channel_dim = _features("multi_chunk", "cpu")
    t = torch.maximum(teacher, margin.reshape(1, -1, 1, 1))
    counted = (student > t) | (t > 0)
    assert 0.1 < counted.double().mean() < 0.9
    assert (teacher < margin.reshape(1, -1, 1, 1)).any() and (teacher > 0).any()


def test_teacher_layout_differs_from_student(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    teacher = teacher.contiguous(memory_format=torch.channels_last)
    _assert_matches_reference(student.requires_grad_(), teacher, margin, "sum", channel_dim)


def test_non_dense_student_is_read_correctly(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw_long_runs", device)
    student = student[:, :, ::2]  # a view with gaps: copied once
    teacher = teacher[:, :, ::2]
    _assert_matches_reference(student.detach().requires_grad_(), teacher, margin, "mean", channel_dim)


def test_none_keeps_the_channels_last_layout(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("channels_last", device)
    loss = margin_partial_l2(student, teacher, margin, "none", channel_dim)
    assert loss.shape == student.shape
    assert loss.is_contiguous(memory_format=torch.channels_last)


def test_official_margin_buffer_shape_is_accepted(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    a = margin_partial_l2(student, teacher, margin.reshape(1, -1, 1, 1))
    b = margin_partial_l2(student, teacher, margin)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_input(device_backend):
    device, _ = device_backend
    student = torch.zeros(0, 4, 3, 3, device=device, requires_grad=True)
    teacher = torch.zeros(0, 4, 3, 3, device=device)
    margin = torch.zeros(4, device=device)
    for reduction in ("sum", "mean", "batchmean"):
        loss = margin_partial_l2(student, teacher, margin, reduction)
        assert loss.item() == 0.0
    assert margin_partial_l2(student, teacher, margin, "none").shape == student.shape
    margin_partial_l2(student, teacher, margin).backward()
    assert student.grad.shape == student.shape


def test_known_values(device_backend):
    device, _ = device_backend
    # channel 0 margin -1, channel 1 margin -0.5; one position each.
    teacher = torch.tensor([[[[-2.0]], [[0.5]]], [[[-0.2]], [[-3.0]]]], device=device)
    student = torch.tensor([[[[-0.5]], [[1.0]]], [[[-0.5]], [[-0.4]]]], device=device)
    margin = torch.tensor([-1.0, -0.5], device=device)
    # T = [-1, 0.5, -0.2, -0.5]; counted: S > T, T > 0, S <= T <= 0, S > T
    expected = torch.tensor([[[[0.25]], [[0.25]]], [[[0.0]], [[0.01]]]], device=device)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "none")
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    expected_grad = torch.tensor([[[[1.0]], [[1.0]]], [[[0.0]], [[0.2]]]], device=device)
    torch.testing.assert_close(student.grad, expected_grad)


def test_module_keeps_margin_as_buffer():
    student, teacher, margin, _ = _features("nchw", "cpu")
    criterion = MarginPartialL2Loss(margin, reduction="batchmean")
    assert "margin" in criterion.state_dict() and criterion.margin.dtype == torch.float32
    torch.testing.assert_close(criterion(student, teacher), margin_partial_l2(student, teacher, margin, "batchmean"))
    other = margin - 0.3
    torch.testing.assert_close(criterion(student, teacher, other), margin_partial_l2(student, teacher, other, "batchmean"))
    assert "reduction='batchmean'" in repr(criterion)


def test_module_from_bn_and_without_margin():
    bn = torch.nn.BatchNorm2d(6)
    torch.nn.init.normal_(bn.weight)
    torch.nn.init.normal_(bn.bias)
    student, teacher, _, _ = _features("nchw", "cpu")
    criterion = MarginPartialL2Loss.from_bn(bn)
    torch.testing.assert_close(criterion(student, teacher), margin_partial_l2(student, teacher, ofd_margin(bn)))
    with pytest.raises(ValueError, match="margin"):
        MarginPartialL2Loss()(student, teacher)


def test_module_tokens_channel_dim():
    student, teacher, margin, _ = _features("tokens", "cpu")
    criterion = MarginPartialL2Loss(margin, reduction="mean", channel_dim=-1)
    torch.testing.assert_close(criterion(student, teacher), margin_partial_l2(student, teacher, margin, "mean", -1))


def test_module_rejects_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        MarginPartialL2Loss(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="margin"):
        MarginPartialL2Loss(torch.zeros(2, 3))
    assert MarginPartialL2Loss(torch.zeros(1, 3, 1, 1)).margin.shape == (3,)  # the official buffer
    with pytest.raises(ValueError, match="reduction"):
        MarginPartialL2Loss(torch.zeros(3), reduction="avg")
