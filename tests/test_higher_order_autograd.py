"""Higher-order autograd of the fused losses, table-driven (``tests/fused_losses.py``): double
backward (gradgradcheck in float64), forward-mode AD, torch.func.grad and vmap, on every backend
that runs here. None of them may silently return zeros."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import kdkernels
from tests.fused_losses import BACKEND_PARAMS, BY_NAME, make_case

LAYOUTS = {"kd_loss": "nchw", "weighted_soft_ce": "rows", "kl_div": "rows", "margin_partial_l2": "channels_last",
           "bounded_regression": "rows"}
NAMES = list(LAYOUTS)  # (double backward of every loss: test_fused_loss_contract.py)


def _small_case(name):
    loss = BY_NAME[name]
    case = make_case(loss, LAYOUTS[name])
    if name == "kl_div":  # gradcheck needs a target where the loss is smooth: no exact zeros
        case.inputs[1] = case.inputs[1] + 0.1
    if name == "margin_partial_l2":
        case.inputs[0] = case.inputs[0] + 0.05  # keep away from the S = T kink
    return loss, case


def _function(loss, case, reduction, backend):
    """f(*differentiable inputs) -> loss through the public function on ``backend``."""
    constants = [x.double() if x.is_floating_point() else x for x in case.inputs[case.n_diff :]]

    def f(*diff):
        with kdkernels.use_backend(backend):
            return loss.call(list(diff) + constants, case, reduction)

    return f


def _diff_inputs(case):
    return [x.detach().double().requires_grad_() for x in case.inputs[: case.n_diff]]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(name, reduction, backend):
    loss, case = _small_case(name)
    f = _function(loss, case, reduction, backend)
    assert torch.autograd.gradgradcheck(f, _diff_inputs(case), eps=1e-6, atol=1e-5, rtol=1e-4)


def _reference_jvp(loss, case, reduction, primals, tangents):
    return torch.func.jvp(_function(loss, case, reduction, "torch"), primals, tangents)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_ad(name, backend):
    loss, case = _small_case(name)
    primals = tuple(x.detach() for x in _diff_inputs(case))
    tangents = tuple(torch.randn_like(x) for x in primals)
    f = _function(loss, case, "none", backend)
    want_value, want_tangent = _reference_jvp(loss, case, "none", primals, tangents)
    assert want_tangent.abs().sum() > 0
    value, tangent = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(f(*duals))
    assert out.tangent is not None, "forward AD lost the tangent"
    torch.testing.assert_close(out.tangent, want_tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_func_grad_and_vmap(name, backend):
    loss, case = _small_case(name)
    primals = tuple(x.detach() for x in _diff_inputs(case))
    f = _function(loss, case, "sum", backend)
    ref = _function(loss, case, "sum", "torch")
    got = torch.func.grad(f, argnums=tuple(range(len(primals))))(*primals)
    want = torch.func.grad(ref, argnums=tuple(range(len(primals))))(*primals)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # vmap over a batch of 3 perturbed copies: the same as a loop
    batch = tuple(torch.stack([p + 0.01 * k for k in range(3)]) for p in primals)
    mapped = torch.func.vmap(f)(*batch)
    looped = torch.stack([f(*(b[k] for b in batch)) for k in range(3)])
    torch.testing.assert_close(mapped, looped, rtol=1e-10, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(f))(*batch)
    looped_grads = torch.stack([torch.func.grad(ref)(*(b[k] for b in batch)) for k in range(3)])
    torch.testing.assert_close(per_sample, looped_grads, rtol=1e-10, atol=1e-12)
