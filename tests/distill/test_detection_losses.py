"""The detection KD losses against independent float64 formulas (methods.md §3, §4), with the
fused backends (cpu kernel) and the PyTorch reference (torch backend)."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.distill.detection import (
    binary_class_logits,
    chen_classification_loss,
    chen_hint_loss,
    chen_regression_loss,
    class_kd_loss,
    distribution_focal_loss,
    integral,
    ld_edge_losses,
    localization_distillation_loss,
    quality_focal_loss,
)

BACKENDS = ["cpu", "torch"]
D = torch.float64


def kl_rows(s, t, T):
    """Σ_i p_t (log p_t − log p_s) per row, written out."""
    out = []
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [v / T for v in srow]
        zt = [v / T for v in trow]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        out.append(sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt)))
    return torch.tensor(out, dtype=D)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with kdkernels.use_backend(request.param):
        yield request.param


def test_ld_edge_losses_are_t2_kl_mean_over_bins(backend):
    s, t = torch.randn(3, 4 * 17, dtype=D), torch.randn(3, 4 * 17, dtype=D)
    got = ld_edge_losses(s, t, reg_max=16, temperature=10.0)
    want = (100.0 * kl_rows(s.reshape(-1, 17), t.reshape(-1, 17), 10.0) / 17).reshape(3, 4)
    assert got.dtype == D
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ld_loss_equals_official_normalisation(backend):
    """HikariTJU/LD: KnowledgeDistillationKLDivLoss(loss_weight=0.25, T=10) called with
    weight = max-sigmoid weights expanded over 4 edges and avg_factor=4.0: (Σ w·kl.mean(1)·T²)/4."""
    P, T = 5, 10.0
    s, t = torch.randn(P, 68, dtype=D, requires_grad=True), torch.randn(P, 68, dtype=D)
    cls = torch.randn(P, 3, dtype=D)
    w = cls.sigmoid().max(1)[0]
    pred, soft = s.reshape(-1, 17), t.reshape(-1, 17)
    official = F.kl_div(F.log_softmax(pred / T, 1), F.softmax(soft / T, 1), reduction="none").mean(1) * T * T
    official = 0.25 * (official * w[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
    got = 0.25 * localization_distillation_loss(s, t, w, reg_max=16, temperature=T, avg_factor=4.0)
    torch.testing.assert_close(got, official, rtol=1e-10, atol=1e-14)
    g_got = torch.autograd.grad(got, s)[0]
    g_want = torch.autograd.grad(official, s)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-14)


def test_ld_worked_example_by_hand():
    """One positive, student uniform (all logits 0), teacher logit 10·ln 2 on bin 3 of every
    edge (T = 10 makes that bin twice as likely), student class logits 0 -> w = 0.5:
    LD = 0.25 · (1/4) · 4 edges · 0.5 · T² · KL / 17."""
    s = torch.zeros(1, 68, dtype=D)
    t = torch.zeros(1, 4, 17, dtype=D)
    t[..., 3] = 10 * math.log(2)
    w = torch.full((1,), 0.5, dtype=D)
    p = [2 / 18 if i == 3 else 1 / 18 for i in range(17)]
    kl = sum(pi * math.log(pi * 17) for pi in p)
    want = 0.25 * (1 / 4) * 4 * 0.5 * 100 * kl / 17
    got = 0.25 * localization_distillation_loss(s, t, w)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_class_kd_is_t2_kl_mean_over_classes(backend):
    s, t = torch.randn(6, 5, dtype=D), torch.randn(6, 5, dtype=D)
    got = class_kd_loss(s, t, temperature=2.0)
    want = (4.0 * kl_rows(s, t, 2.0) / 5).sum() / 6
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_integral_is_expected_bin():
    z = torch.randn(7, 17, dtype=D)
    p = z.softmax(-1)
    want = torch.tensor([sum(i * p[r, i].item() for i in range(17)) for r in range(7)], dtype=D)
    torch.testing.assert_close(integral(z, 16), want)


def test_dfl_matches_official_formula():
    z = torch.randn(8, 17, dtype=D, requires_grad=True)
    y = torch.rand(8, dtype=D) * 15.9
    left = y.long()
    official = F.cross_entropy(z, left, reduction="none") * (left + 1 - y) + F.cross_entropy(z, left + 1, reduction="none") * (y - left)
    torch.testing.assert_close(distribution_focal_loss(z, y, 16), official)
    # the DFL minimum: all the mass on the two bins around y, split in proportion
    yv = 4.25
    best = torch.full((1, 17), -30.0, dtype=D)
    best[0, 4], best[0, 5] = math.log(0.75), math.log(0.25)
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert distribution_focal_loss(best, torch.tensor([yv], dtype=D), 16).item() == pytest.approx(want, abs=1e-9)


def test_qfl_matches_direct_formula():
    z = torch.randn(4, 3, dtype=D)
    labels = torch.tensor([3, 0, 2, 3])  # 3 = background
    q = torch.tensor([0.0, 0.7, 0.4, 0.0], dtype=D)
    want = []
    for r in range(4):
        total = 0.0
        for c in range(3):
            sig = 1 / (1 + math.exp(-z[r, c].item()))
            s = q[r].item() if labels[r].item() == c else 0.0
            total += -abs(s - sig) ** 2 * (s * math.log(sig) + (1 - s) * math.log(1 - sig))
        want.append(total)
    torch.testing.assert_close(quality_focal_loss(z, labels, q), torch.tensor(want, dtype=D))


def test_chen_classification_direct_formula(backend):
    N, C = 6, 4
    s, t = torch.randn(N, C, dtype=D, requires_grad=True), torch.randn(N, C, dtype=D)
    y = torch.randint(C, (N,))
    valid = torch.tensor([True, True, False, True, True, False])
    got = chen_classification_loss(s, t, y, mu=0.3, background_weight=1.5, valid=valid)
    w = [1.5] + [1.0] * (C - 1)
    ps, pt = s.detach().softmax(-1), t.softmax(-1)
    P, Q = ps.tolist(), pt.tolist()
    soft = sum(-sum(w[c] * Q[i][c] * math.log(P[i][c]) for c in range(C)) for i in range(N) if valid[i])
    hard = sum(-math.log(P[i][int(y[i])]) for i in range(N) if valid[i])
    n = int(valid.sum())
    assert got["cls_soft"].item() == pytest.approx(0.7 * soft / n, rel=1e-10)
    assert got["cls_hard"].item() == pytest.approx(0.3 * hard / n, rel=1e-10)
    # the gradient of the soft part: (1 − μ)/n · (Σ_c w_c p_t,c · p_s − w ⊙ p_t) on valid rows
    g = torch.autograd.grad(got["cls_soft"], s)[0]
    wt = torch.tensor(w, dtype=D) * pt
    want = 0.7 / n * (wt.sum(-1, keepdim=True) * ps - wt) * valid[:, None]
    torch.testing.assert_close(g, want)


def test_chen_binary_logits_soft_ce_is_weighted_bce(backend):
    z_s, z_t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    got = chen_classification_loss(binary_class_logits(z_s), binary_class_logits(z_t), mu=0.0)["cls_soft"]
    ps, pt = z_s.sigmoid(), z_t.sigmoid()
    want = (-(1.5 * (1 - pt) * torch.log(1 - ps) + pt * torch.log(ps))).mean()
    torch.testing.assert_close(got, want)


def test_chen_regression_direct_formula(backend):
    N = 7
    s, t, y = torch.randn(N, 4, dtype=D, requires_grad=True), torch.randn(N, 4, dtype=D), torch.randn(N, 4, dtype=D)
    pos = torch.tensor([True, False, True, True, False, True, True])
    got = chen_regression_loss(s, t, y, pos, nu=0.5, margin=0.1, beta=1 / 9, normalizer=10)
    sl1, lb = 0.0, 0.0
    for i in range(N):
        if not pos[i]:
            continue
        for k in range(4):
            d = abs(s[i, k].item() - y[i, k].item())
            sl1 += 0.5 * d * d * 9 if d < 1 / 9 else d - 0.5 / 9
        es = sum((s[i, k].item() - y[i, k].item()) ** 2 for k in range(4))
        et = sum((t[i, k].item() - y[i, k].item()) ** 2 for k in range(4))
        lb += es if es + 0.1 > et else 0.0
    assert got["reg_smooth_l1"].item() == pytest.approx(sl1 / 10, rel=1e-10)
    assert got["reg_bounded"].item() == pytest.approx(0.5 * lb / 10, rel=1e-10)
    assert got["reg_bounded"].dtype == D


def test_chen_reduces_to_plain_losses_when_teacher_weights_are_zero(backend):
    """μ = 1, ν = 0: the classification and regression terms are torchvision's CE and smooth L1."""
    s, t = torch.randn(6, 5, dtype=D), torch.randn(6, 5, dtype=D)
    y = torch.randint(5, (6,))
    cls = chen_classification_loss(s, t, y, mu=1.0)
    assert set(cls) == {"cls_hard"}
    torch.testing.assert_close(cls["cls_hard"], F.cross_entropy(s, y))
    b_s, b_t, b_y = torch.randn(6, 4, dtype=D), torch.randn(6, 4, dtype=D), torch.randn(6, 4, dtype=D)
    pos = y > 0
    reg = chen_regression_loss(b_s, b_t, b_y, pos, nu=0.0, beta=1 / 9, normalizer=6)
    assert set(reg) == {"reg_smooth_l1"}
    torch.testing.assert_close(reg["reg_smooth_l1"], F.smooth_l1_loss(b_s[pos], b_y[pos], beta=1 / 9, reduction="sum") / 6)


def test_chen_hint_l2_and_l1():
    s, t = torch.randn(2, 3, 4, 4, dtype=D), torch.randn(2, 3, 4, 4, dtype=D)
    torch.testing.assert_close(chen_hint_loss(s, t), ((s - t) ** 2).mean())
    torch.testing.assert_close(chen_hint_loss(s, t, norm="l1", reduction="batchmean"), (s - t).abs().sum() / 2)
    torch.testing.assert_close(chen_hint_loss(s, t, reduction="sum"), ((s - t) ** 2).sum())


def test_every_fused_backend_agrees_with_the_reference_in_float32(device_backend):
    """The fused kernels (cpu C++, Triton — interpreted on CPU) against the PyTorch reference."""
    device, _ = device_backend
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 68, generator=g), torch.randn(4, 68, generator=g)
    w = torch.rand(4, generator=g)
    logits_s, logits_t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    boxes = [torch.randn(6, 4, generator=g) for _ in range(3)]
    pos = labels > 0

    def losses(dev):
        out = {"ld": localization_distillation_loss(s.to(dev), t.to(dev), w.to(dev))}
        out.update(chen_classification_loss(logits_s.to(dev), logits_t.to(dev), labels.to(dev)))
        out.update(chen_regression_loss(*(b.to(dev) for b in boxes), pos.to(dev), margin=0.05))
        return {k: v.cpu() for k, v in out.items()}

    fused = losses(device)
    with kdkernels.use_backend("torch"):
        ref = losses(device)
    for key in ref:
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=1e-6)
