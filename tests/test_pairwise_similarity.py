"""Pair-wise similarity distillation (structured KD, Liu et al. 2019): every backend against the
float64 eager formula of the official sim_dis_compute, written out here independently, at the
kernels' tile boundaries.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch

from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss
from kdkernels.nn.pairwise_similarity import PairwiseSimilarityLoss
from kdkernels.ops.pairwise_similarity import PAIRWISE_SIMILARITY
from tests.conftest import device_backend_or_reference_of
from tests.helpers import assert_close_to_reference

# No CUDA C++ kernel: on a GPU the cuda backend is a skip that says so.
device_backend_or_reference = device_backend_or_reference_of(PAIRWISE_SIMILARITY)


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
@pytest.mark.parametrize("reduction", ["none"])  # (the reductions: test_fused_loss_contract.py)
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


def test_module():
    s, t = _maps(2, 4, 6, 3, 3, "cpu")
    criterion = PairwiseSimilarityLoss(reduction="sum")
    torch.testing.assert_close(criterion(s, t), pairwise_similarity_loss(s, t, "sum"))
    assert "sum" in repr(criterion)
    with pytest.raises(ValueError, match="reduction"):
        PairwiseSimilarityLoss(reduction="batchmean")


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
