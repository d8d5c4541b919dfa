"""The drop-in kl_div / KLDivLoss against torch.nn.functional.kl_div and the reference.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.functional import kl_div
from kdkernels.ops.reference.kl_div import kl_div_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _inputs(shape, log_target, device, dtype=torch.float32):
    x = torch.randn(shape, dtype=torch.float64).log_softmax(-1)
    y = torch.rand(shape, dtype=torch.float64)
    y = y * (torch.rand(shape, dtype=torch.float64) > 0.2)  # zero targets
    if log_target:
        y = torch.where(y > 0, y.log(), torch.full_like(y, -30.0))
    return x.to(device, dtype), y.to(device, dtype)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 4, 5), (7,), (3, 9000)])
def test_matches_torch_values_and_gradients(device_backend, reduction, log_target, shape):
    device, _ = device_backend
    x, y = _inputs(shape, log_target, device)
    x.requires_grad_(), y.requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = y.detach().cpu().double().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual = kl_div(x, y, reduction=reduction, log_target=log_target)
        expected = F.kl_div(x64, y64, reduction=reduction, log_target=log_target)
    assert actual.dtype == torch.float32
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (actual * weights.to(device, actual.dtype)).sum().backward()
    (expected * weights).sum().backward()
    assert_close_to_reference(x.grad.cpu(), x64.grad, torch.float32, "input grad")
    # torch's target gradient is NaN at y = 0 (d/dy of y·log y); ours is 0 there, by design.
    ref_target_grad = kl_div_reference_grad_target(x64.detach(), y64.detach(), reduction, log_target, weights)
    assert_close_to_reference(y.grad.cpu(), ref_target_grad, torch.float32, "target grad")


def kl_div_reference_grad_target(x, y, reduction, log_target, weights):
    y = y.clone().requires_grad_()
    (kl_div_reference(x, y, reduction, log_target) * weights).sum().backward()
    return y.grad


def test_none_reduction_keeps_torch_dtype(device_backend):
    device, _ = device_backend
    x, y = _inputs((3, 8), False, device, torch.bfloat16)
    assert kl_div(x, y, reduction="none").dtype == F.kl_div(x, y, reduction="none").dtype == torch.bfloat16


def test_zero_target_with_minus_inf_input_matches_torch(device_backend):
    device, _ = device_backend
    x = torch.tensor([[-1.0, float("-inf"), -0.5]], device=device)
    y = torch.tensor([[0.5, 0.0, 0.5]], device=device)
    torch.testing.assert_close(kl_div(x, y, reduction="none"), F.kl_div(x, y, reduction="none"), equal_nan=True)


def test_broadcasting_like_torch(device_backend):
    device, _ = device_backend
    x, _ = _inputs((3, 6), False, device)
    y = torch.rand(1, 6, device=device)
    torch.testing.assert_close(kl_div(x, y, reduction="sum"), F.kl_div(x, y, reduction="sum"))


def test_empty_input_like_torch(device_backend):
    # torch: the sum of nothing is 0; "mean" and "batchmean" of an empty batch divide it by 0.
    device, _ = device_backend
    x = torch.randn(0, 5, device=device, requires_grad=True)
    y = torch.rand(0, 5, device=device)
    expected = {"sum": 0.0, "batchmean": float("nan"), "mean": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for reduction, value in expected.items():
            loss = kl_div(x, y, reduction=reduction)
            torch.testing.assert_close(loss.cpu(), torch.tensor(value), equal_nan=True)
            torch.testing.assert_close(loss.cpu(), F.kl_div(x.cpu(), y.cpu(), reduction=reduction), equal_nan=True)
    loss.backward()
    assert x.grad.shape == (0, 5)


def test_mean_warns_like_torch():
    x, y = _inputs((2, 3), False, "cpu")
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        kl_div(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl_div(x, y, reduction="batchmean")


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True), (False, True)])
def test_legacy_arguments(size_average, reduce):
    x, y = _inputs((4, 5), False, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = kdkernels.nn.KLDivLoss(size_average=size_average, reduce=reduce)
        theirs = torch.nn.KLDivLoss(size_average=size_average, reduce=reduce)
        assert ours.reduction == theirs.reduction
        torch.testing.assert_close(ours(x, y), theirs(x, y))
        torch.testing.assert_close(kl_div(x, y, size_average, reduce), F.kl_div(x, y, size_average, reduce))


def test_module_is_a_drop_in(device_backend):
    device, _ = device_backend
    x, y = _inputs((4, 10), True, device)
    ours = kdkernels.nn.KLDivLoss(reduction="batchmean", log_target=True)
    theirs = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    torch.testing.assert_close(ours(x, y), theirs(x, y))


def test_gradcheck_float64_log_target():
    # (probability targets: test_fused_loss_contract.py)
    x, y = _inputs((3, 5), True, "cpu", torch.float64)
    x.requires_grad_(), y.requires_grad_()
    with kdkernels.use_backend("cpu"):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(lambda a, b: kl_div(a, b, reduction=reduction, log_target=True), (x, y))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_log_target(reduction):
    # (probability targets: test_fused_loss_contract.py)
    x, y = _inputs((4, 6), False, "cpu")
    x.requires_grad_()
    log_y = y.detach().clamp_min(1e-3).log().requires_grad_()  # finite: exp(-inf)·(-inf) is NaN, as in torch
    torch.library.opcheck(torch.ops.kdkernels.kl_div, (x, log_y, True, reduction, 1.0, True, False, "cpu"))
    scale = torch.tensor([2.0])
    torch.library.opcheck(torch.ops.kdkernels.kl_div_pointwise, (x.detach(), log_y.detach(), True, scale, reduction != 0, True, True))
