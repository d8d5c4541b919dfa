"""``torch.compile(fullgraph=True)`` of the LLM losses, dense and top-k teachers (the top-k index
checks must not break the graph), equals eager in value and gradient."""

import pytest
import torch

from kdkernels.functional import distill_loss, generalized_jsd_loss


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_compile_fullgraph_matches_eager(teacher, divergence):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 40, generator=g, requires_grad=True)
    t = torch.randn(6, 40, generator=g)
    mask = torch.tensor([True, True, False, True, True, True])
    values, ids = t.log_softmax(-1).topk(8, -1)

    def step(student):
        if teacher == "dense":
            return distill_loss(student, t, divergence=divergence, beta=0.3, temperature=2.0, mask=mask)
        return distill_loss(student, teacher_topk=(ids, values), divergence=divergence, beta=0.3, mask=mask)

    eager = step(s)
    (eager_grad,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True)(s)
    (compiled_grad,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_compiled_topk_check_still_rejects_bad_indices():
    s = torch.randn(2, 10)
    values = torch.randn(2, 3).log_softmax(-1)
    ids = torch.tensor([[0, 1, 2], [3, 3, 4]])  # a repeated id
    with pytest.raises(Exception, match="out of range or repeated"):
        torch.compile(lambda a: distill_loss(a, teacher_topk=(ids, values)), fullgraph=True)(s)


def test_generalized_jsd_compiles():
    s, t = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    eager = generalized_jsd_loss(s, t, beta=0.5, temperature=1.0)
    compiled = torch.compile(lambda a, b: generalized_jsd_loss(a, b, beta=0.5, temperature=1.0), fullgraph=True)(s, t)
    torch.testing.assert_close(compiled, eager)
