"""weighted_soft_ce / WeightedSoftCELoss: temperatures, class counts, class weights, −inf teacher
logits, precision at large logits, the module and the reference's closed-form gradients.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce
from kdkernels.nn.weighted_soft_ce import WeightedSoftCELoss
from kdkernels.ops import weighted_soft_ce as _ops  # noqa: F401  (registers the ops)
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_positions, weighted_soft_ce_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _weights(classes: int) -> torch.Tensor:
    # Representable in float32, so the fused call (fp32 weights) and the reference see the same values.
    return (torch.rand(classes, dtype=torch.float64) * 2 + 0.1).float().double()


def _run(shape, dim, temperature, reduction, device, dtype=torch.float32, teacher_dtype=None, mask=None,
         weight=True, teacher_grad=True, make=None):
    """Fused loss and gradients next to the float64 reference on the same (rounded) data."""
    student = (make or torch.randn)(shape, dtype=torch.float64) * 3
    teacher = (make or torch.randn)(shape, dtype=torch.float64) * 3
    s = student.to(device, dtype).requires_grad_()
    t = teacher.to(device, teacher_dtype or dtype).requires_grad_(teacher_grad)
    w = _weights(shape[dim]) if weight else None
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_(teacher_grad)
    expected = weighted_soft_ce_reference(s64, t64, w, temperature, reduction, dim, mask)
    actual = weighted_soft_ce(
        s, t, None if w is None else w.to(device, torch.float32), temperature, reduction, dim,
        None if mask is None else mask.to(device),
    )
    grad_output = torch.randn(expected.shape, dtype=torch.float64)
    (expected * grad_output).sum().backward()
    (actual * grad_output.to(device, actual.dtype)).sum().backward()
    return actual, expected, s, s64, t, t64


def _assert_all_close(actual, expected, s, s64, t, t64, dtype=torch.float32, teacher_dtype=None):
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")  # fp32 accumulation
    assert_close_to_reference(s.grad.cpu(), s64.grad, dtype, "student grad")
    if t64.requires_grad:
        assert_close_to_reference(t.grad.cpu(), t64.grad, teacher_dtype or dtype, "teacher grad")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("dim", [-1, 1])
def test_temperatures(device_backend, temperature, dim):
    device, _ = device_backend
    shape = (5, 33) if dim == -1 else (2, 9, 3, 5)
    _assert_all_close(*_run(shape, dim, temperature, "mean", device))


@pytest.mark.parametrize("classes", [1, 2, 1000, 3000])
def test_class_counts(device_backend, classes):
    device, _ = device_backend
    _assert_all_close(*_run((2, classes), -1, 1.0, "sum", device))


@pytest.mark.parametrize("classes", [1, 3, 300])
def test_class_counts_channels_first(device_backend, classes):
    device, _ = device_backend
    _assert_all_close(*_run((2, classes, 3, 3), 1, 2.0, "sum", device))


def test_large_class_count_cpu():
    with kdkernels.use_backend("cpu"):
        _assert_all_close(*_run((2, 70_000), -1, 2.0, "batchmean", "cpu"))


def test_float64_on_cpu():
    with kdkernels.use_backend("cpu"):
        actual, expected, s, s64, t, t64 = _run((3, 2, 40), 1, 1.5, "sum", "cpu", torch.float64, torch.float16)
    assert actual.dtype == torch.float64
    _assert_all_close(actual, expected, s, s64, t, t64, torch.float64, torch.float16)
    assert_close_to_reference(actual, expected, torch.float64, "loss in float64")


def test_mean_divides_by_counted_positions(device_backend):
    device, _ = device_backend
    s, t = torch.randn(6, 10, device=device), torch.randn(6, 10, device=device)
    mask = torch.tensor([True, False, True, True, False, False], device=device)
    per_position = weighted_soft_ce(s, t, reduction="none")
    torch.testing.assert_close(weighted_soft_ce(s, t, mask=mask), per_position[mask].mean())
    nothing = torch.zeros(6, dtype=torch.bool, device=device)
    assert weighted_soft_ce(s, t, mask=nothing).item() == 0.0


def test_minus_inf_teacher_logits_are_exact(device_backend):
    device, _ = device_backend
    student = torch.randn(4, 50, device=device)
    teacher = torch.randn(4, 50, device=device)
    teacher[:, 10:20] = float("-inf")  # classes the teacher excludes ...
    student[:, 10:15] = float("-inf")  # ... some of which the student excludes too
    teacher[3] = float("-inf")  # a position with no teacher distribution at all
    weight = _weights(50).float().to(device)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = weighted_soft_ce(s, t, weight, 2.0, "none")
    loss.sum().backward()
    expected = weighted_soft_ce_reference(student.double().cpu(), teacher.double().cpu(), weight.double().cpu(), 2.0, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert loss[3].item() == 0.0 and (s.grad[3] == 0).all() and (t.grad[3] == 0).all()
    assert (t.grad[:, 10:20] == 0).all()


def test_minus_inf_teacher_in_dense_maps(device_backend):
    device, _ = device_backend
    teacher = torch.randn(2, 6, 3, 3)
    teacher[:, 2] = float("-inf")
    teacher[1, :, 0, 0] = float("-inf")
    s64 = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    t64 = teacher.double().requires_grad_()
    expected = weighted_soft_ce_reference(s64, t64, None, 1.0, "sum", 1)
    expected.backward()
    s, t = s64.detach().float().to(device).requires_grad_(), teacher.to(device).requires_grad_()
    loss = weighted_soft_ce(s, t, None, 1.0, "sum", 1)
    loss.backward()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")
    assert (t.grad[:, 2] == 0).all() and (s.grad[1, :, 0, 0] == 0).all()


def test_zero_weight_ignores_a_class_even_at_minus_inf(device_backend):
    device, _ = device_backend
    student, teacher = torch.randn(3, 8), torch.randn(3, 8)
    student[:, 0] = float("-inf")  # the student rules out class 0, which weighs 0 in the loss
    weight = torch.tensor([0.0, 1, 1, 1, 2, 1, 1, 1])
    s = student.to(device).requires_grad_()
    t = teacher.to(device).requires_grad_()
    loss = weighted_soft_ce(s, t, weight.to(device), 1.0, "none")
    loss.sum().backward()
    s64, t64 = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    expected = weighted_soft_ce_reference(s64, t64, weight.double(), 1.0, "none")
    expected.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device_backend, reduction):
    device, _ = device_backend
    s = torch.randn(0, 10, device=device, requires_grad=True)
    loss = weighted_soft_ce(s, torch.randn(0, 10, device=device), torch.ones(10, device=device), 2.0, reduction)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0 and s.grad.shape == (0, 10)


def test_class_weight_scales_each_class(device_backend):
    device, _ = device_backend
    s, t = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    weight = torch.tensor([1.5, 1.0, 1.0, 1.0], device=device)
    log_p_s, p_t = F.log_softmax(s, -1), F.softmax(t, -1)
    expected = -(weight * p_t * log_p_s).sum(-1)
    torch.testing.assert_close(weighted_soft_ce(s, t, weight, reduction="none"), expected)
    torch.testing.assert_close(weighted_soft_ce(s, t, None, reduction="none"), -(p_t * log_p_s).sum(-1))


def test_large_logits_lose_no_precision(device_backend):
    """ℓ is formed from terms relative to the maxima: logits of 1e4 still give an accurate small loss."""
    device, _ = device_backend
    base = torch.randn(4, 64, dtype=torch.float64)
    s64 = base + 1e4
    t64 = base + 0.01 * torch.randn(4, 64, dtype=torch.float64) - 1e4
    actual = weighted_soft_ce(s64.float().to(device), t64.float().to(device), None, 1.0, "none")
    # fp32 rounds 1e4 + x to ~1e-3; the loss (≈ the teacher entropy, ~4) must not add more error.
    expected = weighted_soft_ce_reference(s64.float().double(), t64.float().double(), None, 1.0, "none")
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_module_matches_function(device_backend):
    device, _ = device_backend
    s, t = torch.randn(2, 6, 3, 3, device=device), torch.randn(2, 6, 3, 3, device=device)
    mask = torch.rand(2, 3, 3, device=device) > 0.5
    weight = torch.tensor([1.5, 1, 1, 1, 1, 1.0])
    module = WeightedSoftCELoss(weight, temperature=3.0, reduction="sum", dim=1).to(device)
    assert module.class_weight.device.type == torch.device(device).type and "class_weight" in module.state_dict()
    torch.testing.assert_close(module(s, t, mask), weighted_soft_ce(s, t, weight.to(device), 3.0, "sum", 1, mask))
    assert "temperature=3.0" in repr(module) and "classes=6" in repr(module)


def test_module_without_weights_defaults_to_ones(device_backend):
    device, _ = device_backend
    s, t = torch.randn(4, 9, device=device), torch.randn(4, 9, device=device)
    module = WeightedSoftCELoss()
    assert module.class_weight is None
    torch.testing.assert_close(module(s, t), weighted_soft_ce(s, t, torch.ones(9, device=device)))


# --- checks of the reference itself and of the gradient formulas --------------------------------------


def test_reference_gradients_match_the_closed_form():
    """∂ℓ/∂s = (S p_s − w p_t)/T and ∂ℓ/∂t = −p_t (ℓ + w log p_s)/T, S = Σ w p_t."""
    T = 2.5
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    w = _weights(11)
    loss = weighted_soft_ce_positions(s, t, w, T, -1)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t))
    p_s, log_p_s, p_t = F.softmax(s / T, -1), F.log_softmax(s / T, -1), F.softmax(t / T, -1)
    mass = (w * p_t).sum(-1, keepdim=True)
    torch.testing.assert_close(grad_s, (mass * p_s - w * p_t) / T)
    torch.testing.assert_close(grad_t, -p_t * (loss.unsqueeze(-1) + w * log_p_s) / T)
    torch.testing.assert_close(grad_t.sum(-1), torch.zeros(5, dtype=torch.float64))  # shift invariance


def test_reference_is_cross_entropy_with_soft_targets():
    s, t = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    expected = F.cross_entropy(s / 2.0, F.softmax(t / 2.0, -1), reduction="mean")
    torch.testing.assert_close(weighted_soft_ce_reference(s, t, None, 2.0, "mean"), expected)


# --- checks that need no particular fused backend -------------------------------------------------------


# --- bad input ----------------------------------------------------------------------------------------
