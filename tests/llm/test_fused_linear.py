"""``fused_linear_distill_loss``: the divergence of two LM heads' logits computed block by block from
hidden states and weights. Against the float64 eager formula (the logits materialised, then the
reference ``distill_loss``) on every backend that runs here: values and the gradients of hidden
states, weights and biases (the teacher's too when they require grad), every divergence and
reduction, masks and labels, differing hidden sizes, a padded vocabulary, soft-capping; blocks
that do not divide the positions; gradcheck; compile; no (N, V) allocation; errors."""

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss, fused_linear_distill_loss
from kdkernels.nn import FusedLinearDistillLoss
from tests.conftest import backend_params
from tests.helpers import assert_compiled_matches_eager, peak_extra_bytes

BACKENDS = backend_params("cpu", ("cpu", "triton", "torch"))
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.1), ("tvd", 0.5)]


def _heads(seed, batch=2, seq=7, hs=5, ht=6, vs=19, vt=21, dtype=torch.float64, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    student = [randn(batch, seq, hs, grad=True), randn(vs, hs, grad=True), randn(vs, grad=True)]
    teacher = [randn(batch, seq, ht, grad=teacher_grad), randn(vt, ht, grad=teacher_grad), randn(vt, grad=teacher_grad)]
    return student, teacher


def _eager(student, teacher, **kw):
    """The materialised logits through the float64 reference."""
    (h_s, w_s, b_s), (h_t, w_t, b_t) = student, teacher
    with kdkernels.use_backend("torch"):
        return distill_loss(h_s @ w_s.T + b_s, h_t @ w_t.T + b_t, **kw)


def _compare(student, teacher, backend, chunk_rows, **kw):
    leaves = [x for x in (*student, *teacher) if x.requires_grad]
    with kdkernels.use_backend(backend):
        ours = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], chunk_rows=chunk_rows, **kw)
    ours_grads = torch.autograd.grad(ours.sum(), leaves)
    expected = _eager(student, teacher, **kw)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    for a, e in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_matches_the_materialised_logits(divergence, beta, reduction, backend):
    student, teacher = _heads(1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 7, generator=g) > 0.3
    kw = dict(divergence=divergence, beta=beta, temperature=1.7, mask=mask, vocab_size=19, softcap=(4.0, None))
    if reduction == "items":
        kw.update(reduction="sum", num_items_in_batch=11)
    else:
        kw.update(reduction=reduction)
    # 14 positions in blocks of 4: the last block is short.
    _compare(student, teacher, backend, 4, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.4), ("tvd", 0.5)])
def test_teacher_gradients_labels_and_one_block(divergence, beta, backend):
    student, teacher = _heads(3, vs=23, vt=23, teacher_grad=True)
    labels = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = -100
    _compare(student, teacher, backend, None, divergence=divergence, beta=beta, temperature=2.0, labels=labels,
             reduction="mean", logit_scale=(0.7, 1.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_heads(backend):
    """bf16 hidden states and weights: bf16 logits per block, fp32 loss, each gradient in its
    tensor's dtype, close to float64 on the same (rounded) values."""
    student, teacher = _heads(5, hs=16, ht=16, vs=40, vt=40, dtype=torch.bfloat16)
    with kdkernels.use_backend(backend):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], divergence="jsd", chunk_rows=5)
    grads = torch.autograd.grad(loss, student)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    student64 = [x.detach().double().requires_grad_() for x in student]
    teacher64 = [x.detach().double() for x in teacher]
    expected = _eager(student64, teacher64, divergence="jsd")
    expected_grads = torch.autograd.grad(expected, student64)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=1e-3)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=5e-2, atol=5e-2 * e.abs().max().item())


def test_gradcheck_and_no_double_backward():
    student, teacher = _heads(6, batch=1, seq=4, hs=3, ht=2, vs=5, vt=5)
    with kdkernels.use_backend("cpu"):
        fn = lambda h, w, b: fused_linear_distill_loss(h, w, teacher[0], teacher[1], b, teacher[2],  # noqa: E731
                                                       divergence="skew_reverse_kl", beta=0.3, chunk_rows=3)
        assert torch.autograd.gradcheck(fn, tuple(student))
        loss = fn(*student)
        (g_h,) = torch.autograd.grad(loss, student[0], create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
            torch.autograd.grad(g_h.sum(), student[0])


def test_compile_fullgraph_and_module():
    student, teacher = _heads(7, dtype=torch.float32)
    module = FusedLinearDistillLoss("jsd", beta=0.3, temperature=2.0, vocab_size=19, chunk_rows=5)
    args = (student[0], student[1], teacher[0], teacher[1], student[2], teacher[2])
    assert_compiled_matches_eager(module, args, student, "cpu")


def test_never_allocates_the_logits():
    """N = 2048 positions, V = 4000: one (N, V) fp32 tensor is 31 MiB. In blocks of 64 rows the
    peak extra memory is the weight and hidden-state gradients plus a few (64, V) blocks."""
    n, h, v = 2048, 32, 4000
    g = torch.Generator().manual_seed(8)
    h_s = torch.randn(n, h, generator=g, requires_grad=True)
    w_s = torch.randn(v, h, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)

    def run():
        with kdkernels.use_backend("cpu"):
            fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", chunk_rows=64).backward()

    run()  # warm up (lazy initialisation)
    h_s.grad = w_s.grad = None
    peak = peak_extra_bytes(run)
    nv = n * v * 4
    gradients = (n * h + v * h) * 4
    assert peak < gradients + 8 * 64 * v * 4 + (1 << 20), f"peak {peak / 2**20:.1f} MiB"
    assert peak < nv / 4


def test_bad_inputs_name_the_argument():
    student, teacher = _heads(9)
    h_s, w_s, b_s = (x.detach() for x in student)
    h_t, w_t, _ = (x.detach() for x in teacher)
    with pytest.raises(ValueError, match="student_weight: hidden size"):
        fused_linear_distill_loss(h_s, w_s[:, :3], h_t, w_t, vocab_size=19)
    with pytest.raises(ValueError, match="teacher_hidden: expected leading shape"):
        fused_linear_distill_loss(h_s, w_s, h_t[:1], w_t, vocab_size=19)
    with pytest.raises(ValueError, match="teacher_weight: a vocabulary of 21 rows"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t)  # 19 vs 21 classes
    with pytest.raises(ValueError, match="vocab_size: expected ≤ 19"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, vocab_size=20)
    with pytest.raises(TypeError, match="student_weight: dtype"):
        fused_linear_distill_loss(h_s, w_s.float(), h_t, w_t, vocab_size=19)
    with pytest.raises(ValueError, match="student_bias"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, b_s[:4], vocab_size=19)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, vocab_size=19, chunk_rows=0)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, vocab_size=19, divergence="jsd", beta=1.5)


def test_a_second_backward_walks_the_blocks_again():
    """The forward's gradients are handed over once (scaled in place); a second backward through
    the same graph (retain_graph) recomputes them, with its own incoming gradient."""
    student, teacher = _heads(10, vs=19, vt=19)
    with kdkernels.use_backend("cpu"):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], divergence="jsd", chunk_rows=4)
    first = torch.autograd.grad(loss, student[:2], retain_graph=True)
    second = torch.autograd.grad(loss, student[:2], grad_outputs=torch.tensor(3.0, dtype=loss.dtype))
    for a, b in zip(first, second):
        torch.testing.assert_close(3 * a, b, rtol=1e-12, atol=1e-14)


def test_a_float64_teacher_gives_a_float64_loss():
    """Mixed heads (float32 student, float64 teacher): the loss accumulates in float64, as
    distill_loss's does for the same logits."""
    student, teacher = _heads(11, vs=19, vt=19, dtype=torch.float32)
    teacher = [x.double() for x in teacher]
    with kdkernels.use_backend("cpu"):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], divergence="jsd", chunk_rows=4)
    assert loss.dtype == torch.float64
    expected = _eager([x.double() for x in student], teacher, divergence="jsd")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
