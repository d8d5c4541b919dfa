"""bounded_regression / BoundedRegressionLoss (Chen et al., NeurIPS 2017): leading shapes, strides,
known values, the mask's mean and the module.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch

from kdkernels.functional.bounded_regression import bounded_regression
from kdkernels.nn.bounded_regression import BoundedRegressionLoss
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
# (leading shape, K) beyond the contract's (rows, K) layouts (tests/fused_losses.py): anchors per
# image, class-specific regression (K > one vector of at::vec lanes, with a tail), a single box,
# and enough rows for several partial-sum chunks.
SHAPES = [((2, 9), 4), ((3, 5), 37), ((), 4), ((3, 700), 4)]


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


def test_empty_input(device_backend):
    device, _ = device_backend
    student = torch.zeros(0, 4, device=device, requires_grad=True)
    teacher, target = torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)
    for reduction in ("sum", "mean", "batchmean"):
        assert bounded_regression(student, teacher, target, 0.0, reduction).item() == 0.0
    assert bounded_regression(student, teacher, target, 0.0, "none").shape == (0,)


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
