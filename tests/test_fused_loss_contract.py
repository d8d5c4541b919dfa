"""The contract every fused loss meets, one test per clause, driven by the table of
``tests/fused_losses.py`` (one row per loss: its declaration, input makers per layout, the public
call and the float64 reference). A new loss gets all of it by adding its row.

Clauses: values and gradients equal the float64 reference on every backend, layout, reduction,
mask and dtype; inputs that do not require grad get none; gradcheck in float64; ``opcheck`` of
the op and of the extension's kernel op; ``torch.compile(fullgraph=True)`` equals eager;
bitwise repeatable; ``retain_graph`` repeats the gradient and ``grad_output`` scales it; the
fused backward allocates no more than the gradient and copies nothing; autocast does not lower
the fused precision; the forward reads no tensor value on the host; double backward equals the
torch backend's. The GPU variants (marked ``gpu``) run opcheck, compile and peak memory on CUDA
tensors with the ``triton`` and ``cuda`` backends.

Per-loss files keep what only that loss has (its math edge cases, layouts, module, API errors);
bad inputs are the table of ``test_bad_inputs_contract.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import kdkernels
from kdkernels.ops.fused_loss import FusedLoss
from tests.fused_losses import BY_NAME, LOSSES, Case, loss_and_grads, make_case
from tests.helpers import (
    HOST_SYNC_OPS,
    RecordOps,
    assert_close_to_reference,
    assert_compiled_matches_eager,
    peak_extra_bytes,
)

def _skip_unless_runnable(backend: str, device: str = "cpu") -> list:
    reason = kdkernels.backends.why_unavailable(backend, device)
    return [] if reason is None else [pytest.mark.skip(reason=f"backend {backend!r} on {device}: {reason}")]


def grid(axes, backends=("cpu", "triton", "torch"), rows=LOSSES, device="cpu", marks=()):
    """pytest params ``(name, *axis values, backend)`` with ids like ``kd_loss-nchw-mean-cpu``;
    ``axes(row)`` gives the axis values of a row (a list of tuples). A backend that cannot run
    here is a skip that says why."""
    params = []
    for row in rows:
        for values, backend in itertools.product(axes(row), backends):
            if backend != "torch" and backend not in row.spec.kernel_backends:
                continue  # no kernel of that backend for this loss: nothing to test
            ident = "-".join([row.name, *(str(v) for v in values), backend])
            params.append(pytest.param(row.name, *values, backend, marks=[*_skip_unless_runnable(backend, device), *marks], id=ident))
    return params


def _reducing(row) -> str:
    return "sum" if "sum" in row.reductions else row.reductions[0]


def _channels_layout(row) -> str:
    return "channels_last" if "channels_last" in row.layouts else row.layouts[0]


def _diff_function(row, case, reduction):
    """f(*differentiable inputs) -> the public loss, the constants of ``case`` fixed (on the
    backend active where it is called)."""
    constants = case.inputs[case.n_diff :]

    def f(*diff):
        return row.call([*diff, *constants], case, reduction)

    return f


def _on(case: Case, device) -> Case:
    mask = None if case.mask is None else case.mask.to(device)
    return dataclasses.replace(case, inputs=[x.to(device) for x in case.inputs], mask=mask)


def _mask_at_elements(case: Case) -> torch.Tensor:
    """The mask (positions shape) broadcast over the first input's elements."""
    x = case.inputs[0]
    return case.mask.unsqueeze(case.dim % x.dim()).expand(x.shape)


# --- reference parity ------------------------------------------------------------------------


def _parity_axes(row):
    masks = ("masked", "unmasked") if row.has_mask else ("unmasked",)
    return list(itertools.product(row.layouts, row.reductions, masks))


@pytest.mark.parametrize("name,layout,reduction,mask,backend", grid(_parity_axes))
def test_values_and_gradients_match_the_float64_reference(name, layout, reduction, mask, backend):
    row = BY_NAME[name]
    case = make_case(row, layout)
    if mask == "unmasked":
        case.mask = None
    out, grads = loss_and_grads(row, case, reduction, backend, torch.float32)
    want, want_grads = loss_and_grads(row, case, reduction, None)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, want, torch.float32, "loss")
    for x, g, w in zip(case.inputs, grads, want_grads):
        assert g.dtype == x.dtype
        if backend != "torch" and not row.spec.contiguous_grads and layout not in ("strided", "dim0") and name != "kl_div":
            # the kernels read dense inputs in place and write gradients alike (kl_div's inputs are
            # made contiguous; views with classes outermost or strided are copied)
            assert g.stride() == x.stride(), "the gradient does not keep the input's layout"
        assert_close_to_reference(g, w, torch.float32, "gradient")
    if case.mask is not None and not case.mask.all():
        masked_out = ~_mask_at_elements(case)
        assert all((g[masked_out] == 0).all() for g in grads), "a masked-out position got a gradient"
        if reduction == "none":
            assert (out[~case.mask] == 0).all()


DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bfloat16-float32": (torch.bfloat16, torch.float32),  # the first input bf16, the rest fp32
    "float32-float16": (torch.float32, torch.float16),
    "float32-bfloat16": (torch.float32, torch.bfloat16),
    "float64": torch.float64,
}


def _dtypes(spec, n):
    if isinstance(spec, tuple):
        return [spec[0]] + [spec[1]] * (n - 1)
    return [spec] * n


@pytest.mark.parametrize(
    "name,layout,dtype,backend",
    grid(lambda row: list(itertools.product(row.dtype_layouts or dict.fromkeys((row.layouts[0], row.layouts[-1])), DTYPES))),
)
def test_dtypes_match_the_float64_reference_at_their_precision(name, layout, dtype, backend):
    """Low precision accumulates in fp32 (the loss is as close as an fp32 one to the reference on
    the same rounded inputs; gradients come back in each input's dtype); float64 is float64
    accurate, down to its gradient scales and divisors."""
    row = BY_NAME[name]
    case = make_case(row, layout)
    if "temperature" in case.kwargs:
        case.kwargs["temperature"] = 2.0  # a power of two: Triton passes 1/T as an fp32 scalar
    dtypes = _dtypes(DTYPES[dtype], len(case.inputs))
    case = case.rounded(dtypes)
    reduction = "mean"  # a divisor and a gradient scale, both in the accumulation dtype
    out, grads = loss_and_grads(row, case, reduction, backend, dtypes)
    want, want_grads = loss_and_grads(row, case, reduction, None)
    if dtype == "float64":
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
        for g, w in zip(grads, want_grads):
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        return
    if row.keeps_input_dtype:  # torch's result dtype (accumulated in fp32 inside)
        assert out.dtype == torch.promote_types(*dtypes[:2])
        assert_close_to_reference(out, want, out.dtype, "loss")
    else:  # fp32 accumulation: as close as an fp32 loss
        assert out.dtype == torch.float32
        assert_close_to_reference(out, want, torch.float32, "loss")
    for g, w, d in zip(grads, want_grads, dtypes):
        assert g.dtype == d
        assert_close_to_reference(g, w, d, "gradient")


@pytest.mark.parametrize("name,backend", grid(lambda row: [()]))
def test_only_the_inputs_that_require_grad_get_one(name, backend):
    """A frozen (detached) teacher gets no gradient and leaves the student's unchanged; inputs the
    loss does not differentiate (the teacher of a feature or box regression) get none even when
    they require one."""
    row = BY_NAME[name]
    case = make_case(row, row.layouts[0])
    reduction = _reducing(row)
    with kdkernels.use_backend(backend):
        everything = case.leaves()
        everything[1].requires_grad_()
        row.call(everything, case, reduction).backward()
        only_first = case.leaves()
        teacher = only_first[1].requires_grad_()
        if case.n_diff > 1:
            frozen = [only_first[0], teacher.detach(), *only_first[2:]]
        else:  # teacher, target, margin: not differentiated even when they ask
            frozen = [only_first[0], *(x.requires_grad_(x.is_floating_point()) for x in only_first[1:])]
        row.call(frozen, case, reduction).backward()
    assert only_first[0].grad.abs().sum() > 0
    torch.testing.assert_close(only_first[0].grad, everything[0].grad)
    assert all(x.grad is None for x in only_first[1:])
    if case.n_diff > 1:
        assert everything[1].grad is not None and everything[1].grad.abs().sum() > 0
    else:
        assert everything[1].grad is None


# --- gradcheck, opcheck, torch.compile ------------------------------------------------------------

GRADCHECK_ROWS = [row for row in LOSSES if row.no_gradcheck is None]


def _tiny_float64(row):
    case = make_case(row, "tiny")
    return case, [x.detach().double().requires_grad_() for x in case.inputs[: case.n_diff]], [
        x.double() if x.is_floating_point() else x for x in case.inputs[case.n_diff :]
    ]


@pytest.mark.parametrize(
    "name,reduction,backend", grid(lambda row: [(r,) for r in row.reductions], ("cpu", "torch"), GRADCHECK_ROWS)
)
def test_gradcheck_float64(name, reduction, backend):
    row = BY_NAME[name]
    case, diff, constants = _tiny_float64(row)
    case = dataclasses.replace(case, inputs=[*diff, *constants])
    with kdkernels.use_backend(backend):
        assert torch.autograd.gradcheck(_diff_function(row, case, reduction), diff)


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("triton",), GRADCHECK_ROWS))
def test_gradcheck_float64_triton(name, backend):
    # interpreted Triton is slow: one tiny case per loss, checked along random directions
    row = BY_NAME[name]
    case, diff, constants = _tiny_float64(row)
    case = dataclasses.replace(case, inputs=[*diff, *constants])
    with kdkernels.use_backend(backend):
        assert torch.autograd.gradcheck(_diff_function(row, case, _reducing(row)), diff, fast_mode=True)


def test_gradcheck_is_waived_only_with_a_reason():
    for row in LOSSES:
        assert row.no_gradcheck is None or len(row.no_gradcheck) > 40, row.name


def _op_inputs(row, case, monkeypatch, device="cpu"):
    """The op's inputs exactly as the public function passes them (views, masks, constants):
    recorded from :meth:`FusedLoss.__call__`, detached."""
    recorded = {}
    original = FusedLoss.__call__

    def record(spec, *inputs, **kwargs):
        if spec is row.spec:
            recorded["inputs"] = inputs
        return original(spec, *inputs, **kwargs)

    monkeypatch.setattr(FusedLoss, "__call__", record)
    with kdkernels.use_backend("torch"):
        row.call(_on(case, device).leaves(), _on(case, device), _reducing(row))
    monkeypatch.undo()
    return [x.detach() if isinstance(x, torch.Tensor) else x for x in recorded["inputs"]]


def _flag_combinations(spec):
    """Every input asks for its gradient; only the first does (or, with one input, none does)."""
    n = len(spec.differentiable)
    return [[True] * n, [True] + [False] * (n - 1) if n > 1 else [False]]


def _without_optionals(spec, inputs):
    """The same inputs with every optional tensor (mask, class weights) left out (None)."""
    return [None if "Optional" in str(p.annotation) else x for p, x in zip(spec.inputs, inputs)]


def _input_variants(spec, inputs):
    without = _without_optionals(spec, inputs)
    return [inputs, without] if any(a is not b for a, b in zip(inputs, without)) else [inputs]


def _opcheck_op(row, case, backend, monkeypatch, device="cpu"):
    spec = row.spec
    recorded = _op_inputs(row, case, monkeypatch, device)
    op = getattr(torch.ops.kdkernels, spec.name)
    for inputs in _input_variants(spec, recorded):
        for reduction, flags in itertools.product((0, 1, 2), _flag_combinations(spec)):
            args = [x.clone().requires_grad_(f) for x, f in zip(inputs, flags)] + inputs[len(flags) :]
            torch.library.opcheck(op, (*args, reduction, 0.5, *flags, backend))


def _opcheck_kernel(row, case, monkeypatch, device="cpu"):
    spec = row.spec
    recorded = _op_inputs(row, case, monkeypatch, device)
    op = getattr(torch.ops.kdkernels, spec.kernel_name)
    grad_scale = torch.full((1,), 0.25, dtype=spec.accumulation_dtype(recorded), device=device)
    for inputs in _input_variants(spec, recorded):
        for reduce, wanted in itertools.product((False, True) if spec.kernel_reduces else (None,), (True, False)):
            flags = [wanted] * len(spec.differentiable)
            torch.library.opcheck(op, (*inputs, grad_scale, *([] if reduce is None else [reduce]), *flags))


def _opcheck_case(row):
    return make_case(row, _channels_layout(row))


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu",)))
def test_opcheck_op(name, backend, monkeypatch):
    """Schema, fake, autograd registration and AOT dispatch of ``kdkernels::<name>``: every
    reduction, both grad-flag combinations, with and without the optional tensors."""
    row = BY_NAME[name]
    _opcheck_op(row, _opcheck_case(row), backend, monkeypatch)


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu",)))
def test_opcheck_kernel_op(name, backend, monkeypatch):
    """The extension's ``kdkernels::<kernel_name>``: schema and fake against the CPU kernel."""
    row = BY_NAME[name]
    _opcheck_kernel(row, _opcheck_case(row), monkeypatch)


def _compile_axes(row):
    return [(r,) for r in dict.fromkeys((row.reductions[0], _reducing(row)))]


def _compiled_equals_eager(row, case, reduction, backend):
    torch._dynamo.reset()
    diff = case.leaves()[: case.n_diff]
    f = _diff_function(row, case, reduction)

    def step(*xs):
        return f(*xs).sum() * 2.0

    assert_compiled_matches_eager(step, diff, diff, backend)


@pytest.mark.parametrize("name,reduction,backend", grid(_compile_axes, ("cpu", "torch")))
def test_compile_fullgraph_matches_eager(name, reduction, backend):
    row = BY_NAME[name]
    _compiled_equals_eager(row, make_case(row, _channels_layout(row)), reduction, backend)


# Under the interpreter the op stays whole (its fake stands in for the kernels, which cannot run on
# fake tensors); on a GPU Inductor gets the Triton kernels themselves
# (test_compile_fullgraph_matches_eager_gpu below).
@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("triton",)))
def test_compile_fullgraph_matches_eager_triton(name, backend):
    row = BY_NAME[name]
    _compiled_equals_eager(row, make_case(row, _channels_layout(row)), _reducing(row), backend)


# --- determinism, retain_graph, memory, host syncs, double backward ----------------------------------


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu", "triton")))
def test_two_runs_give_the_same_bits(name, backend):
    """The kernels reduce in a fixed order (no atomics, a fixed split over threads / programs), at
    a size where the work is split."""
    row = BY_NAME[name]
    case = make_case(row, "large")
    runs = [loss_and_grads(row, case, _reducing(row), backend, torch.float32) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name,backend", grid(lambda row: [()]))
def test_retain_graph_repeats_and_grad_output_scales(name, backend):
    row = BY_NAME[name]
    case = make_case(row, row.layouts[0])
    diff = case.leaves()[: case.n_diff]
    with kdkernels.use_backend(backend):
        loss = _diff_function(row, case, _reducing(row))(*diff)
        first = torch.autograd.grad(loss * 3.0, diff, retain_graph=True)
        second = torch.autograd.grad(loss * 3.0, diff, retain_graph=True)
        third = torch.autograd.grad(loss, diff)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, 3.0 * c)


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu",)))
def test_memory_is_the_gradient(name, backend):
    """Forward + backward take the gradient's memory and a per-position loss, nothing input-sized
    besides; the backward hands the kernel's gradient buffer to ``.grad`` without filling,
    cloning or scaling a copy."""
    row = BY_NAME[name]
    case = make_case(row, "large")
    leaves = case.leaves()
    leaf, rest = leaves[0], [x.detach() for x in leaves[1:]]

    def run():
        leaf.grad = None
        row.call([leaf, *rest], case, _reducing(row)).backward()

    with kdkernels.use_backend(backend):
        run()  # warm up (first calls allocate lazily)
        extra = peak_extra_bytes(run)
        gradient = leaf.numel() * leaf.element_size()
        allowed = gradient + torch.get_num_threads() * row.workspace(case) + (64 << 10)
        assert extra <= allowed, f"peak {extra} B for a {gradient} B gradient"
        leaf.grad = None
        loss = row.call([leaf, *rest], case, _reducing(row))
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
    copies = {"aten::fill_", "aten::zero_", "aten::clone", "aten::copy_", "aten::mul_", "aten::mul", "aten::add_"}
    # (backward() itself fills the one-element grad_output with 1)
    big = [(e.name, e.input_shapes) for e in prof.events() if e.name in copies and any(math.prod(s) > 1 for s in e.input_shapes)]
    assert not big, big


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu", "triton")))
def test_autocast_does_not_lower_the_fused_precision(name, backend):
    # (the torch backend's eager formula follows autocast: its matmuls run in bf16)
    row = BY_NAME[name]
    case = make_case(row, row.layouts[0])
    results = []
    for autocast in (False, True):
        leaves = case.leaves()
        with kdkernels.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = row.call(leaves, case, _reducing(row))
        results.append((loss, *torch.autograd.grad(loss.sum(), leaves[: case.n_diff])))
    assert results[1][0].dtype == results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    for cast, plain in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(cast, plain, rtol=1e-5, atol=1e-7)


SYNC_FREE = [row for row in LOSSES if row.host_reads is None]


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu", "torch"), SYNC_FREE))
def test_forward_reads_no_tensor_value_on_the_host(name, backend):
    # (the rows with ``host_reads`` say why they may: a check of CPU constants)
    row = BY_NAME[name]
    case = make_case(row, row.layouts[0])
    leaves = case.leaves()
    with kdkernels.use_backend(backend), RecordOps() as record:
        row.call(leaves, case, _reducing(row))
    synced = [op for op in record.ops if op._schema.name in HOST_SYNC_OPS]
    assert not synced, synced
    assert any(op.namespace == "kdkernels" for op in record.ops) or backend == "torch"


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("cpu", "triton")))
def test_double_backward_equals_the_torch_backend(name, backend):
    """``create_graph=True`` differentiates the op's twin: a gradient penalty reaches the inputs,
    as on the torch backend, never a silent zero."""
    row = BY_NAME[name]
    case, _, constants = _tiny_float64(row)
    results = []
    for b in (backend, "torch"):
        diff = [x.detach().double().requires_grad_() for x in case.inputs[: case.n_diff]]
        f = _diff_function(row, dataclasses.replace(case, inputs=[*diff, *constants]), _reducing(row))
        with kdkernels.use_backend(b):
            (g,) = torch.autograd.grad(f(*diff), diff[:1], create_graph=True)
            assert g.requires_grad
            g.pow(2).sum().backward()
        results.append([torch.zeros_like(x) if x.grad is None else x.grad for x in diff])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in results[0])


# --- on a GPU ------------------------------------------------------------------------------------

GPU_BACKENDS = ("triton", "cuda")
gpu = pytest.mark.gpu


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], GPU_BACKENDS, device="cuda", marks=[gpu]))
def test_opcheck_gpu(name, backend, monkeypatch):
    row = BY_NAME[name]
    _opcheck_op(row, _opcheck_case(row), backend, monkeypatch, "cuda")
    if backend == "cuda":  # the extension's kernel op (Triton's kernels have no op of their own)
        _opcheck_kernel(row, _opcheck_case(row), monkeypatch, "cuda")


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], GPU_BACKENDS, device="cuda", marks=[gpu]))
def test_compile_fullgraph_matches_eager_gpu(name, backend):
    row = BY_NAME[name]
    _compiled_equals_eager(row, _on(make_case(row, _channels_layout(row)), "cuda"), _reducing(row), backend)


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], GPU_BACKENDS, device="cuda", marks=[gpu]))
def test_peak_memory_is_the_gradient_gpu(name, backend):
    row = BY_NAME[name]
    case = _on(make_case(row, "large"), "cuda")
    leaf = case.leaves()[0].detach().requires_grad_()
    rest = [x.detach() for x in case.leaves()[1:]]
    with kdkernels.use_backend(backend):
        row.call([leaf, *rest], case, _reducing(row)).backward()  # warm up
        leaf.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row.call([leaf, *rest], case, _reducing(row)).backward()
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradient = leaf.numel() * leaf.element_size()
    assert extra <= gradient * 1.01 + (1 << 20), f"peak {extra} B for a {gradient} B gradient"


def _triton_kernel_names(spec: FusedLoss) -> set[str]:
    """Names of the ``@triton.jit`` functions defined in the loss's Triton launcher module."""
    import importlib

    from tests.test_triton_kernel_sources import jit_functions

    return set(jit_functions(importlib.import_module(f"kdkernels.ops.triton.{spec.name}")))


@pytest.mark.parametrize("name,backend", grid(lambda row: [()], ("triton",), device="cuda", marks=[gpu]))
def test_inductor_compiles_the_triton_kernels_themselves(name, backend):
    """Deliverable of issue 11: with the Triton backend on a GPU, the code Inductor generates
    launches the loss's own Triton kernels (``wrap_triton``), not the opaque op."""
    from torch._inductor.utils import run_and_get_code

    row = BY_NAME[name]
    case = _on(make_case(row, _channels_layout(row)), "cuda")
    diff = case.leaves()[: case.n_diff]
    f = _diff_function(row, case, _reducing(row))
    torch._dynamo.reset()
    with kdkernels.use_backend(backend):
        _, codes = run_and_get_code(torch.compile(lambda *xs: f(*xs).sum(), fullgraph=True), *diff)
    code = "\n".join(codes)
    kernels = _triton_kernel_names(row.spec)
    assert kernels and any(k in code for k in kernels), f"none of {sorted(kernels)} in Inductor's code"
    assert f"kdkernels.{row.spec.name}.default" not in code, "the op was kept whole"
