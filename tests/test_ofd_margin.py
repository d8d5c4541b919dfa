"""ofd_margin / ofd_margin_from_affine: the margins of Overhaul of Feature Distillation from the
teacher's BatchNorm, against the official code's formula (written out here without scipy)."""

import math

import pytest
import torch

from kdkernels.ofd_margin import ofd_margin, ofd_margin_from_affine


def _official(weight: float, bias: float) -> float:
    """clovaai/overhaul-distillation ``get_margin_from_BN``, one channel, with Φ from math.erfc."""
    s, m = abs(weight), bias
    cdf = 0.5 * math.erfc(m / s / math.sqrt(2.0))  # Φ(−m/s)
    if cdf > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3 * s


def test_matches_the_official_formula():
    torch.manual_seed(0)
    weight = torch.randn(512, dtype=torch.float64) * 2
    bias = torch.randn(512, dtype=torch.float64) * 3
    expected = torch.tensor([_official(w, b) for w, b in zip(weight.tolist(), bias.tolist())], dtype=torch.float64)
    margin = ofd_margin_from_affine(weight, bias)
    assert margin.dtype == torch.float32 and margin.shape == (512,)
    torch.testing.assert_close(margin.double(), expected, rtol=1e-6, atol=1e-6)
    # both branches of the official rule occur in this draw
    tail = 0.5 * torch.erfc(bias / weight.abs() / math.sqrt(2.0))
    assert (tail > 1e-3).any() and (tail <= 1e-3).any()


def test_known_values():
    margin = ofd_margin_from_affine(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.0, -1.0, 5.0]))
    # μ = 0: −σ·φ(0)/Φ(0) = −σ·sqrt(2/π); μ/σ = 5: Φ(−5) < 1e-3, so −3σ
    expected = torch.tensor([-math.sqrt(2 / math.pi), -1.0 - 2.0 * _ratio(-0.5), -3.0])
    torch.testing.assert_close(margin, expected)


def _ratio(u: float) -> float:
    return math.exp(-u * u / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(-(-u) / math.sqrt(2.0)))


def test_zero_sigma_is_the_limit_min_mu_0():
    margin = ofd_margin_from_affine(torch.zeros(3), torch.tensor([2.0, -1.5, 0.0]))
    torch.testing.assert_close(margin, torch.tensor([0.0, -1.5, 0.0]))
    # and it is the limit: a tiny σ gives (almost) the same margins
    tiny = ofd_margin_from_affine(torch.full((3,), 1e-6, dtype=torch.float64), torch.tensor([2.0, -1.5, 0.0]).double())
    torch.testing.assert_close(tiny, margin, atol=1e-5, rtol=0)


def test_extreme_ratios_are_finite():
    weight = torch.tensor([1e-30, 1e-30, 1.0, 1.0, 1e30, 1e-300, 1e-300], dtype=torch.float64)
    bias = torch.tensor([1.0, -1.0, 1e30, -1e30, 1.0, 1e300, -1e300], dtype=torch.float64)
    margin = ofd_margin_from_affine(weight, bias)
    assert torch.isfinite(margin).all()
    # μ/σ → +∞: −3σ; μ/σ → −∞: μ (clamped to fp32's range for ±1e30 / ±1e300 inputs)
    assert margin[0].item() == pytest.approx(-3e-30, rel=1e-6)
    assert margin[1].item() == -1.0 and margin[2].item() == -3.0
    assert margin[3].item() == pytest.approx(-1e30, rel=1e-6)
    assert margin[4].item() == pytest.approx(-1e30 * math.sqrt(2 / math.pi), rel=1e-6)
    assert margin[5].item() == 0.0  # −3σ, σ = 1e-300 underflows fp32
    assert margin[6].item() == torch.finfo(torch.float32).min  # μ = −1e300: fp32's most negative


def test_margins_are_negative_and_continuous_across_the_threshold():
    # Just below and above Φ(−μ/σ) = 1e-3 (μ/σ ≈ 3.09) the two branches differ, as in the official
    # code; each side must still be ≤ 0 and finite.
    bias = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    margin = ofd_margin_from_affine(torch.ones_like(bias), bias)
    assert torch.isfinite(margin).all() and (margin <= 0).all()


def test_from_batchnorm_modules():
    for bn in (torch.nn.BatchNorm1d(5), torch.nn.BatchNorm2d(5), torch.nn.BatchNorm3d(5), torch.nn.SyncBatchNorm(5)):
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
        margin = ofd_margin(bn)
        torch.testing.assert_close(margin, ofd_margin_from_affine(bn.weight, bn.bias))
        assert not margin.requires_grad and margin.shape == (5,)


def test_running_statistics_are_not_used():
    bn = torch.nn.BatchNorm2d(4)
    before = ofd_margin(bn)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(9.0)
    torch.testing.assert_close(ofd_margin(bn), before)


def test_half_precision_parameters():
    bn = torch.nn.BatchNorm2d(8).half()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    expected = torch.tensor([_official(w, b) for w, b in zip(bn.weight.float().tolist(), bn.bias.float().tolist())])
    torch.testing.assert_close(ofd_margin(bn), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bn"):
        ofd_margin(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="bn"):
        ofd_margin(torch.nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match="bn"):
        ofd_margin(torch.nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="weight"):
        ofd_margin_from_affine(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="bias"):
        ofd_margin_from_affine(torch.ones(2), torch.tensor([float("inf"), 0.0]))
    with pytest.raises(ValueError, match="bias"):
        ofd_margin_from_affine(torch.ones(2), torch.zeros(3))
    with pytest.raises(ValueError, match="weight"):
        ofd_margin_from_affine(torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="weight"):
        ofd_margin_from_affine([1.0], torch.zeros(1))
    with pytest.raises(TypeError, match="bias"):
        ofd_margin_from_affine(torch.ones(2), torch.zeros(2, dtype=torch.long))
