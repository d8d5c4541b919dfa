"""The divergence kernels — Triton (``kdkernels/ops/triton/divergences.py``, interpreted here) and
CPU C++ (``csrc/cpu/divergences.cpp``) — against the float64 reference of the LLM divergence family
(``kdkernels/ops/reference/divergences.py``): per-position values and the gradients of student and
teacher, for every divergence and β endpoint, with masks, −inf teacher logits, temperature, T²
on/off, soft-capping and logit scaling; Triton in its launcher's blocks and in forced small blocks,
the CPU walker in rows of several of its 2048-class blocks (maxima that grow in later blocks);
rows, channels-first maps, strided vocabulary views, float32 / bfloat16 and mixed dtypes.
"""

from __future__ import annotations

import pytest
import torch

from kdkernels.backends import why_unavailable
from kdkernels.ops.reference.divergences import distill_loss_positions


def _runnable(backend):
    why = why_unavailable(backend, "cpu")
    return pytest.mark.skipif(why is not None, reason=str(why))


# (backend, Triton launch block or None): the CPU kernel has one configuration.
TRITON = [pytest.param(("triton", b), marks=_runnable("triton"), id=i)
          for b, i in [(None, "triton"), ((2, 8, 1, False), "triton-p2c8"), ((4, 64, 1, False), "triton-p4c64-reread")]]
CPU = [pytest.param(("cpu", None), marks=_runnable("cpu"), id="cpu")]
KERNELS = TRITON + CPU
SMALL_BLOCK = {"triton": (1, 8, 1, False), "cpu": None}
BACKENDS = [pytest.param("triton", marks=_runnable("triton")), pytest.param("cpu", marks=_runnable("cpu"))]

CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 1.0),
    ("skew_forward_kl", 0.0),
    ("skew_forward_kl", 0.1),
    ("skew_forward_kl", 1.0),
    ("skew_reverse_kl", 0.0),
    ("skew_reverse_kl", 0.3),
    ("skew_reverse_kl", 1.0),
    ("tvd", 0.5),
]
TOL = dict(rtol=1e-9, atol=1e-11, equal_nan=True)  # NaN exactly where the reference has NaN


def _pair(value):
    """(student, teacher) of a softcap / logit-scale argument: a float for both, or a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def divergence_rows(backend):
    """The kernel of ``backend``: the Triton launcher, or the extension's CPU op."""
    if backend == "cpu":
        return torch.ops.kdkernels.divergence_rows
    from kdkernels.ops.triton.divergences import divergence_rows as triton_kernel

    return triton_kernel


def _kernel(s, t, mask, kernel=("triton", None), **kwargs):
    """Runs divergence_rows on classes-last (…, V) logits; returns (loss, grad_s, grad_t) as (…)."""
    from kdkernels.ops.triton import divergences as module

    backend, block = kernel
    s3, t3 = s.reshape(-1, s.shape[-1], 1), t.reshape(-1, t.shape[-1], 1)
    m3 = None if mask is None else mask.reshape(-1, 1)
    args = dict(divergence="forward_kl", beta=0.5, temperature=1.0, scale_by_t2=True, softcap=None, logit_scale=None)
    args.update(kwargs)
    call = lambda: divergence_rows(backend)(  # noqa: E731
        s3, t3, m3, args["divergence"], args["beta"], args["temperature"], args["scale_by_t2"], *_pair(args["softcap"]),
        *_pair(args["logit_scale"]), torch.ones((), dtype=torch.float64), True, True,
    )
    if block is None:
        loss, g_s, g_t = call()
    else:
        original = module._launch_config
        module._launch_config = lambda *a: block
        try:
            loss, g_s, g_t = call()
        finally:
            module._launch_config = original
    return loss.reshape(s.shape[:-1]), g_s.reshape(s.shape), g_t.reshape(t.shape)


def _reference(s, t, mask, **kwargs):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    args = dict(kwargs)
    for name in ("softcap", "logit_scale"):
        value = args.pop(name, None)
        args[name] = value if isinstance(value, tuple) else (value, value)
    per_position, _ = distill_loss_positions(s, t, mask=mask, **args)
    # β = 1 of a skew KL does not use the other model's logits: their gradient is 0.
    g_s, g_t = torch.autograd.grad(per_position.sum(), (s, t), allow_unused=True, materialize_grads=True)
    return per_position.detach(), g_s, g_t


def _logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, v, generator=g, dtype=torch.float64) * scale)


def _check(s, t, mask, kernel, **kwargs):
    loss, g_s, g_t = _kernel(s, t, mask, kernel, **kwargs)
    want, want_s, want_t = _reference(s, t, mask, **kwargs)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(g_s, want_s, **TOL)
    torch.testing.assert_close(g_t, want_t, **TOL)
    return loss, g_s, g_t


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_divergence_matches_reference(divergence, beta, kernel):
    s, t = _logits(5, 37, seed=1)
    s[0, 30] = 25.0  # a maximum that grows in a later block
    t[1, 33] = 30.0
    mask = torch.tensor([True, True, False, True, True])
    s[2] = float("nan")  # masked out: exactly 0, zero gradients
    _check(s, t, mask, kernel, divergence=divergence, beta=beta, temperature=2.0)
    loss, g_s, g_t = _kernel(s, t, mask, kernel, divergence=divergence, beta=beta, temperature=2.0)
    assert loss[2] == 0 and (g_s[2] == 0).all() and (g_t[2] == 0).all()


@pytest.mark.parametrize("kernel", CPU)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_divergence_cpu_walks_several_blocks(divergence, beta, kernel):
    """Rows of 5000 classes: three of the CPU walker's 2048-class blocks, maxima that grow in the
    last one, a teacher whose mass starts in the second, soft-capping on one side."""
    s, t = _logits(3, 5000, seed=8)
    s[0, 4990] = 25.0
    t[1, 4500] = 30.0
    t[2, :2100] = float("-inf")
    _check(s, t, None, kernel, divergence=divergence, beta=beta, temperature=1.3)
    _check(s, t, None, kernel, divergence=divergence, beta=beta, temperature=1.3, softcap=(None, 20.0))


@pytest.mark.parametrize("kernel", [TRITON[0], pytest.param(("triton", (1, 8, 1, False)), marks=_runnable("triton"), id="triton-p1c8")] + CPU)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_divergence_teacher_minus_inf(divergence, beta, kernel):
    """−inf teacher logits are classes with p_t = 0; a row of them only is not counted."""
    s, t = _logits(4, 21, seed=2)
    t[0, :9] = float("-inf")  # the teacher's mass starts in a later block
    t[1, 5] = float("-inf")
    t[3] = float("-inf")  # no teacher distribution: not counted
    s[3, 4] = float("nan")
    loss, g_s, g_t = _check(s, t, None, kernel, divergence=divergence, beta=beta, temperature=0.7)
    assert loss[3] == 0 and (g_s[3] == 0).all() and (g_t[3] == 0).all()
    if divergence in ("reverse_kl",) or (divergence == "jsd" and beta == 1) or (divergence == "skew_reverse_kl" and beta == 0):
        assert loss[:2].isinf().all()  # the student has mass where the teacher has none


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("skew_reverse_kl", 0.1), ("tvd", 0.5)])
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_divergence_transforms_and_t2(divergence, beta, scale_by_t2, backend):
    s, t = _logits(3, 19, seed=3, scale=20.0)
    s[1, 3] = float("-inf")
    _check(s, t, None, (backend, (2, 8, 1, False) if backend == "triton" else None), divergence=divergence, beta=beta,
           temperature=1.5, scale_by_t2=scale_by_t2, softcap=(30.0, 50.0), logit_scale=(0.5, 1.25))
    _check(s, t, None, (backend, None), divergence=divergence, beta=beta, temperature=1.5,
           scale_by_t2=scale_by_t2, softcap=30.0, logit_scale=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_divergence_nan_makes_the_row_nan(divergence, beta, backend):
    s, t = _logits(3, 20, seed=4)
    s[0, 17] = float("nan")
    t[1, 12] = float("nan")
    loss, g_s, g_t = _kernel(s, t, None, (backend, SMALL_BLOCK[backend]), divergence=divergence, beta=beta)
    want, _, _ = _reference(s, t, None, divergence=divergence, beta=beta)
    torch.testing.assert_close(loss, want, **TOL)  # NaN rows as the reference (β = 1 skew: its reference side only)
    assert not loss[2].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_channels_first_and_float32(backend):
    """(outer, classes, inner) maps with inner contiguous, and float32 logits (float32 loss); the
    CPU kernel copies such maps to rows and hands back gradients with the logits' strides."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 13, 6, generator=g)
    t = torch.randn(2, 13, 6, generator=g)
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        loss, g_s, g_t = divergence_rows(backend)(s, t, None, divergence, 0.4, 1.3, True, None, None, None, None, torch.ones(()), True, True)
        assert g_s.stride() == s.stride() and g_t.stride() == t.stride()
        assert loss.dtype == torch.float32
        want, want_s, want_t = _reference(s.double().movedim(1, -1), t.double().movedim(1, -1), None,
                                          divergence=divergence, beta=0.4, temperature=1.3)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_s.double(), want_s.movedim(-1, 1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_t.double(), want_t.movedim(-1, 1), rtol=1e-5, atol=1e-6)


def test_divergence_kernel_compiles_for_a_gpu():
    """Every kind (and the resident mode) compiled for sm_90 down to the cubin, no GPU needed:
    the interpreter accepts code compiled Triton rejects."""
    from tests.test_triton_row_walker import compile_for_sm90, nvidia_backend_installed

    if not nvidia_backend_installed():
        pytest.skip("Triton's NVIDIA backend is not installed")
    result = compile_for_sm90("divergences")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("skew_forward_kl", 0.2), ("tvd", 0.5)])
def test_divergence_vocab_slice_is_a_view(divergence, beta, backend):
    """``vocab_size``: the kernel reads the leading classes of both models through strided views
    (teacher and student rows of different lengths), no copy."""
    s, _ = _logits(4, 40, seed=6)
    _, t = _logits(4, 44, seed=7)
    s_view, t_view = s[:, :37], t[:, :37]
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    block = (2, 16, 1, False) if backend == "triton" else None
    loss, g_s, g_t = _kernel(s_view, t_view, None, (backend, block), divergence=divergence, beta=beta, temperature=1.7)
    want, want_s, want_t = _reference(s, t, None, divergence=divergence, beta=beta, temperature=1.7, vocab_size=37)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(g_s, want_s[:, :37], **TOL)
    torch.testing.assert_close(g_t, want_t[:, :37], **TOL)


@pytest.mark.parametrize("kernel", [pytest.param(("triton", None), marks=_runnable("triton"), id="triton")] + CPU)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_reverse_kl", 0.2), ("tvd", 0.5)])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["bf16", "fp32-bf16", "fp16-fp32"])
def test_divergence_low_precision_and_mixed_dtypes(divergence, beta, dtypes, kernel):
    """bf16 / fp16 logits (fp32 accumulation, fp32 loss) and a student and teacher of different
    dtypes: each gradient in its own logits' dtype, close to the float64 reference of the same
    (rounded) logits."""
    s, t = _logits(4, 300, seed=9)
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    loss, g_s, g_t = _kernel(s, t, None, kernel, divergence=divergence, beta=beta, temperature=1.5, softcap=(None, 8.0))
    assert loss.dtype == torch.float32 and g_s.dtype == s.dtype and g_t.dtype == t.dtype
    want, want_s, want_t = _reference(s.double(), t.double(), None, divergence=divergence, beta=beta, temperature=1.5,
                                      softcap=(None, 8.0))
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    for got, ref in ((g_s, want_s), (g_t, want_t)):
        resolution = 1e-2 if got.dtype == torch.bfloat16 else 1e-3 if got.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got.double(), ref, rtol=resolution, atol=resolution * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wanted", ["student", "teacher"])
@pytest.mark.parametrize("transformed", [False, True])
def test_divergence_one_sided_gradient(divergence, beta, dtype, wanted, transformed, backend):
    """One model's gradient alone (the teacher frozen, the common case; or the student): the CPU
    kernel takes other paths for it (p from pass 1's cached exponentials: the forward KL's student,
    the reverse KL's student), so each is checked against the float64 formula on its own, across
    blocks of the CPU walker (V = 5000 > 2048), with −inf logits and, optionally, transforms."""
    v = 5000 if backend == "cpu" else 40
    s, t = _logits(3, v, seed=11)
    s[0, 7] = float("-inf")
    t[1, 2500 % v] = float("-inf")
    kw = dict(divergence=divergence, beta=beta, temperature=1.7, scale_by_t2=True)
    kw.update(softcap=(30.0, 50.0), logit_scale=(0.5, 1.25)) if transformed else kw.update(softcap=None, logit_scale=None)
    student, teacher = wanted == "student", wanted == "teacher"
    s3, t3 = s.to(dtype).reshape(3, v, 1), t.to(dtype).reshape(3, v, 1)
    loss, g_s, g_t = divergence_rows(backend)(
        s3, t3, None, kw["divergence"], kw["beta"], kw["temperature"], kw["scale_by_t2"], *_pair(kw["softcap"]),
        *_pair(kw["logit_scale"]), torch.ones((), dtype=torch.float64), student, teacher,
    )
    want, want_s, want_t = _reference(s3.double().squeeze(-1), t3.double().squeeze(-1), None, **kw)
    tol = TOL if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-7, equal_nan=True)
    torch.testing.assert_close(loss.double().squeeze(-1), want, **tol)
    got, ref = (g_s, want_s) if student else (g_t, want_t)
    torch.testing.assert_close(got.double().squeeze(-1), ref, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(why_unavailable("triton", "cuda") is not None, reason=str(why_unavailable("triton", "cuda")))
@pytest.mark.parametrize("classes", [37, 5000, 20000], ids=["resident", "two-pass", "long"])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_divergence_triton_compiled_on_cuda(divergence, beta, classes):
    """The Triton kernel compiled for a GPU (the tests above interpret it on CPU tensors), in
    float64 against the reference: resident and two-pass rows, a maximum in the last block, a
    masked row, soft-capping of the teacher."""
    s, t = _logits(3, classes, seed=9)
    s[0, classes - 3] = 25.0
    t[1, classes // 2] = 30.0
    mask = torch.tensor([True, False, True])
    _check(s.cuda(), t.cuda(), mask.cuda(), ("triton", None), divergence=divergence, beta=beta, temperature=1.3, softcap=(None, 20.0))
