"""The CUDA C++ kernels of the LLM divergences (``csrc/cuda/divergences_kernel.cu``, dense teacher;
``csrc/cuda/sparse_divergences_kernel.cu``, top-k teacher) against the float64 reference
(:mod:`kdkernels.ops.reference.divergences`): per-position losses and the gradients of student and
teacher / values, through ``distill_loss`` with ``backend="cuda"`` (the ops' dispatch and
autograd) and through the kernel ops directly (layouts, non-finite rows, determinism, opcheck);
every divergence and β endpoint, both tails, float64 / float32 / bfloat16 / float16 and mixed
dtypes, masks, temperature, T² on and off, soft-capping and logit scaling. Needs a CUDA device
and an extension built with CUDA kernels: skipped otherwise (``gpu`` marker, as tests/test_gpu.py).
The arithmetic itself also runs on the host without a GPU: csrc/cuda/tests/divergences_test.cu."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.backends import why_unavailable
from kdkernels.functional import distill_loss
from kdkernels.ops.reference.divergences import distill_loss_positions
from tests.llm.test_divergence_kernels import CASES  # every divergence and β endpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or why_unavailable("cuda", "cuda") is not None,
        reason=str(why_unavailable("cuda", "cuda")) if torch.cuda.is_available() else "no CUDA device",
    ),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (loss rtol/atol, gradient error relative to the largest reference gradient, absolute gradient
# error allowed on top) per input dtype: the reference runs in float64 on the same (rounded)
# inputs; the kernels accumulate in float32 (float64 for float64) and store gradients in the
# input's dtype. The absolute part covers nearly one-hot rows, whose gradients are tiny differences
# g − p·Σg of O(1) float32 terms: the same formula run by the CPU kernel on a bf16 skew-KL case of
# this file gave an absolute error of 1e-6 on gradients of at most 7e-8 (float32 cancellation, not a
# wrong formula), so the reduced dtypes (whose rounded inputs make such rows likelier) allow 4e-6.
# The loss of the reduced dtypes allows 4e-5: the reverse-KL rows of test_dense_transforms_and_t2
# (bf16 logits ×20, soft-capped and scaled) gave 2.3e-5 on an H200, where the extension is built
# with --use_fast_math (exponentials whose error grows with |x|) and sums 5003 float32 terms.
TOL = {
    torch.float64: (1e-9, 1e-9, 1e-11),
    torch.float32: (2e-5, 2e-5, 1e-7),
    torch.bfloat16: (4e-5, 1e-2, 4e-6),
    torch.float16: (4e-5, 2e-3, 4e-6),
}


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _reference(s, t=None, topk=None, **kw):
    """Per-position loss and the gradients of its sum, in float64, on CUDA."""
    s = s.detach().double().requires_grad_()
    args = dict(kw)
    for name in ("softcap", "logit_scale"):
        args[name] = _pair(args.get(name))
    if topk is None:
        t = t.detach().double().requires_grad_()
        loss, _ = distill_loss_positions(s, t, **args)
        inputs = (s, t)
    else:
        ids, values = topk
        values = values.detach().double().requires_grad_()
        loss, _ = distill_loss_positions(s, teacher_topk=(ids, values), **args)
        inputs = (s, values)
    grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True, materialize_grads=True)
    return loss.detach(), *grads


def _cuda(s, t=None, topk=None, **kw):
    """The same through distill_loss with backend="cuda" (reduction none)."""
    s = s.detach().clone().requires_grad_()
    if topk is None:
        other = t.detach().clone().requires_grad_()
        call = lambda: distill_loss(s, other, reduction="none", **kw)  # noqa: E731
    else:
        ids, values = topk
        other = values.detach().clone().requires_grad_()
        call = lambda: distill_loss(s, teacher_topk=(ids, other), reduction="none", **kw)  # noqa: E731
    with kdkernels.use_backend("cuda"):
        loss = call()
    grads = torch.autograd.grad(loss.sum(), (s, other), allow_unused=True, materialize_grads=True)
    return loss.detach(), *grads


def _assert_close(ours, ref, dtype, what=""):
    loss_tol, grad_tol, grad_atol = TOL[dtype]
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=loss_tol, atol=loss_tol, equal_nan=True, msg=lambda m: f"{what} loss: {m}")
    for name, a, b in zip(("student grad", "teacher grad"), ours[1:], ref[1:]):
        a = a.double()
        assert a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()), f"{what} {name}: NaN at other places"
        finite = b.isfinite()
        scale = b[finite].abs().max().clamp_min(1e-30) if finite.any() else torch.tensor(1.0, device=b.device)
        err = ((a - b)[finite].abs().max() / (scale + grad_atol / grad_tol)).item() if finite.any() else 0.0
        assert err <= grad_tol, f"{what} {name}: max error {err:.3g} of the largest gradient"


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)
    return s, t


# ------------------------------------------------------------------ dense teacher
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_dense_matches_reference(divergence, beta, dtype):
    s, t = _logits((3, 7, 1000), dtype, seed=1)
    s[0, 1, 999] = 25.0  # a maximum late in the row
    t[1, 2, 500:] = float("-inf")  # teacher classes without mass
    t[2, 3] = float("-inf")  # no teacher distribution: not counted
    mask = torch.rand(3, 7, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)) > 0.3
    mask[2, 3] = mask[0, 1] = True
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, mask=mask)
    ours = _cuda(s, t, **kw)
    ref = _reference(s, t, **kw)
    _assert_close(ours, ref, dtype, f"{divergence} β={beta} {dtype}")
    assert (ours[0][~mask] == 0).all() and (ours[1][~mask] == 0).all() and (ours[2][~mask] == 0).all()
    assert ours[0][2, 3] == 0


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("skew_reverse_kl", 0.1), ("tvd", 0.5)])
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dense_transforms_and_t2(divergence, beta, scale_by_t2, dtype):
    s, t = _logits((4, 5003), dtype, seed=3, scale=20.0)
    if dtype == torch.float64:  # in float32 the teacher's mass there may underflow to 0 (a finite loss)
        s[1, 3] = float("-inf")
    for softcap, logit_scale in (((30.0, 50.0), (0.5, 1.25)), (30.0, None), (None, 2.0)):
        kw = dict(divergence=divergence, beta=beta, temperature=1.5, scale_by_t2=scale_by_t2, softcap=softcap, logit_scale=logit_scale)
        _assert_close(_cuda(s, t, **kw), _reference(s, t, **kw), dtype, f"{divergence} {softcap} {logit_scale}")


@pytest.mark.parametrize("divergence,beta", CASES)
def test_dense_mixed_dtypes_and_llm_vocabulary(divergence, beta):
    """A bfloat16 student against a float32 teacher on 128,256 classes (float32 accumulation)."""
    s, _ = _logits((8, 128_256), torch.bfloat16, seed=4)
    _, t = _logits((8, 128_256), torch.float32, seed=5)
    kw = dict(divergence=divergence, beta=beta, temperature=1.0)
    ours = _cuda(s, t, **kw)
    ref = _reference(s, t, **kw)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        assert ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= 1e-2


def _dense_kernel(s, t, mask=None, divergence="forward_kl", beta=0.5, temperature=1.0, grads=(True, True)):
    acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    return torch.ops.kdkernels.divergence_rows(
        s, t, mask, divergence, beta, temperature, True, None, None, None, None,
        torch.full((1,), 0.5, device="cuda", dtype=acc), *grads,
    )


@pytest.mark.parametrize("divergence,beta", CASES)
def test_dense_kernel_layouts(divergence, beta):
    """(outer, classes, inner) maps with inner contiguous, strided class views and gradients with the
    inputs' strides; each gradient alone."""
    s, t = _logits((2, 13, 6), torch.float64, seed=6)
    loss, g_s, g_t = _dense_kernel(s, t, None, divergence, beta, 1.3)
    ref = _reference(s.movedim(1, -1), t.movedim(1, -1), divergence=divergence, beta=beta, temperature=1.3)
    torch.testing.assert_close(loss, ref[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_s, 0.5 * ref[1].movedim(-1, 1), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_t, 0.5 * ref[2].movedim(-1, 1), rtol=1e-9, atol=1e-11)
    assert g_s.stride() == s.stride() and g_t.stride() == t.stride()
    wide_s, wide_t = _logits((4, 40, 1), torch.float64, seed=7)
    s2, t2 = wide_s[:, ::2], wide_t[:, 1::2]  # class stride 2
    loss2, g_s2, g_t2 = _dense_kernel(s2, t2, None, divergence, beta, 0.8)
    ref2 = _reference(s2.squeeze(-1), t2.squeeze(-1), divergence=divergence, beta=beta, temperature=0.8)
    torch.testing.assert_close(loss2.squeeze(-1), ref2[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_s2.squeeze(-1), 0.5 * ref2[1], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_t2.squeeze(-1), 0.5 * ref2[2], rtol=1e-9, atol=1e-11)
    only_s = _dense_kernel(s, t, None, divergence, beta, 1.3, grads=(True, False))
    only_t = _dense_kernel(s, t, None, divergence, beta, 1.3, grads=(False, True))
    assert torch.equal(only_s[1], g_s) and only_s[2].numel() == 0
    assert torch.equal(only_t[2], g_t) and only_t[1].numel() == 0


@pytest.mark.parametrize("divergence,beta", CASES)
def test_dense_non_finite_rows(divergence, beta):
    s, t = _logits((5, 300, 1), torch.float32, seed=8)
    s[0, 17] = float("nan")
    t[1, 12] = float("nan")
    s[2, 40] = float("inf")
    s[3] = float("-inf")  # the reference's log-softmax of such a row is NaN
    mask = torch.ones(5, 1, dtype=torch.bool, device="cuda")
    loss, g_s, g_t = _dense_kernel(s, t, mask, divergence, beta)
    want = _reference(s.squeeze(-1), t.squeeze(-1), divergence=divergence, beta=beta)[0]
    torch.testing.assert_close(loss.squeeze(-1).double(), want, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert not loss[4].isnan()
    masked = mask.clone()
    masked[:4] = False  # masked out: exactly 0 whatever the rows hold
    loss, g_s, g_t = _dense_kernel(s, t, masked, divergence, beta)
    assert (loss[:4] == 0).all() and (g_s[:4] == 0).all() and (g_t[:4] == 0).all()


def test_dense_bitwise_repeatable():
    s, t = _logits((512, 32_000), torch.bfloat16, seed=9)
    for divergence in ("forward_kl", "jsd", "tvd"):
        first = _dense_kernel(s.unsqueeze(-1), t.unsqueeze(-1), None, divergence, 0.3)
        second = _dense_kernel(s.unsqueeze(-1), t.unsqueeze(-1), None, divergence, 0.3)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------ sparse teacher
def _topk_case(n, vocab, k, dtype, seed, values_dtype=None):
    """Student logits, distinct unsorted top-k ids of another distribution and its full-vocabulary
    log-probs / logits there; position 1 is padding (all −inf values)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.float64) * 2
    log_p, ids = teacher.log_softmax(-1).topk(k, -1)
    perm = torch.argsort(torch.rand(n, k, generator=g, device="cuda"), -1)
    ids, log_p = ids.gather(-1, perm), log_p.gather(-1, perm)
    logits = teacher.gather(-1, ids)
    log_p[1] = float("-inf")
    logits[1] = float("-inf")
    vd = values_dtype or dtype
    return s, ids, log_p.to(vd), logits.to(vd)


TAILS = [("renormalize", "logits"), ("renormalize", "logprobs"), ("tail_bucket", "logprobs")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail,teacher_values", TAILS)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_sparse_matches_reference(divergence, beta, tail, teacher_values, dtype):
    s, ids, log_p, logits = _topk_case(6, 3001, 32, dtype, seed=10)
    values = log_p if teacher_values == "logprobs" else logits
    mask = torch.tensor([True, True, False, True, True, True], device="cuda")
    kw = dict(divergence=divergence, beta=beta, temperature=1.7, tail=tail, teacher_values=teacher_values,
              stored_temperature=1.2 if teacher_values == "logprobs" else 1.0, mask=mask)
    ours = _cuda(s, topk=(ids, values), **kw)
    ref = _reference(s, topk=(ids, values), **kw)
    _assert_close(ours, ref, dtype, f"{divergence} β={beta} {tail} {dtype}")
    assert (ours[0][~mask] == 0).all() and (ours[1][~mask] == 0).all() and (ours[2][~mask] == 0).all()
    assert ours[0][1] == 0 and (ours[1][1] == 0).all()  # padding: no teacher mass


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("skew_forward_kl", 0.1), ("tvd", 0.5)])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_sparse_transforms_mixed_dtypes_and_long_rows(divergence, beta, tail):
    """A row longer than one chunk of the complement's bitmap (131,072 classes), a bfloat16 student
    with float32 log-probs, soft-capping, no T²."""
    s, ids, log_p, _ = _topk_case(3, 140_000, 64, torch.bfloat16, seed=11, values_dtype=torch.float32)
    ids[0, 0] = 139_999  # an id in the second chunk
    kw = dict(divergence=divergence, beta=beta, temperature=1.0, tail=tail, teacher_values="logprobs",
              scale_by_t2=False, softcap=(30.0, None))
    ours = _cuda(s, topk=(ids, log_p), **kw)
    ref = _reference(s, topk=(ids, log_p), **kw)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        assert ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= 1e-2


@pytest.mark.parametrize("divergence,beta", CASES)
def test_sparse_full_k_equals_dense(divergence, beta):
    s, ids, log_p, _ = _topk_case(4, 50, 50, torch.float64, seed=12)
    dense_t = torch.empty_like(log_p).scatter_(-1, ids, log_p)
    kw = dict(divergence=divergence, beta=beta, temperature=1.3)
    dense = _cuda(s, dense_t, **kw)
    for tail in ("renormalize", "tail_bucket"):
        sparse = _cuda(s, topk=(ids, log_p), tail=tail, teacher_values="logprobs", **kw)
        torch.testing.assert_close(sparse[0], dense[0], rtol=1e-9, atol=1e-11, equal_nan=True)
        torch.testing.assert_close(sparse[1], dense[1], rtol=1e-9, atol=1e-11, equal_nan=True)
        torch.testing.assert_close(sparse[2], dense[2].gather(-1, ids), rtol=1e-9, atol=1e-11, equal_nan=True)


def _sparse_kernel(s3, v3, i3, mask, divergence, beta, tail, teacher_values="logprobs", grads=(True, True)):
    acc = torch.float64 if torch.float64 in (s3.dtype, v3.dtype) else torch.float32
    return torch.ops.kdkernels.sparse_divergence_rows(
        s3, v3, i3, mask, divergence, beta, 1.0, True, tail, teacher_values, 1.0, None, None, None, None,
        torch.full((1,), 0.5, device="cuda", dtype=acc), *grads,
    )


@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_sparse_kernel_layouts_and_non_finite(divergence, beta, tail):
    """(outer, k, inner) views with inner > 1 and gradients with the inputs' strides; a NaN student
    logit outside the ids (read by the tail only), masked rows; repeatable bit for bit."""
    s, ids, log_p, _ = _topk_case(6, 37, 5, torch.float64, seed=13)
    s[2, int(torch.isin(torch.arange(37, device="cuda"), ids[2], invert=True).nonzero()[0])] = float("nan")
    s3 = s.reshape(2, 3, 37).transpose(1, 2)  # (outer, classes, inner), inner contiguous
    v3 = log_p.reshape(2, 3, 5).transpose(1, 2)
    i3 = ids.reshape(2, 3, 5).transpose(1, 2)
    loss, g_s, g_v = _sparse_kernel(s3, v3, i3, None, divergence, beta, tail)
    ref = _reference(s, topk=(ids, log_p), divergence=divergence, beta=beta, tail=tail, teacher_values="logprobs")
    torch.testing.assert_close(loss.reshape(6), ref[0], rtol=1e-9, atol=1e-11, equal_nan=True)
    assert g_s.stride() == s3.stride() and g_v.stride() == v3.stride()
    finite = ~ref[0].isnan()
    torch.testing.assert_close(g_s.transpose(1, 2).reshape(6, 37)[finite], 0.5 * ref[1][finite], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_v.transpose(1, 2).reshape(6, 5)[finite], 0.5 * ref[2][finite], rtol=1e-9, atol=1e-11)
    again = _sparse_kernel(s3, v3, i3, None, divergence, beta, tail)
    for a, b in zip((loss, g_s, g_v), again):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    mask = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
    loss, g_s, g_v = _sparse_kernel(s3, v3, i3, mask, divergence, beta, tail)
    assert (loss == 0).all() and (g_s == 0).all() and (g_v == 0).all()


def test_kernel_ops_pass_opcheck():
    s, t = _logits((4, 33, 3), torch.float32, seed=14)
    mask = torch.rand(4, 3, device="cuda") > 0.3
    scale = torch.ones(1, device="cuda")
    torch.library.opcheck(torch.ops.kdkernels.divergence_rows, (s, t, mask, "jsd", 0.3, 1.5, True, 30.0, None, None, 2.0, scale, True, True))
    s2, ids, log_p, _ = _topk_case(4, 40, 6, torch.float32, seed=15)
    torch.library.opcheck(
        torch.ops.kdkernels.sparse_divergence_rows,
        (s2.unsqueeze(-1), log_p.unsqueeze(-1), ids.unsqueeze(-1), None, "tvd", 0.5, 1.0, True, "tail_bucket", "logprobs", 1.0,
         None, None, None, None, scale, True, True),
    )
