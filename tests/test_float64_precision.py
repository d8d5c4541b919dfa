"""float64 stays float64 through the fused ops: exact mask counts in the accumulation dtype, and
saved inputs that respect torch's version counters. Table-driven over the fused losses
(``tests/fused_losses.py``); float64 accuracy of values and gradients is a clause of
``test_fused_loss_contract.py``."""

import pytest
import torch

import kdkernels
from kdkernels.ops._reduction import MEAN, grad_scale_and_divisor
from tests.fused_losses import BY_NAME, FUSED_BACKEND_PARAMS, LOSSES, make_case

NAMES = [loss.name for loss in LOSSES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_counts_are_exact_beyond_2_to_the_24(dtype):
    count = 2**25 + 3  # a float32 sum of ones stops at 2**24
    mask = torch.ones(count, dtype=torch.bool)
    grad_scale, divisor = grad_scale_and_divisor(MEAN, 1.0, count, mask, mask.device, dtype)
    assert grad_scale.dtype == dtype and divisor.dtype == dtype
    assert divisor.item() == float(torch.tensor(count, dtype=torch.float64).to(dtype))
    assert abs(grad_scale.double().item() * count - 1) < (1e-15 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("backend", FUSED_BACKEND_PARAMS)
@pytest.mark.parametrize("which", [0, 1], ids=["student", "teacher"])
@pytest.mark.parametrize("name", NAMES)
def test_second_backward_after_an_in_place_change_raises_like_torch(name, which, backend):
    loss = BY_NAME[name]
    case = make_case(loss, loss.layouts[0])
    leaves = case.leaves()
    if which >= case.n_diff:  # a constant input (the detached teacher): still saved for backward
        leaves[which].requires_grad_(False)
    with kdkernels.use_backend(backend):
        out = loss.call(leaves, case, "sum")
    out.backward(retain_graph=True)
    with torch.no_grad():
        leaves[which].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("backend", FUSED_BACKEND_PARAMS)
@pytest.mark.parametrize("name", NAMES)
def test_second_backward_without_changes_repeats_the_gradient(name, backend):
    loss = BY_NAME[name]
    case = make_case(loss, loss.layouts[0])
    leaves = case.leaves()
    with kdkernels.use_backend(backend):
        out = loss.call(leaves, case, "mean")
    out.backward(retain_graph=True)
    first = [x.grad.clone() for x in leaves[: case.n_diff]]
    out.backward()
    for x, g in zip(leaves, first):
        torch.testing.assert_close(x.grad, 2 * g)
