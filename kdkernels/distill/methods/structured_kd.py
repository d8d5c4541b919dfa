"""Structured knowledge distillation for dense prediction: Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation" (CVPR 2019); code irfanICMLL/structure_knowledge_distillation
(``utils/criterion.py``, ``utils/utils.py``, ``networks/sagan_models.py``, ``networks/kd_model.py``).
docs/methods.md §5.

Three terms, each usable alone (:class:`PixelWiseDistillation`, :class:`PairWiseDistillation`,
:class:`HolisticDistillation`) or together (:class:`StructuredKD`):

- pixel-wise, on (B, C, H, W) score maps, T = 1, summed over the batch (not averaged)::

      ℓ_pi = (1 / HW) Σ_b Σ_i −Σ_c q^t_{b,i,c} log q^s_{b,i,c}

- pair-wise, on a feature map max-pooled to a coarse grid of N = H'W' nodes (kernel = stride =
  ⌊scale·H⌋ × ⌊scale·W⌋, ``ceil_mode``), with cosine similarities whose norms are detached::

      a_ij = f_iᵀ f_j / ((‖f_i‖ + 1e-8)(‖f_j‖ + 1e-8)),   ℓ_pa = (1/B) Σ_b (1/N²) Σ_ij (a^s_ij − a^t_ij)²

- holistic, WGAN-GP with a SAGAN discriminator D on the score maps (Q_s, Q_t)::

      L_G = −λ_d E D(Q_s)
      L_D = λ_d [−E D(Q_t) + E D(Q_s)] + λ_d λ_gp E (‖∇_x̂ D(x̂)‖₂ − 1)²,   x̂ = ε Q_t + (1 − ε) Q_s

Defaults are the official ones: λ_pi = 10, λ_pa = 1.0 (argparse; ``run_train_val.sh`` uses 0.5),
λ_d = 0.1, λ_gp = 10, pool scale 0.5, D unconditioned (the released code; ``condition_on_image=True``
concatenates the image, resized to the score map, as the paper describes), D updated once per
student step after it. They were tuned on Cityscapes, PSPNet-R101 → PSPNet-R18, 512² crops, batch
8, 19-class score maps at 1/8 resolution (64 × 64) and a 512-channel pair-wise feature pooled to a
2 × 2 grid. Scale: ℓ_pi grows linearly with the batch (it is a sum over the batch) and not with
the map size; ℓ_pa is a mean (independent of batch, map size and channels) in [0, 4]; the
holistic terms are means over the batch and the discriminator's output positions.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from kdkernels.distill.adversarial import AdversarialMethod, at_least_fp32, gradient_penalty
from kdkernels.distill.capture import FeatureSpec, SpecLike
from kdkernels.distill.discriminators import SAGANDiscriminator
from kdkernels.distill.method import Method, check_same_shape, check_weight, full_precision
from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce

MODEL_INPUT = FeatureSpec("", on="input")  # the image: the first positional input of the model


def _check_maps(method: str, what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 4:
        raise ValueError(f"{method}: {what}: expected (B, C, H, W) maps, got shape {tuple(student.shape)}")
    check_same_shape(method, what, student, teacher)


def pixel_wise_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """ℓ_pi on (B, C, H, W) score maps: the fused soft cross-entropy along the class dim, read in
    place, summed over batch and positions, divided by H·W (the official normalisation)."""
    _check_maps("pixel_wise", "scores", student_scores, teacher_scores)
    h, w = student_scores.shape[-2:]
    return weighted_soft_ce(student_scores, teacher_scores.detach(), temperature=1.0, reduction="sum", dim=1) / (h * w)


def pool_to_grid(feature: torch.Tensor, scale: float) -> torch.Tensor:
    """Max-pool with kernel = stride = (⌊scale·H⌋, ⌊scale·W⌋) and ``ceil_mode``: the coarse node grid."""
    h, w = feature.shape[-2:]
    kernel = (int(h * scale), int(w * scale))
    if min(kernel) < 1:
        raise ValueError(f"pair_wise: pool_scale={scale} gives an empty pooling window on a {h}×{w} feature; raise pool_scale")
    return F.max_pool2d(feature, kernel_size=kernel, stride=kernel, ceil_mode=True)


def _pairwise_similarity(student_grid: torch.Tensor, teacher_grid: torch.Tensor) -> torch.Tensor:
    # The tiled fused loss: the mean over node pairs of (a^s − a^t)² with detached norms, averaged
    # over the batch, without the (H'W')² similarity matrices.
    return pairwise_similarity_loss(student_grid, teacher_grid.detach())


def pair_wise_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, pool_scale: float = 0.5) -> torch.Tensor:
    """ℓ_pa: pool both features to the node grid, then the similarity loss. Half-precision
    features are upcast to float32 (the released code's ``feat.float()``); float64 stays float64."""
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise ValueError(f"pair_wise: expected (B, C, H, W) features, got {tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}")
    if student_feature.shape[0] != teacher_feature.shape[0] or student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        raise ValueError(
            f"pair_wise: student feature {tuple(student_feature.shape)} and teacher feature {tuple(teacher_feature.shape)} "
            "must share batch and spatial size (channels may differ)"
        )

    s = at_least_fp32(pool_to_grid(student_feature, pool_scale))
    t = at_least_fp32(pool_to_grid(teacher_feature.detach(), pool_scale))
    with full_precision(s):  # the similarity matmuls stay in fp32 under bf16/fp16 autocast
        return _pairwise_similarity(s, t)


def _check_pool_scale(pool_scale) -> float:
    if isinstance(pool_scale, bool) or not isinstance(pool_scale, (int, float)) or not 0 < pool_scale <= 1:
        raise ValueError(f"pair_wise: pool_scale: expected a number in (0, 1], got {pool_scale!r}")
    return float(pool_scale)


class PixelWiseDistillation(Method):
    """Structured KD's pixel-wise term alone (Liu et al., CVPR 2019):
    ℓ_pi = (1/HW) Σ_b Σ_i −Σ_c q^t log q^s, T = 1, through the fused ``weighted_soft_ce``.

    λ_pi = 10 was tuned on Cityscapes with 19-class 64 × 64 score maps and batch 8. ℓ_pi is a
    sum over the batch: it grows linearly with the (per-process, under DDP) batch size, not with
    the map size; scale λ_pi by 8 / batch to keep the official balance against a mean CE.

    Args:
        student_layer, teacher_layer: the (B, C, H, W) score maps (e.g. the segmentation head's
            classifier); same shape on both sides.
        weight: λ_pi (default 10, official).
    """

    name = "pixel_wise"

    def __init__(self, student_layer: SpecLike = "", teacher_layer: SpecLike = "", *, weight: float = 10.0, name: str | None = None) -> None:
        super().__init__([student_layer], [teacher_layer], weight, name)

    def forward(self, student, teacher, target):
        _check_maps(self.name, f"{self.student_features[0]} vs {self.teacher_features[0]}", student[0], teacher[0])
        return pixel_wise_loss(student[0], teacher[0])


class PairWiseDistillation(Method):
    """Structured KD's pair-wise term alone (Liu et al., CVPR 2019): features max-pooled to a
    grid of N nodes, a_ij = cosine similarity with detached norms,
    ℓ_pa = (1/B) Σ_b (1/N²) Σ_ij (a^s_ij − a^t_ij)².

    λ_pa = 1.0 was tuned on Cityscapes with 512-channel 64 × 64 PSP features pooled to 2 × 2,
    batch 8. ℓ_pa is a mean in [0, 4]: independent of batch, channels and map size.

    Args:
        student_layer, teacher_layer: (B, C, H, W) features of one spatial size (the released
            code: the PSP module outputs, 512 channels); the channel counts may differ.
        pool_scale: window as a fraction of H and W (default 0.5: a 2 × 2 grid).
        weight: λ_pa (default 1.0, argparse; 0.5 in ``run_train_val.sh``).
    """

    name = "pair_wise"

    def __init__(self, student_layer: SpecLike, teacher_layer: SpecLike, *, pool_scale: float = 0.5, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__([student_layer], [teacher_layer], weight, name)
        self.pool_scale = _check_pool_scale(pool_scale)

    def forward(self, student, teacher, target):
        return pair_wise_loss(student[0], teacher[0], self.pool_scale)


class HolisticDistillation(AdversarialMethod):
    """Structured KD's holistic term alone (Liu et al., CVPR 2019): a WGAN-GP critic D on score maps,
    L_G = −λ_d E D(Q_s), L_D = λ_d [−E D(Q_t) + E D(Q_s)] + λ_d λ_gp E (‖∇D(x̂)‖₂ − 1)².

    λ_d = 0.1 and λ_gp = 10 were tuned on Cityscapes (19-class 64 × 64 score maps, batch 8, D lr
    4e-4). Both terms are means over batch and D's output positions: they do not grow with the
    batch; they scale with D's output magnitude, which the gradient penalty keeps near 1-Lipschitz.

    Returns ``{"adversarial": −E D(Q_s)}`` to the distiller (which multiplies by ``weight`` = λ_d);
    the discriminator loss is ``{"discriminator": λ_d[−E D(Q_t) + E D(Q_s)], "gradient_penalty":
    λ_d λ_gp GP}`` with λ_d as constructed (``discriminator_weight``): calibration
    (:func:`~kdkernels.distill.calibrate_weights`) or a later change of ``weight`` balances the
    student's term against its other losses and leaves the critic's training as it was (a smaller
    λ_d on the critic's loss would only slow its SGD steps).

    Args:
        student_layer, teacher_layer: the (B, C, H, W) score maps.
        num_classes: C; with ``discriminator=None`` a :class:`SAGANDiscriminator` is built for it.
        discriminator: a module mapping (B, C[+3], H, W) to scores (overrides the default).
        condition_on_image: concatenate the student's input image, resized to the score map
            (bilinear), to D's input (the paper); default False (the released code).
        image_channels: channels of that image (default 3).
        discriminator_conv_dim, discriminator_depth: the default D's ``conv_dim`` (64) and ``depth`` (4,
            for 64 × 64 maps; use 2 for 16 × 16).
        weight: λ_d (default 0.1). gradient_penalty_weight: λ_gp (default 10).
        discriminator_lr: the default optimiser's learning rate (SGD, momentum 0.9, weight decay
            1e-4; lr 4e-4: the official lr_D).
        order, discriminator_steps: see :class:`~kdkernels.distill.adversarial.AdversarialMethod`
            (default: the student step first, then one discriminator step, as ``kd_model.py``).
    """

    name = "holistic"

    def __init__(
        self,
        student_layer: SpecLike = "",
        teacher_layer: SpecLike = "",
        *,
        num_classes: int | None = None,
        discriminator: torch.nn.Module | None = None,
        condition_on_image: bool = False,
        image_channels: int = 3,
        discriminator_conv_dim: int = 64,
        discriminator_depth: int = 4,
        weight: float = 0.1,
        gradient_penalty_weight: float = 10.0,
        discriminator_lr: float = 4e-4,
        order: str = "generator_first",
        discriminator_steps: int = 1,
        name: str | None = None,
    ) -> None:
        student_specs = [student_layer] + ([MODEL_INPUT] if condition_on_image else [])
        super().__init__(student_specs, [teacher_layer], weight, name, order=order, discriminator_steps=discriminator_steps)
        self.condition_on_image = bool(condition_on_image)
        self.discriminator_weight = self.weight  # λ_d of the critic's loss; calibration leaves it
        self.gradient_penalty_weight = check_weight(gradient_penalty_weight, f"{self.name}: gradient_penalty_weight")
        self.discriminator_lr = check_weight(discriminator_lr, f"{self.name}: discriminator_lr")
        if discriminator is None:
            if num_classes is None:
                raise ValueError(f"{self.name}: pass num_classes= (the score maps' channels) or a discriminator= module")
            in_channels = num_classes + (image_channels if condition_on_image else 0)
            discriminator = SAGANDiscriminator(in_channels, conv_dim=discriminator_conv_dim, depth=discriminator_depth)
        elif not isinstance(discriminator, torch.nn.Module):
            raise TypeError(f"{self.name}: discriminator: expected an nn.Module, got {type(discriminator).__name__}")
        self.discriminator = discriminator

    def _condition(self, scores: torch.Tensor, student: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.condition_on_image:
            return None
        image = student[-1]
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(f"{self.name}: condition_on_image needs the model's first positional input to be a (B, 3, H, W) image")
        return F.interpolate(image.to(scores.dtype), size=scores.shape[-2:], mode="bilinear", align_corners=False)

    def generator_adversarial_loss(self, fake, condition):
        return -at_least_fp32(self.frozen_discriminator(self.discriminator_input(fake, condition))).mean()

    def discriminator_loss(self, fake, real, condition):
        fake_in = self.discriminator_input(fake.detach(), condition)
        real_in = self.discriminator_input(real.detach(), condition)
        wasserstein = -at_least_fp32(self.discriminator(real_in)).mean() + at_least_fp32(self.discriminator(fake_in)).mean()
        losses = {"discriminator": self.discriminator_weight * wasserstein}
        if self.gradient_penalty_weight:
            losses["gradient_penalty"] = self.discriminator_weight * self.gradient_penalty_weight * gradient_penalty(self.discriminator, real_in, fake_in)
        return losses

    def make_discriminator_optimizer(self):
        return torch.optim.SGD(self.discriminator.parameters(), lr=self.discriminator_lr, momentum=0.9, weight_decay=1e-4)

    def adversarial_parts(self, scores_s: torch.Tensor, scores_t: torch.Tensor, student: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        _check_maps(self.name, f"{self.student_features[0]} vs {self.teacher_features[0]}", scores_s, scores_t)
        term = self.adversarial_term(scores_s, scores_t, self._condition(scores_s, student))
        return {} if term is None else {self.adversarial_part: term}

    def forward(self, student, teacher, target):
        return self.adversarial_parts(student[0], teacher[0], student)


class StructuredKD(AdversarialMethod):
    """Structured KD (Liu et al., CVPR 2019): λ_pi ℓ_pi + λ_pa ℓ_pa − λ_d E D(Q_s) for the student,
    the WGAN-GP loss for the discriminator (formulas in the module docstring).

    Defaults (10, 1.0, 0.1, λ_gp = 10) are the official ones, tuned on Cityscapes with PSPNet
    R101 → R18, batch 8, 19-class score maps at 64 × 64. The pixel term is a sum over the batch
    (it grows linearly with the per-process batch); the pair-wise and holistic terms are means.

    Returns ``{"pixel_wise": λ_pi ℓ_pi, "pair_wise": λ_pa ℓ_pa, "adversarial": −λ_d E D(Q_s)}``
    (a part with weight 0 is left out; with ``holistic_weight=0`` there is no discriminator and
    the method trains with a plain Distiller). The discriminator step is the holistic one.

    Args:
        student_scores, teacher_scores: the (B, C, H, W) score maps (same shape).
        student_feature, teacher_feature: the pair-wise features (same spatial size); required
            when ``pair_wise_weight > 0``.
        num_classes: C, for the default discriminator.
        pixel_wise_weight: λ_pi (10). pair_wise_weight: λ_pa (1.0; 0.5 in the official script).
        holistic_weight: λ_d (0.1). gradient_penalty_weight: λ_gp (10).
        pool_scale: the pair-wise grid (0.5). Other keywords as :class:`HolisticDistillation`.
        weight: factor on every part, discriminator losses included (default 1); the critic's
            losses keep λ_d × ``weight`` as constructed: calibration rescales the student's parts
            only (see :class:`HolisticDistillation`).
    """

    name = "structured_kd"

    def __init__(
        self,
        student_scores: SpecLike = "",
        teacher_scores: SpecLike = "",
        student_feature: SpecLike | None = None,
        teacher_feature: SpecLike | None = None,
        *,
        num_classes: int | None = None,
        pixel_wise_weight: float = 10.0,
        pair_wise_weight: float = 1.0,
        holistic_weight: float = 0.1,
        gradient_penalty_weight: float = 10.0,
        pool_scale: float = 0.5,
        discriminator: torch.nn.Module | None = None,
        condition_on_image: bool = False,
        image_channels: int = 3,
        discriminator_conv_dim: int = 64,
        discriminator_depth: int = 4,
        discriminator_lr: float = 4e-4,
        order: str = "generator_first",
        discriminator_steps: int = 1,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        self_name = name or self.name
        pixel = check_weight(pixel_wise_weight, f"{self_name}: pixel_wise_weight")
        pair = check_weight(pair_wise_weight, f"{self_name}: pair_wise_weight")
        holistic = check_weight(holistic_weight, f"{self_name}: holistic_weight")
        if not (pixel or pair or holistic):
            raise ValueError(f"{self_name}: pixel_wise_weight, pair_wise_weight and holistic_weight are all 0")
        if pair and (student_feature is None or teacher_feature is None):
            raise ValueError(f"{self_name}: pair_wise_weight > 0 needs student_feature= and teacher_feature= (the pair-wise feature maps)")
        student_specs: list[SpecLike] = [student_scores]
        teacher_specs: list[SpecLike] = [teacher_scores]
        if pair:
            student_specs.append(student_feature)
            teacher_specs.append(teacher_feature)
        if holistic and condition_on_image:
            student_specs.append(MODEL_INPUT)
        super().__init__(student_specs, teacher_specs, weight, name, order=order, discriminator_steps=discriminator_steps)
        self.pixel_wise_weight, self.pair_wise_weight, self.holistic_weight = pixel, pair, holistic
        self.pool_scale = _check_pool_scale(pool_scale)
        holistic_method = None
        if holistic:
            holistic_method = HolisticDistillation(
                student_scores,
                teacher_scores,
                num_classes=num_classes,
                discriminator=discriminator,
                condition_on_image=condition_on_image,
                image_channels=image_channels,
                discriminator_conv_dim=discriminator_conv_dim,
                discriminator_depth=discriminator_depth,
                weight=holistic * self.weight,
                gradient_penalty_weight=gradient_penalty_weight,
                discriminator_lr=discriminator_lr,
                order=order,
                discriminator_steps=discriminator_steps,
                name=f"{self.name}.holistic",
            )
            # Registered once, here: state_dict holds "discriminator.*"; the holistic helper
            # (not a submodule) shares the same module object.
            self.discriminator = holistic_method.discriminator
        object.__setattr__(self, "holistic", holistic_method)

    # The holistic helper keeps the pending inputs; this method forwards to it.
    def pending_inputs(self):
        return self.holistic.pending_inputs()

    def clear_pending(self):
        if self.holistic is not None:
            self.holistic.clear_pending()

    def generator_adversarial_loss(self, fake, condition):
        return self.holistic_weight * self.holistic.generator_adversarial_loss(fake, condition)

    def discriminator_loss(self, fake, real, condition):
        return self.holistic.discriminator_loss(fake, real, condition)

    def make_discriminator_optimizer(self):
        return self.holistic.make_discriminator_optimizer()

    def forward(self, student, teacher, target):
        scores_s, scores_t = student[0], teacher[0]
        _check_maps(self.name, f"{self.student_features[0]} vs {self.teacher_features[0]}", scores_s, scores_t)
        losses: dict[str, torch.Tensor] = {}
        if self.pixel_wise_weight:
            losses["pixel_wise"] = self.pixel_wise_weight * pixel_wise_loss(scores_s, scores_t)
        if self.pair_wise_weight:
            losses["pair_wise"] = self.pair_wise_weight * pair_wise_loss(student[1], teacher[1], self.pool_scale)
        if self.holistic is not None:
            condition = self.holistic._condition(scores_s, student)
            self.holistic._defer = self._defer
            term = self.holistic.adversarial_term(scores_s, scores_t, condition)
            # adversarial_term returns the unweighted −E D(Q_s) (or the deferred placeholder).
            losses[self.adversarial_part] = self.holistic_weight * term
        return losses


__all__ = [
    "HolisticDistillation",
    "PairWiseDistillation",
    "PixelWiseDistillation",
    "StructuredKD",
    "pair_wise_loss",
    "pixel_wise_loss",
]
