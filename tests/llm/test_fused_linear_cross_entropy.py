"""``fused_linear_distill_loss(..., labels=, ce_weight=)``: the label cross-entropy of the student's
logits computed in the same row blocks as the divergence (no logits for it either). Against the
float64 formula on materialised logits — ``kd_weight · divergence + ce_weight · CE`` with
``CE = −log softmax(transform(z_s))[label]`` over the student's whole vocabulary — on every backend
that runs here: values and the gradients of hidden states, weights and biases (the teacher's too),
every reduction, masks and ignored labels, a padded vocabulary, soft-capping / scaling, the
recomputing ``reduction="none"`` backward; errors."""

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss, fused_linear_distill_loss
from tests.conftest import backend_params
from tests.helpers import reduce_llm_positions

BACKENDS = backend_params("cpu", ("cpu", "triton", "torch"))


def _heads(seed, vs=19, vt=21, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad):
        return (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(grad)

    student = [randn(2, 7, 5, grad=True), randn(vs, 5, grad=True), randn(vs, grad=True)]
    teacher = [randn(2, 7, 6, grad=teacher_grad), randn(vt, 6, grad=teacher_grad), randn(vt, grad=teacher_grad)]
    labels = torch.randint(0, vs, (2, 7), generator=g)
    labels[0, :2] = -100
    labels[1, 6] = -100
    return student, teacher, labels


def _expected(student, teacher, labels, *, kd_weight=1.0, ce_weight=0.0, mask=None, reduction="batchmean",
              num_items_in_batch=None, vocab_size=None, softcap=None, logit_scale=None, **kw):
    """Materialised float64 logits: the reference divergence plus a direct cross-entropy."""
    (h_s, w_s, b_s), (h_t, w_t, b_t) = student, teacher
    z_s, z_t = h_s @ w_s.T + b_s, h_t @ w_t.T + b_t
    with kdkernels.use_backend("torch"):
        kd = distill_loss(z_s, z_t, labels=labels, mask=mask, reduction="none", vocab_size=vocab_size,
                          softcap=softcap, logit_scale=logit_scale, **kw)
    z = z_s
    s_scale = logit_scale[0] if isinstance(logit_scale, tuple) else logit_scale
    s_cap = softcap[0] if isinstance(softcap, tuple) else softcap
    if s_scale is not None:
        z = z * s_scale
    if s_cap is not None:
        z = s_cap * torch.tanh(z / s_cap)
    counted = labels != -100
    if mask is not None:
        counted = counted & mask
    log_z = torch.logsumexp(z, -1)
    picked = z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = torch.where(counted, log_z - picked, torch.zeros_like(log_z))
    per_position = kd_weight * kd + ce_weight * ce
    return reduce_llm_positions(per_position, counted, reduction, num_items_in_batch)


def _compare(student, teacher, labels, backend, **kw):
    leaves = [x for x in (*student, *teacher) if x.requires_grad]
    with kdkernels.use_backend(backend):
        ours = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], labels=labels, **kw)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(99), dtype=ours.dtype)
    ours_grads = torch.autograd.grad((ours * weights).sum(), leaves)
    kw.pop("chunk_rows", None)
    expected = _expected(student, teacher, labels, **kw)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    for a, e in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items"])
def test_cross_entropy_joins_the_divergence(reduction, backend):
    """Padded vocabularies (19 vs 21, the divergence over 17 classes, the CE over all 19), a mask
    on top of ignored labels, the student soft-capped, 14 positions in blocks of 4."""
    student, teacher, labels = _heads(1)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(2)) > 0.2
    kw = dict(divergence="jsd", beta=0.3, temperature=1.7, mask=mask, vocab_size=17, softcap=(4.0, None),
              kd_weight=0.7, ce_weight=0.4, chunk_rows=4)
    if reduction == "items":
        kw.update(reduction="sum", num_items_in_batch=11)
    else:
        kw.update(reduction=reduction)
    _compare(student, teacher, labels, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5)])
def test_teacher_gradients_scaling_and_one_block(divergence, beta, backend):
    student, teacher, labels = _heads(3, vs=23, vt=23, teacher_grad=True)
    _compare(student, teacher, labels, backend, divergence=divergence, beta=beta, temperature=2.0,
             logit_scale=(0.7, 1.3), ce_weight=1.5, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_alone(backend):
    """kd_weight = 0: the loss is the cross-entropy (torch's), the teacher gets no gradient."""
    student, teacher, labels = _heads(4, vs=19, vt=19, teacher_grad=True)
    with kdkernels.use_backend(backend):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], student[2], teacher[2], labels=labels,
                                         kd_weight=0.0, ce_weight=1.0, reduction="mean", chunk_rows=3)
    logits = student[0] @ student[1].T + student[2]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 19), labels.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    got = torch.autograd.grad(loss, [*student, *teacher])
    want = torch.autograd.grad(expected, student)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)
    assert all(float(g.abs().max()) == 0.0 for g in got[3:])


def test_a_second_backward_recomputes_the_cross_entropy():
    student, teacher, labels = _heads(5, vs=19, vt=19)
    with kdkernels.use_backend("cpu"):
        loss = fused_linear_distill_loss(*student[:2], *teacher[:2], labels=labels, ce_weight=0.5, chunk_rows=4)
    first = torch.autograd.grad(loss, student[:2], retain_graph=True)
    second = torch.autograd.grad(loss, student[:2], grad_outputs=torch.tensor(3.0, dtype=loss.dtype))
    for a, b in zip(first, second):
        torch.testing.assert_close(3 * a, b, rtol=1e-12, atol=1e-14)


def test_bad_weights_and_labels_name_the_argument():
    student, teacher, labels = _heads(6, vs=19, vt=19)
    h_s, w_s, _ = (x.detach() for x in student)
    h_t, w_t, _ = (x.detach() for x in teacher)
    with pytest.raises(ValueError, match="ce_weight: the label cross-entropy needs labels"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, ce_weight=1.0)
    with pytest.raises(ValueError, match="ce_weight: expected ≥ 0"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=labels, ce_weight=-1.0)
    with pytest.raises(TypeError, match="kd_weight"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=labels, kd_weight="1")
    bad = labels.clone()
    bad[1, 3] = 19
    with pytest.raises(ValueError, match=r"labels: the cross-entropy needs ids in \[0, 19\)"):
        fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=bad, ce_weight=1.0)
    # An out-of-range id at an ignored position does not count.
    bad[1, 3] = -100
    fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=bad, ce_weight=1.0)


def test_compile_fullgraph_with_the_cross_entropy():
    student, teacher, labels = _heads(7, vs=19, vt=19)
    student = [x.detach().float().requires_grad_() for x in student]
    teacher = [x.detach().float() for x in teacher]

    def loss_fn(h, w, b):
        return fused_linear_distill_loss(h, w, teacher[0], teacher[1], b, teacher[2], labels=labels, ce_weight=0.5,
                                         divergence="jsd", beta=0.3, chunk_rows=5)

    results = []  # (loss, gradients) eager, then compiled
    with kdkernels.use_backend("cpu"):
        for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
            loss = fn(*student)
            results.append((loss, *torch.autograd.grad(loss, student)))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager)
