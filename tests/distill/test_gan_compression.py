"""GAN Compression (docs/methods.md §6): the student's and the discriminator's losses against a
direct formula written here in float64, the connectors, the default discriminator, and errors."""

import pytest
import torch
from torch import nn

from distill_nets import TinyGenerator
from kdkernels.distill import Distiller, GANCompressionDistillation
from kdkernels.distill.discriminators import PatchDiscriminator

DOUBLE = torch.float64


def close(actual, expected):
    assert actual.dtype == DOUBLE
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-10, atol=1e-12)


class Critic(nn.Module):
    """A fixed small patch critic: a 1×1 conv, so D is easy to write out by hand."""

    def __init__(self, channels):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(channels, dtype=DOUBLE, generator=g))

    def forward(self, x):
        return torch.einsum("c,bchw->bhw", self.w, x).unsqueeze(1)


def make(paired=True, gan_mode="hinge", **kwargs):
    critic = Critic(3 + (1 if paired else 0))
    method = GANCompressionDistillation(
        ["a", "b"], ["a", "b"], student_channels=[2, 3], teacher_channels=[4, 6], discriminator=critic, paired=paired, gan_mode=gan_mode, **kwargs
    ).double()
    return method, critic


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=DOUBLE, generator=g)  # noqa: E731
    student = [r(2, 2, 4, 4).requires_grad_(), r(2, 3, 4, 4).requires_grad_(), r(2, 3, 8, 8).requires_grad_(), r(2, 1, 8, 8)]
    teacher = [r(2, 4, 4, 4), r(2, 6, 4, 4), r(2, 3, 8, 8)]
    return student, teacher, r(2, 3, 8, 8)


def direct_distill(method, student, teacher):
    total = 0.0
    for k, (s, t) in enumerate(zip(student[:2], teacher[:2])):
        conv = method.connectors[k][0]
        mapped = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s) + conv.bias.reshape(1, -1, 1, 1)
        total = total + ((mapped - t) ** 2).mean()
    return total


@pytest.mark.parametrize("gan_mode", ["hinge", "lsgan"])
def test_paired_losses_match_formula(gan_mode):
    method, critic = make(paired=True, gan_mode=gan_mode)
    student, teacher, y = inputs()
    parts = method(student, teacher, y)
    out, x = student[2], student[3]
    d = lambda img: critic(torch.cat([x, img], 1))  # noqa: E731  (paired: D sees [x, output])
    close(parts["distill"], direct_distill(method, student, teacher))
    close(parts["recon"], 100.0 * (out - y).abs().mean())
    g_term = -d(out).mean() if gan_mode == "hinge" else ((d(out) - 1) ** 2).mean()
    close(parts["adversarial"], g_term)

    losses = method.discriminator_loss(out.detach(), y, x)
    if gan_mode == "hinge":
        fake, real = torch.clamp(1 + d(out), min=0).mean(), torch.clamp(1 - d(y), min=0).mean()
    else:
        fake, real = (d(out) ** 2).mean(), ((d(y) - 1) ** 2).mean()
    close(losses["discriminator_fake"], 0.5 * fake)
    close(losses["discriminator_real"], 0.5 * real)


def test_unpaired_recon_is_against_the_teacher_and_d_is_unconditioned():
    method, critic = make(paired=False)
    student, teacher, y = inputs(1)
    parts = method(student, teacher, y)
    out = student[2]
    close(parts["recon"], 100.0 * (out - teacher[2]).abs().mean())
    close(parts["adversarial"], -critic(out).mean())
    losses = method.discriminator_loss(out.detach(), y, None)
    close(losses["discriminator_real"], 0.5 * torch.clamp(1 - critic(y), min=0).mean())


def test_generator_gradients_reach_student_and_connectors_not_discriminator():
    method, critic = make()
    student, teacher, y = inputs(2)
    parts = method(student, teacher, y)
    sum(parts.values()).backward()
    assert critic.w.grad is None
    assert all(s.grad is not None for s in student[:3])
    assert all(p.grad is not None for p in method.connectors.parameters())


def test_weights_and_recon_options():
    method, critic = make(recon_weight=10.0, distill_weight=0.01, gan_weight=2.0, recon_loss="l2")
    student, teacher, y = inputs(3)
    parts = method(student, teacher, y)
    reference, _ = make()
    reference.load_state_dict(method.state_dict())
    base = reference(student, teacher, y)
    close(parts["distill"], 0.01 * base["distill"])
    close(parts["adversarial"], 2.0 * base["adversarial"])
    close(parts["recon"], 10.0 * ((student[2] - y) ** 2).mean())


def test_connectors_are_1x1_convs_with_bias():
    method, _ = make()
    conv = method.connectors[1][0]
    assert conv.kernel_size == (1, 1) and conv.bias is not None and (conv.in_channels, conv.out_channels) == (3, 6)
    torch.testing.assert_close(conv.bias, torch.zeros_like(conv.bias))
    assert 0.005 < conv.weight.std().item() < 0.05  # N(0, 0.02)


def test_default_discriminator_and_optimizer():
    paired = GANCompressionDistillation("a", "a", student_channels=8, teacher_channels=16, input_channels=1, output_channels=3)
    assert isinstance(paired.discriminator, PatchDiscriminator) and paired.discriminator.model[0].in_channels == 4
    unpaired = GANCompressionDistillation("a", "a", student_channels=8, teacher_channels=16, output_channels=3, paired=False)
    assert unpaired.discriminator.model[0].in_channels == 3
    opt = paired.make_discriminator_optimizer()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
    assert (paired.recon_weight, paired.distill_weight, paired.gan_weight, paired.gan_mode) == (100.0, 1.0, 1.0, "hinge")


def test_patch_discriminator_is_pix2pix():
    d = PatchDiscriminator(6)
    convs = [m for m in d.model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in d.model) == 3
    assert d(torch.randn(1, 6, 64, 64)).shape == (1, 1, 6, 6)  # 70×70 receptive-field patches


def test_in_a_distiller_with_hooked_generators():
    torch.manual_seed(0)
    method = GANCompressionDistillation("model.1", "model.1", student_channels=4, teacher_channels=8, input_channels=1, output_channels=3)
    distiller = Distiller(TinyGenerator(4), TinyGenerator(8), [method])
    out = distiller(torch.randn(2, 1, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1)
    assert set(out.losses) == {"gan_compression/distill", "gan_compression/recon", "gan_compression/adversarial"}
    out.total.backward()
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gan_mode="vanilla"), "gan_mode"),
        (dict(recon_loss="vgg"), "recon_loss"),
        (dict(student_channels=[2, 3, 4]), "student_channels"),
        (dict(recon_weight=-1.0), "recon_weight"),
        (dict(discriminator=None, output_channels=3), "input_channels= and output_channels="),
        (dict(discriminator="patch"), "discriminator"),
        (dict(order="sideways"), "order"),
    ],
)
def test_bad_configurations(kwargs, match):
    base = dict(student_channels=[2, 3], teacher_channels=[4, 6], discriminator=Critic(4))
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        GANCompressionDistillation(["a", "b"], ["a", "b"], **base)


def test_missing_target_names_the_method():
    method, _ = make()
    student, teacher, _ = inputs()
    with pytest.raises(ValueError, match="gan_compression: needs the labels"):
        method(student, teacher, None)
