"""bounded_regression / BoundedRegressionLoss (Chen et al., NeurIPS 2017) against the float64
reference, on every fused backend, reduction, mask, shape and dtype."""

import math

import pytest
import torch

import kdkernels
from kdkernels.functional.bounded_regression import bounded_regression
from kdkernels.nn.bounded_regression import BoundedRegressionLoss
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
# (leading shape, K): boxes, anchors per image, class-specific regression (K > one vector of
# at::vec lanes, with a tail), one row, and enough rows for several partial-sum chunks.
SHAPES = [((6,), 4), ((2, 9), 4), ((3, 5), 37), ((), 4), ((3, 700), 4)]


def _boxes(leading, k, device, dtype=torch.float32):
    shape = (*leading, k)
    target = torch.randn(shape, dtype=torch.float64)
    # Teacher closer to the target than the student on about half of the rows.
    student = target + torch.randn(shape, dtype=torch.float64) * 0.5
    teacher = target + torch.randn(shape, dtype=torch.float64) * 0.5
    return student.to(device, dtype), teacher.to(device, dtype), target.to(device, dtype)


def _reference(student, teacher, target, margin, reduction, mask):
    s64 = student.detach().cpu().double().requires_grad_()
    expected = bounded_regression_reference(
        s64, teacher.cpu().double(), target.cpu().double(), margin, reduction, None if mask is None else mask.cpu()
    )
    return s64, expected


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_values_and_gradients(device_backend, shape, reduction, masked):
    device, _ = device_backend
    leading, k = shape
    student, teacher, target = _boxes(leading, k, device)
    mask = (torch.rand(leading) > 0.4).to(device) if masked else None
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 0.1, reduction, mask)
    s64, expected = _reference(student, teacher, target, 0.1, reduction, mask)
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    weights = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    (loss * weights.to(device, loss.dtype)).sum().backward()
    (expected * weights).sum().backward()
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.float32, "student grad")


def test_test_data_exercise_both_branches():
    student, teacher, target = _boxes((3, 700), 4, "cpu")
    d_s = ((student - target) ** 2).sum(-1)
    d_t = ((teacher - target) ** 2).sum(-1)
    active = d_s + 0.1 > d_t
    assert 0.2 < active.double().mean() < 0.8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device_backend, dtype):
    device, _ = device_backend
    student, teacher, target = _boxes((4, 50), 4, device, dtype)
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 0.0, "sum")
    loss.backward()
    s64, expected = _reference(student, teacher, target, 0.0, "sum", None)
    expected.backward()
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert student.grad.dtype == dtype
    assert_close_to_reference(student.grad.cpu(), s64.grad, dtype, "student grad")


def test_mixed_dtypes_are_promoted(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((5, 8), 4, device, torch.bfloat16)
    target = target.float()
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 0.0, "mean")
    loss.backward()
    s64, expected = _reference(student, teacher, target, 0.0, "mean", None)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert student.grad.dtype == torch.bfloat16
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.bfloat16, "student grad")


def test_strided_inputs(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((4, 6), 8, device)
    # coordinate-major storage (K, rows) viewed as (rows, K), and every other coordinate
    student = student.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2].detach().requires_grad_()
    teacher, target = teacher[..., ::2], target.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2]
    loss = bounded_regression(student, teacher, target, 0.0, "sum")
    loss.backward()
    s64, expected = _reference(student, teacher, target, 0.0, "sum", None)
    expected.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(student.grad.cpu(), s64.grad, torch.float32, "student grad")


def test_known_values(device_backend):
    device, _ = device_backend
    target = torch.zeros(3, 2, device=device)
    student = torch.tensor([[1.0, 1.0], [0.5, 0.0], [2.0, 0.0]], device=device, requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.9]], device=device)
    # d_s = [2, 0.25, 4], d_t = [0, 4, 3.61]; active with m = 0: [yes, no, yes]
    loss = bounded_regression(student, teacher, target, 0.0, "none")
    torch.testing.assert_close(loss, torch.tensor([2.0, 0.0, 4.0], device=device))
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[2.0, 2.0], [0.0, 0.0], [4.0, 0.0]], device=device))
    # a margin of -0.5 turns off the third row: 4 - 0.5 < 3.61
    loss = bounded_regression(student, teacher, target, -0.5, "none")
    torch.testing.assert_close(loss, torch.tensor([2.0, 0.0, 0.0], device=device))
    loss = bounded_regression(student, teacher, target, 5.0, "mean")  # every row active
    torch.testing.assert_close(loss, torch.tensor(6.25 / 3, device=device))


def test_mean_over_counted_rows_and_zero_when_none(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((8,), 4, device)
    mask = torch.tensor([True, False] * 4, device=device)
    total = bounded_regression(student, teacher, target, 10.0, "sum", mask)
    torch.testing.assert_close(bounded_regression(student, teacher, target, 10.0, "mean", mask), total / 4)
    nothing = torch.zeros(8, dtype=torch.bool, device=device)
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 10.0, "mean", nothing)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad.abs().sum() == 0


def test_batchmean_divides_by_the_first_dimension(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((4, 6), 4, device)
    total = bounded_regression(student, teacher, target, 0.0, "sum")
    torch.testing.assert_close(bounded_regression(student, teacher, target, 0.0, "batchmean"), total / 4)


def test_teacher_and_target_get_no_gradient(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((2, 9), 4, device)
    for t in (student, teacher, target):
        t.requires_grad_()
    bounded_regression(student, teacher, target, 1.0, "sum").backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and target.grad is None


def test_retain_graph_backward_twice(device_backend):
    device, _ = device_backend
    student, teacher, target = _boxes((2, 9), 4, device)
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 0.5, "mean")
    (first,) = torch.autograd.grad(loss * 3.0, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(first, 3.0 * second)


def test_backward_hands_the_forward_gradient_to_grad(device_backend):
    # loss.backward() must neither fill a zero tensor for the gradient output nor clone or scale
    # the gradient: the buffer the kernel wrote becomes student.grad.
    device, _ = device_backend
    student, teacher, target = _boxes((2, 9), 4, device)
    student.requires_grad_()
    loss = bounded_regression(student, teacher, target, 0.1, "sum")
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    copies = {"aten::fill_", "aten::zero_", "aten::clone", "aten::copy_", "aten::mul_", "aten::mul"}
    # (backward() itself fills the one-element grad_output with 1)
    big = [(e.name, e.input_shapes) for e in prof.events() if e.name in copies and any(math.prod(s) > 1 for s in e.input_shapes)]
    assert not big, big


def test_empty_input(device_backend):
    device, _ = device_backend
    student = torch.zeros(0, 4, device=device, requires_grad=True)
    teacher, target = torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)
    for reduction in ("sum", "mean", "batchmean"):
        assert bounded_regression(student, teacher, target, 0.0, reduction).item() == 0.0
    assert bounded_regression(student, teacher, target, 0.0, "none").shape == (0,)


def test_gradcheck_float64():
    student, teacher, target = _boxes((3, 4), 5, "cpu", torch.float64)
    mask = torch.rand(3, 4) > 0.3
    student.requires_grad_()
    with kdkernels.use_backend("cpu"):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(
                lambda s: bounded_regression(s, teacher, target, 0.05, reduction, mask), (student,)
            )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_loss_stays_float64(device_backend, reduction):
    device, _ = device_backend
    student, teacher, target = _boxes((3, 4), 4, device, torch.float64)
    mask = (torch.rand(3, 4) > 0.3).to(device)
    loss = bounded_regression(student, teacher, target, 0.05, reduction, mask)
    assert loss.dtype == torch.float64
    expected = bounded_regression_reference(student.cpu(), teacher.cpu(), target.cpu(), 0.05, reduction, mask.cpu())
    assert_close_to_reference(loss.cpu(), expected, torch.float64, "loss")


def test_torch_backend_is_the_reference():
    student, teacher, target = _boxes((2, 9), 4, "cpu")
    mask = torch.rand(2, 9) > 0.5
    with kdkernels.use_backend("torch"):
        loss = bounded_regression(student, teacher, target, 0.1, "mean", mask)
    torch.testing.assert_close(loss, bounded_regression_reference(student, teacher, target, 0.1, "mean", mask))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    student, teacher, target = _boxes((12,), 4, "cpu")
    mask = torch.rand(12) > 0.3
    student.requires_grad_()
    op = torch.ops.kdkernels.bounded_regression
    torch.library.opcheck(op, (student, teacher, target, mask, 0.1, reduction, 0.5, True, "cpu"))
    torch.library.opcheck(op, (student, teacher, target, None, 0.0, reduction, 1.0, True, "cpu"))
    torch.library.opcheck(op, (student.detach(), teacher, target, mask, 0.1, reduction, 1.0, False, "cpu"))
    torch.library.opcheck(
        torch.ops.kdkernels.bounded_regression_rows,
        (student.detach(), teacher, target, mask, 0.1, torch.full((1,), 0.5), reduction != 0, True),
    )


@pytest.mark.gpu
def test_opcheck_triton():
    student, teacher, target = _boxes((12,), 4, "cuda")
    mask = torch.rand(12, device="cuda") > 0.3
    student.requires_grad_()
    for reduction in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.kdkernels.bounded_regression, (student, teacher, target, mask, 0.1, reduction, 0.5, True, "triton")
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    student, teacher, target = _boxes((2, 9), 4, "cpu")
    mask = torch.rand(2, 9) > 0.3
    student.requires_grad_()

    def step(s, t, y, m):
        return bounded_regression(s, t, y, 0.1, reduction, m).sum() * 0.5

    with kdkernels.use_backend("cpu"):
        eager = step(student, teacher, target, mask)
        (eager_grad,) = torch.autograd.grad(eager, student)
        compiled = torch.compile(step, fullgraph=True)(student, teacher, target, mask)
        (compiled_grad,) = torch.autograd.grad(compiled, student)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_module():
    student, teacher, target = _boxes((2, 9), 4, "cpu")
    mask = torch.rand(2, 9) > 0.3
    criterion = BoundedRegressionLoss(margin=0.2, reduction="sum")
    torch.testing.assert_close(
        criterion(student, teacher, target, mask), bounded_regression(student, teacher, target, 0.2, "sum", mask)
    )
    assert "margin=0.2" in repr(criterion)
    with pytest.raises(ValueError, match="margin"):
        BoundedRegressionLoss(margin=float("nan"))
    with pytest.raises(TypeError, match="margin"):
        BoundedRegressionLoss(margin=torch.tensor(0.5))
    with pytest.raises(ValueError, match="reduction"):
        BoundedRegressionLoss(reduction="elementwise")


def _bad_inputs():
    s, t, y = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    return [
        ((s.tolist(), t, y), {}, TypeError, "student"),
        ((s, t.int(), y), {}, TypeError, "teacher"),
        ((s, t, y[..., :3]), {}, ValueError, "target"),
        ((s, t[:1], y), {}, ValueError, "teacher"),
        ((s, t, y), {"margin": float("inf")}, ValueError, "margin"),
        ((s, t, y), {"margin": "0.1"}, TypeError, "margin"),
        ((s, t, y), {"reduction": "avg"}, ValueError, "reduction"),
        ((s, t, y), {"mask": torch.ones(2, 5)}, TypeError, "mask"),
        ((s, t, y), {"mask": torch.ones(2, 5, 4, dtype=torch.bool)}, ValueError, "mask"),
        ((s, t, y), {"mask": torch.ones(10, dtype=torch.bool)}, ValueError, "mask"),
        ((s, t, y), {"mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, ValueError, "mask"),
        ((s.to_sparse(), t, y), {}, TypeError, "student"),
        ((torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "student"),
        ((s, t, y.to("meta")), {}, ValueError, "target"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_name_the_argument(case):
    args, kwargs, error, name = _bad_inputs()[case]
    with pytest.raises(error, match=name):
        bounded_regression(*args, **kwargs)
