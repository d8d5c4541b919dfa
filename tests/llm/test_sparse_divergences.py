"""``distill_loss`` with a sparse (top-k) teacher runs through the fused op
``kdkernels::sparse_divergences`` (CPU C++, Triton through its interpreter, and the torch twin):
values, the student's gradient and the values' gradient equal the float64 reference
(:mod:`kdkernels.ops.reference.divergences`, itself checked against independent formulas in
``test_divergences.py``) for every divergence × tail, reductions, masks, padding rows, dtypes, −inf
and NaN logits; k = V equals the dense loss; the op passes opcheck and compiles with fullgraph;
its peak extra memory is the student's gradient plus O(N·k)."""

import itertools

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss
from kdkernels.ops.reference.divergences import distill_loss_reference
from kdkernels.ops.sparse_divergences import SPARSE_DIVERGENCES
from tests.conftest import backend_params
from tests.helpers import assert_compiled_matches_eager, peak_extra_bytes

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
BACKENDS = backend_params("cpu", ("cpu", "triton", "torch"))
KERNEL_BACKENDS = backend_params("cpu", ("cpu", "triton"))


def _reference(s, topk, **kw):
    full = dict(tail="renormalize", teacher_values="logits", stored_temperature=1.0, scale_by_t2=True, reduction="batchmean")
    full.update(kw)
    for pair in ("softcap", "logit_scale"):
        value = kw.get(pair)
        full[pair] = value if isinstance(value, tuple) else (value, value)
    return distill_loss_reference(s, teacher_topk=topk, **full)


def _case(n=(2, 5), vocab=23, k=5, seed=0, dtype=torch.float64, values_dtype=None, id_range=None):
    """Student logits, distinct top-k ids (among the first ``id_range`` classes) of another
    distribution, and its full-vocabulary log-probs there (what a store holds); position (0, 1) is
    padding (all −inf values)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*n, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(*n, vocab, generator=g, dtype=torch.float64) * 2
    log_p, ids = teacher.log_softmax(-1)[..., : id_range or vocab].topk(k, -1)
    # shuffle the order of the k entries: the kernels must not assume a sorted top-k
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(ids[..., 0].numel())]).reshape(ids.shape)
    ids, log_p = ids.gather(-1, perm), log_p.gather(-1, perm)
    log_p[0, 1] = float("-inf")
    mask = torch.rand(*n, generator=g) > 0.25
    mask[0, 0] = True
    return s, ids, log_p.to(values_dtype or dtype), mask


def _loss_and_grads(fn, s, ids, values, **kw):
    s = s.detach().clone().requires_grad_()
    values = values.detach().clone().requires_grad_()
    loss = fn(s, (ids, values), **kw)
    g_s, g_v = torch.autograd.grad(loss.sum(), (s, values), allow_unused=True)
    return loss, (torch.zeros_like(s) if g_s is None else g_s), (torch.zeros_like(values) if g_v is None else g_v)


def _ours(backend):
    def run(s, topk, **kw):
        with kdkernels.use_backend(backend):
            return distill_loss(s, teacher_topk=topk, **kw)

    return run


def _assert_matches(backend, s, ids, values, rtol=1e-9, atol=1e-11, **kw):
    ours = _loss_and_grads(_ours(backend), s, ids, values, **kw)
    ref = _loss_and_grads(_reference, s.double(), ids, values.double(), **kw)
    for name, a, b in zip(("loss", "student grad", "values grad"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ float64 parity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,teacher_values", [("renormalize", "logits"), ("renormalize", "logprobs"), ("tail_bucket", "logprobs")])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_the_reference(divergence, tail, teacher_values, backend):
    s, ids, values, mask = _case(vocab=23, k=5)
    kw = dict(
        divergence=divergence, beta=0.3, temperature=1.7, tail=tail, teacher_values=teacher_values,
        stored_temperature=1.3, mask=mask, reduction="sum",
        softcap=(6.0, 4.0) if teacher_values == "logits" else (6.0, None), logit_scale=(0.9, 1.2),
    )
    _assert_matches(backend, s, ids, values, **kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence,beta", list(itertools.product(("jsd", "skew_forward_kl", "skew_reverse_kl"), (0.0, 1.0))))
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_beta_endpoints_match_the_reference(divergence, beta, tail, backend):
    s, ids, values, mask = _case(vocab=17, k=4, seed=1)
    _assert_matches(backend, s, ids, values, divergence=divergence, beta=beta, tail=tail, teacher_values="logprobs", mask=mask, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "items", "items_tensor"])
def test_reductions(reduction, backend):
    s, ids, values, mask = _case(seed=2, id_range=20)  # a padded student vocabulary: 20 of 23 compared
    kw = dict(divergence="jsd", tail="tail_bucket", teacher_values="logprobs", mask=mask, vocab_size=20, temperature=2.0)
    if reduction.startswith("items"):
        kw.update(reduction="sum", num_items_in_batch=7 if reduction == "items" else torch.tensor(7.0))
    else:
        kw.update(reduction=reduction)
    ours = _loss_and_grads(_ours(backend), s, ids, values, **kw)
    ref_kw = dict(kw)
    if isinstance(ref_kw.get("num_items_in_batch"), torch.Tensor):
        ref_kw["num_items_in_batch"] = 7
    ref = _loss_and_grads(_reference, s, ids, values, **ref_kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_mean_counts_only_positions_with_teacher_mass():
    s, ids, values, _ = _case(seed=3)
    with kdkernels.use_backend("cpu"):
        mean = distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs", reduction="mean")
        per_position = distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs", reduction="none")
    assert per_position[0, 1] == 0  # the padding row
    torch.testing.assert_close(mean, per_position.sum() / 9)


def test_labels_mask_positions():
    s, ids, values, _ = _case(seed=4)
    labels = torch.tensor([[1, -100, 3, 4, -100], [0, 1, 2, -100, 4]])
    with kdkernels.use_backend("cpu"):
        ours = distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs", tail="tail_bucket", labels=labels, reduction="none")
    ref = _reference(s, (ids, values), teacher_values="logprobs", tail="tail_bucket", mask=labels != -100, reduction="none")
    torch.testing.assert_close(ours, ref)
    assert (ours[labels == -100] == 0).all()


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,values_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_low_precision_matches_float64_on_the_same_inputs(tail, dtype, values_dtype, backend):
    s, ids, values, mask = _case(vocab=300, k=8, seed=5, dtype=dtype, values_dtype=values_dtype)
    kw = dict(divergence="forward_kl", tail=tail, teacher_values="logprobs", mask=mask, reduction="sum", temperature=1.5)
    loss, g_s, g_v = _loss_and_grads(_ours(backend), s, ids, values, **kw)
    assert loss.dtype == torch.float32 and g_s.dtype == dtype and g_v.dtype == values_dtype
    ref = _loss_and_grads(_reference, s.double(), ids, values.double(), **kw)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    grad_tol = 1e-2 if dtype == torch.bfloat16 or values_dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(g_s.double(), ref[1], rtol=grad_tol, atol=grad_tol * 1e-2)
    torch.testing.assert_close(g_v.double(), ref[2], rtol=grad_tol, atol=grad_tol * 1e-2)


def test_float32_long_vocabulary_tail_is_accurate():
    # A confident student: the top-k hold almost all its mass, so its tail is tiny; the kernel sums
    # the tail over the complement (no 1 − Σ p cancellation) and matches float64 closely.
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, 5000, generator=g)
    ids = torch.stack([torch.randperm(5000, generator=g)[:16] for _ in range(4)])
    s.scatter_(-1, ids, 20.0 + torch.randn(4, 16, generator=g))
    values = torch.randn(4, 16, generator=g).log_softmax(-1) - 1e-3
    kw = dict(tail="tail_bucket", teacher_values="logprobs", reduction="sum", divergence="reverse_kl")
    ours = _loss_and_grads(_ours("cpu"), s, ids, values, **kw)
    ref = _loss_and_grads(_reference, s.double(), ids, values.double(), **kw)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1].double(), ref[1], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_tail_bucket_complement_over_several_blocks(divergence, softcap, dtype, backend):
    # The CPU kernel walks the complement of the top-k in blocks of 2048 classes, with the vectors
    # that hold ids masked lane by lane. V = 4500: two full blocks and a partial one ending in a
    # partial vector. Rows: ids on vector and block edges and the last class; all ids in one
    # vector; a first block that is −inf outside its ids (the complement's sum starts in the second); top-k
    # logits far above the complement (their exponentials at the complement's shift overflow, and
    # must not reach the sum); a maximum that grows block after block (every block rescales).
    V, k = 4500, 11
    g = torch.Generator().manual_seed(12)
    s = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([
        torch.tensor([0, 1, 15, 16, 2047, 2048, 2049, 4095, 4096, 4480, 4499]),
        torch.arange(32, 32 + k),
        torch.tensor([3, 700, 2047, 2100, 2500, 3000, 3333, 4000, 4100, 4200, 4498]),
        torch.randperm(V, generator=g)[:k],
        torch.randperm(V, generator=g)[:k],
    ])
    s[2, :2048] = torch.where(torch.isin(torch.arange(2048), ids[2]), s[2, :2048], float("-inf"))
    s[2, 4400] = 12.0
    s[3].scatter_(0, ids[3], 60.0 + torch.randn(k, generator=g, dtype=torch.float64))
    s[4] = torch.linspace(-30, 10, V, dtype=torch.float64)
    values = (torch.randn(5, k, generator=g, dtype=torch.float64) * 2).log_softmax(-1) - 0.05
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(5)])  # unsorted ids
    ids, values = ids.gather(-1, perm), values.gather(-1, perm)
    # fp32: the complement's coefficient g_tail − Σg·P_tail cancels in JSD (Triton: 1.5e-7 at the
    # row's largest complement gradient, 7e-4)
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-5, 5e-7)
    _assert_matches(backend, s.to(dtype), ids, values.to(dtype), rtol=rtol, atol=atol, tail="tail_bucket",
                    teacher_values="logprobs", reduction="none", divergence=divergence, softcap=softcap)


# ------------------------------------------------------------------ −inf, NaN
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_minus_inf_student_logits_are_exact(tail, backend):
    s, ids, values, mask = _case(seed=7)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s = torch.where(outside & (torch.arange(23) % 4 == 0), float("-inf"), s)  # a masked vocabulary
    _assert_matches(backend, s, ids, values, tail=tail, teacher_values="logprobs", mask=mask, reduction="sum", divergence="jsd")
    loss, g_s, _ = _loss_and_grads(_ours(backend), s, ids, values, tail=tail, teacher_values="logprobs", reduction="sum")
    assert (g_s[s == float("-inf")] == 0).all()
    # a −inf student logit where the teacher has mass: forward KL is +inf, the gradient finite
    s2 = s.clone()
    s2[1, 2, ids[1, 2, 0]] = float("-inf")
    loss, g_s, _ = _loss_and_grads(_ours(backend), s2, ids, values, tail=tail, teacher_values="logprobs", reduction="none")
    assert loss[1, 2] == float("inf") and torch.isfinite(loss[1, [0, 1, 3, 4]]).all()
    assert torch.isfinite(g_s[1, 2]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_in_nan_out(backend):
    s, ids, values, _ = _case(seed=8)
    kw = dict(teacher_values="logprobs", reduction="none")
    outside_id = int(torch.ones(23, dtype=torch.bool).scatter(0, ids[1, 3], False).nonzero()[0])
    s[1, 3, outside_id] = float("nan")  # read by tail_bucket only
    values[1, 0, 2] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    s[1, 4] = float("nan")  # masked out: exact zeros whatever it holds
    for tail in ("renormalize", "tail_bucket"):
        loss, g_s, g_v = _loss_and_grads(_ours(backend), s, ids, values, tail=tail, mask=mask, **kw)
        ref = _reference(s, (ids, values), tail=tail, mask=mask, **kw)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        assert loss[1, 0].isnan() and g_v[1, 0].isnan().any() and g_s[1, 0, ids[1, 0]].isnan().any()
        assert loss[1, 3].isnan() == (tail == "tail_bucket")
        assert loss[1, 4] == 0 and (g_s[1, 4] == 0).all() and (g_v[1, 4] == 0).all()
        assert torch.isfinite(loss[0, [0, 2, 3, 4]]).all()


# ------------------------------------------------------------------ k = V is the dense loss
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_k_equal_v_equals_the_dense_loss(divergence, tail, backend):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3, 4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 12, generator=g, dtype=torch.float64)
    log_p = t.log_softmax(-1)
    ids = torch.stack([torch.randperm(12, generator=g) for _ in range(12)]).reshape(3, 4, 12)
    kw = dict(divergence=divergence, beta=0.4, temperature=1.5)
    with kdkernels.use_backend(backend):
        sparse = distill_loss(s, teacher_topk=(ids, log_p.gather(-1, ids)), tail=tail, teacher_values="logprobs", **kw)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    dense = distill_loss(s, log_p, **kw)
    (g_dense,) = torch.autograd.grad(dense, s)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the op layer
def test_values_gradient_is_provided_and_inputs_without_grad_get_none():
    s, ids, values, mask = _case(seed=10)
    values.requires_grad_()
    with kdkernels.use_backend("cpu"):
        loss = distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs", tail="tail_bucket", mask=mask)
    (g_v,) = torch.autograd.grad(loss, values)
    assert g_v.shape == values.shape and g_v.abs().sum() > 0


def _op_args(tail):
    s, ids, values, mask = _case(n=(1, 3), vocab=13, k=4, seed=11, dtype=torch.float32)
    s3 = s.reshape(3, 13).unsqueeze(-1)
    v3, i3 = values.reshape(3, 4).unsqueeze(-1), ids.reshape(3, 4).unsqueeze(-1)
    return s3, v3, i3, mask.reshape(3, 1), "jsd", 0.3, 1.5, True, tail, "logprobs", 1.2, 5.0, None, 0.9, None


@pytest.mark.skipif("cpu" not in kdkernels.backends.available("cpu"), reason="the extension is not built")
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_opcheck(tail):
    s3, v3, i3, mask, *scalars = _op_args(tail)
    op = torch.ops.kdkernels.sparse_divergences
    for reduction, (fs, fv), with_mask in itertools.product((0, 1, 2), ((True, True), (True, False), (False, False)), (True, False)):
        args = (s3.clone().requires_grad_(fs), v3.clone().requires_grad_(fv), i3, mask if with_mask else None, *scalars)
        torch.library.opcheck(op, (*args, reduction, 0.5, fs, fv, "cpu"))
    kernel = torch.ops.kdkernels.sparse_divergence_rows
    grad_scale = torch.full((1,), 0.25)
    for wanted in (True, False):
        torch.library.opcheck(kernel, (s3, v3, i3, mask, *scalars, grad_scale, wanted, wanted))


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_compile_fullgraph_matches_eager(tail, backend):
    s, ids, values, mask = _case(seed=12, dtype=torch.float32)
    s.requires_grad_()
    values.requires_grad_()

    def step(student, vals):
        return distill_loss(student, teacher_topk=(ids, vals), divergence="skew_reverse_kl", beta=0.2, tail=tail,
                            teacher_values="logprobs", mask=mask, temperature=1.3)

    assert_compiled_matches_eager(step, (s, values), (s, values), backend)


def test_double_backward_goes_through_the_twin():
    s, ids, values, _ = _case(n=(2, 2), vocab=9, k=3, seed=13)
    s.requires_grad_()
    values.requires_grad_()

    def fn(a, v):
        with kdkernels.use_backend("cpu"):
            return distill_loss(a, teacher_topk=(ids, v), teacher_values="logprobs", tail="tail_bucket", divergence="jsd")

    assert torch.autograd.gradgradcheck(fn, (s, values))


# ------------------------------------------------------------------ memory
@pytest.mark.skipif("cpu" not in kdkernels.backends.available("cpu"), reason="the extension is not built")
def test_peak_memory_is_the_student_gradient_plus_o_nk():
    n, vocab, k = 256, 8000, 32
    g = torch.Generator().manual_seed(14)
    s = torch.randn(n, vocab, generator=g, requires_grad=True)
    values, ids = torch.randn(n, vocab, generator=g).log_softmax(-1).topk(k, -1)
    grad_bytes = s.numel() * 4

    def run(backend):
        def once():
            s.grad = None
            with kdkernels.use_backend(backend):
                distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs", tail="tail_bucket").backward()

        return once

    fused = peak_extra_bytes(run("cpu"))
    eager = peak_extra_bytes(run("torch"))
    assert eager > 3 * grad_bytes  # the measurement sees the reference's (N, V) temporaries
    assert fused <= grad_bytes + 64 * n * k + (1 << 16), f"fused peak {fused} B, student gradient {grad_bytes} B"


def test_schemas_follow_from_the_declaration():
    spec = SPARSE_DIVERGENCES
    assert spec.differentiable == ["student", "values"]
    assert spec.kernel_backends == ("triton", "cpu", "cuda")
    inputs = [p.name for p in spec.inputs]
    assert inputs[:4] == ["student", "values", "indices", "mask"]
    flags = ["student_grad", "values_grad"]
    op_schema = spec.op._opoverload._schema
    assert [a.name for a in op_schema.arguments] == inputs + ["reduction", "scale"] + flags + ["backend"]
    if kdkernels._extension.has_extension():
        kernel_schema = torch.ops.kdkernels.sparse_divergence_rows.default._schema
        assert [a.name for a in kernel_schema.arguments] == inputs + ["grad_scale"] + flags
        assert len(kernel_schema.returns) == 3


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_op_with_inner_positions_and_strides(tail, backend):
    # (outer, classes, inner) views with inner > 1 and non-unit class strides (a channels-first
    # map), ids and values as (outer, k, inner) views of (outer, inner, k) tensors: the op equals
    # its twin (the reference), values and both gradients.
    g = torch.Generator().manual_seed(15)
    outer, vocab, inner, k = 2, 19, 3, 4
    student = torch.randn(outer, vocab, inner, generator=g, dtype=torch.float64)
    log_p, ids = torch.randn(outer, inner, vocab, generator=g, dtype=torch.float64).log_softmax(-1).topk(k, -1)
    values, indices = log_p.transpose(1, 2), ids.transpose(1, 2)  # strided (outer, k, inner) views
    mask = torch.rand(outer, inner, generator=g) > 0.3
    scalars = ("reverse_kl", 0.5, 1.4, True, tail, "logprobs", 1.1, None, None, 1.3, None)
    results = []
    for run in (backend, "twin"):
        s = student.clone().requires_grad_()
        v = values.clone().requires_grad_()
        args = (s, v, indices, mask, *scalars)
        if run == "twin":
            loss = SPARSE_DIVERGENCES.reduced_twin(*args, 1, 0.5, True, True, "torch")
        else:
            loss = SPARSE_DIVERGENCES.op(*args, 1, 0.5, True, True, run)[0]
        results.append((loss, *torch.autograd.grad(loss, (s, v))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(
    kdkernels.backends.why_unavailable("triton", "cuda") is not None, reason=str(kdkernels.backends.why_unavailable("triton", "cuda"))
)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_compiled_on_cuda_matches_the_reference(divergence, tail):
    """The Triton kernel compiled for a GPU (the tests above interpret it on CPU tensors), in
    float64 at an LLM-sized vocabulary, top-k ids anywhere in it."""
    s, ids, values, mask = _case(n=(4, 3), vocab=32000, k=32, seed=5)
    kw = dict(divergence=divergence, beta=0.3, temperature=1.7, tail=tail, teacher_values="logprobs", mask=mask.cuda(), reduction="sum")
    _assert_matches("triton", s.cuda(), ids.cuda(), values.cuda(), **kw)
