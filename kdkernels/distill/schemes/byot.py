"""Self-distillation with auxiliary heads: Zhang et al., "Be Your Own Teacher" (BYOT, ICCV 2019).

A head (bottleneck + FC) reads the feature after each shallow stage i; the model's own deepest
classifier C is the teacher:

    L = Σ_i [ (1−α)·CE(q^i, y) + α·T²·KL(p_C^T ‖ p_i^T) + λ·‖F_i − sg[F_C]‖² ]

with the KD and feature terms absent for i = C (so the deepest classifier gets (1−α)·CE) and the
feature term summed over every element. Defaults are the unofficial implementation
(luanyunteng/pytorch-be-your-own-teacher; no official code): T = 3, α = 0.1, λ = 10⁻⁶.
Deviations: the soft term is the KL (``kd_loss``) where the formula has the CE: same gradient, the
value is lower by α·T²·H(p_C^T). The feature term is the plain squared L2; the unofficial code
masks it by (F_i > 0) ∨ (F_C > 0), which changes nothing for non-negative (post-ReLU) features.
The heads belong to this module (the model is not edited). By default (``head="bottleneck"``) each
is the unofficial code's branch bottleneck: 1×1 conv to D/4 channels, a k×k conv of stride k that
brings the stage down to the deepest stage's resolution (``stage_strides``: 8, 4, 2 after the
ResNet stages there), 1×1 conv to D, each followed by BN and ReLU, then global average pooling and
an FC layer; the convolutions have no bias (the unofficial code's are cancelled by the BN that
follows). ``head="pointwise"`` is a lighter head, 1×1 conv to D + BN + ReLU, then pooling and FC.

Scale: the defaults come from the unofficial code's CIFAR-100 ResNets (512-wide final features).
The KD terms are per-sample means (T² keeps them near the CE's size); the feature term is a plain
sum over batch × feature_dim, so it grows with both (λ = 10⁻⁶ keeps it small at that size; on the
digits study's batch of 250 and 16-wide features it starts at 3·10⁻⁵ × the CE, so the hint is
all but off). :meth:`BYOT.calibrate` sets λ, the one weight that depends on the scale, so that the
feature term starts at ``ratio`` × the deepest classifier's CE; on the digits study that hint,
at the CE's size from the first step, cost the student 26 points (``bench/results/methods_digits.md``):
the calibration exists to set the scale on purpose, not as a default.
A head asks its stage to be class-separable after pooling, which a narrow stage that also serves
the stages above may not afford. On the digits study's 4/8/16-channel CNN
(``bench/results/byot_validation/``, ``bench/results/methods_digits.md``) no placement helped on 40
validation seeds: a pointwise head on the 8-channel stage ±0 (−1.8 on the 20 test seeds), the
bottleneck head there −0.6, heads on both shallow stages −2.7 (pointwise) and −1.3 (bottleneck).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.calibration import LossScaleWarning, calibration_record, check_ratio, measuring, rank_mean
from kdkernels.distill.capture import FeatureCapture, SpecLike, as_spec
from kdkernels.distill.distiller import DistillOutput, total_loss
from kdkernels.functional.kd_loss import kd_loss


HEADS = ("bottleneck", "pointwise")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=kernel_size, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class AuxiliaryHead(nn.Module):
    """(B, C_i, H, W) → feature (B, D) and logits (B, num_classes).

    ``head="bottleneck"``: 1×1 conv to max(1, D/4), ``stride``×``stride`` conv of that stride,
    1×1 conv to D (each + BN + ReLU); ``"pointwise"``: 1×1 conv to D + BN + ReLU. Then global
    average pooling and an FC layer."""

    def __init__(self, in_channels: int, feature_dim: int, num_classes: int, head: str = "bottleneck", stride: int = 1) -> None:
        super().__init__()
        if head == "bottleneck":
            middle = max(1, feature_dim // 4)
            layers = [*_conv_bn_relu(in_channels, middle, 1), *_conv_bn_relu(middle, middle, stride), *_conv_bn_relu(middle, feature_dim, 1)]
        else:
            layers = _conv_bn_relu(in_channels, feature_dim, 1)
        self.bottleneck = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bottleneck(x)
        return feature, self.fc(feature)


class BYOT(nn.Module):
    """The model plus one auxiliary head per shallow stage; ``parameters()`` covers both.

    Args:
        model: returns the deepest logits (or set ``logits_layer``).
        stage_layers: features after the shallow stages (e.g. ``["layer1", "layer2", "layer3"]``).
        stage_channels: their channel counts.
        feature_layer: the deepest feature F_C (e.g. ``"avgpool"``), flattened to (B, feature_dim).
        feature_dim, num_classes: sizes of F_C and of the logits.
        temperature, alpha, feature_weight: T (3), α (0.1), λ (10⁻⁶); keyword-only, as the rest.
        logits_layer: where the deepest logits are (default ``""``: the model's output).
        head: ``"bottleneck"`` (the unofficial code's branch bottleneck, default) or ``"pointwise"``.
        stage_strides: per stage, its resolution over the deepest stage's (the bottleneck's strided
            conv; default 1 each).
    """

    def __init__(
        self,
        model: nn.Module,
        stage_layers: Sequence[SpecLike],
        stage_channels: Sequence[int],
        feature_layer: SpecLike,
        feature_dim: int,
        num_classes: int,
        *,
        temperature: float = 3.0,
        alpha: float = 0.1,
        feature_weight: float = 1e-6,
        logits_layer: SpecLike = "",
        head: str = "bottleneck",
        stage_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(stage_layers) != len(stage_channels) or not stage_layers:
            raise ValueError(f"byot: expected one channel count per stage layer (at least one), got {len(stage_layers)} and {len(stage_channels)}")
        if head not in HEADS:
            raise ValueError(f"byot: head must be one of {HEADS}, got {head!r}")
        strides = [1] * len(stage_layers) if stage_strides is None else list(stage_strides)
        if len(strides) != len(stage_layers) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in strides):
            raise ValueError(f"byot: stage_strides must be one integer ≥ 1 per stage layer, got {stage_strides!r}")
        self.model = model
        self.heads = nn.ModuleList(AuxiliaryHead(c, feature_dim, num_classes, head, k) for c, k in zip(stage_channels, strides))
        self.stage_layers = [as_spec(s) for s in stage_layers]
        self.feature_layer, self.logits_layer = as_spec(feature_layer), as_spec(logits_layer)
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        # What calibrate measured (None until then); saved with λ in state_dict.
        self.calibration: dict | None = None
        self._capture = FeatureCapture(model, [*self.stage_layers, self.feature_layer, self.logits_layer], role="byot")

    def _run(self, x: Any, **kwargs: Any):
        try:
            with self._capture:
                output = self.model(x, **kwargs)
            logits = self._capture.get(self.logits_layer)
            feature = self._capture.get(self.feature_layer).flatten(1)
            heads = [head(self._capture.get(spec)) for head, spec in zip(self.heads, self.stage_layers)]
        finally:
            self._capture.clear()
        return output, logits, feature, heads

    def _check(self, feature: torch.Tensor, heads) -> None:
        for i, (head_feature, _) in enumerate(heads):
            if head_feature.shape != feature.shape:
                raise ValueError(f"byot: head {i} feature {tuple(head_feature.shape)} does not match {self.feature_layer} {tuple(feature.shape)}; check feature_dim")

    @staticmethod
    def _feature_distance(head_feature: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """‖F_i − sg[F_C]‖², summed over the batch and the features."""
        return (head_feature.float() - feature.detach().float()).pow(2).sum()

    def forward(self, x: Any, target: torch.Tensor, **kwargs: Any) -> DistillOutput:
        output, logits, feature, heads = self._run(x, **kwargs)
        self._check(feature, heads)
        a, T = self.alpha, self.temperature
        losses = {"deepest/ce": (1.0 - a) * F.cross_entropy(logits, target)}
        for i, (head_feature, head_logits) in enumerate(heads):
            losses[f"head{i}/ce"] = (1.0 - a) * F.cross_entropy(head_logits, target)
            losses[f"head{i}/kd"] = a * kd_loss(head_logits, logits.detach(), T, reduction="batchmean")
            losses[f"head{i}/feature"] = self.feature_weight * self._feature_distance(head_feature, feature)
        return DistillOutput(output, losses, total_loss(losses))

    def calibrate(self, x: Any, target: torch.Tensor, *, ratio: float = 1.0, seed: int = 0, verbose: bool = True, **kwargs: Any) -> float:
        """Set λ (``feature_weight``) so that the feature terms of all heads together start at
        ``ratio`` × the deepest classifier's CE on the batch ``(x, target)``; returns the new λ.

        Loss-scale calibration as :func:`~kdkernels.distill.calibrate_weights` does it for a
        distiller's methods (one no-grad forward in train mode, BatchNorm buffers and the RNG
        state put back, averaged over ranks under ``torch.distributed``, the one host read here).
        Only λ is set: the feature term is a sum over batch × feature_dim, while α weighs two
        per-sample means against each other and T² keeps the KD at the CE's size. A feature term
        of 0 or a loss that is not finite leaves λ as it is (with a warning)."""
        ratio = check_ratio(ratio)
        with measuring([self], seed):
            _, logits, feature, heads = self._run(x, **kwargs)
            self._check(feature, heads)
            task = F.cross_entropy(logits.float(), target)
            distance = sum(self._feature_distance(head_feature, feature) for head_feature, _ in heads)
        task_value, distance_value = rank_mean([task, distance]).tolist()  # the one host read
        before = self.feature_weight
        record = calibration_record(distance_value, task_value, ratio, before)
        if record is None:
            warnings.warn(f"byot.calibrate: feature distance {distance_value:.4g}, CE {task_value:.4g}; feature_weight left at {before:g}", LossScaleWarning, stacklevel=2)
            return before
        self.feature_weight = record.pop("weight")
        self.calibration = record
        if verbose:
            print(f"byot.calibrate: CE {task_value:.4g}, feature distance {distance_value:.4g} -> feature_weight {before:g} becomes {self.feature_weight:.4g}")
        return self.feature_weight

    def get_extra_state(self) -> dict:
        """λ (it may have been calibrated) and the calibration record travel with the heads."""
        return {"feature_weight": self.feature_weight, "calibration": self.calibration}

    def set_extra_state(self, state: dict) -> None:
        self.feature_weight = float(state["feature_weight"])
        self.calibration = state.get("calibration")

    @torch.no_grad()
    def predict(self, x: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Logits of every head, shallowest first, then the deepest classifier."""
        _, logits, _, heads = self._run(x, **kwargs)
        return [head_logits for _, head_logits in heads] + [logits]
