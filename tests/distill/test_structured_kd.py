"""Structured KD (docs/methods.md §5): each term against a direct formula written here
independently in float64 (values and gradients), the discriminator, and configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import kdkernels
from kdkernels.distill import (
    Distiller,
    HolisticDistillation,
    PairWiseDistillation,
    PixelWiseDistillation,
    StructuredKD,
)
from kdkernels.distill.discriminators import SAGANDiscriminator, SelfAttention2d
from kdkernels.distill.methods.structured_kd import pair_wise_loss, pixel_wise_loss

DOUBLE = torch.float64


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-10, atol=1e-12)


# --- pixel-wise --------------------------------------------------------------------------------


def direct_pixel_wise(s, t):
    b, c, h, w = s.shape
    total = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                q_t = torch.softmax(t[n, :, i, j], 0)
                total = total - (q_t * torch.log_softmax(s[n, :, i, j], 0)).sum()
    return total / (h * w)  # summed over the batch, not averaged


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_pixel_wise_matches_formula_value_and_gradient(backend):
    if backend not in kdkernels.backends.available(torch.device("cpu")):
        pytest.skip(f"{backend} backend not built here")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, 4, dtype=DOUBLE, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 3, 4, dtype=DOUBLE, generator=g)
    with kdkernels.use_backend(backend):
        loss = pixel_wise_loss(s, t)
        (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == DOUBLE
    expected = direct_pixel_wise(s, t)
    (expected_grad,) = torch.autograd.grad(expected, s)
    close(loss, expected)
    close(grad, expected_grad)


def test_pixel_wise_is_summed_over_the_batch():
    s, t = torch.randn(1, 3, 4, 4, dtype=DOUBLE), torch.randn(1, 3, 4, 4, dtype=DOUBLE)
    one = pixel_wise_loss(s, t)
    close(pixel_wise_loss(s.repeat(3, 1, 1, 1), t.repeat(3, 1, 1, 1)), 3 * one)


def test_pixel_wise_method_weight_and_channels_last():
    s = torch.randn(2, 4, 5, 5, dtype=DOUBLE).to(memory_format=torch.channels_last)
    t = torch.randn(2, 4, 5, 5, dtype=DOUBLE)
    method = PixelWiseDistillation("a", "b")
    assert method.weight == 10.0
    close(method([s], [t], None), direct_pixel_wise(s.contiguous(), t))


# --- pair-wise ---------------------------------------------------------------------------------


def direct_pool(feature, scale):
    """Max over windows of ⌊scale·H⌋ × ⌊scale·W⌋, stride = window, a partial window at the end kept."""
    b, c, h, w = feature.shape
    kh, kw = int(h * scale), int(w * scale)
    rows = [feature[:, :, i : i + kh, :] for i in range(0, h, kh)]
    grid = [[r[:, :, :, j : j + kw].amax(dim=(2, 3)) for j in range(0, w, kw)] for r in rows]
    return torch.stack([torch.stack(row, -1) for row in grid], -2)  # (B, C, H', W')


def direct_pair_wise(fs, ft, scale):
    ps, pt = direct_pool(fs, scale), direct_pool(ft, scale)
    b = ps.shape[0]
    nodes_s, nodes_t = ps.flatten(2), pt.flatten(2)  # (B, C, N)
    n = nodes_s.shape[-1]
    total = 0.0
    for k in range(b):
        for i in range(n):
            for j in range(n):

                def a(nodes):
                    fi, fj = nodes[k, :, i], nodes[k, :, j]
                    return (fi @ fj) / ((fi.norm().detach() + 1e-8) * (fj.norm().detach() + 1e-8))

                total = total + (a(nodes_s) - a(nodes_t)) ** 2
    return total / n**2 / b


@pytest.mark.parametrize("shape, scale", [((2, 3, 6, 8), 0.5), ((2, 3, 5, 7), 0.5), ((1, 4, 6, 6), 0.34)])
def test_pair_wise_matches_formula_value_and_gradient(shape, scale):
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(*shape, dtype=DOUBLE, generator=g, requires_grad=True)
    ft = torch.randn(shape[0], 6, *shape[2:], dtype=DOUBLE, generator=g)  # teacher channels differ
    loss = pair_wise_loss(fs, ft, scale)
    expected = direct_pair_wise(fs, ft, scale)
    close(loss, expected)
    close(torch.autograd.grad(loss, fs)[0], torch.autograd.grad(expected, fs)[0])


def test_pair_wise_norms_are_detached():
    """With the norms in the graph the gradient would differ (and would be ~0 along f_i)."""
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(1, 3, 2, 2, dtype=DOUBLE, generator=g, requires_grad=True)
    ft = torch.randn(1, 3, 2, 2, dtype=DOUBLE, generator=g)
    grad = torch.autograd.grad(pair_wise_loss(fs, ft, pool_scale=0.5), fs)[0]
    unit = lambda f: F.normalize(f.flatten(2), dim=1)  # noqa: E731  (norms in the graph)
    attached = ((unit(fs).transpose(1, 2) @ unit(fs) - unit(ft).transpose(1, 2) @ unit(ft)) ** 2).mean()
    grad_attached = torch.autograd.grad(attached, fs)[0]
    assert not torch.allclose(grad, grad_attached, rtol=1e-3)


def test_pair_wise_method_and_errors():
    method = PairWiseDistillation("a", "b")
    assert method.weight == 1.0 and method.pool_scale == 0.5
    with pytest.raises(ValueError, match="pool_scale"):
        PairWiseDistillation("a", "b", pool_scale=0.0)
    with pytest.raises(ValueError, match="empty pooling window"):
        pair_wise_loss(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0.5)
    with pytest.raises(ValueError, match="batch and spatial size"):
        method([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 8, 8)], None)


def test_pair_wise_upcasts_half_and_keeps_float64():
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert pair_wise_loss(fs.bfloat16(), ft.bfloat16()).dtype == torch.float32
    assert pair_wise_loss(fs.double(), ft.double()).dtype == DOUBLE


# --- holistic ----------------------------------------------------------------------------------


class LinearCritic(nn.Module):
    """D(x) = Σ v ⊙ x + Σ w ⊙ x² per sample: its input gradient is v + 2 w ⊙ x, by hand."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.v = nn.Parameter(torch.randn(*shape, dtype=DOUBLE, generator=g))
        self.w = nn.Parameter(torch.randn(*shape, dtype=DOUBLE, generator=g))

    def forward(self, x):
        return (self.v * x + self.w * x * x).flatten(1).sum(1)


def test_holistic_losses_match_formula():
    shape = (3, 4, 4)
    critic = LinearCritic(shape)
    method = HolisticDistillation("a", "b", discriminator=critic, weight=0.1, gradient_penalty_weight=10.0)
    g = torch.Generator().manual_seed(4)
    q_s = torch.randn(2, *shape, dtype=DOUBLE, generator=g, requires_grad=True)
    q_t = torch.randn(2, *shape, dtype=DOUBLE, generator=g)
    d = lambda x: (critic.v * x + critic.w * x * x).flatten(1).sum(1)  # noqa: E731

    # The student's term: the distiller multiplies by weight = λ_d.
    parts = method([q_s], [q_t], None)
    close(parts["adversarial"], -d(q_s).mean())
    parts["adversarial"].backward()
    assert critic.v.grad is None and critic.w.grad is None, "the discriminator got a generator-step gradient"
    assert q_s.grad is not None

    torch.manual_seed(7)
    losses = method.discriminator_loss(q_s.detach(), q_t, None)
    torch.manual_seed(7)
    eps = torch.rand(2, dtype=DOUBLE).reshape(2, 1, 1, 1)
    x_hat = eps * q_t + (1 - eps) * q_s.detach()
    grad = critic.v + 2 * critic.w * x_hat  # ∇_x̂ D(x̂), by hand
    gp = ((grad.flatten(1).pow(2).sum(1).sqrt() - 1) ** 2).mean()
    close(losses["discriminator"], 0.1 * (-d(q_t).mean() + d(q_s.detach()).mean()))
    close(losses["gradient_penalty"], 0.1 * 10.0 * gp)
    # The penalty trains D: its gradient w.r.t. D's parameters is that of the hand formula.
    got = torch.autograd.grad(losses["gradient_penalty"], [critic.v, critic.w])
    want = torch.autograd.grad(0.1 * 10.0 * gp, [critic.v, critic.w])
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.parametrize("structured", [False, True])
def test_calibrating_the_student_weight_leaves_the_critic_loss(structured):
    """calibrate_weights (or any later change of ``weight``) balances the student's terms; the
    critic's WGAN-GP loss keeps the λ_d it was built with."""
    shape = (3, 4, 4)
    critic = LinearCritic(shape)
    if structured:
        method = StructuredKD("a", "b", discriminator=critic, pair_wise_weight=0.0, holistic_weight=0.1, weight=2.0)
    else:
        method = HolisticDistillation("a", "b", discriminator=critic, weight=0.2)
    g = torch.Generator().manual_seed(4)
    q_s, q_t = torch.randn(2, *shape, dtype=DOUBLE, generator=g), torch.randn(2, *shape, dtype=DOUBLE, generator=g)
    torch.manual_seed(7)
    before = method.discriminator_loss(q_s, q_t, None)
    method.weight = 0.005  # as calibrate_weights sets it
    torch.manual_seed(7)
    after = method.discriminator_loss(q_s, q_t, None)
    assert before.keys() == after.keys() == {"discriminator", "gradient_penalty"}
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    d = lambda x: (critic.v * x + critic.w * x * x).flatten(1).sum(1)  # noqa: E731
    close(after["discriminator"], 0.2 * (-d(q_t).mean() + d(q_s).mean()))  # λ_d × weight as built


def test_holistic_conditioned_on_image_concatenates_resized_image():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean(dim=(1, 2, 3))

    method = HolisticDistillation("a", "b", discriminator=Spy(), condition_on_image=True)
    image = torch.randn(2, 3, 16, 16)
    scores = torch.randn(2, 5, 8, 8)
    method([scores, image], [torch.randn(2, 5, 8, 8)], None)
    assert seen[-1].shape == (2, 8, 8, 8)
    torch.testing.assert_close(seen[-1][:, :3], F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(seen[-1][:, 3:], scores)


def test_holistic_default_discriminator_and_optimizer():
    method = HolisticDistillation("a", "b", num_classes=19)
    assert isinstance(method.discriminator, SAGANDiscriminator) and method.weight == 0.1 and method.gradient_penalty_weight == 10.0
    opt = method.make_discriminator_optimizer()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 4e-4 and opt.defaults["momentum"] == 0.9
    conditioned = HolisticDistillation("a", "b", num_classes=19, condition_on_image=True)
    assert conditioned.discriminator.input_norm.num_features == 22


def test_sagan_discriminator_structure():
    d = SAGANDiscriminator(19)  # the released code: 65-pixel setting, 4 stride-2 convs
    convs = [m for m in d.body if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs) and not parametrize.is_parametrized(d.last, "weight")
    attention = [m for m in d.body if isinstance(m, SelfAttention2d)]
    assert [a.value.in_channels for a in attention] == [256, 512] and all(float(a.gamma.detach()) == 0.0 for a in attention)
    assert isinstance(d.input_norm, nn.BatchNorm2d)
    assert d(torch.randn(2, 19, 64, 64)).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="depth="):
        d(torch.randn(2, 19, 16, 16))


def test_self_attention_matches_formula():
    torch.manual_seed(0)
    attn = SelfAttention2d(16).double()
    nn.init.constant_(attn.gamma, 0.7)
    x = torch.randn(2, 16, 3, 3, dtype=DOUBLE)
    q, k, v = (conv(x).flatten(2) for conv in (attn.query, attn.key, attn.value))
    out = torch.empty(2, 16, 9, dtype=DOUBLE)
    for b in range(2):
        weights = torch.softmax(q[b].t() @ k[b], dim=1)  # weights[i, j]: position i attends to j
        for i in range(9):
            out[b, :, i] = (v[b] * weights[i]).sum(1)
    close(attn(x), x + 0.7 * out.reshape(2, 16, 3, 3))


# --- StructuredKD ------------------------------------------------------------------------------


def test_structured_kd_is_the_sum_of_its_parts():
    critic = LinearCritic((3, 4, 4))
    method = StructuredKD("s", "t", "fs", "ft", discriminator=critic, pair_wise_weight=0.5)
    g = torch.Generator().manual_seed(5)
    q_s, q_t = torch.randn(2, 3, 4, 4, dtype=DOUBLE, generator=g), torch.randn(2, 3, 4, 4, dtype=DOUBLE, generator=g)
    f_s, f_t = torch.randn(2, 6, 8, 8, dtype=DOUBLE, generator=g), torch.randn(2, 7, 8, 8, dtype=DOUBLE, generator=g)
    parts = method([q_s, f_s], [q_t, f_t], None)
    assert set(parts) == {"pixel_wise", "pair_wise", "adversarial"}
    close(parts["pixel_wise"], 10.0 * direct_pixel_wise(q_s, q_t))
    close(parts["pair_wise"], 0.5 * direct_pair_wise(f_s, f_t, 0.5))
    close(parts["adversarial"], -0.1 * critic(q_s).mean())
    assert "discriminator" in dict(method.named_children()) and not any(n.startswith("holistic") for n in method.state_dict())


def test_structured_kd_in_a_distiller_end_to_end():
    class Seg(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
            self.classifier = nn.Conv2d(width, 4, 1)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    method = StructuredKD("classifier", "classifier", "body", "body", num_classes=4, discriminator_conv_dim=8, discriminator_depth=2)
    distiller = Distiller(Seg(4), Seg(8), [method])
    out = distiller(torch.randn(2, 3, 16, 16))
    assert set(out.losses) == {"structured_kd/pixel_wise", "structured_kd/pair_wise", "structured_kd/adversarial"}
    out.total.backward()
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(p.grad is not None for p in distiller.student.parameters())


def test_structured_kd_without_holistic_has_no_discriminator():
    method = StructuredKD("s", "t", holistic_weight=0.0, pair_wise_weight=0.0)
    assert method.discriminator is None
    parts = method([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)], None)
    assert set(parts) == {"pixel_wise"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pixel_wise_weight=0.0, pair_wise_weight=0.0, holistic_weight=0.0), "all 0"),
        (dict(num_classes=3), "needs student_feature"),
        (dict(pair_wise_weight=0.0), "num_classes="),
        (dict(pair_wise_weight=0.0, num_classes=3, holistic_weight=-1.0), "holistic_weight"),
        (dict(pair_wise_weight=0.0, num_classes=3, order="d_first"), "order"),
        (dict(pair_wise_weight=0.0, num_classes=3, discriminator_steps=0), "discriminator_steps"),
        (dict(pair_wise_weight=0.0, num_classes=3, gradient_penalty_weight=math.nan), "gradient_penalty_weight"),
        (dict(pair_wise_weight=0.0, discriminator="sagan"), "discriminator"),
    ],
)
def test_structured_kd_bad_configurations(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StructuredKD("s", "t", **kwargs)


def test_numeric_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        PairWiseDistillation("a", "b", 0.5)
    with pytest.raises(TypeError):
        HolisticDistillation("a", "b", 19)


def test_score_map_mismatch_names_the_method():
    with pytest.raises(ValueError, match="structured_kd"):
        StructuredKD("s", "t", pair_wise_weight=0.0, holistic_weight=0.0)([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 8, 8)], None)
