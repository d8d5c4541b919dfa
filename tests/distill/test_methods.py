"""Every method's loss against a direct formula from docs/methods.md, written here independently
(on random tensors), and its configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import (
    FSP,
    OFD,
    RKD,
    AttentionDistributionTransfer,
    AttentionTransfer,
    CrossEntropy,
    Distiller,
    FeatureMapTransfer,
    FeatureSpec,
    FitNets,
    HintonKD,
    SimilarityPreserving,
)
from distill_nets import SmallCNN


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-6)


# --- Hinton KD ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, alpha", [(4.0, 0.9), (1.0, 0.5), (2.0, 1.0)])
def test_hinton_kd_matches_formula(temperature, alpha):
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    losses = HintonKD(temperature=temperature, alpha=alpha)([s], [t], y)
    T = temperature
    kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()
    close(losses["kd"], alpha * T * T * kl)
    if alpha < 1:
        close(losses["ce"], (1 - alpha) * F.cross_entropy(s, y))
    else:
        assert "ce" not in losses


def test_hinton_kd_is_not_the_circulating_bug():
    """The bug weights the soft term by 2T² + α (and KLDiv's 'mean'); the fix by α·T² (batchmean)."""
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    T, alpha = 4.0, 0.9
    losses = HintonKD(temperature=T, alpha=alpha)([s], [t], y)
    kl_elementwise_mean = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).mean()  # KLDivLoss()
    buggy = kl_elementwise_mean * (T * T * 2.0 + alpha)
    assert not torch.allclose(losses["kd"], buggy, rtol=1e-3)


def test_hinton_kd_needs_labels_when_alpha_below_one():
    with pytest.raises(ValueError, match="needs the labels"):
        HintonKD(alpha=0.5)([torch.randn(2, 3)], [torch.randn(2, 3)], None)


# --- FitNets ----------------------------------------------------------------------------------


def test_fitnets_matches_formula():
    method = FitNets("a", "b", student_channels=4, teacher_channels=6)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    w = method.connector[0].weight.reshape(6, 4)
    regressed = torch.einsum("oc,bchw->bohw", w, s)
    close(method([s], [t], None), ((regressed - t) ** 2).mean())
    paper = FitNets("a", "b", student_channels=4, teacher_channels=6, reduction="paper")
    paper.load_state_dict(method.state_dict())
    close(paper([s], [t], None), 0.5 * ((regressed - t) ** 2).sum() / 3)


def test_fitnets_channel_mismatch_without_connector_is_an_error():
    with pytest.raises(ValueError, match="student_channels and teacher_channels"):
        FitNets("a", "b")([torch.randn(2, 4, 3, 3)], [torch.randn(2, 6, 3, 3)], None)


# --- Attention transfer ---------------------------------------------------------------------


def test_attention_transfer_matches_formula():
    s1, t1 = torch.randn(4, 3, 6, 6), torch.randn(4, 7, 6, 6)
    s2, t2 = torch.randn(4, 5, 3, 3), torch.randn(4, 9, 3, 3)

    def q(a):
        m = (a**2).sum(1).reshape(len(a), -1) / a.shape[1]
        return m / m.norm(dim=1, keepdim=True)

    expected = sum(((q(s) - q(t)) ** 2).sum() / q(s).numel() for s, t in [(s1, t1), (s2, t2)])
    close(AttentionTransfer(["a", "b"], ["c", "d"])([s1, s2], [t1, t2], None), expected)


def test_attention_transfer_spatial_mismatch():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="spatial sizes"):
        AttentionTransfer("a", "b")([s], [t], None)
    pooled = AttentionTransfer("a", "b", pool=True)([s], [t], None)
    close(pooled, AttentionTransfer("a", "b")([F.avg_pool2d(s, 2)], [t], None))


# --- FSP --------------------------------------------------------------------------------------


def test_fsp_matches_formula():
    s1, s2 = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 4, 4)
    t1, t2 = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 4, 4)

    def gram(a, b):
        a = F.avg_pool2d(a, 2)  # the larger map pooled to the smaller size
        return torch.einsum("bihw,bjhw->bij", a, b) / (b.shape[2] * b.shape[3])

    diff2 = (gram(s1, s2) - gram(t1, t2)) ** 2
    method = FSP([("a", "b")], [("c", "d")])
    close(method([s1, s2], [t1, t2], None), diff2.mean())
    close(FSP([("a", "b")], [("c", "d")], reduction="paper")([s1, s2], [t1, t2], None), diff2.sum((1, 2)).mean())


def test_fsp_channel_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"widths \(3, 3\) and the teacher's \(c, d\) \(6, 3\).*pairs layers of equal width"):
        FSP([("a", "b")], [("c", "d")])([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)], [torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)], None)


# --- RKD --------------------------------------------------------------------------------------


def huber_mean(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def rkd_distance(e):
    d = torch.cdist(e, e)
    n = len(e)
    return d / (d.sum() / (n * (n - 1)))  # all off-diagonal distances of random points are > 0


def rkd_angles(e):
    n = len(e)
    out = torch.zeros(n, n, n)
    for j in range(n):  # vertex
        for i in range(n):
            for k in range(n):
                if i != j and k != j:
                    u, v = e[i] - e[j], e[k] - e[j]
                    out[j, i, k] = u @ v / (u.norm() * v.norm())
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_rkd_matches_formula(normalize):
    s, t = torch.randn(6, 5), torch.randn(6, 9)
    losses = RKD("a", "b", distance_weight=25.0, angle_weight=50.0, normalize=normalize)([s], [t], None)
    if normalize:
        s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    close(losses["distance"], 25.0 * huber_mean(rkd_distance(s), rkd_distance(t)))
    close(losses["angle"], 50.0 * huber_mean(rkd_angles(s), rkd_angles(t)))


def test_rkd_student_normaliser_is_not_detached():
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4)
    RKD("a", "b", angle_weight=0.0, normalize=False)([s], [t], None)["distance"].backward()
    s2 = s.detach().clone().requires_grad_()
    d = torch.cdist(s2, s2)
    mu = (d.sum() / 20).detach()
    huber_mean(d / mu, rkd_distance(t)).mul(25.0).backward()
    assert not torch.allclose(s.grad, s2.grad, atol=1e-6)


# --- Similarity-preserving -------------------------------------------------------------------


def test_similarity_preserving_matches_formula():
    s, t = torch.randn(5, 3, 4, 4), torch.randn(5, 8, 2, 2)

    def g(a):
        q = a.reshape(5, -1)
        gram = q @ q.T
        return gram / gram.norm(dim=1, keepdim=True)

    close(SimilarityPreserving("a", "b")([s], [t], None), ((g(t) - g(s)) ** 2).sum() / 25)


# --- OFD --------------------------------------------------------------------------------------


def ofd_teacher(channels=(4, 6)):
    bns = nn.ModuleDict({f"bn{i}": nn.BatchNorm2d(c) for i, c in enumerate(channels)})
    with torch.no_grad():
        for bn in bns.values():
            bn.weight.copy_(torch.randn(bn.num_features))
            bn.bias.copy_(torch.randn(bn.num_features) * 2)
            bn.bias[0] = 8.0 * bn.weight[0].abs()  # Φ(−μ/σ) < 0.001: the −3σ branch
    return bns


def margin_formula(bn):
    out = []
    for gamma, beta in zip(bn.weight.tolist(), bn.bias.tolist()):
        mu, sigma = beta, abs(gamma)
        cdf = 0.5 * (1 + math.erf(-mu / sigma / math.sqrt(2)))  # Φ(−μ/σ)
        if cdf > 0.001:
            pdf = math.exp(-((mu / sigma) ** 2) / 2) / math.sqrt(2 * math.pi)
            out.append(mu - sigma * pdf / cdf)
        else:
            out.append(-3 * sigma)
    return torch.tensor(out).reshape(1, -1, 1, 1)


def test_ofd_matches_formula():
    teacher = ofd_teacher()
    method = OFD(["s0", "s1"], ["t0", "t1"], teacher_bns=["bn0", "bn1"], student_channels=[3, 5])
    method.bind(None, teacher)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn(2, 4, 4, 4) * 2, torch.randn(2, 6, 2, 2) * 2]
    expected = 0.0
    for i, (stage_weight, bn) in enumerate(zip([0.5, 1.0], teacher.values())):
        conn = method.connectors[i]
        S = conn(s[i])
        T = torch.maximum(t[i], margin_formula(bn))
        counted = (S > T) | (T > 0)
        expected = expected + stage_weight * torch.where(counted, (T - S) ** 2, torch.zeros(())).sum()
    close(method(s, t, None), expected / 2)
    torch.testing.assert_close(method.margin0, margin_formula(teacher["bn0"]), rtol=1e-4, atol=1e-5)


def test_ofd_connector_is_conv_bn_with_official_init():
    method = OFD(["s"], ["t"], teacher_bns=["bn0"], student_channels=[64])
    method.bind(None, ofd_teacher((256,)))
    conv, bn = method.connectors[0]
    assert conv.kernel_size == (1, 1) and conv.bias is None and (conv.in_channels, conv.out_channels) == (64, 256)
    assert abs(conv.weight.std().item() - math.sqrt(2 / 256)) < 0.01
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))


def test_ofd_defaults_follow_the_official_cifar_code():
    method = OFD(["a", "b", "c"], ["d", "e", "f"], teacher_bns=["x", "y", "z"], student_channels=[1, 2, 3])
    assert method.stage_weights == [0.25, 0.5, 1.0]
    assert method.weight == 1e-3 and method.teacher_mode == "bn_train"


def test_ofd_missing_teacher_bn_is_an_error():
    student, teacher = SmallCNN(4), SmallCNN(8)
    spec = [FeatureSpec("relu1", on="input")]
    with pytest.raises(ValueError, match="is a Conv2d; OFD takes its margins"):
        Distiller(student, teacher, [OFD(spec, spec, teacher_bns=["layer1.0"], student_channels=[4])])
    with pytest.raises(ValueError, match="no module at path 'layer1.2'.*'layer1.1'"):
        Distiller(student, teacher, [OFD(spec, spec, teacher_bns=["layer1.2"], student_channels=[4])])
    teacher.layer1[1] = nn.BatchNorm2d(8, affine=False)
    with pytest.raises(ValueError, match="affine BatchNorm"):
        Distiller(student, teacher, [OFD(spec, spec, teacher_bns=["layer1.1"], student_channels=[4])])


def test_ofd_wrong_student_channels_is_an_error():
    method = OFD(["s"], ["t"], teacher_bns=["bn0"], student_channels=[3])
    method.bind(None, ofd_teacher((4,)))
    with pytest.raises(ValueError, match=r"ofd: the student feature s has shape \(2, 5, 4, 4\).*student_channels\[0\]=3"):
        method([torch.randn(2, 5, 4, 4)], [torch.randn(2, 4, 4, 4)], None)


# --- MobileBERT -------------------------------------------------------------------------------


def test_feature_map_transfer_matches_formula():
    hs = [torch.randn(2, 5, 8) * 3 + 1, torch.randn(2, 5, 8)]
    ht = [torch.randn(2, 5, 8) * 2 - 1, torch.randn(2, 5, 8)]

    def ln(x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-12)

    expected = sum(((ln(t) - ln(s)) ** 2).mean() for s, t in zip(hs, ht)) / 2
    close(FeatureMapTransfer(["a", "b"], ["c", "d"])(hs, ht, None), expected)


def test_feature_map_transfer_needs_equal_width():
    with pytest.raises(ValueError, match="does not match"):
        FeatureMapTransfer("a", "b")([torch.randn(2, 3, 4)], [torch.randn(2, 3, 8)], None)


def test_attention_distribution_transfer_matches_formula():
    scores_s = [torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)]
    scores_t = [torch.randn(2, 3, 5, 5) * 2, torch.randn(2, 3, 5, 5)]
    scores_t[0][..., -1] = -10000.0  # a masked key (mask adder −10⁴)
    expected = sum(-(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean() for s, t in zip(scores_s, scores_t)) / 2
    close(AttentionDistributionTransfer(["a", "b"], ["c", "d"])(scores_s, scores_t, None), expected)


# --- Task loss and shared checks ----------------------------------------------------------------


def test_cross_entropy_method():
    s, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    close(CrossEntropy()([s], [], y), F.cross_entropy(s, y))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), "1"])
def test_invalid_weight_is_an_error(weight):
    with pytest.raises(ValueError, match="weight"):
        HintonKD(weight=weight)


def test_layer_lists_must_pair_up():
    with pytest.raises(ValueError, match="as many student layers as teacher layers"):
        AttentionTransfer(["a", "b"], ["c"])


def test_fitnets_linear_connector_on_tokens():
    method = FitNets("a", "b", student_channels=4, teacher_channels=6, connector="linear")
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    lin = method.connector[0]
    close(method([s], [t], None), ((s @ lin.weight.T + lin.bias - t) ** 2).mean())


def test_unknown_connector_is_an_error():
    with pytest.raises(ValueError, match="connector: expected None, an nn.Module or one of"):
        FitNets("a", "b", student_channels=4, teacher_channels=6, connector="mlp")
