"""``generalized_jsd_loss`` against TRL's ``GKDTrainer.generalized_jsd_loss``: always against an
independent re-implementation of TRL's formula (written here), and against TRL's own function when
the ``trl`` package is importable. TRL's module imports accelerate / datasets / its trainers, so
the test reads the function's source from TRL's file and runs it alone (no TRL dependency needed
beyond the file itself)."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from kdkernels.llm import GeneralizedJSDLoss, generalized_jsd_loss


def trl_formula(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    """TRL's convention, written independently: mixture β·p_t + (1−β)·p_s in probability space;
    β = 0 → KL(p_t‖p_s), β = 1 → KL(p_s‖p_t); no T²."""
    p_s = torch.softmax(student_logits / temperature, -1)
    p_t = torch.softmax(teacher_logits / temperature, -1)

    def kl_pointwise(p, q):
        return torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, 1.0)) - torch.log(q)), 0.0)

    if beta == 0:
        jsd = kl_pointwise(p_t, p_s)
    elif beta == 1:
        jsd = kl_pointwise(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        jsd = beta * kl_pointwise(p_t, m) + (1 - beta) * kl_pointwise(p_s, m)
    if labels is not None:
        keep = labels != -100
        jsd = jsd[keep]
    if reduction == "batchmean":
        return jsd.sum() / (keep.sum().clamp_min(1) if labels is not None else jsd.shape[0])
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _trl_function():
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    for relative in ("experimental/gkd/gkd_trainer.py", "trainer/gkd_trainer.py"):
        path = os.path.join(list(spec.submodule_search_locations)[0], relative)
        if os.path.exists(path):
            break
    else:
        return None
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
            node.decorator_list = []
            namespace = {"torch": torch, "F": F}
            exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
            return namespace["generalized_jsd_loss"]
    return None


CASES = [(beta, reduction, with_labels) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)
         for reduction in ("batchmean", "sum", "mean", "none") for with_labels in (False, True)]


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = (torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, :2] = -100
    return s, t, labels


def _assert_matches(want_fn, seed, beta, reduction, with_labels, temperature, rtol, grad_rtol):
    """``generalized_jsd_loss`` equals ``want_fn`` (called the same way) on ``_inputs(seed)``: the
    value and the gradients of both logits."""
    s, t, labels = _inputs(seed)
    labels = labels if with_labels else None
    ours = generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    want = want_fn(s, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    torch.testing.assert_close(ours, want, rtol=rtol, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours.sum(), (s, t)), torch.autograd.grad(want.sum(), (s, t))):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=1e-12)


@pytest.mark.parametrize("beta,reduction,with_labels", CASES)
def test_matches_trl_formula(beta, reduction, with_labels):
    _assert_matches(trl_formula, 0, beta, reduction, with_labels, temperature=1.5, rtol=1e-10, grad_rtol=1e-9)


@pytest.mark.parametrize("beta,reduction,with_labels", CASES)
def test_matches_trl_itself(beta, reduction, with_labels):
    trl_loss = _trl_function()
    if trl_loss is None:
        pytest.skip("trl is not installed (the formula test above covers the convention)")
    _assert_matches(trl_loss, 1, beta, reduction, with_labels, temperature=0.7, rtol=1e-9, grad_rtol=1e-8)


def test_beta_direction_is_teacher_first_at_zero():
    """β = 0 must be KL(p_t‖p_s) (the recurring bug is the swapped direction)."""
    s, t, _ = _inputs(2)
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum() / 2
    reverse = (p_s * (p_s.log() - p_t.log())).sum() / 2
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.0), forward)
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=1.0), reverse)
    assert abs(forward.item() - reverse.item()) > 1e-3


def test_module_and_bad_beta():
    s, t, labels = _inputs(3)
    torch.testing.assert_close(GeneralizedJSDLoss(beta=0.3)(s, t, labels), generalized_jsd_loss(s, t, labels, beta=0.3))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, beta=2.0)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_num_items_in_batch(beta):
    s, t, labels = _inputs(4)
    ours = generalized_jsd_loss(s, t, labels, beta=beta, reduction="mean", num_items_in_batch=torch.tensor(7))
    want = trl_formula(s, t, labels, beta=beta, reduction="sum") / 7
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)
    trl_loss = _trl_function()
    if trl_loss is not None:
        torch.testing.assert_close(ours, trl_loss(s, t, labels, beta=beta, reduction="mean", num_items_in_batch=torch.tensor(7)))
