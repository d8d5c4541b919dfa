"""``kl_div`` / ``KLDivLoss`` as drop-ins, checked with PyTorch's own test cases.

Runs the ``nn.functional.kl_div`` OpInfo samples (``common_methods_invocations.op_db``), the
``KLDivLoss`` ModuleInfo inputs (``common_modules.module_db``) and the ``common_nn`` KLDivLoss cases
against ``torch.nn.functional.kl_div`` / ``torch.nn.KLDivLoss``: values (NaN where torch has NaN),
result dtype and shape, and the gradients of input and target. Then hand-made cases for what
those samples do not reach: broadcasting under ``batchmean``, 0-d and 1-d inputs, the legacy
``size_average`` / ``reduce`` arguments with every reduction, half-precision result dtypes, the
warnings, empty inputs, and invalid (negative, NaN, infinite) values.

The one documented deviation (``kl_div``'s docstring, README): the gradient w.r.t. a target of
exactly 0 is 0 where torch's is NaN. Cases that hit it compare everything else and say so.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import kdkernels
import kdkernels.nn as kdnn
from kdkernels.functional import kl_div

# torch's test helpers import expecttest (pip install expecttest); CI installs it.
common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations", reason="torch's OpInfo tables need expecttest"
)
from torch.testing._internal import common_nn  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

ZERO_TARGET_GRADIENT = "documented deviation: the gradient w.r.t. a target of exactly 0 is 0 (torch: NaN)"

# A probability target of +inf is no distribution: the loss is +inf as in torch, but the gradients
# there differ (torch: NaN target gradient from inf - inf inside xlogy's derivative, -inf input
# gradient; here +inf / -inf on the fused kernels, NaN on the reference). Documented in kl_div's
# docstring; strict, so a change of behaviour is reported.
PLUS_INF_TARGET = "documented deviation: gradients at a +inf probability target differ from torch's"


AVAILABLE = kdkernels.backends.available("cpu")
BACKENDS = [name for name in ("cpu", "torch") if name in AVAILABLE]
TRITON = ["triton"] if "triton" in AVAILABLE else []

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad and t.is_floating_point()) for t in tensors]


def assert_drop_in(ours_fn, torch_fn, tensors, *, skip_target_grad: str | None = None, backend: str = "cpu"):
    """``ours_fn(*tensors)`` equals ``torch_fn(*tensors)``: dtype, shape, values (NaN where torch
    has NaN) and the gradients of every tensor that requires grad, under a random weighting of the
    output. ``skip_target_grad`` names the documented deviation that excuses the second tensor's
    gradient.

    With a float16/bfloat16 input the values are compared with torch's float64 result instead,
    at the result dtype's tolerance: torch computes those in half precision (and ``xlogy`` of a
    bfloat16 target in bfloat16 even for a float32 result), the kernels in float32.
    """
    ours_inputs, torch_inputs = _leaves(tensors), _leaves(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kdkernels.use_backend(backend):
            ours = ours_fn(*ours_inputs)
        expected = torch_fn(*torch_inputs)
        assert ours.dtype == expected.dtype, f"dtype {ours.dtype} != torch's {expected.dtype}"
        assert ours.shape == expected.shape, f"shape {tuple(ours.shape)} != torch's {tuple(expected.shape)}"
        result_dtype = expected.dtype
        if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
            torch_inputs = [t.double().detach().requires_grad_(t.requires_grad) for t in torch_inputs]
            expected = torch_fn(*torch_inputs)
    tol = TOLERANCES[result_dtype]
    torch.testing.assert_close(ours.to(expected.dtype), expected, equal_nan=True, **tol, msg=lambda m: f"loss: {m}")
    if not any(t.requires_grad for t in torch_inputs):
        return
    weights = torch.rand(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    wanted = [i for i, t in enumerate(torch_inputs) if t.requires_grad]
    with kdkernels.use_backend(backend):
        ours_loss = (ours * weights.to(ours.dtype)).sum()
        ours_grads = torch.autograd.grad(ours_loss, [ours_inputs[i] for i in wanted], allow_unused=True)
    torch_loss = (expected * weights.to(expected.dtype)).sum()
    torch_grads = torch.autograd.grad(torch_loss, [torch_inputs[i] for i in wanted], allow_unused=True)
    for i, ours_grad, torch_grad in zip(wanted, ours_grads, torch_grads):
        if i == 1 and skip_target_grad:
            continue
        name = "input" if i == 0 else "target"
        assert (ours_grad is None) == (torch_grad is None), f"{name} grad: {ours_grad} vs torch {torch_grad}"
        if torch_grad is not None:
            assert ours_grad.dtype == tensors[i].dtype, f"{name} grad dtype {ours_grad.dtype}"
            tol = TOLERANCES[ours_grad.dtype]
            torch.testing.assert_close(
                ours_grad.to(torch_grad.dtype), torch_grad, equal_nan=True, **tol, msg=lambda m: f"{name} grad: {m}"
            )


# --- PyTorch's OpInfo samples for nn.functional.kl_div ----------------------------------------

KL_DIV_OPINFO = next(op for op in common_methods_invocations.op_db if op.name == "nn.functional.kl_div")


def _opinfo_samples(dtype):
    torch.manual_seed(0)
    samples = list(KL_DIV_OPINFO.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, "torch's OpInfo for nn.functional.kl_div produced no samples"
    return samples


def _sample_id(sample) -> str:
    shape = "x".join(map(str, sample.input.shape)) or "scalar"
    log = "-log_target" if sample.kwargs.get("log_target") else ""
    return f"{shape}-{sample.kwargs.get('reduction', 'mean')}{log}"


def _opinfo_cases(dtypes, backends):
    cases = []
    for dtype in dtypes:
        for sample in _opinfo_samples(dtype):
            for backend in backends:
                name = f"{backend}-{str(dtype).removeprefix('torch.')}-{_sample_id(sample)}"
                tensors = [sample.input, *sample.args]
                cases.append(pytest.param(sample, backend, id=name))
    return cases


def _run_opinfo_sample(sample, backend):
    tensors = [sample.input, *sample.args]

    def ours(input, target):
        return kl_div(input, target, **sample.kwargs)

    def theirs(input, target):
        return KL_DIV_OPINFO.op(input, target, **sample.kwargs)

    # softmax targets are never exactly 0, so no deviation applies to these samples
    assert bool((sample.args[0] != 0).all()) or sample.kwargs.get("log_target")
    assert_drop_in(ours, theirs, tensors, backend=backend)


@pytest.mark.parametrize("sample,backend", _opinfo_cases([torch.float32, torch.float64], BACKENDS))
def test_opinfo_samples(sample, backend):
    _run_opinfo_sample(sample, backend)


@pytest.mark.parametrize("sample,backend", _opinfo_cases([torch.float16, torch.bfloat16], BACKENDS))
def test_opinfo_samples_half_precision(sample, backend):
    _run_opinfo_sample(sample, backend)


@pytest.mark.parametrize("sample,backend", _opinfo_cases([torch.float32], TRITON))
def test_opinfo_samples_triton_interpreted(sample, backend):
    _run_opinfo_sample(sample, backend)


# --- PyTorch's ModuleInfo inputs for nn.KLDivLoss ---------------------------------------------

KL_DIV_MODULE_INFO = next(info for info in module_db if info.module_cls is torch.nn.KLDivLoss)

# module_db builds its targets as make_tensor(...).log(), so about half of them are NaN (log of a
# negative number), and so are the inputs: torch returns NaN there, with NaN gradients.


def _module_cases(dtypes, backends):
    cases = []
    for dtype in dtypes:
        torch.manual_seed(0)
        module_inputs = KL_DIV_MODULE_INFO.module_inputs_func(
            KL_DIV_MODULE_INFO, device="cpu", dtype=dtype, requires_grad=True, training=True
        )
        for module_input in module_inputs:
            for backend in backends:
                desc = module_input.desc or "default"
                case_id = f"{backend}-{str(dtype).removeprefix('torch.')}-{desc}"
                cases.append(pytest.param(module_input, backend, id=case_id))
    return cases


@pytest.mark.parametrize("module_input,backend", _module_cases([torch.float32, torch.float64], BACKENDS))
def test_module_db_inputs(module_input, backend):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    ours_module, torch_module = kdnn.KLDivLoss(*args, **kwargs), torch.nn.KLDivLoss(*args, **kwargs)
    assert ours_module.reduction == torch_module.reduction and ours_module.log_target == torch_module.log_target
    assert_drop_in(ours_module, torch_module, list(module_input.forward_input.args), backend=backend)


# --- common_nn's KLDivLoss cases (functional and module), run with ours swapped in -------------


def _common_nn_cases():
    torch.manual_seed(0)
    tests = [t for t in common_nn.get_new_module_tests() if t.get("fullname", "").startswith("KLDivLoss")]
    tests += [t for t in common_nn.criterion_tests if t.get("fullname", "").startswith("KLDivLoss")]
    assert len(tests) >= 6, [t.get("fullname") for t in tests]
    return [pytest.param(t, backend, id=f"{backend}-{t['fullname']}") for t in tests for backend in BACKENDS]


@pytest.mark.parametrize("case,backend", _common_nn_cases())
def test_common_nn_cases(case, backend, monkeypatch):
    """The cases call ``F.kl_div`` / ``nn.KLDivLoss`` by name: build torch's module first, then
    ours with those names pointing at kdkernels."""
    torch.manual_seed(0)
    torch_module = case["constructor"]()
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "kl_div", kl_div)
        patch.setattr(torch.nn, "KLDivLoss", kdnn.KLDivLoss)
        ours_module = case["constructor"]()
        input = case["input_fn"]().double().requires_grad_()
        tensors = [input] if "target_fn" not in case else [input, case["target_fn"]().double()]
        assert_drop_in(ours_module, torch_module, tensors, backend=backend)
    assert torch.nn.functional.kl_div is not kl_div  # the patch is undone
    # and torch's own reference formula agrees with torch's module on the same case
    reference = case["reference_fn"]
    if "target_fn" not in case:
        torch.testing.assert_close(torch_module(input.detach()), reference(input.detach()))


# --- hand-made cases the samples above do not reach -------------------------------------------


def _log_probs(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).log_softmax(-1).requires_grad_()


def _probs(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype).add(0.05).softmax(-1).requires_grad_()


BROADCAST_SHAPES = [
    pytest.param((1, 6), (3, 6), id="input-1x6-target-3x6"),
    pytest.param((3, 6), (1, 6), id="input-3x6-target-1x6"),
    pytest.param((6,), (3, 6), id="input-6-target-3x6"),
    pytest.param((3, 1, 6), (1, 4, 6), id="input-3x1x6-target-1x4x6"),
    pytest.param((), (2, 3), id="input-scalar-target-2x3"),
    pytest.param((2, 3), (), id="input-2x3-target-scalar"),
]


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("input_shape,target_shape", BROADCAST_SHAPES)
def test_broadcasting_divides_by_the_inputs_batch_size(input_shape, target_shape, reduction, backend):
    # the reproducer: batchmean of a (1, 6) input against (3, 6) targets was 1/3 of torch's
    x = torch.randn(input_shape).log_softmax(-1) if input_shape else torch.tensor(-0.7)
    y = torch.rand(target_shape).add(0.05) if target_shape else torch.tensor(0.4)
    x.requires_grad_(), y.requires_grad_()
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction), lambda a, b: F.kl_div(a, b, reduction=reduction), [x, y], backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_target", [False, True], ids=["probs", "log_target"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("shape", [(), (7,), (4, 7)], ids=["0d", "1d", "2d"])
def test_low_rank_inputs(shape, reduction, log_target, backend):
    # batchmean divides by size(0) for 1-d inputs (the class count) and not at all for 0-d, as torch
    x = torch.randn(shape, dtype=torch.float64).requires_grad_()
    y = torch.rand(shape, dtype=torch.float64).add(0.05)
    y = (y.log() if log_target else y).requires_grad_()
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction, log_target=log_target),
        lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target),
        [x, y],
        backend=backend,
    )


LEGACY = [(sa, r) for sa, r in itertools.product([None, True, False], repeat=2) if (sa, r) != (None, None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "not-a-reduction"])
@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=[f"size_average={a}-reduce={b}" for a, b in LEGACY])
def test_legacy_arguments_functional(size_average, reduce, reduction, backend):
    # torch: the legacy arguments pick none/sum/mean (reduction is then not checked), and
    # reduction="batchmean" still divides that result by input.size(0)
    x, y = _log_probs(3, 5), _probs(3, 5)
    assert_drop_in(
        lambda a, b: kl_div(a, b, size_average, reduce, reduction),
        lambda a, b: F.kl_div(a, b, size_average, reduce, reduction),
        [x, y],
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=[f"size_average={a}-reduce={b}" for a, b in LEGACY])
def test_legacy_arguments_module(size_average, reduce, reduction, backend):
    # torch's module resolves the legacy arguments in __init__, so "batchmean" is lost there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = kdnn.KLDivLoss(size_average, reduce, reduction)
        theirs = torch.nn.KLDivLoss(size_average, reduce, reduction)
    assert ours.reduction == theirs.reduction
    assert_drop_in(ours, theirs, [_log_probs(3, 5), _probs(3, 5)], backend=backend)


def test_legacy_arguments_warn_like_torch():
    x, y = _log_probs(2, 3), _probs(2, 3)
    for call in (lambda: F.kl_div(x, y, size_average=False), lambda: kl_div(x, y, size_average=False)):
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated, please use reduction='sum'"):
            call()
    # attributed to the line that passed the legacy argument
    with pytest.warns(UserWarning, match="please use reduction='none'") as record:
        kdnn.KLDivLoss(reduce=False)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="please use reduction='mean'") as record:
        kl_div(x, y, size_average=True, reduce=True)
    assert record[0].filename == __file__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(reduction="batchmean"),
        dict(size_average=False, reduction="batchmean"),
        dict(reduce=False, reduction="batchmean"),
        dict(size_average=True, reduce=True),
        dict(reduction="mean"),
        dict(reduction="none", log_target=True),
    ],
    ids=["batchmean", "legacy-sum-batchmean", "legacy-none-batchmean", "legacy-mean", "mean", "none-log_target"],
)
def test_compiled_fullgraph_is_the_same_drop_in(kwargs, backend):
    # the legacy rule, the broadcast batch divisor and the warnings all trace under Dynamo
    torch._dynamo.reset()
    x, y = _log_probs(1, 6), _probs(3, 6)
    if kwargs.get("log_target"):
        y = y.detach().log().requires_grad_()
    compiled = torch.compile(lambda a, b: kl_div(a, b, **kwargs), fullgraph=True)
    assert_drop_in(compiled, lambda a, b: F.kl_div(a, b, **kwargs), [x, y], backend=backend)


def test_mean_warns_like_torch():
    x, y = _log_probs(2, 3), _probs(2, 3)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        F.kl_div(x, y, reduction="mean")
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        kl_div(x, y, reduction="mean")
    assert [(w.category, str(w.message)) for w in ours] == [(w.category, str(w.message)) for w in theirs]
    assert len(ours) == 1 and ours[0].filename == __file__  # attributed to the caller, as torch's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in ("batchmean", "sum", "none"):
            kl_div(x, y, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize(
    "input_dtype,target_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
    ],
    ids=["fp16", "bf16", "fp16-fp32", "fp32-bf16", "fp32-fp64"],
)
def test_result_dtype_is_torchs(input_dtype, target_dtype, reduction, backend):
    x = _log_probs(4, 33, dtype=torch.float32).detach().to(input_dtype).requires_grad_()
    y = _probs(4, 33, dtype=torch.float32).detach().to(target_dtype).requires_grad_()
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction), lambda a, b: F.kl_div(a, b, reduction=reduction), [x, y], backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)], ids=["0x5", "3x0", "0"])
def test_empty_inputs(shape, reduction, backend):
    # torch: sum of nothing = 0, mean of nothing = NaN, batchmean = 0 / size(0)
    x, y = torch.randn(shape).requires_grad_(), torch.rand(shape).requires_grad_()
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction), lambda a, b: F.kl_div(a, b, reduction=reduction), [x, y], backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_zero_target_gradient_is_the_documented_deviation(reduction, backend):
    x = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]], requires_grad=True)
    y = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]], requires_grad=True)
    # everything but the target gradient agrees with torch ...
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction),
        lambda a, b: F.kl_div(a, b, reduction=reduction),
        [x, y],
        skip_target_grad=ZERO_TARGET_GRADIENT,
        backend=backend,
    )
    # ... and there torch has NaN at the zero target, we have 0 (finite elsewhere, equal to torch's)
    with kdkernels.use_backend(backend):
        (ours,) = torch.autograd.grad(kl_div(x, y, reduction=reduction).sum(), y)
    (theirs,) = torch.autograd.grad(F.kl_div(x, y, reduction=reduction).sum(), y)
    assert math.isnan(theirs[0, 1]) and ours[0, 1] == 0.0
    nonzero = y.detach() != 0
    torch.testing.assert_close(ours[nonzero], theirs[nonzero])


# Invalid or extreme values: torch's composite decides (NaN for a negative or NaN probability, a NaN
# input; +inf for a -inf input where the target has mass; 0·log 0 = 0; exp(-inf)·(-inf - x) = NaN).
INF, NAN = float("inf"), float("nan")
INVALID_VALUES = [
    # id, log_target, the bad input value, the bad target value
    ("negative-target", False, None, -0.25),
    ("nan-target", False, None, NAN),
    ("nan-input", False, NAN, None),
    ("minus-inf-input", False, -INF, None),
    ("plus-inf-target", False, None, INF),
    ("zero-target-minus-inf-input", False, -INF, 0.0),
    ("log-target-nan", True, None, NAN),
    ("log-target-minus-inf", True, None, -INF),
    ("log-target-plus-inf", True, None, INF),
    ("log-target-nan-input", True, NAN, None),
]
def _invalid_cases(backends):
    cases = []
    for case_id, log_target, bad_input, bad_target in INVALID_VALUES:
        for backend in backends:
            for reduction in ("none", "sum"):
                deviation = case_id == "plus-inf-target"
                marks = [pytest.mark.xfail(reason=PLUS_INF_TARGET, strict=True)] if deviation else []
                case = (log_target, bad_input, bad_target, reduction, backend)
                cases.append(pytest.param(*case, id=f"{backend}-{case_id}-{reduction}", marks=marks))
    return cases


@pytest.mark.parametrize("log_target,bad_input,bad_target,reduction,backend", _invalid_cases(BACKENDS + TRITON))
def test_invalid_values_follow_torch(log_target, bad_input, bad_target, reduction, backend):
    x = torch.randn(3, 8).log_softmax(-1)
    y = torch.rand(3, 8).add(0.05).softmax(-1)
    y = y.log() if log_target else y
    if bad_input is not None:
        x[1, 2] = bad_input
    if bad_target is not None:
        y[1, 2] = bad_target
    # a zero target's gradient is the documented deviation; everything else must match
    skip = ZERO_TARGET_GRADIENT if not log_target and bool((y == 0).any()) else None
    assert_drop_in(
        lambda a, b: kl_div(a, b, reduction=reduction, log_target=log_target),
        lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target),
        [x.requires_grad_(), y.requires_grad_()],
        skip_target_grad=skip,
        backend=backend,
    )
