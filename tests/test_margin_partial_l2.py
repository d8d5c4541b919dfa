"""margin_partial_l2 / MarginPartialL2Loss (Overhaul of Feature Distillation) against the float64
reference, on every fused backend, layout, reduction and dtype."""

import math

import pytest
import torch

import kdkernels
from kdkernels.functional.margin_partial_l2 import margin_partial_l2
from kdkernels.nn.margin_partial_l2 import MarginPartialL2Loss
from kdkernels.ofd_margin import ofd_margin
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_elements, margin_partial_l2_reference
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


def _backward(loss, expected):
    """Backward of both with one random upstream gradient (exercises grad_output != 1)."""
    weights = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    (expected * weights).sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_low_precision(device_backend, layout, dtype):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features(layout, device, dtype)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "sum", channel_dim)
    loss.backward()
    s64, expected = _reference(student, teacher, margin, "sum", channel_dim)
    expected.backward()
    assert loss.dtype == torch.float32  # fp32 accumulation: only the summation order differs
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert student.grad.dtype == dtype
    assert_close_to_reference(student.grad.cpu(), s64.grad, dtype, "student grad")


def test_teacher_of_another_dtype(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("channels_last", device, torch.bfloat16, torch.float32)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "batchmean", channel_dim)
    loss.backward()
    s64, expected = _reference(student, teacher, margin, "batchmean", channel_dim)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.bfloat16, "student grad")


def test_teacher_layout_differs_from_student(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    teacher = teacher.contiguous(memory_format=torch.channels_last)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "sum", channel_dim)
    loss.backward()
    s64, expected = _reference(student, teacher, margin, "sum", channel_dim)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.float32, "student grad")


def test_non_dense_student_is_read_correctly(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw_long_runs", device)
    student = student[:, :, ::2]  # a view with gaps: copied once
    teacher = teacher[:, :, ::2]
    leaf = student.detach().requires_grad_()
    loss = margin_partial_l2(leaf, teacher, margin, "mean", channel_dim)
    loss.backward()
    s64, expected = _reference(leaf, teacher, margin, "mean", channel_dim)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(leaf.grad.cpu(), s64.grad, torch.float32, "student grad")


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


def test_teacher_gets_no_gradient(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    student.requires_grad_()
    teacher.requires_grad_()
    margin.requires_grad_()
    margin_partial_l2(student, teacher, margin, "sum", channel_dim).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and margin.grad is None


def test_retain_graph_backward_twice(device_backend):
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "sum", channel_dim)
    (first,) = torch.autograd.grad(loss * 2.0, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(first, 2.0 * second)


def test_backward_hands_the_forward_gradient_to_grad(device_backend):
    # loss.backward() must neither fill a zero tensor for the gradient output nor clone or scale
    # the gradient: the buffer the kernel wrote becomes student.grad.
    device, _ = device_backend
    student, teacher, margin, channel_dim = _features("nchw", device)
    student.requires_grad_()
    loss = margin_partial_l2(student, teacher, margin, "sum", channel_dim)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    copies = {"aten::fill_", "aten::zero_", "aten::clone", "aten::copy_", "aten::mul_", "aten::mul"}
    # (backward() itself fills the one-element grad_output with 1)
    big = [(e.name, e.input_shapes) for e in prof.events() if e.name in copies and any(math.prod(s) > 1 for s in e.input_shapes)]
    assert not big, big


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


def test_gradcheck_float64():
    student, teacher, margin, channel_dim = _features("nchw", "cpu", torch.float64)
    margin = margin.double()
    student.requires_grad_()
    with kdkernels.use_backend("cpu"):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(
                lambda s: margin_partial_l2(s, teacher, margin, reduction, channel_dim), (student,)
            )


def test_float64_on_cpu_matches_reference_exactly_enough():
    student, teacher, margin, channel_dim = _features("channels_last", "cpu", torch.float64)
    with kdkernels.use_backend("cpu"):
        loss = margin_partial_l2(student, teacher, margin, "none", channel_dim)
    assert loss.dtype == torch.float64
    expected = margin_partial_l2_elements(student, teacher, margin.double(), 1)
    assert_close_to_reference(loss, expected, torch.float64, "loss")


def test_torch_backend_is_the_reference():
    student, teacher, margin, channel_dim = _features("tokens", "cpu")
    with kdkernels.use_backend("torch"):
        loss = margin_partial_l2(student, teacher, margin, "mean", channel_dim)
    expected = margin_partial_l2_reference(student, teacher, margin, "mean", channel_dim)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    student, teacher, margin, _ = _features("channels_last", "cpu")
    student.requires_grad_()
    stride = student.stride(1)
    torch.library.opcheck(
        torch.ops.kdkernels.margin_partial_l2, (student, teacher, margin, stride, reduction, 0.5, True, "cpu")
    )
    torch.library.opcheck(
        torch.ops.kdkernels.margin_partial_l2, (student.detach(), teacher, margin, stride, reduction, 1.0, False, "cpu")
    )
    scale = torch.full((1,), 0.5)
    torch.library.opcheck(
        torch.ops.kdkernels.margin_partial_l2_elements,
        (student.detach(), teacher, margin, stride, scale, reduction != 0, True),
    )


@pytest.mark.gpu
def test_opcheck_triton():
    student, teacher, margin, _ = _features("channels_last", "cuda")
    student.requires_grad_()
    stride = student.stride(1)
    for reduction in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.kdkernels.margin_partial_l2, (student, teacher, margin, stride, reduction, 0.5, True, "triton")
        )


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    student, teacher, margin, channel_dim = _features("channels_last", "cpu")
    student.requires_grad_()

    def step(s, t, m):
        return margin_partial_l2(s, t, m, reduction, channel_dim).sum() * 0.5

    with kdkernels.use_backend("cpu"):
        eager = step(student, teacher, margin)
        (eager_grad,) = torch.autograd.grad(eager, student)
        compiled = torch.compile(step, fullgraph=True)(student, teacher, margin)
        (compiled_grad,) = torch.autograd.grad(compiled, student)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


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


def _bad_inputs():
    s = torch.randn(2, 3, 4, 4)
    t = torch.randn(2, 3, 4, 4)
    m = torch.zeros(3)
    return [
        ((s.numpy(), t, m), {}, TypeError, "student"),
        ((s, t.long(), m), {}, TypeError, "teacher"),
        ((s, t[:, :2], m), {}, ValueError, "teacher"),
        ((s, t, torch.zeros(4)), {}, ValueError, "margin"),
        ((s, t, torch.zeros(3, 1)), {}, ValueError, "margin"),
        ((s, t, torch.tensor([0.0, float("inf"), 0.0])), {}, ValueError, "margin"),
        ((s, t, torch.zeros(3, dtype=torch.long)), {}, TypeError, "margin"),
        ((s, t, [0.0, 0.0, 0.0]), {}, TypeError, "margin"),
        ((s, t, m), {"reduction": "avg"}, ValueError, "reduction"),
        ((s, t, m), {"channel_dim": 4}, ValueError, "channel_dim"),
        ((s, t, m), {"channel_dim": 1.0}, TypeError, "channel_dim"),
        ((s.to_sparse(), t, m), {}, TypeError, "student"),
        ((torch.tensor(1.0), torch.tensor(1.0), m), {}, ValueError, "student"),
        ((s, t, torch.zeros(3, device="meta")), {}, ValueError, "margin"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_name_the_argument(case):
    args, kwargs, error, name = _bad_inputs()[case]
    with pytest.raises(error, match=name):
        margin_partial_l2(*args, **kwargs)
