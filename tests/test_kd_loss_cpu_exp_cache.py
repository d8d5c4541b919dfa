"""The CPU row walker's student-gradient pass from pass 1's exponentials
(csrc/cpu/two_distribution_row.h, ``ExpCache``), shared by kd_loss and weighted_soft_ce: rows
longer than one class block (2048), whose blocks were shifted by different running maxima, must
give the float64 gradient; so must the cases that fall back to recomputing from the logits
(non-finite maxima, a teacher gradient as well)."""

import pytest
import torch

import kdkernels
from kdkernels.functional import kd_loss, weighted_soft_ce

pytestmark = pytest.mark.skipif(
    kdkernels.backends.why_unavailable("cpu", "cpu") is not None,
    reason=f"cpu backend: {kdkernels.backends.why_unavailable('cpu', 'cpu')}",
)

V = 3 * 2048 + 37  # four blocks, the last one partial (vector tail)

# Class weights of weighted_soft_ce: positive, a few exactly 0 (classes selected out).
_WEIGHT = torch.rand(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
_WEIGHT[::97] = 0.0


def _kd(s, t, temperature):
    return kd_loss(s, t, temperature, reduction="none")


def _wsce(s, t, temperature):
    return weighted_soft_ce(s, t, _WEIGHT.to(s.dtype), temperature=temperature, reduction="none")


LOSSES = {"kd_loss": _kd, "weighted_soft_ce": _wsce}


def _rows(dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, V, generator=g, dtype=torch.float64) * 3
    ramp = torch.linspace(0, 40, V, dtype=torch.float64)
    s[0] += ramp  # the maxima grow block after block: every block has its own shift
    t[0] += ramp
    s[1] -= ramp  # the first block holds the maxima
    s[2, : 2 * 2048 + 5] = float("-inf")  # student blocks whose running maximum is still -inf
    t[3, : 2048 + 1] = float("-inf")  # teacher likewise: classes the teacher excludes
    s[4, 100] = 60.0  # one dominant class: most of the row's exponentials underflow
    t[5, -1] = 60.0
    return s.to(dtype), t.to(dtype)


def _fused(loss_fn, s, t, temperature, teacher_grad=False):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_(teacher_grad)
    with kdkernels.use_backend("cpu"):
        loss = loss_fn(s, t, temperature)
    loss.sum().backward()
    return loss, s.grad, t.grad


def _reference(loss_fn, s, t, temperature):
    s = s.double().requires_grad_()
    t = t.double().requires_grad_()
    with kdkernels.use_backend("torch"):
        loss = loss_fn(s, t, temperature)
    loss.sum().backward()
    return loss, s.grad, t.grad


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_student_gradient_from_cached_exponentials(loss_name, dtype, temperature):
    loss_fn = LOSSES[loss_name]
    s, t = _rows(dtype)
    loss, grad, _ = _fused(loss_fn, s, t, temperature)
    ref_loss, ref_grad, _ = _reference(loss_fn, s, t, temperature)
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=0.0)
    # Per element, relative to the row's largest gradient (the small ones are sums of two terms).
    atol = rtol * ref_grad.abs().amax(dim=1, keepdim=True)
    assert ((grad.double() - ref_grad).abs() <= atol + rtol * ref_grad.abs()).all()
    assert loss[2] == float("inf")  # the student excludes classes the teacher does not


def test_equal_inputs_give_exactly_zero_gradient():
    s, _ = _rows(torch.float32)
    _, grad, _ = _fused(_kd, s, s.clone(), 4.0)
    assert (grad == 0).all()


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_teacher_gradient_and_non_finite_rows_take_the_recomputing_pass(loss_name):
    loss_fn = LOSSES[loss_name]
    s, t = _rows(torch.float32)
    s[4, 7] = float("nan")
    s[5, 9] = float("inf")
    loss, grad_s, grad_t = _fused(loss_fn, s, t, 2.0, teacher_grad=True)
    ref_loss, ref_s, ref_t = _reference(loss_fn, s, t, 2.0)
    # Row 2 has an infinite loss: its teacher gradient is NaN in the reference, not compared.
    for got, ref, rows in ((grad_s, ref_s, [0, 1, 2, 3]), (grad_t, ref_t, [0, 1, 3])):
        g, r = got[rows].double(), ref[rows]
        assert ((g - r).abs() <= 2e-5 * r.abs().amax(dim=1, keepdim=True) + 2e-5 * r.abs()).all()
        assert got[4:].isnan().all()  # a NaN or +inf logit: the whole row's gradient is NaN
    assert loss[4:].isnan().all() and ref_loss[4:].isnan().all()
    _, grad_only_s, _ = _fused(loss_fn, s, t, 2.0)
    assert grad_only_s[4:].isnan().all() and not grad_only_s[:4].isnan().any()


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("where", [0, 15, 16, 2047, 2048, V - 1])
@pytest.mark.parametrize("rest", ["finite", "-inf"])
def test_one_nan_logit_anywhere_makes_its_row_nan(loss_name, side, where, rest):
    # On AVX-512 the block maxima are a plain VMAXPS, which drops a NaN when a larger logit comes
    # after it in the same lane; the row must still come out NaN (from its softmax sums), also
    # where every other logit of that side is −inf (a maximum of −inf would otherwise read as "no
    # distribution": loss 0, or +inf).
    loss_fn = LOSSES[loss_name]
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, V, generator=g)
    t = torch.randn(3, V, generator=g)
    x = s if side == "student" else t
    if rest == "-inf":
        x[1] = float("-inf")
    else:
        x[1, (where + 16) % V] = 50.0  # a larger logit in the same vector lane (the row's start for V − 1)
    x[1, where] = float("nan")
    loss, grad, _ = _fused(loss_fn, s, t, 2.0)
    assert loss[1].isnan() and grad[1].isnan().all()
    assert loss[[0, 2]].isfinite().all() and grad[[0, 2]].isfinite().all()
