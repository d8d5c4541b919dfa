"""Pair-wise similarity distillation (structured KD, Liu et al. 2019): every backend against the
float64 eager formula of the official sim_dis_compute, written out here independently."""

import pytest
import torch

import kdkernels
from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss
from kdkernels.nn.pairwise_similarity import PairwiseSimilarityLoss
from kdkernels.ops.reference.pairwise_similarity import pairwise_similarity_reference
from tests.helpers import assert_close_to_reference


def direct_formula(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-batch loss of (B, C, H, W) maps in float64, as the official code spells it: channels
    first, ``L2(f) = sqrt(sum_c f²) + 1e-8`` detached, ``bmm(fᵀ, f)``, squared error / N²."""

    def similarity(feat):
        feat = feat.double()
        norm = (feat.pow(2).sum(dim=1) ** 0.5).unsqueeze(1).detach() + 1e-8
        flat = (feat / norm).flatten(2)
        return torch.bmm(flat.transpose(1, 2), flat)

    n = student.shape[2] * student.shape[3]
    return ((similarity(student) - similarity(teacher)) ** 2).sum(dim=(1, 2)) / n**2


def _maps(b, cs, ct, h, w, device, dtype=torch.float32, grad=True):
    s = torch.randn(b, cs, h, w, dtype=torch.float64)
    t = torch.randn(b, ct, h, w, dtype=torch.float64)
    return s.to(device, dtype).requires_grad_(grad), t.to(device, dtype).requires_grad_(grad)


def _to_layout(feat, layout):
    return feat if layout == "BCHW" else feat.flatten(2).transpose(1, 2)


# (B, Cs, Ct, H, W): equal and differing channel counts, one node, a single batch element, N above
# one 32-row Triton tile and the 256-row C++ tile, C above one channel chunk.
SHAPES = [(2, 8, 8, 3, 4), (2, 5, 11, 6, 7), (1, 16, 4, 1, 1), (1, 3, 3, 2, 2), (2, 40, 70, 5, 9), (1, 6, 9, 17, 17)]


@pytest.mark.parametrize("layout", ["BCHW", "BNC"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_match_the_float64_formula(device_backend_or_reference, shape, reduction, layout):
    device, backend = device_backend_or_reference
    if backend == "triton" and shape[3] * shape[4] > 100 and device.type == "cpu":
        pytest.skip("interpreted Triton: the largest node count is covered by the cpu backend")
    s, t = _maps(*shape, device)
    loss = pairwise_similarity_loss(_to_layout(s, layout), _to_layout(t, layout), reduction)
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_()
    per_batch = direct_formula(s64, t64)
    expected = {"mean": per_batch.mean(), "sum": per_batch.sum(), "none": per_batch}[reduction]
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.detach().cpu(), expected.detach(), torch.float32, "loss")
    weights = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    gs, gt = torch.autograd.grad((loss * weights.to(device, loss.dtype)).sum(), (s, t))
    rs, rt = torch.autograd.grad((expected * weights).sum(), (s64, t64))
    assert_close_to_reference(gs.cpu(), rs, torch.float32, "student grad")
    assert_close_to_reference(gt.cpu(), rt, torch.float32, "teacher grad")


def test_float64_is_exact(device_backend_or_reference):
    device, _ = device_backend_or_reference
    s, t = _maps(2, 5, 7, 6, 5, device, torch.float64)
    loss = pairwise_similarity_loss(s, t)
    assert loss.dtype == torch.float64
    expected = direct_formula(s.detach().cpu(), t.detach().cpu()).mean()
    assert_close_to_reference(loss.detach().cpu(), expected, torch.float64, "loss")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device_backend_or_reference, dtype):
    device, _ = device_backend_or_reference
    s, t = _maps(2, 6, 4, 4, 5, device, dtype)
    loss = pairwise_similarity_loss(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and gs.dtype == dtype
    s64 = s.detach().cpu().double().requires_grad_()
    expected = direct_formula(s64, t.detach().cpu().double()).mean()
    (rs,) = torch.autograd.grad(expected, s64)
    assert_close_to_reference(loss.detach().cpu(), expected.detach(), dtype, "loss")
    assert_close_to_reference(gs.cpu(), rs, dtype, "student grad")


def test_identical_features_give_zero(device_backend_or_reference):
    device, _ = device_backend_or_reference
    s, _ = _maps(2, 6, 6, 3, 3, device)
    loss = pairwise_similarity_loss(s, s.detach().clone())
    (gs,) = torch.autograd.grad(loss, s)
    assert loss.abs().item() < 1e-10 and gs.abs().max().item() < 1e-8


def test_detached_teacher_gets_no_gradient_and_strided_student(device_backend_or_reference):
    device, _ = device_backend_or_reference
    base = torch.randn(2, 4, 6, 10, dtype=torch.float64).to(device, torch.float32)
    s = base[..., ::2].requires_grad_()  # non-contiguous (B, C, H, W)
    t = torch.randn(2, 3, 6, 5, device=device)
    loss = pairwise_similarity_loss(s, t)
    loss.backward()
    s64 = s.detach().cpu().double().requires_grad_()
    expected = direct_formula(s64, t.cpu()).mean()
    expected.backward()
    assert t.grad is None
    assert_close_to_reference(s.grad.cpu(), s64.grad, torch.float32, "student grad")


# No torch.autograd.gradcheck here: with the norms detached (the official formula) the analytical
# gradient is by design not the derivative of the loss value (finite differences move the norms
# too), for the eager formula as for the kernels. The gradients are instead checked against
# autograd of the float64 formula, at float64 precision:
def test_float64_gradients_are_exact(device_backend_or_reference):
    device, _ = device_backend_or_reference
    s, t = _maps(2, 3, 5, 4, 3, device, torch.float64)
    for reduction in ("mean", "none"):
        loss = pairwise_similarity_loss(s, t, reduction)
        weights = torch.rand(loss.shape, dtype=torch.float64) + 0.5
        gs, gt = torch.autograd.grad((loss * weights.to(device)).sum(), (s, t))
        s64, t64 = s.detach().cpu().requires_grad_(), t.detach().cpu().requires_grad_()
        per_batch = direct_formula(s64, t64)
        expected = per_batch.mean() if reduction == "mean" else per_batch
        rs, rt = torch.autograd.grad((expected * weights).sum(), (s64, t64))
        assert_close_to_reference(gs.cpu(), rs, torch.float64, "student grad")
        assert_close_to_reference(gt.cpu(), rt, torch.float64, "teacher grad")


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    s, t = _maps(2, 4, 3, 3, 3, "cpu")
    s, t = s.flatten(2).transpose(1, 2), t.detach().flatten(2).transpose(1, 2)
    op = torch.ops.kdkernels.pairwise_similarity
    torch.library.opcheck(op, (s, t, reduction, 1.0, True, False, "cpu"))
    torch.library.opcheck(op, (s, t.requires_grad_(), reduction, 0.5, True, True, "cpu"))
    torch.library.opcheck(
        torch.ops.kdkernels.pairwise_similarity_batches, (s.detach(), t.detach(), torch.full((1,), 0.5), True, True)
    )


# The interpreter cannot run under opcheck's fake-tensor tracing (as for the other Triton ops).
@pytest.mark.gpu
def test_opcheck_triton():
    s, t = torch.randn(1, 5, 3, device="cuda"), torch.randn(1, 5, 4, device="cuda")
    torch.library.opcheck(torch.ops.kdkernels.pairwise_similarity, (s.requires_grad_(), t, 2, 1.0, True, False, "triton"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    s, t = _maps(2, 5, 3, 4, 4, "cpu")
    t = t.detach()

    def step(a, b):
        return pairwise_similarity_loss(a, b, reduction).sum() * 0.5

    with kdkernels.use_backend("cpu"):
        eager = step(s, t)
        (eager_grad,) = torch.autograd.grad(eager, s)
        compiled = torch.compile(step, fullgraph=True)(s, t)
        (compiled_grad,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_retain_graph_backward_twice():
    s, t = _maps(2, 4, 4, 3, 3, "cpu")
    with kdkernels.use_backend("cpu"):
        loss = pairwise_similarity_loss(s, t.detach()) * 3.0
        (first,) = torch.autograd.grad(loss, s, retain_graph=True)
        (second,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(first, second)


def test_double_backward_on_the_fused_backend_equals_the_torch_one():
    # create_graph=True differentiates the op's twin (the eager formula): second-order gradients
    # on every backend, never a silent zero.
    s, t = _maps(1, 3, 3, 2, 2, "cpu", torch.float64)
    second = {}
    for backend in ("cpu", "torch"):
        with kdkernels.use_backend(backend):
            (g,) = torch.autograd.grad(pairwise_similarity_loss(s, t), s, create_graph=True)
            (second[backend],) = torch.autograd.grad(g.pow(2).sum(), s)
    assert second["cpu"].abs().sum() > 0
    torch.testing.assert_close(second["cpu"], second["torch"])


def test_module():
    s, t = _maps(2, 4, 6, 3, 3, "cpu")
    criterion = PairwiseSimilarityLoss(reduction="sum")
    torch.testing.assert_close(criterion(s, t), pairwise_similarity_loss(s, t, "sum"))
    assert "sum" in repr(criterion)
    with pytest.raises(ValueError, match="reduction"):
        PairwiseSimilarityLoss(reduction="batchmean")


def test_torch_backend_is_the_reference_module():
    s, t = _maps(2, 4, 6, 3, 3, "cpu")
    with kdkernels.use_backend("torch"):
        loss = pairwise_similarity_loss(s, t)
    torch.testing.assert_close(loss, pairwise_similarity_reference(s.flatten(2).mT, t.flatten(2).mT))


def _bad_inputs():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    return [
        ("list", (s.tolist(), t), {}, TypeError, "student_feat"),
        ("int-teacher", (s, t.int()), {}, TypeError, "teacher_feat"),
        ("2d-student", (s[:, :, 0, 0], t), {}, ValueError, "student_feat"),
        ("5d-teacher", (s, t.unsqueeze(0)), {}, ValueError, "teacher_feat"),
        ("layout-mismatch", (s, t.flatten(2)), {}, ValueError, "teacher_feat"),
        ("batch-mismatch", (s, t[:1]), {}, ValueError, "teacher_feat"),
        ("spatial-mismatch", (s, t[..., :2]), {}, ValueError, "teacher_feat"),
        ("nodes-mismatch", (s.flatten(2).mT, t.flatten(2).mT[:, :5]), {}, ValueError, "teacher_feat"),
        ("device", (s, t.to("meta")), {}, ValueError, "teacher_feat"),
        ("empty", (s[:0], t[:0]), {}, ValueError, "student_feat"),
        ("empty-channels", (s, t[:, :0]), {}, ValueError, "teacher_feat"),
        ("sparse", (s.to_sparse(), t), {}, TypeError, "student_feat"),
        ("reduction", (s, t), {"reduction": "batchmean"}, ValueError, "reduction"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_name_the_argument(case):
    _, args, kwargs, error, name = case
    with pytest.raises(error, match=name):
        pairwise_similarity_loss(*args, **kwargs)


def test_autocast_does_not_lower_the_fused_precision(device_backend_or_reference):
    device, backend = device_backend_or_reference
    if backend == "torch":
        pytest.skip("the eager formula follows autocast (its matmuls run in bf16)")
    s, t = _maps(2, 6, 4, 5, 5, device)
    plain = pairwise_similarity_loss(s, t.detach())
    (plain_grad,) = torch.autograd.grad(plain, s)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        cast = pairwise_similarity_loss(s, t.detach())
    (cast_grad,) = torch.autograd.grad(cast, s)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cast_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_all_zero_nodes(device_backend_or_reference):
    # Post-ReLU maps have all-zero pixels: their unit vector is 0 (norm + 1e-8 in the denominator).
    device, _ = device_backend_or_reference
    s = torch.relu(torch.randn(2, 4, 5, 6, dtype=torch.float64))
    s[:, :, 1, :3] = 0
    t = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    t[:, :, 2, 2] = 0
    s = s.to(device, torch.float32).requires_grad_()
    t = t.to(device, torch.float32)
    loss = pairwise_similarity_loss(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    s64 = s.detach().cpu().double().requires_grad_()
    expected = direct_formula(s64, t.cpu().double()).mean()
    (rs,) = torch.autograd.grad(expected, s64)
    assert_close_to_reference(loss.detach().cpu(), expected.detach(), torch.float32, "loss")
    assert_close_to_reference(gs.cpu(), rs, torch.float32, "student grad")


def test_compile_fullgraph_triton():
    if "triton" not in kdkernels.backends.available("cpu"):
        pytest.skip("Triton not runnable here")
    s, t = _maps(2, 3, 6, 4, 5, "cpu")
    t = t.detach()
    with kdkernels.use_backend("triton"):
        eager = pairwise_similarity_loss(s, t)
        (eager_grad,) = torch.autograd.grad(eager, s)
        compiled = torch.compile(pairwise_similarity_loss, fullgraph=True)(s, t)
        (compiled_grad,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
