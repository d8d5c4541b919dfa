"""Contract of every fused loss on every fused backend: two runs on the same inputs give the same
bits, loss and gradients (the kernels reduce in a fixed order: no atomics, a fixed split over
threads). One row per loss, at a size where the work is split over several programs / threads."""

import pytest
import torch

from kdkernels.functional import bounded_regression, kd_loss, kl_div, margin_partial_l2, weighted_soft_ce
from tests.test_bounded_regression import _boxes
from tests.test_kl_div import _inputs as _kl_inputs
from tests.test_margin_partial_l2 import _features


def _kd(device):
    s = torch.randn(64, 3000, device=device, requires_grad=True)
    t = torch.randn(64, 3000, device=device)
    return lambda: kd_loss(s, t, 3.0), [s]


def _wsce(device):
    s = torch.randn(16, 3000, device=device, requires_grad=True)
    t = torch.randn(16, 3000, device=device)
    return lambda: weighted_soft_ce(s, t, None, 3.0), [s]


def _kl(device):
    x, y = _kl_inputs((50, 4000), False, device)
    x.requires_grad_()
    return lambda: kl_div(x, y, reduction="sum"), [x]


def _margin(device):
    student, teacher, margin, channel_dim = _features("multi_chunk", device)
    student.requires_grad_()
    return lambda: margin_partial_l2(student, teacher, margin, "sum", channel_dim), [student]


def _bounded(device):
    student, teacher, target = _boxes((3, 700), 4, device)
    student.requires_grad_()
    return lambda: bounded_regression(student, teacher, target, 0.1, "sum"), [student]


LARGE_CALLS = {"kd_loss": _kd, "weighted_soft_ce": _wsce, "kl_div": _kl, "margin_partial_l2": _margin,
               "bounded_regression": _bounded}


@pytest.mark.parametrize("loss", list(LARGE_CALLS))
def test_two_runs_give_the_same_bits(device_backend, loss):
    device, _ = device_backend
    call, leaves = LARGE_CALLS[loss](device)
    runs = []
    for _ in range(2):
        for x in leaves:
            x.grad = None
        value = call()
        value.backward()
        runs.append([value.detach().clone()] + [x.grad.clone() for x in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
