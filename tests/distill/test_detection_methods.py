"""ChenDetectionKD and LocalizationDistillation as distiller methods: parts equal the plain
functions, gradients reach the student and the connector and never the teacher, float64 stays
float64, bad configurations name the argument."""

import pytest
import torch
import torch.nn.functional as F

from kdkernels.distill import ChenDetectionKD, Distiller, LocalizationDistillation
from kdkernels.distill.detection import DetectionTargets, chen_classification_loss, class_kd_loss, localization_distillation_loss
from kdkernels.distill.detection.gfl_detector import CompactGFL

D = torch.float64
GT = [torch.tensor([[4.0, 6.0, 30.0, 41.0], [33.0, 28.0, 61.0, 62.0]]), torch.tensor([[20.0, 20.0, 44.0, 43.0]])]
LABELS = [torch.tensor([0, 2]), torch.tensor([1])]


def pair():
    torch.manual_seed(0)
    return CompactGFL(3, width=8, channels=16, stacked_convs=1), CompactGFL(3, width=8, channels=24, stacked_convs=1)


def ld_method(**kw):
    return LocalizationDistillation("head.cls_out", "head.reg_out", "head.cls_out", "head.reg_out", **kw)


def chen_method(**kw):
    return ChenDetectionKD(
        "head.cls_out", "head.cls_out", "head.distances", "head.distances", "neck.outputs.0", "neck.outputs.0",
        student_channels=16, teacher_channels=24, sigmoid=True, **kw,
    )


@pytest.mark.parametrize("make", [ld_method, lambda: chen_method(hard_terms=False, cls_normalizer="positive")], ids=["ld", "chen"])
def test_gradients_reach_student_and_connector_not_teacher(make):
    student, teacher = pair()
    before = [p.detach().clone() for p in teacher.parameters()]
    method = make()
    distiller = Distiller(student, teacher, [method])
    x = torch.rand(2, 3, 64, 64)
    targets = student.assign(GT, LABELS, (64, 64), vlr=True)
    out = distiller(x, targets)
    assert len(out.losses) >= 2
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head.box_logits.weight.grad.abs().sum() > 0
    assert student.head.cls_logits.weight.grad.abs().sum() > 0
    for p in method.parameters():  # Chen's adaptation layer
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not any(p is q for p in distiller.parameters() for q in teacher.parameters())


def test_ld_parts_equal_the_plain_functions_and_are_float64():
    B, A, C, levels = 2, 6, 3, [4, 2]
    s_cls, t_cls = torch.randn(B, A, C, dtype=D), torch.randn(B, A, C, dtype=D)
    s_reg, t_reg = torch.randn(B, A, 68, dtype=D, requires_grad=True), torch.randn(B, A, 68, dtype=D)
    pos = torch.zeros(B, A, dtype=torch.bool)
    pos[0, [0, 4]] = True
    pos[1, [1, 2, 5]] = True
    vlr = torch.zeros(B, A, dtype=D)
    vlr[0, 3], vlr[1, 0] = 0.4, 0.7
    target = DetectionTargets(positive=pos, vlr_weight=vlr, num_level_anchors=levels)
    parts = ld_method()([s_cls, s_reg], [t_cls, t_reg], target)
    w = s_cls[pos].sigmoid().amax(-1)
    torch.testing.assert_close(parts["ld"], 0.25 * localization_distillation_loss(s_reg[pos], t_reg[pos], w))
    m = vlr > 0
    torch.testing.assert_close(parts["ld_vlr"], 0.25 * localization_distillation_loss(s_reg[m], t_reg[m], vlr[m], avg_factor=16.0))
    level = torch.tensor([0, 0, 0, 0, 1, 1]).expand(B, A)
    kd = sum(class_kd_loss(s_cls[pos & (level == l)], t_cls[pos & (level == l)], temperature=2.0) for l in (0, 1))
    torch.testing.assert_close(parts["kd"], 10.0 * kd)
    assert all(v.dtype == D for v in parts.values())
    # the box weights are detached: no gradient reaches the class logits through LD
    s_cls.requires_grad_(True)
    g = torch.autograd.grad(ld_method(vlr_weight=0, kd_weight=0)([s_cls, s_reg], [t_cls, t_reg], target)["ld"], [s_cls, s_reg], allow_unused=True)
    assert g[0] is None and g[1].abs().sum() > 0


def test_ld_with_no_positive_is_zero_and_keeps_the_graph():
    s_cls, s_reg = torch.randn(1, 4, 3), torch.randn(1, 4, 68, requires_grad=True)
    target = DetectionTargets(positive=torch.zeros(1, 4, dtype=torch.bool))
    parts = ld_method(vlr_weight=0)([s_cls, s_reg], [s_cls.clone(), s_reg.detach()], target)
    assert parts["ld"].item() == 0 and parts["kd"].item() == 0
    parts["ld"].backward()


def test_chen_method_reduces_to_plain_losses_with_teacher_weights_zero():
    N, C = 8, 4
    s_cls, t_cls = torch.randn(N, C, dtype=D), torch.randn(N, C, dtype=D)
    s_reg, t_reg, y_reg = torch.randn(N, 4, dtype=D), torch.randn(N, 4, dtype=D), torch.randn(N, 4, dtype=D)
    labels = torch.tensor([0, 1, 0, 3, 2, 0, 0, 1])
    target = DetectionTargets(positive=labels > 0, labels=labels, box_targets=y_reg)
    method = ChenDetectionKD("c", "c", "r", "r", mu=1.0, nu=0.0, smooth_l1_beta=1 / 9)
    parts = method([s_cls, s_reg], [t_cls, t_reg], target)
    assert set(parts) == {"cls_hard", "reg_smooth_l1"}
    torch.testing.assert_close(parts["cls_hard"], F.cross_entropy(s_cls, labels))
    torch.testing.assert_close(parts["reg_smooth_l1"], F.smooth_l1_loss(s_reg[labels > 0], y_reg[labels > 0], beta=1 / 9, reduction="sum") / N)


def test_chen_method_soft_part_matches_function_and_mu_split():
    N, C = 5, 3
    s_cls, t_cls = torch.randn(N, C, dtype=D), torch.randn(N, C, dtype=D)
    s_reg = torch.randn(N, 4, dtype=D)
    labels = torch.tensor([0, 1, 2, 0, 1])
    target = DetectionTargets(positive=labels > 0, labels=labels, box_targets=torch.randn(N, 4, dtype=D))
    full = ChenDetectionKD("c", "c", "r", "r", mu=0.25)([s_cls, s_reg], [t_cls, s_reg + 1], target)
    want = chen_classification_loss(s_cls, t_cls, labels, mu=0.25)
    torch.testing.assert_close(full["cls_soft"], want["cls_soft"])
    torch.testing.assert_close(full["cls_hard"], want["cls_hard"])
    soft_only = ChenDetectionKD("c", "c", "r", "r", mu=0.25, hard_terms=False)([s_cls, s_reg], [t_cls, s_reg + 1], target)
    assert "cls_hard" not in soft_only and "reg_smooth_l1" not in soft_only
    torch.testing.assert_close(soft_only["cls_soft"], full["cls_soft"])


def test_bad_configurations_name_the_argument():
    s_cls, s_reg = torch.randn(1, 4, 3), torch.randn(1, 4, 4 * 9)  # reg_max 8, not 16
    pos = DetectionTargets(positive=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reg_max"):
        ld_method(vlr_weight=0)([s_cls, s_reg], [s_cls, s_reg], pos)
    good = torch.randn(1, 4, 68)
    with pytest.raises(ValueError, match="target.positive"):
        ld_method()([s_cls, good], [s_cls, good], DetectionTargets(positive=None))
    with pytest.raises(ValueError, match="target.vlr_weight"):
        ld_method()([s_cls, good], [s_cls, good], pos)
    with pytest.raises(ValueError, match="target.positive: expected shape"):
        ld_method(vlr_weight=0)([s_cls, good], [s_cls, good], DetectionTargets(positive=torch.ones(1, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="target"):
        ld_method()([s_cls, good], [s_cls, good], None)
    with pytest.raises(ValueError, match="teacher_distributions|box distributions"):
        localization_distillation_loss(torch.randn(2, 68), torch.randn(3, 68))
    with pytest.raises(ValueError, match="target.labels"):
        ChenDetectionKD("c", "c", "r", "r")([s_cls, torch.randn(1, 4, 4)], [s_cls, torch.randn(1, 4, 4)],
                                           DetectionTargets(positive=pos.positive, box_targets=torch.randn(1, 4, 4)))
    with pytest.raises(ValueError, match="target.box_targets"):
        ChenDetectionKD("c", "c", "r", "r")([s_cls, torch.randn(1, 4, 4)], [s_cls, torch.randn(1, 4, 4)], pos)
    with pytest.raises(ValueError, match="student_channels, teacher_channels"):
        ChenDetectionKD("c", "c", "r", "r", "h", "h")
    with pytest.raises(ValueError, match="mu"):
        ChenDetectionKD("c", "c", "r", "r", mu=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ld_method(temperature=0)
    with pytest.raises(TypeError):
        LocalizationDistillation("a", "b", "c", "d", 16)  # numeric arguments are keyword-only
