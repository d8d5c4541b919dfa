"""Checks only a GPU can run: > 2³¹ elements, bitwise repeatability at scale, LLM vocabularies in
bf16/fp16, opcheck and torch.compile of the Triton- and CUDA-backed ops, and peak memory."""

import pytest
import torch

import kdkernels
from kdkernels.functional import kd_loss, kl_div
from kdkernels.ops.reference.kd_loss import kd_loss_positions

pytestmark = pytest.mark.gpu


def _gpu_backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda"]
    return [b for b in kdkernels.backends.available("cuda") if b != "torch"]


@pytest.fixture(params=_gpu_backends())
def gpu_backend(request):
    with kdkernels.use_backend(request.param):
        yield request.param


def test_more_than_2_pow_31_elements(gpu_backend):
    rows, classes, temperature = 16_384, 152_064, 2.0
    assert rows * classes > 2**31
    student = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    loss = kd_loss(student, teacher, temperature, reduction="sum")
    loss.backward()
    total, worst, largest = 0.0, 0.0, 0.0
    for start in range(0, rows, 512):
        s = student.detach()[start : start + 512].double().requires_grad_()
        t = teacher[start : start + 512].double()
        chunk = kd_loss_positions(s, t, temperature, -1).sum()
        chunk.backward()
        total += chunk.item()
        worst = max(worst, (student.grad[start : start + 512].double() - s.grad).abs().max().item())
        largest = max(largest, s.grad.abs().max().item())
    assert abs(loss.item() - total) <= 1e-4 * abs(total)
    assert worst <= 1e-2 * largest  # bf16 rounding of the gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llm_vocabulary_low_precision_against_float64(gpu_backend, dtype):
    student = (torch.randn(64, 128_256, device="cuda") * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(64, 128_256, device="cuda") * 3).to(dtype).requires_grad_()
    loss = kd_loss(student, teacher, 4.0)
    loss.backward()
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    expected = kd_loss_positions(s64, t64, 4.0, -1).sum() / 64
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    for ours, ref in ((student.grad, s64.grad), (teacher.grad, t64.grad)):
        err = (ours.double() - ref).abs().max() / ref.abs().max()
        assert err <= 1e-2


def test_bitwise_repeatable_at_scale(gpu_backend):
    student = torch.randn(4096, 32_000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(4096, 32_000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = []
    for _ in range(3):
        student.grad = teacher.grad = None
        loss = kd_loss(student, teacher, 2.0)
        loss.backward()
        runs.append((loss.detach().clone(), student.grad.clone(), teacher.grad.clone()))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    x = torch.randn(4096, 32_000, device="cuda").log_softmax(-1)
    y = torch.rand(4096, 32_000, device="cuda")
    assert torch.equal(kl_div(x, y, reduction="sum"), kl_div(x, y, reduction="sum"))


def test_peak_memory_is_the_gradient(gpu_backend):
    rows, classes = 4096, 128_256
    student = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kd_loss(student, teacher, 2.0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradient_bytes = student.numel() * student.element_size()
    assert extra <= gradient_bytes * 1.01 + (1 << 20)


def test_opcheck_gpu_ops(gpu_backend):
    s = torch.randn(4, 33, 3, device="cuda", requires_grad=True)
    t = torch.randn(4, 33, 3, device="cuda", requires_grad=True)
    mask = torch.rand(4, 3, device="cuda") > 0.3
    torch.library.opcheck(torch.ops.kdkernels.kd_loss, (s, t, mask, 2.0, 1, 0.5, True, True, gpu_backend))
    x = torch.randn(4, 9, device="cuda").log_softmax(-1).requires_grad_()
    y = torch.rand(4, 9, device="cuda").requires_grad_()
    torch.library.opcheck(torch.ops.kdkernels.kl_div, (x, y, False, 1, 1.0, True, True, gpu_backend))
    if gpu_backend == "cuda":  # the extension's kernel op (Triton's kernels have no op of their own)
        scale = torch.ones(1, device="cuda")
        torch.library.opcheck(torch.ops.kdkernels.kd_loss_rows, (s.detach(), t.detach(), mask, 2.0, scale, True, True))


def test_compile_fullgraph_on_gpu(gpu_backend):
    torch._dynamo.reset()
    s = torch.randn(16, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(16, 1000, device="cuda", dtype=torch.bfloat16)

    def step(a, b):
        return kd_loss(a, b, 4.0) * 0.5

    eager = step(s, t)
    (eager_grad,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True)(s, t)
    (compiled_grad,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
