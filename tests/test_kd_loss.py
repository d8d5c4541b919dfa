"""kd_loss / KDLoss on every fused backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.functional import kd_loss
from kdkernels.ops.reference.kd_loss import kd_loss_reference
from tests.helpers import assert_close_to_reference

REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _run(shape, dim, temperature, reduction, device, dtype=torch.float32, teacher_dtype=None, mask=None, teacher_grad=True, make=None):
    """Fused loss and gradients next to the float64 reference on the same data."""
    student = (make or torch.randn)(shape, dtype=torch.float64) * 3
    teacher = (make or torch.randn)(shape, dtype=torch.float64) * 3
    s = student.to(device, dtype).requires_grad_()
    t = teacher.to(device, teacher_dtype or dtype).requires_grad_(teacher_grad)
    # The reference sees the same (rounded) values as the fused kernel.
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_(teacher_grad)
    expected = kd_loss_reference(s64, t64, temperature, reduction, dim, mask)
    actual = kd_loss(s, t, temperature, reduction, dim, None if mask is None else mask.to(device))
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (expected * weights).sum().backward()
    (actual * weights.to(device, actual.dtype)).sum().backward()
    return actual, expected, s, s64, t, t64


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,dim", [((6, 37), -1), ((2, 3, 50), -1), ((2, 5, 3, 4), 1), ((3, 4, 2), 0)])
def test_values_and_gradients_match_reference(device_backend, reduction, shape, dim):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run(shape, dim, 2.0, reduction, device)
    assert actual.dtype == torch.float32
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_temperatures(device_backend, temperature):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run((5, 33), -1, temperature, "batchmean", device)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("classes", [1, 2, 1000, 4097, 200_003])
def test_vocabulary_sizes(device_backend, classes):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run((2, classes), -1, 1.0, "sum", device)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize(
    "dtype,teacher_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_low_precision_inputs_accumulate_in_fp32(device_backend, dtype, teacher_dtype):
    device, _ = device_backend
    actual, expected, s, s64, t, t64 = _run((4, 300), -1, 2.0, "batchmean", device, dtype, teacher_dtype)
    assert actual.dtype == torch.float32
    assert s.grad.dtype == dtype and t.grad.dtype == (teacher_dtype or dtype)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")  # fp32 accumulation
    assert_close_to_reference(s.grad.cpu(), s64.grad, dtype, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, teacher_dtype or dtype, "teacher grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,dim", [((3, 5, 40), -1), ((2, 6, 4, 5), 1)])
def test_mask_excludes_positions(device_backend, reduction, shape, dim):
    device, _ = device_backend
    positions = shape[:dim % len(shape)] + shape[dim % len(shape) + 1 :]
    mask = torch.rand(positions) > 0.4
    actual, expected, s, s64, t, t64 = _run(shape, dim, 2.0, reduction, device, mask=mask)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    masked_out = (~mask).unsqueeze(dim % len(shape)).expand(shape)
    assert (s.grad.cpu()[masked_out] == 0).all()
    assert (t.grad.cpu()[masked_out] == 0).all()


def test_channels_last_dense_logits_are_read_in_place(device_backend):
    device, _ = device_backend
    make = lambda shape, dtype: torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)  # noqa: E731
    actual, expected, s, s64, t, t64 = _run((2, 7, 3, 5), 1, 4.0, "batchmean", device, make=make)
    assert_close_to_reference(actual.cpu(), expected, torch.float32, "loss")
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")
    assert_close_to_reference(t.grad.cpu(), t64.grad, torch.float32, "teacher grad")


def test_minus_inf_logits_are_exact(device_backend):
    device, _ = device_backend
    student = torch.randn(4, 50, device=device)
    teacher = torch.randn(4, 50, device=device)
    teacher[:, 10:20] = float("-inf")  # masked vocabulary in the teacher
    student[:, 10:15] = float("-inf")  # ... and in the student for some of those classes
    teacher[3] = float("-inf")  # a position with no distribution at all
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = kd_loss(s, t, 2.0, "none")
    loss.sum().backward()
    expected = kd_loss_reference(student.double().cpu(), teacher.double().cpu(), 2.0, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert_close_to_reference(loss.cpu(), expected, torch.float32, "loss")
    assert loss[3].item() == 0.0 and (s.grad[3] == 0).all()
    assert (t.grad[:, 10:20] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device_backend, reduction):
    device, _ = device_backend
    s = torch.randn(0, 10, device=device, requires_grad=True)
    loss = kd_loss(s, torch.randn(0, 10, device=device), 2.0, reduction)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0 and s.grad.shape == (0, 10)


def test_grad_output_scales_and_retain_graph_repeats(device_backend):
    device, _ = device_backend
    s = torch.randn(3, 20, device=device, requires_grad=True)
    t = torch.randn(3, 20, device=device)
    loss = kd_loss(s, t, 2.0)
    (first,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (third,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, 3.0 * third)


def test_frozen_teacher_gets_no_gradient(device_backend):
    device, _ = device_backend
    s = torch.randn(3, 20, device=device, requires_grad=True)
    t = torch.randn(3, 20, device=device, requires_grad=True)
    kd_loss(s, t.detach(), 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_matches_the_composite_users_write(device_backend):
    device, _ = device_backend
    s, t, T = torch.randn(8, 100, device=device), torch.randn(8, 100, device=device), 4.0
    composite = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    torch.testing.assert_close(kd_loss(s, t, T), composite, rtol=1e-5, atol=1e-6)


def test_module_matches_function(device_backend):
    device, _ = device_backend
    s, t = torch.randn(2, 6, 3, 3, device=device), torch.randn(2, 6, 3, 3, device=device)
    mask = torch.rand(2, 3, 3, device=device) > 0.5
    module = kdkernels.nn.KDLoss(temperature=3.0, reduction="mean", dim=1)
    torch.testing.assert_close(module(s, t, mask), kd_loss(s, t, 3.0, "mean", 1, mask))
    assert "temperature=3.0" in repr(module)


# --- checks that need no particular fused backend -------------------------------------------------


def test_gradcheck_float64():
    with kdkernels.use_backend("cpu"):
        s = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
        t = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([[True, False], [True, True], [False, True]])
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 1.5, reduction, -1, mask), (s, t))
        assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 0.7, "sum", 1), (s, t))


def test_gradcheck_float64_triton():
    if "triton" not in kdkernels.backends.available("cpu"):
        pytest.skip("Triton interpreter not available")
    with kdkernels.use_backend("triton"):
        s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 1.5, "batchmean"), (s, t))


def _opcheck_args(requires_grad):
    s = torch.randn(4, 9, 3, requires_grad=requires_grad)
    t = torch.randn(4, 9, 3, requires_grad=requires_grad)
    mask = torch.rand(4, 3) > 0.3
    return s, t, mask


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_kd_loss(reduction):
    s, t, mask = _opcheck_args(True)
    torch.library.opcheck(torch.ops.kdkernels.kd_loss, (s, t, mask, 2.0, reduction, 0.5, True, True, "cpu"))
    torch.library.opcheck(torch.ops.kdkernels.kd_loss, (s, t, None, 2.0, reduction, 1.0, True, False, "cpu"))


def test_opcheck_kernel_op():
    s, t, mask = _opcheck_args(False)
    scale = torch.tensor([0.25])
    torch.library.opcheck(torch.ops.kdkernels.kd_loss_rows, (s, t, mask, 2.0, scale, True, True))
    torch.library.opcheck(torch.ops.kdkernels.kd_loss_rows, (s, t, None, 1.0, scale, False, False))


@pytest.mark.parametrize("backend", kdkernels.backends.available("cpu"))
@pytest.mark.parametrize("reduction,dim", [("batchmean", -1), ("none", -1), ("mean", 1)])
def test_compile_fullgraph_matches_eager(backend, reduction, dim):
    torch._dynamo.reset()
    s = torch.randn(4, 6, 5, requires_grad=True)
    t = torch.randn(4, 6, 5, requires_grad=True)

    def step(a, b):
        return kd_loss(a, b, 2.0, reduction, dim).sum() * 2.0

    with kdkernels.use_backend(backend):
        eager = step(s, t)
        eager_grads = torch.autograd.grad(eager, (s, t))
        compiled = torch.compile(step, fullgraph=True)(s, t)
        compiled_grads = torch.autograd.grad(compiled, (s, t))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    module = kdkernels.nn.KDLoss(temperature=4.0)
    s, t = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
    with kdkernels.use_backend("cpu"):
        torch.testing.assert_close(torch.compile(module, fullgraph=True)(s, t), module(s, t))


def test_autocast_bf16():
    layer = torch.nn.Linear(16, 50)
    x = torch.randn(4, 16)
    teacher = torch.randn(4, 50)
    with kdkernels.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = kd_loss(logits, teacher, 2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and layer.weight.grad is not None
    torch.testing.assert_close(loss, kd_loss_reference(logits.float(), teacher, 2.0), rtol=1e-4, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda s, t: kd_loss(s, t[:, :-1]), ValueError, "teacher_logits"),
    (lambda s, t: kd_loss(s.tolist(), t), TypeError, "student_logits"),
    (lambda s, t: kd_loss(s.long(), t), TypeError, "student_logits"),
    (lambda s, t: kd_loss(s, t.int()), TypeError, "teacher_logits"),
    (lambda s, t: kd_loss(s.to_sparse(), t), TypeError, "student_logits"),
    (lambda s, t: kd_loss(s, t, temperature=0.0), ValueError, "temperature"),
    (lambda s, t: kd_loss(s, t, temperature=-1.0), ValueError, "temperature"),
    (lambda s, t: kd_loss(s, t, temperature=float("inf")), ValueError, "temperature"),
    (lambda s, t: kd_loss(s, t, temperature=float("nan")), ValueError, "temperature"),
    (lambda s, t: kd_loss(s, t, temperature="4"), TypeError, "temperature"),
    (lambda s, t: kd_loss(s, t, reduction="avg"), ValueError, "reduction"),
    (lambda s, t: kd_loss(s, t, dim=2), ValueError, "dim"),
    (lambda s, t: kd_loss(s, t, mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    (lambda s, t: kd_loss(s, t, mask=torch.ones(3)), TypeError, "mask"),
    (lambda s, t: kd_loss(s, t, mask=torch.ones(3, dtype=torch.bool, device="meta")), ValueError, "mask"),
    (lambda s, t: kd_loss(s, t.to("meta")), ValueError, "teacher_logits"),
    (lambda s, t: kdkernels.nn.KDLoss(temperature=0), ValueError, "temperature"),
]


@pytest.mark.parametrize("call,error,name", BAD_INPUTS)
def test_bad_input_is_rejected_before_any_kernel(call, error, name):
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(error, match=name):
        call(s, t)


def test_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        with kdkernels.use_backend("cuda"):
            kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="backend"):
        with kdkernels.use_backend("tpu"):
            pass


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert kdkernels.backends.resolve(torch.device("cpu")) == "torch"
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        kdkernels.backends.resolve(torch.device("cpu"))


def test_default_backend_on_cpu_is_the_compiled_kernel():
    assert kdkernels.backends.available("cpu")[0] == "cpu"
    assert kdkernels.backends.resolve(torch.device("cpu")) == "cpu"

