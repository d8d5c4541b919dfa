"""kd_loss / KDLoss: temperatures, vocabulary sizes, −inf logits, the composite users write, the
module, autocast and the backend selection.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.functional import kd_loss
from kdkernels.ops.reference.kd_loss import kd_loss_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _run(shape, dim, temperature, reduction, device, dtype=torch.float32, teacher_dtype=None, mask=None, teacher_grad=True, make=None):
    """Fused loss and gradients next to the float64 reference on the same data."""
    student = (make or torch.randn)(shape, dtype=torch.float64) * 3
    teacher = (make or torch.randn)(shape, dtype=torch.float64) * 3
    s = student.to(device, dtype).requires_grad_()
    t = teacher.to(device, teacher_dtype or dtype).requires_grad_(teacher_grad)
    # The reference sees the same (rounded) values as the fused kernel.
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_(teacher_grad)
    expected = kd_loss_reference(s64, t64, temperature, reduction, dim, mask)
    actual = kd_loss(s, t, temperature, reduction, dim, None if mask is None else mask.to(device))
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (expected * weights).sum().backward()
    (actual * weights.to(device, actual.dtype)).sum().backward()
    return actual, expected, s, s64, t, t64


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_temperatures(device_backend, temperature):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run((5, 33), -1, temperature, "batchmean", device)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("classes", [1, 2, 1000, 4097, 200_003])
def test_vocabulary_sizes(device_backend, classes):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run((2, classes), -1, 1.0, "sum", device)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


def test_minus_inf_logits_are_exact(device_backend):
    device, _ = device_backend
    student = torch.randn(4, 50, device=device)
    teacher = torch.randn(4, 50, device=device)
    teacher[:, 10:20] = float("-inf")  # masked vocabulary in the teacher
    student[:, 10:15] = float("-inf")  # ... and in the student for some of those classes
    teacher[3] = float("-inf")  # a position with no distribution at all
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = kd_loss(s, t, 2.0, "none")
    loss.sum().backward()
    expected = kd_loss_reference(student.double().cpu(), teacher.double().cpu(), 2.0, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert loss[3].item() == 0.0 and (s.grad[3] == 0).all()
    assert (t.grad[:, 10:20] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device_backend, reduction):
    device, _ = device_backend
    s = torch.randn(0, 10, device=device, requires_grad=True)
    loss = kd_loss(s, torch.randn(0, 10, device=device), 2.0, reduction)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0 and s.grad.shape == (0, 10)


def test_matches_the_composite_users_write(device_backend):
    device, _ = device_backend
    s, t, T = torch.randn(8, 100, device=device), torch.randn(8, 100, device=device), 4.0
    composite = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    torch.testing.assert_close(kd_loss(s, t, T), composite, rtol=1e-5, atol=1e-6)


def test_module_matches_function(device_backend):
    device, _ = device_backend
    s, t = torch.randn(2, 6, 3, 3, device=device), torch.randn(2, 6, 3, 3, device=device)
    mask = torch.rand(2, 3, 3, device=device) > 0.5
    module = kdkernels.nn.KDLoss(temperature=3.0, reduction="mean", dim=1)
    torch.testing.assert_close(module(s, t, mask), kd_loss(s, t, 3.0, "mean", 1, mask))
    assert "temperature=3.0" in repr(module)


# --- checks that need no particular fused backend -------------------------------------------------


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    module = kdkernels.nn.KDLoss(temperature=4.0)
    s, t = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
    with kdkernels.use_backend("cpu"):
        torch.testing.assert_close(torch.compile(module, fullgraph=True)(s, t), module(s, t))


def test_autocast_bf16():
    layer = torch.nn.Linear(16, 50)
    x = torch.randn(4, 16)
    teacher = torch.randn(4, 50)
    with kdkernels.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = kd_loss(logits, teacher, 2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and layer.weight.grad is not None
    torch.testing.assert_close(loss, kd_loss_reference(logits.float(), teacher, 2.0), rtol=1e-4, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------


def test_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        with kdkernels.use_backend("cuda"):
            kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="backend"):
        with kdkernels.use_backend("tpu"):
            pass


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert kdkernels.backends.resolve(torch.device("cpu")) == "torch"
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        kdkernels.backends.resolve(torch.device("cpu"))


def test_default_backend_on_cpu_is_the_compiled_kernel():
    assert kdkernels.backends.available("cpu")[0] == "cpu"
    assert kdkernels.backends.resolve(torch.device("cpu")) == "cpu"
