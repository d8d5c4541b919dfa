"""GAN Compression's distillation: Li et al., "GAN Compression: Efficient Architectures for
Interactive Conditional GANs" (CVPR 2020); code mit-han-lab/gan-compression
(``distillers/base_resnet_distiller.py``, ``distillers/resnet_distiller.py``, ``models/modules/loss.py``).
docs/methods.md §6.

The compressed generator G' is trained with its own cGAN loss, a reconstruction loss and the
distillation of intermediate teacher activations::

    L_G = λ_gan L_cGAN(G') + λ_recon L_recon + λ_distill Σ_k MSE(f_k(G'_k(x)), G_k(x))
    L_D = ½ (L_D,fake + L_D,real)

- f_k: a 1×1 convolution with bias (the official ``nn.Conv2d(4·ngf_s, 4·ngf_t, 1)``, initialised
  N(0, 0.02), bias 0, by ``init_net``), trained with the student; MSE is the element mean.
- L_recon: L1 (default; ``"l2"``, ``"smooth_l1"``) against the ground truth y for paired data
  (pix2pix) or against the teacher's output G(x) for unpaired data (CycleGAN).
- L_cGAN: hinge (default, the distill options) or lsgan (the CycleGAN scripts). Hinge:
  L_G = −E D(fake), L_D,real = E max(0, 1 − D(real)), L_D,fake = E max(0, 1 + D(fake));
  lsgan: L_G = E (D(fake) − 1)², L_D,real = E (D(real) − 1)², L_D,fake = E D(fake)².
  Paired data: D sees the input concatenated with the output (fake = [x, G'(x)], real = [x, y]);
  unpaired: the output only (real = y, an image of the target domain).
- Defaults: λ_recon = 100, λ_distill = 1, λ_gan = 1; D: a PatchGAN, Adam lr 2e-4, β = (0.5, 0.999).
  Tuned on pix2pix/CycleGAN datasets at 256², batch 1 (edges2shoes: 4), ResNet generators with
  ngf 64 → 48/32 (distilled layers: the last down-sampling ReLU and residual blocks 3, 6, 9,
  ``model.9/12/15/18``); horse2zebra and map2sat scripts use λ_recon = 10, λ_distill = 0.01.
  Scale: every term is a mean over elements, so none grows with batch or image size; the
  distill sum grows with the number of layers.

Step order: the official step computes the discriminator's and the student's losses from one
forward with the same discriminator parameters and steps both after, which is this trainer's
default ``order="generator_first"`` (the student's adversarial term uses the discriminator
before its update; the discriminator step uses the detached student output of that forward).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.adversarial import AdversarialMethod, at_least_fp32
from kdkernels.distill.capture import FeatureSpec, SpecLike
from kdkernels.distill.connectors import Conv1x1
from kdkernels.distill.discriminators import PatchDiscriminator
from kdkernels.distill.method import check_same_shape, check_weight, require_target
from kdkernels.distill.method import paired as paired_layers

GAN_MODES = ("hinge", "lsgan")
RECON_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}
MODEL_OUTPUT = FeatureSpec("")
MODEL_INPUT = FeatureSpec("", on="input")


def generator_gan_loss(prediction: torch.Tensor, gan_mode: str) -> torch.Tensor:
    """The student's cGAN term on D(fake) (target "real")."""
    prediction = at_least_fp32(prediction)
    if gan_mode == "hinge":
        return -prediction.mean()
    return F.mse_loss(prediction, torch.ones_like(prediction))


def discriminator_gan_loss(prediction: torch.Tensor, real: bool, gan_mode: str) -> torch.Tensor:
    """The discriminator's cGAN term on D(real) or D(fake)."""
    prediction = at_least_fp32(prediction)
    if gan_mode == "hinge":
        return F.relu(1 - prediction).mean() if real else F.relu(1 + prediction).mean()
    return F.mse_loss(prediction, torch.full_like(prediction, 1.0 if real else 0.0))


def _channel_list(name: str, value, count: int) -> list[int]:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"gan_compression: {name}: expected one per distilled layer ({count}), got {len(values)}")
    return values


class GANCompressionDistillation(AdversarialMethod):
    """GAN Compression (Li et al., CVPR 2020): L_G = λ_gan L_cGAN + λ_recon L_recon +
    λ_distill Σ_k MSE(f_k(G'_k(x)), G_k(x)) for the student generator, L_D = ½ (L_D,fake + L_D,real)
    for the discriminator it owns (details in the module docstring).

    Defaults (λ_recon = 100, λ_distill = 1, λ_gan = 1, hinge, D Adam 2e-4, β₁ = 0.5) were tuned on
    pix2pix/CycleGAN datasets at 256², batch 1–4, ResNet generators ngf 64 → 48/32. Every term is
    an element mean: none grows with batch or image size; the distill sum grows with the layers.

    The distiller is called as ``distiller(x, target)``: ``target`` is the ground-truth output
    for paired data and an image of the target domain (the discriminator's "real") for unpaired
    data. Returns ``{"distill": λ_distill Σ_k MSE, "recon": λ_recon L_recon, "adversarial":
    λ_gan L_G}`` (a part with weight 0 is left out); the discriminator loss is
    ``{"discriminator_fake": ½ L_D,fake, "discriminator_real": ½ L_D,real}``.

    Args:
        student_layers, teacher_layers: the distilled activations (equal-length lists).
        student_channels, teacher_channels: their channel counts (one per layer, or one int for all).
        discriminator: the discriminator module; default a :class:`PatchDiscriminator` for
            ``input_channels + output_channels`` (paired) or ``output_channels`` (unpaired) channels.
        input_channels, output_channels: image channels of x and of the generator's output
            (needed for the default discriminator).
        paired: aligned data (pix2pix, default True) or unaligned (CycleGAN).
        gan_mode: ``"hinge"`` (default) or ``"lsgan"``.
        recon_loss: ``"l1"`` (default), ``"l2"`` or ``"smooth_l1"``.
        recon_weight: λ_recon (100). distill_weight: λ_distill (1). gan_weight: λ_gan (1).
        discriminator_lr, discriminator_betas: Adam of the discriminator (2e-4, (0.5, 0.999)).
        order, discriminator_steps: see :class:`~kdkernels.distill.adversarial.AdversarialMethod`.
        weight: factor on every student part (default 1).
    """

    name = "gan_compression"

    def __init__(
        self,
        student_layers: Sequence[SpecLike] | SpecLike,
        teacher_layers: Sequence[SpecLike] | SpecLike,
        *,
        student_channels: Sequence[int] | int,
        teacher_channels: Sequence[int] | int,
        discriminator: nn.Module | None = None,
        input_channels: int | None = None,
        output_channels: int | None = None,
        paired: bool = True,
        gan_mode: str = "hinge",
        recon_loss: str = "l1",
        recon_weight: float = 100.0,
        distill_weight: float = 1.0,
        gan_weight: float = 1.0,
        discriminator_lr: float = 2e-4,
        discriminator_betas: tuple[float, float] = (0.5, 0.999),
        order: str = "generator_first",
        discriminator_steps: int = 1,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        s, t = paired_layers("gan_compression", student_layers, teacher_layers)
        layer_count = len(s)
        super().__init__(
            list(s) + [MODEL_OUTPUT, MODEL_INPUT], list(t) + [MODEL_OUTPUT], weight, name, order=order, discriminator_steps=discriminator_steps
        )
        if gan_mode not in GAN_MODES:
            raise ValueError(f"{self.name}: gan_mode: expected one of {GAN_MODES}, got {gan_mode!r}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"{self.name}: recon_loss: expected one of {tuple(RECON_LOSSES)}, got {recon_loss!r}")
        self.paired, self.gan_mode, self.recon_loss = bool(paired), gan_mode, recon_loss
        self.recon_weight = check_weight(recon_weight, f"{self.name}: recon_weight")
        self.distill_weight = check_weight(distill_weight, f"{self.name}: distill_weight")
        self.gan_weight = check_weight(gan_weight, f"{self.name}: gan_weight")
        self.discriminator_lr = check_weight(discriminator_lr, f"{self.name}: discriminator_lr")
        self.discriminator_betas = tuple(float(b) for b in discriminator_betas)
        self.layer_count = layer_count
        self.connectors = nn.ModuleList()
        if self.distill_weight:
            for c_s, c_t in zip(_channel_list("student_channels", student_channels, layer_count), _channel_list("teacher_channels", teacher_channels, layer_count)):
                connector = Conv1x1(c_s, c_t, bias=True)
                nn.init.normal_(connector[0].weight, 0.0, 0.02)  # the official init_net('normal', 0.02)
                nn.init.zeros_(connector[0].bias)
                self.connectors.append(connector)
        if discriminator is None and self.gan_weight:
            if output_channels is None or (self.paired and input_channels is None):
                needed = "input_channels= and output_channels=" if self.paired else "output_channels="
                raise ValueError(f"{self.name}: pass {needed} for the default PatchGAN discriminator, or a discriminator= module")
            discriminator = PatchDiscriminator(output_channels + (input_channels if self.paired else 0))
        elif discriminator is not None and not isinstance(discriminator, nn.Module):
            raise TypeError(f"{self.name}: discriminator: expected an nn.Module, got {type(discriminator).__name__}")
        self.discriminator = discriminator if self.gan_weight else None

    def generator_adversarial_loss(self, fake, condition):
        prediction = self.frozen_discriminator(self.discriminator_input(fake, condition))
        return self.gan_weight * generator_gan_loss(prediction, self.gan_mode)

    def discriminator_loss(self, fake, real, condition):
        pred_fake = self.discriminator(self.discriminator_input(fake.detach(), condition))
        pred_real = self.discriminator(self.discriminator_input(real.detach(), condition))
        return {
            "discriminator_fake": 0.5 * discriminator_gan_loss(pred_fake, False, self.gan_mode),
            "discriminator_real": 0.5 * discriminator_gan_loss(pred_real, True, self.gan_mode),
        }

    def make_discriminator_optimizer(self):
        return torch.optim.Adam(self.discriminator.parameters(), lr=self.discriminator_lr, betas=self.discriminator_betas)

    def forward(self, student, teacher, target):
        n = self.layer_count
        student_acts, output, image = student[:n], student[n], student[n + 1]
        teacher_acts, teacher_output = teacher[:n], teacher[n]
        for what, value in (("the student's output", output), ("the teacher's output", teacher_output)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{self.name}: {what} is a {type(value).__name__}; the generators must return an image tensor")
        losses: dict[str, torch.Tensor] = {}
        if self.distill_weight:
            distill = 0.0
            for k, (s, t, connector) in enumerate(zip(student_acts, teacher_acts, self.connectors)):
                s = connector(s)
                check_same_shape(self.name, f"{self.student_features[k]} (after the connector) vs {self.teacher_features[k]}", s, t)
                distill = distill + F.mse_loss(s, t.detach())
            losses["distill"] = self.distill_weight * distill
        if self.paired or self.gan_weight:
            target = require_target(self.name, target)
        recon_reference = target if self.paired else teacher_output.detach()
        if self.recon_weight:
            check_same_shape(self.name, "the student's output vs " + ("the target" if self.paired else "the teacher's output"), output, recon_reference)
            losses["recon"] = self.recon_weight * RECON_LOSSES[self.recon_loss](output, recon_reference)
        if self.discriminator is not None:
            condition = image if self.paired else None
            if condition is not None and (not isinstance(condition, torch.Tensor) or condition.shape[-2:] != output.shape[-2:]):
                raise ValueError(f"{self.name}: paired data: the model input must be an image of the output's spatial size, to condition the discriminator")
            check_same_shape(self.name, "the student's output vs the target (the discriminator's real sample)", output, target)
            losses[self.adversarial_part] = self.adversarial_term(output, target, condition)
        return losses


__all__ = ["GANCompressionDistillation", "discriminator_gan_loss", "generator_gan_loss"]
