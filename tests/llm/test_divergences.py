"""The LLM divergence family against independent float64 formulas written here in probability space
(values and the gradients of student and teacher), dense and top-k teachers, tails, reductions,
masks, dtypes and the LLM conventions (vocab_size, softcap, logit scale, num_items_in_batch)."""

from __future__ import annotations

import math

import pytest
import torch

from kdkernels.llm import DistillLoss, distill_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


# ---------------------------------------------------------------- independent formulas (float64)
def probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(z / temperature - (z / temperature).amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p / q) with 0 log 0 = 0."""
    safe_p = torch.where(p > 0, p, 1.0)
    return torch.where(p > 0, p * torch.log(safe_p / q), 0.0).sum(-1)


def formula(p_t: torch.Tensor, p_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return kl(p_t, p_s)
    if divergence == "reverse_kl":
        return kl(p_s, p_t)
    if divergence == "jsd":
        if beta == 0:
            return kl(p_t, p_s)
        if beta == 1:
            return kl(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if divergence == "skew_forward_kl":
        return kl(p_t, beta * p_t + (1 - beta) * p_s)
    if divergence == "skew_reverse_kl":
        return kl(p_s, beta * p_s + (1 - beta) * p_t)
    return 0.5 * (p_t - p_s).abs().sum(-1)


def reduce(per_position, counted, reduction):
    per_position = per_position * counted
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "batchmean":
        return per_position.sum() / per_position.shape[0]
    return per_position.sum() / counted.sum().clamp_min(1)


def logits(*shape, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-10), atol=kw.get("atol", 1e-12))


# ---------------------------------------------------------------- dense teacher
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_equals_formula(divergence, reduction, masked):
    s, t = logits(3, 5, 11, seed=1), logits(3, 5, 11, seed=2)
    mask = (torch.arange(15).reshape(3, 5) % 3 != 0) if masked else None
    temperature, beta = 1.7, 0.3
    ours = distill_loss(s, t, divergence=divergence, beta=beta, temperature=temperature, mask=mask, reduction=reduction)
    counted = mask.double() if masked else torch.ones(3, 5, dtype=torch.float64)
    want = reduce(formula(probs(t, temperature), probs(s, temperature), divergence, beta) * temperature**2, counted, reduction)
    assert ours.dtype == torch.float64
    assert_close(ours, want)
    weight = torch.randn(ours.shape, dtype=torch.float64) if reduction == "none" else 1.0
    for g_ours, g_want in zip(grads((ours * weight).sum(), s, t), grads((want * weight).sum(), s, t)):
        assert_close(g_ours, g_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_inputs_accumulate_in_float32(dtype, divergence):
    s, t = logits(4, 32, seed=3, dtype=dtype), logits(4, 32, seed=4, dtype=dtype)
    ours = distill_loss(s, t, divergence=divergence, temperature=2.0)
    assert ours.dtype == torch.float32
    s64, t64 = s.detach().double(), t.detach().double()
    want = formula(probs(t64, 2.0), probs(s64, 2.0), divergence, 0.5).sum() * 4 / 4
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = grads(ours, s)
    assert g.dtype == dtype and torch.isfinite(g).all()


def test_scale_by_t2_false_and_temperature():
    s, t = logits(2, 9, seed=5), logits(2, 9, seed=6)
    with_t2 = distill_loss(s, t, temperature=3.0)
    without = distill_loss(s, t, temperature=3.0, scale_by_t2=False)
    assert_close(with_t2, without * 9.0)


@pytest.mark.parametrize("divergence,beta,reduces_to", [("jsd", 0.0, "forward_kl"), ("jsd", 1.0, "reverse_kl"),
                                                       ("skew_forward_kl", 0.0, "forward_kl"), ("skew_reverse_kl", 0.0, "reverse_kl")])
def test_endpoints_reduce_to_the_documented_kls(divergence, beta, reduces_to):
    s, t = logits(4, 13, seed=7), logits(4, 13, seed=8)
    a = distill_loss(s, t, divergence=divergence, beta=beta, temperature=1.3)
    b = distill_loss(s, t, divergence=reduces_to, temperature=1.3)
    assert_close(a, b)
    for ga, gb in zip(grads(a, s, t), grads(b, s, t)):
        assert_close(ga, gb)
    # The mixture form tends to 0 at the ends: the special case is a discontinuity, as TRL's.
    near = distill_loss(s, t, divergence="jsd", beta=1e-9 if beta == 0 else 1 - 1e-9, temperature=1.3)
    if divergence == "jsd":
        assert near.item() < 1e-6 * a.item()


def test_skew_one_is_zero():
    s, t = logits(3, 7, seed=9), logits(3, 7, seed=10)
    for divergence in ("skew_forward_kl", "skew_reverse_kl"):
        assert distill_loss(s, t, divergence=divergence, beta=1.0).item() == 0.0


def test_identical_distributions_give_zero():
    s = logits(3, 7, seed=11)
    for divergence in DIVERGENCES:
        assert abs(distill_loss(s, s.detach().clone(), divergence=divergence).item()) < 1e-14


# ---------------------------------------------------------------- sparse teacher
def topk_of(t: torch.Tensor, k: int, stored_temperature: float = 1.0):
    log_p = torch.log_softmax(t / stored_temperature, -1)
    values, indices = log_p.detach().topk(k, -1)
    return indices, log_p.gather(-1, indices)  # values stay differentiable w.r.t. t


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_topk_equals_formula(divergence, tail):
    s, t = logits(2, 3, 17, seed=12), logits(2, 3, 17, seed=13)
    k, temperature, beta = 5, 1.0, 0.4
    indices, values = topk_of(t, k)
    ours = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail, divergence=divergence,
                        beta=beta, temperature=temperature, reduction="sum")
    P_t, P_s = probs(t, temperature), probs(s, temperature)
    pt_k, ps_k = P_t.gather(-1, indices), P_s.gather(-1, indices)
    if tail == "renormalize":
        p_t, p_s = pt_k / pt_k.sum(-1, keepdim=True), ps_k / ps_k.sum(-1, keepdim=True)
    else:  # the k classes plus one bucket of the rest, from the dense distributions
        outside = torch.ones_like(P_t).scatter(-1, indices, 0.0)
        p_t = torch.cat([pt_k, (P_t * outside).sum(-1, keepdim=True)], -1)
        p_s = torch.cat([ps_k, (P_s * outside).sum(-1, keepdim=True)], -1)
    want = formula(p_t, p_s, divergence, beta).sum()
    assert_close(ours, want, rtol=1e-9)
    g_ours, g_want = grads(ours, s, t), grads(want, s, t)
    for a, b in zip(g_ours, g_want):
        assert_close(a, b, rtol=1e-8, atol=1e-11)
    if tail == "renormalize":  # the student's gradient lives on the k ids only
        assert (g_ours[0].scatter(-1, indices, 0.0) == 0).all()
    else:
        outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, indices, False)
        assert (g_ours[0][outside] != 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", [("renormalize", "logits"), ("renormalize", "logprobs"), ("tail_bucket", "logprobs")])
def test_topk_with_k_equal_v_equals_dense(divergence, mode):
    tail, teacher_values = mode
    s, t = logits(3, 4, 10, seed=14), logits(3, 4, 10, seed=15)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    dense = distill_loss(s, t, divergence=divergence, temperature=2.0, mask=mask, reduction="mean")
    if teacher_values == "logits":
        indices = t.detach().argsort(-1, descending=True)
        values = t.gather(-1, indices)
    else:
        indices, values = topk_of(t, 10)
    sparse = distill_loss(s, teacher_topk=(indices, values), teacher_values=teacher_values, tail=tail,
                          divergence=divergence, temperature=2.0, mask=mask, reduction="mean")
    assert_close(sparse, dense, rtol=1e-9)
    for a, b in zip(grads(sparse, s, t), grads(dense, s, t)):
        assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_retempering_of_stored_logprobs(tail):
    """Log-probs stored at T₀ = 2, used at T = 0.5: with every class stored (and, for the tail
    bucket, at T = T₀), the loss is the dense loss at T."""
    s, t = logits(2, 12, seed=16), logits(2, 12, seed=17)
    indices, values = topk_of(t, 12, stored_temperature=2.0)
    sparse = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail,
                          stored_temperature=2.0, temperature=0.5)
    assert_close(sparse, distill_loss(s, t, temperature=0.5), rtol=1e-9)
    # k < V, tail bucket at T = T₀: exact (formula test above at T = 1); at T ≠ T₀ it differs from
    # the dense truth (the tail's logits are unknown) but stays a finite, non-negative divergence.
    indices, values = topk_of(t, 4, stored_temperature=2.0)
    approx = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail,
                          stored_temperature=2.0, temperature=0.5)
    assert torch.isfinite(approx) and approx >= 0


def test_renormalize_and_tail_bucket_differ_and_bucket_sees_the_tail():
    s, t = logits(4, 30, seed=18), logits(4, 30, seed=19)
    indices, values = topk_of(t, 3)
    renorm = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs")
    bucket = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail="tail_bucket")
    assert abs(renorm.item() - bucket.item()) > 1e-3
    # Moving student mass between two classes outside the top-k changes neither loss.
    outside = torch.ones(4, 30, dtype=torch.bool).scatter(-1, indices, False)
    perm = s.detach().clone()
    for row in range(4):
        cols = outside[row].nonzero().squeeze(1)
        perm[row, cols] = perm[row, cols.flip(0)]
    for tail in ("renormalize", "tail_bucket"):
        a = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail)
        b = distill_loss(perm, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail)
        assert_close(a, b)


def test_topk_padding_rows_are_not_counted():
    """The store pads missing positions with value −inf: such rows are not counted by mean."""
    s, t = logits(2, 4, 9, seed=20), logits(2, 4, 9, seed=21)
    indices, values = topk_of(t, 3)
    values = values.detach().clone()
    values[1, 2:] = float("-inf")
    s_nan = s.detach().clone()
    s_nan[1, 2:] = float("nan")
    s_nan.requires_grad_()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    for tail in ("renormalize", "tail_bucket"):
        got = distill_loss(s_nan, teacher_topk=(indices, values), teacher_values="logprobs", tail=tail, reduction="mean")
        want = distill_loss(s, teacher_topk=(indices, values.detach()), teacher_values="logprobs", tail=tail, mask=mask, reduction="mean")
        assert_close(got, want)
        (g,) = grads(got, s_nan)
        assert (g[1, 2:] == 0).all() and torch.isfinite(g).all()


# ---------------------------------------------------------------- LLM conventions
def test_vocab_size_compares_the_shared_leading_classes():
    s, t = logits(2, 3, 12, seed=22), logits(2, 3, 16, seed=23)
    got = distill_loss(s, t, vocab_size=10, divergence="jsd")
    want = distill_loss(s[..., :10], t[..., :10], divergence="jsd")
    assert_close(got, want)
    g_s, g_t = grads(got, s, t)
    assert (g_s[..., 10:] == 0).all() and (g_t[..., 10:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        distill_loss(s, t)  # different vocabularies without vocab_size


def test_softcap_and_logit_scale():
    s, t = logits(3, 11, seed=24, scale=20.0), logits(3, 11, seed=25, scale=20.0)
    got = distill_loss(s, t, softcap=(30.0, 50.0), logit_scale=0.5, divergence="reverse_kl")
    want = distill_loss(30.0 * torch.tanh(s * 0.5 / 30.0), 50.0 * torch.tanh(t * 0.5 / 50.0), divergence="reverse_kl")
    assert_close(got, want)
    for a, b in zip(grads(got, s, t), grads(want, s, t)):
        assert_close(a, b)


def test_masked_vocabulary_stays_excluded_under_softcap():
    s, t = logits(2, 8, seed=26), logits(2, 8, seed=27)
    t_masked = t.detach().clone()
    t_masked[:, 5:] = float("-inf")  # classes the teacher excludes
    got = distill_loss(s, t_masked, softcap=10.0)
    want = formula(probs(10 * torch.tanh(t_masked / 10), 1.0), probs(10 * torch.tanh(s / 10), 1.0), "forward_kl", 0.5)
    # the independent formula maps −inf to −10 (tanh): with the cap, −inf must stay p = 0
    capped_t = torch.where(t_masked == float("-inf"), t_masked, 10 * torch.tanh(t_masked / 10))
    want = formula(probs(capped_t, 1.0), probs(10 * torch.tanh(s / 10), 1.0), "forward_kl", 0.5).sum() / 2
    assert_close(got, want)


def test_labels_ignore_index_is_a_mask():
    s, t = logits(2, 6, 9, seed=28), logits(2, 6, 9, seed=29)
    labels = torch.tensor([[1, 2, -100, 4, -100, 0], [-100, 1, 1, 1, 1, 1]])
    got = distill_loss(s, t, labels=labels, reduction="mean", divergence="tvd")
    want = distill_loss(s, t, mask=labels != -100, reduction="mean", divergence="tvd")
    assert_close(got, want)
    got = distill_loss(s, t, labels=labels, ignore_index=1, reduction="sum")
    assert_close(got, distill_loss(s, t, mask=labels != 1, reduction="sum"))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_num_items_in_batch_makes_accumulation_equal_one_batch(divergence):
    """Hugging Face's convention: two micro-batches, each sum ÷ the global token count, add up to
    the mean over all counted tokens of the full batch (loss and gradients)."""
    s, t = logits(4, 5, 9, seed=30), logits(4, 5, 9, seed=31)
    labels = torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    labels[3, 1:] = -100
    full = distill_loss(s, t, labels=labels, reduction="mean", divergence=divergence)
    n = int((labels != -100).sum())
    halves = sum(
        distill_loss(s[i : i + 2], t[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=torch.tensor(n), divergence=divergence)
        for i in (0, 2)
    )
    assert_close(halves, full)
    for a, b in zip(grads(halves, s, t), grads(full, s, t)):
        assert_close(a, b)
    # an int count, and the reduction does not matter once the count is given
    assert_close(distill_loss(s, t, labels=labels, num_items_in_batch=n, reduction="sum"), distill_loss(s, t, labels=labels, reduction="mean"))


# ---------------------------------------------------------------- non-finite values
def test_minus_inf_and_nan_rules():
    s, t = logits(3, 6, seed=32), logits(3, 6, seed=33)
    s_x, t_x = s.detach().clone(), t.detach().clone()
    t_x[0, 1] = float("-inf")  # excluded teacher class: contributes 0
    s_x[0, 1] = float("-inf")  # where the student also says 0
    s_x[1, 2] = float("-inf")  # the student excludes a class the teacher has: +inf
    t_x[2, :] = float("-inf")  # no teacher distribution: not counted
    s_x.requires_grad_()
    t_x.requires_grad_()
    per = distill_loss(s_x, t_x, reduction="none")
    want0 = kl(probs(t_x[0].detach(), 1.0), probs(s_x[0].detach(), 1.0))
    assert_close(per[0], want0)
    assert per[1].item() == math.inf and per[2].item() == 0.0
    g_s, g_t = grads(per[0] + per[2], s_x, t_x)
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t[[0, 2]]).all() and (g_s[2] == 0).all()
    (g_s1,) = grads(distill_loss(s_x, t_x, reduction="none")[1], s_x)  # +inf loss, finite student gradient p_s − p_t
    assert_close(g_s1[1], probs(s_x[1].detach(), 1.0) - probs(t_x[1].detach(), 1.0))
    # A NaN in a counted row: NaN loss; a NaN in a masked-out row: exactly 0 and zero gradients.
    s_n = s.detach().clone()
    s_n[1, 3] = float("nan")
    s_n.requires_grad_()
    per = distill_loss(s_n, t, reduction="none", divergence="jsd")
    assert per[1].isnan() and not per[0].isnan()
    mask = torch.tensor([True, False, True])
    loss = distill_loss(s_n, t, mask=mask, divergence="jsd")
    (g,) = grads(loss, s_n)
    assert torch.isfinite(loss) and (g[1] == 0).all()


# ---------------------------------------------------------------- bad inputs
def _bad(match, *args, **kwargs):
    with pytest.raises((ValueError, TypeError), match=match):
        distill_loss(*args, **kwargs)


def test_bad_inputs_name_the_argument():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    idx = torch.arange(4).expand(2, 3, 4).contiguous()
    val = torch.randn(2, 3, 4)
    _bad("teacher_topk: k = 9", s, teacher_topk=(torch.arange(9).expand(2, 3, 9), torch.randn(2, 3, 9)))
    _bad(r"teacher_topk: indices must lie in \[0, 8\)", s, teacher_topk=(idx + 5, val))
    _bad(r"teacher_topk: indices must lie in \[0, 6\)", s, teacher_topk=(idx + 3, val), vocab_size=6)
    _bad(r"teacher_topk: indices must lie", s, teacher_topk=(idx - 1, val))
    rep = idx.clone()
    rep[1, 2, 3] = rep[1, 2, 0]
    _bad(r"repeat a class id .*\(1, 2\)", s, teacher_topk=(rep, val))
    distill_loss(s, teacher_topk=(rep, val), check_indices="off")  # opting out skips the check
    # rows that do not count (masked out, or padding with all values −inf) are not checked
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    distill_loss(s, teacher_topk=(rep, val), mask=mask)
    padded = val.clone()
    padded[1, 2] = float("-inf")
    distill_loss(s, teacher_topk=(rep, padded))
    _bad("beta", s, t, divergence="jsd", beta=1.5)
    _bad("beta", s, t, beta=-0.1)
    _bad("beta", s, t, beta=float("nan"))
    _bad("temperature", s, t, temperature=0.0)
    _bad("stored_temperature", s, teacher_topk=(idx, val), stored_temperature=-1.0)
    _bad("divergence", s, t, divergence="kl")
    _bad("tail", s, teacher_topk=(idx, val), tail="bucket")
    _bad("tail: 'tail_bucket' needs teacher_values", s, teacher_topk=(idx, val), tail="tail_bucket")
    _bad("tail: only applies", s, t, tail="tail_bucket")
    _bad("teacher_logits / teacher_topk", s)
    _bad("teacher_logits / teacher_topk", s, t, teacher_topk=(idx, val))
    _bad("teacher_topk: indices must be an integer", s, teacher_topk=(val, val))
    _bad("teacher_topk: values of shape", s, teacher_topk=(idx, val[..., :3]))
    _bad("teacher_topk: indices of shape", s, teacher_topk=(idx[0], val[0]))
    _bad("teacher_logits: expected leading shape", s, t[:1])
    _bad("student_logits: expected a floating", s.long(), t)
    _bad("mask", s, t, mask=torch.ones(2, 3))
    _bad("labels", s, t, labels=torch.zeros(2, 4, dtype=torch.long))
    _bad("reduction", s, t, reduction="avg")
    _bad("num_items_in_batch", s, t, num_items_in_batch=0)
    _bad("num_items_in_batch", s, t, num_items_in_batch=3, reduction="none")
    _bad("vocab_size", s, t, vocab_size=9)
    _bad("softcap", s, t, softcap=-1.0)
    _bad("check_indices", s, teacher_topk=(idx, val), check_indices="maybe")


def test_module_forwards_its_configuration():
    s, t = logits(2, 4, 7, seed=34), logits(2, 4, 7, seed=35)
    module = DistillLoss("skew_reverse_kl", beta=0.2, temperature=1.5, reduction="sum")
    assert_close(module(s, t), distill_loss(s, t, divergence="skew_reverse_kl", beta=0.2, temperature=1.5, reduction="sum"))
    assert "skew_reverse_kl" in repr(module)


def test_device_mismatch_is_named():
    s = torch.randn(2, 5)
    _bad("teacher_logits: expected device", s, torch.randn(2, 5, device="meta"))
    idx = torch.zeros(2, 1, dtype=torch.long)
    _bad("teacher_topk: values on meta", s, teacher_topk=(idx, torch.randn(2, 1, device="meta")))
    _bad("labels: expected device", s, torch.randn(2, 5), labels=torch.zeros(2, dtype=torch.long, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the accelerator paths of check_indices)")
def test_index_checks_on_cuda():
    s = torch.randn(2, 8, device="cuda")
    idx = torch.tensor([[0, 9], [1, 2]], device="cuda")
    val = torch.randn(2, 2, device="cuda")
    _bad(r"indices must lie in \[0, 8\)", s, teacher_topk=(idx, val))  # "sync": one host read, a ValueError
    good = torch.tensor([[0, 3], [1, 2]], device="cuda")
    want = distill_loss(s.cpu(), teacher_topk=(good.cpu(), val.cpu()))
    got = distill_loss(s, teacher_topk=(good, val), check_indices="async")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("source", ["dense", "renormalize", "tail_bucket"])
@pytest.mark.parametrize("beta", [0.0, 0.35, 1.0])
def test_closed_form_student_gradient_equals_autograd(divergence, source, beta):
    """The per-element gradient formulas a fused kernel will accumulate (bucket_gradient,
    student_logit_gradient) equal autograd through the reference."""
    from kdkernels.ops.reference.divergences import bucket_gradient, sparse_log_probs, student_logit_gradient

    if divergence == "tvd" and beta != 0.35:
        pytest.skip("β does not enter tvd")
    s, t = logits(3, 4, 19, seed=40), logits(3, 4, 19, seed=41)
    temperature = 1.6
    if source == "dense":
        loss = distill_loss(s, t, divergence=divergence, beta=beta, temperature=temperature, scale_by_t2=False, reduction="sum")
        log_p_t = torch.log_softmax(t.detach() / temperature, -1)
        log_p_s = torch.log_softmax(s.detach() / temperature, -1)
        indices = None
    else:
        indices, values = topk_of(t, 6)
        values = values.detach()
        loss = distill_loss(s, teacher_topk=(indices, values), teacher_values="logprobs", tail=source, divergence=divergence,
                            beta=beta, temperature=temperature, scale_by_t2=False, reduction="sum")
        log_p_t, log_p_s = sparse_log_probs(s.detach(), indices, values, temperature=temperature, tail=source,
                                            teacher_values="logprobs", stored_temperature=1.0)
    # skew_forward_kl at β = 1 is KL(p_t ‖ p_t): no path to the student, a zero gradient
    autograd = grads(loss, s)[0] if loss.requires_grad else None
    if autograd is None:
        autograd = torch.zeros_like(s)
    g = bucket_gradient(log_p_t, log_p_s, divergence, beta)
    closed = student_logit_gradient(s.detach(), g, temperature, indices, source)
    assert_close(closed, autograd, rtol=1e-9, atol=1e-12)
