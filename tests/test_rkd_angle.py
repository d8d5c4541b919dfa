"""RKD angle loss (Park et al. 2019) without the B³ tensor: every backend against the float64
triple-by-triple formula of the official RKdAngle, written out here independently, at the
kernels' tile boundaries and with duplicate embeddings.

What every fused loss meets (reference parity across backends, layouts, reductions, masks and
dtypes, gradcheck, opcheck, compile, determinism, memory, bad inputs) is the contract of
``test_fused_loss_contract.py``; this file keeps what is specific to this loss."""

import pytest
import torch

import kdkernels
from kdkernels.functional.rkd_angle import rkd_angle_loss
from kdkernels.nn.rkd_angle import RKDAngleLoss
from kdkernels.ops.reference.rkd_angle import rkd_angle_reference
from kdkernels.ops.rkd_angle import RKD_ANGLE
from tests.conftest import device_backend_or_reference_of
from tests.helpers import assert_close_to_reference

# No CUDA C++ kernel: on a GPU the cuda backend is a skip that says so.
device_backend_or_reference = device_backend_or_reference_of(RKD_ANGLE)


def direct_formula(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over all ordered triples (i, j, k) of huber(⟨e_ij, e_kj⟩_s − ⟨e_ij, e_kj⟩_t) in float64,
    e_ij = (x_i − x_j) / max(‖x_i − x_j‖, 1e-12): anchor by anchor, Huber spelled out."""

    def angles(x, j):
        diff = x.double() - x[j].double()
        unit = diff / diff.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return unit @ unit.t()

    b = student.shape[0]
    total = 0.0
    for j in range(b):
        d = angles(student, j) - angles(teacher, j)
        total = total + torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).sum()
    return total / b**3


def _embeddings(b, ds, dt, device, dtype=torch.float32, duplicates=False):
    s = torch.randn(b, ds, dtype=torch.float64)
    t = torch.randn(b, dt, dtype=torch.float64)
    if duplicates and b > 5:
        # Repeated embeddings (zero differences: F.normalize sends them to 0): in both, in the
        # student only, in the teacher only.
        s[1], t[1] = s[0], t[0]
        s[5] = s[4]
        t[3] = t[2]
    return s.to(device, dtype).requires_grad_(), t.to(device, dtype).requires_grad_()


# (B, Ds, Dt): one sample (all triples degenerate), two, equal and differing widths, B above one
# 16/32-row Triton tile, D above 128 with a tail, and B above the C++ 256-row tile (cpu only).
SHAPES = [(1, 4, 4), (2, 3, 5), (7, 8, 8), (37, 5, 19), (20, 130, 3), (300, 6, 4)]


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_match_the_float64_formula(device_backend_or_reference, shape, duplicates):
    device, backend = device_backend_or_reference
    if shape[0] > 100 and backend != "cpu":
        pytest.skip("B above the C++ tile: the cpu backend's tiling (eager and interpreted Triton are slow here)")
    s, t = _embeddings(*shape, device, duplicates=duplicates)
    loss = rkd_angle_loss(s, t)
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_()
    expected = direct_formula(s64, t64)
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss.detach().cpu(), expected.detach(), torch.float32, "loss")
    if duplicates:
        return  # gradients through F.normalize's clamp are ×1e12: compared in float64 below
    gs, gt = torch.autograd.grad(loss * 3.0, (s, t))
    rs, rt = torch.autograd.grad(expected * 3.0, (s64, t64))
    assert_close_to_reference(gs.cpu(), rs, torch.float32, "student grad")
    assert_close_to_reference(gt.cpu(), rt, torch.float32, "teacher grad")


@pytest.mark.parametrize("duplicates", [False, True])
def test_float64_values_and_gradients(device_backend_or_reference, duplicates):
    device, _ = device_backend_or_reference
    s, t = _embeddings(19, 6, 9, device, torch.float64, duplicates=duplicates)
    loss = rkd_angle_loss(s, t)
    assert loss.dtype == torch.float64
    gs, gt = torch.autograd.grad(loss, (s, t))
    s64, t64 = s.detach().cpu().requires_grad_(), t.detach().cpu().requires_grad_()
    expected = direct_formula(s64, t64)
    rs, rt = torch.autograd.grad(expected, (s64, t64))
    assert_close_to_reference(loss.detach().cpu(), expected.detach(), torch.float64, "loss")
    if duplicates:
        # Terms of order 1e12 · 1/B³ cancel between the anchors' contributions: relative rounding.
        assert rs.abs().max() > 1e6 and rt.abs().max() > 1e6  # the clamp's huge (official) gradient
        for got, want, name in ((gs, rs, "student"), (gt, rt, "teacher")):
            err = (got.cpu() - want).abs().max() / want.abs().max()
            assert err < 1e-6, f"{name} grad: relative error {err:.2e}"
    else:
        assert_close_to_reference(gs.cpu(), rs, torch.float64, "student grad")
        assert_close_to_reference(gt.cpu(), rt, torch.float64, "teacher grad")


def test_huber_both_branches_are_exercised():
    # Angles lie in [-1, 1], so differences reach beyond 1 only for opposed geometry: the test data
    # must contain |d| >= 1 triples or the linear branch of the Huber would go untested.
    s, t = _embeddings(37, 5, 19, "cpu", torch.float64)
    diffs = []
    for j in range(37):
        es = torch.nn.functional.normalize(s.detach() - s.detach()[j], dim=1)
        et = torch.nn.functional.normalize(t.detach() - t.detach()[j], dim=1)
        diffs.append((es @ es.t() - et @ et.t()).abs())
    d = torch.stack(diffs)
    assert (d > 1).any() and (d < 1).any()


def test_scale_and_rotation_invariance(device_backend_or_reference):
    device, _ = device_backend_or_reference
    s, t = _embeddings(11, 6, 6, device)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    moved = (2.5 * t.detach().double().cpu() @ q + 1.0).to(device, torch.float32)
    torch.testing.assert_close(rkd_angle_loss(s, moved), rkd_angle_loss(s, t.detach()), rtol=1e-4, atol=1e-6)
    zero = rkd_angle_loss(t.detach(), moved)
    assert zero.abs().item() < 1e-6


def test_module_and_reference():
    s, t = _embeddings(6, 4, 5, "cpu")
    torch.testing.assert_close(RKDAngleLoss()(s, t), rkd_angle_loss(s, t))
    with kdkernels.use_backend("torch"):
        torch.testing.assert_close(rkd_angle_loss(s, t), rkd_angle_reference(s, t))
