"""Rows at the edges of the LLM divergence kernels (CPU and interpreted Triton) against the float64
reference:

* the mixture divergences (JSD, skew KLs) where the mixture m = β q + (1−β) p of two tiny
  probabilities underflows in float32 (half the smallest subnormal rounds to 0, so log m would be
  −inf and the term p·(log p − log m) infinite): the kernels take log m in log space there;
* the skew KLs at β = 1, KL(x ‖ x), which read one model only: NaN where that model's row has no
  distribution, and a 0 gradient for the other model even where its logits are NaN."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss
from kdkernels.ops.reference.divergences import distill_loss_positions
from tests.llm.test_divergence_kernels import BACKENDS

V = 5003  # three of the CPU walker's 2048-class blocks


def _tiny_mass_rows():
    """Two rows whose class 5 has a student probability near the smallest float32 subnormal
    (e^-103) and no teacher mass, in a first block whose running maximum (−23) is far below the
    row's (0, in the second block): the CPU walker's cached e^{x − m_block} is a normal float and
    only its rescale by e^{m_block − m}/Z lands in the subnormals."""
    s = torch.full((2, V), -23.0)
    s[:, 5] = -103.0
    s[:, 3000] = 0.0
    s[1, 7] = -102.5  # a second tiny class, with teacher mass 0 too
    t = s.clone()
    t[:, 5] = float("-inf")
    t[1, 7] = float("-inf")
    return s, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("jsd", 0.5), ("jsd", 0.1), ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.3), ("skew_reverse_kl", 0.5)])
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_underflowing_mixture_is_finite_and_exact(backend, divergence, beta, teacher):
    s, t = _tiny_mass_rows()
    kw = dict(divergence=divergence, beta=beta, reduction="none")
    s64 = s.double().requires_grad_()
    ref, _ = distill_loss_positions(s64, t.double(), divergence=divergence, beta=beta)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    student = s.clone().requires_grad_()
    with kdkernels.use_backend(backend):
        if teacher == "dense":
            loss = distill_loss(student, t, **kw)
        else:  # k = V: every class stored, the teacher's logits as values
            ids = torch.arange(V).expand(2, V).contiguous()
            loss = distill_loss(student, teacher_topk=(ids, t), tail="renormalize", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def _reference_with_grads(s, t=None, topk=None, **kw):
    s64 = s.double().requires_grad_()
    if topk is None:
        loss, _ = distill_loss_positions(s64, t.double(), **kw)
        other = None
    else:
        other = topk[1].double().requires_grad_()
        loss, _ = distill_loss_positions(s64, teacher_topk=(topk[0], other), **kw)
    inputs = (s64,) if other is None else (s64, other)
    return loss.detach(), *torch.autograd.grad(loss.sum(), inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_reverse_kl_at_beta_one_with_a_student_row_of_minus_inf_is_nan(backend):
    """KL(p ‖ p) with p = softmax of an all −inf student row: NaN, as the reference's log-softmax
    of that row (the teacher is never read)."""
    s = torch.randn(3, 50)
    t = torch.randn(3, 50)
    s[1] = float("-inf")
    ref, ref_grad = _reference_with_grads(s, t, divergence="skew_reverse_kl", beta=1.0)
    student = s.clone().requires_grad_()
    with kdkernels.use_backend(backend):
        loss = distill_loss(student, t, divergence="skew_reverse_kl", beta=1.0, reduction="none")
    assert ref[1].isnan() and loss[1].isnan()
    torch.testing.assert_close(loss.double(), ref, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    torch.testing.assert_close(grad.double(), ref_grad, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_forward_kl_at_beta_one_ignores_a_nan_student(backend):
    """KL(q ‖ q) against a top-k teacher with a tail bucket never reads the student: a NaN student
    logit outside the ids leaves the loss and the student's gradient 0, as in the reference."""
    s = torch.randn(2, 40)
    s[0, 30] = float("nan")
    ids = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 6]])
    values = torch.log_softmax(torch.randn(2, 40), -1).gather(1, ids)  # stored log-probabilities
    kw = dict(divergence="skew_forward_kl", beta=1.0, tail="tail_bucket", teacher_values="logprobs")
    ref, ref_grad, ref_values_grad = _reference_with_grads(s, topk=(ids, values), **kw)
    student, vals = s.clone().requires_grad_(), values.clone().requires_grad_()
    with kdkernels.use_backend(backend):
        loss = distill_loss(student, teacher_topk=(ids, vals), reduction="none", **kw)
    grad, values_grad = torch.autograd.grad(loss.sum(), (student, vals))
    assert torch.equal(ref_grad, torch.zeros_like(ref_grad))  # what the kernels must match
    torch.testing.assert_close(loss.double(), ref, equal_nan=True)
    torch.testing.assert_close(grad.double(), ref_grad)
    torch.testing.assert_close(values_grad.double(), ref_values_grad, equal_nan=True)
