"""``distill_loss`` with a dense teacher runs through the fused op ``kdkernels::divergences``: on
every backend that runs here (Triton through its interpreter, the CPU kernel, torch through the
op's twin) it equals the float64 reference, values and both gradients, with masks, −inf teacher
rows, a padded vocabulary, softcaps and every reduction."""

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss
from kdkernels.ops.reference.divergences import distill_loss_reference
from tests.conftest import backend_params

BACKENDS = backend_params("cpu", ("triton", "cpu", "torch"))


def _reference(s, t, **kw):
    full = dict(teacher_topk=None, tail="renormalize", teacher_values="logits", stored_temperature=1.0, scale_by_t2=True)
    full.update(kw)
    full["softcap"] = kw.get("softcap", (None, None))
    full["logit_scale"] = kw.get("logit_scale", (None, None))
    return distill_loss_reference(s, t, **full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items", "items_tensor"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_dense_teacher_matches_the_reference(divergence, reduction, backend):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 19, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 21, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        t[0, 1] = float("-inf")  # a position without a teacher distribution
    mask = torch.rand(2, 5, generator=g) > 0.3
    kw = dict(divergence=divergence, beta=0.3, temperature=1.7, mask=mask, vocab_size=17, softcap=(5.0, None))
    if reduction.startswith("items"):
        items = 7 if reduction == "items" else torch.tensor(7)
        kw.update(reduction="sum", num_items_in_batch=items)
    else:
        kw.update(reduction=reduction)
    with kdkernels.use_backend(backend):
        ours = distill_loss(s, t, **kw)
    ours_grads = torch.autograd.grad(ours.sum(), (s, t))
    ref_kw = dict(kw)
    if "num_items_in_batch" in ref_kw and isinstance(ref_kw["num_items_in_batch"], torch.Tensor):
        ref_kw["num_items_in_batch"] = 7
    expected = _reference(s, t, **ref_kw)
    expected_grads = torch.autograd.grad(expected.sum(), (s, t))
    torch.testing.assert_close(ours, expected)
    for ours_grad, expected_grad in zip(ours_grads, expected_grads):
        torch.testing.assert_close(ours_grad, expected_grad)
