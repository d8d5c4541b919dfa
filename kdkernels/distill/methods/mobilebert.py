"""MobileBERT layer-wise transfer: Sun et al., "MobileBERT: a Compact Task-Agnostic BERT for
Resource-Limited Devices" (ACL 2020); code google-research ``mobilebert/run_pretraining.py``.

Feature-map transfer, per layer ℓ:   MSE( LN(H_ℓᵗ), LN(H_ℓˢ) )
with LN a parameter-free layer normalisation over the hidden axis (the code standardises both
sides; the paper writes the plain MSE), the MSE a mean over batch × seq × hidden.

Attention transfer, per layer ℓ:   −Σ_k softmax(A_ℓᵗ)_qk · log softmax(A_ℓˢ)_qk
averaged over batch × heads × queries, from the *pre-softmax* scaled and masked scores A
(B, heads, queries, keys) — a CE, the paper's KL up to the teacher's entropy; padded query rows
count. Hugging Face models do not expose the scores as any module's output:
:class:`kdkernels.distill.adapters.BertFeatures` computes them from hooked query/key projections.

Mean/variance transfer, per layer ℓ, with μ, σ² the mean and (biased) variance of each token's
hidden vector:   mean_{b,s} (μᵗ − μˢ)²   and   mean_{b,s} |σ²ᵗ − σ²ˢ|.

Every term averages over the L given layers (Σ_ℓ g_ℓ·loss_ℓ / L, with per-layer gates g_ℓ set by
the progressive schedule, :class:`~kdkernels.distill.methods.mobilebert_progressive.LayerwiseTransferSchedule`;
all ones by default). Stage-1 factors (README): 100 (hidden), 1 (attention), 5000 (mean), 5 (variance).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import FeatureSpec, SpecLike
from kdkernels.distill.method import Method, check_same_shape, check_weight, paired
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce

HIDDEN_WIDTH_HINT = "MobileBERT's student and teacher share the inter-block width"  # the shape error's hint
LAYER_NORM_EPS = 1e-12  # tf.contrib.layers.layer_norm's variance epsilon (unverified for the MobileBERT code)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 upcast to fp32 for the loss math; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def feature_map_transfer_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    hidden = student_hidden.shape[-1]
    s = F.layer_norm(at_least_float32(student_hidden), (hidden,), eps=LAYER_NORM_EPS)
    t = F.layer_norm(at_least_float32(teacher_hidden.detach()), (hidden,), eps=LAYER_NORM_EPS)
    return F.mse_loss(s, t.to(s.dtype))


def attention_transfer_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    return weighted_soft_ce(student_scores, teacher_scores.detach(), reduction="mean", dim=-1)


def hidden_moments(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and biased variance over the hidden (last) axis, keepdim."""
    hidden = at_least_float32(hidden)
    mean = hidden.mean(-1, keepdim=True)
    return mean, (hidden - mean).square().mean(-1, keepdim=True)


def mean_variance_transfer_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_{b,s}(μᵗ − μˢ)², mean_{b,s}|σ²ᵗ − σ²ˢ|)``. With the official code's bug, pass all
    teacher hidden states stacked as (L_t, B, S, H): the differences broadcast over the teacher
    layers and the means include them."""
    s_mean, s_var = hidden_moments(student_hidden)
    t_mean, t_var = hidden_moments(teacher_hidden.detach())
    return (t_mean - s_mean).square().mean(), (t_var - s_var).abs().mean()


def check_gates(method: str, gates, layers: int) -> list[float] | None:
    if gates is None:
        return None
    gates = [float(g) for g in gates]
    if len(gates) != layers or any(not (g >= 0) or g == float("inf") for g in gates):
        raise ValueError(f"{method}: layer_gates: expected {layers} finite numbers >= 0, got {gates!r}")
    return gates


def gated_layer_mean(losses: list[torch.Tensor], gates: list[float] | None = None) -> torch.Tensor:
    """Σ_ℓ g_ℓ·loss_ℓ / L (all g_ℓ = 1 when ``gates`` is None), the official per-term average."""
    gates = gates or [1.0] * len(losses)
    total = 0.0
    for gate, loss in zip(gates, losses):
        if gate != 0.0:  # a layer outside its phase adds nothing, not even a zero-times-NaN
            total = total + gate * loss
    if isinstance(total, float):  # every gate is 0: a zero that keeps the graph and the dtype
        total = losses[0] * 0.0
    return total / len(losses)


class _LayerwiseMethod(Method):
    """A method whose loss is Σ_ℓ g_ℓ·loss_ℓ / L over L layer pairs; ``layer_gates`` (None: all
    ones) is set per step by the progressive schedule."""

    def __init__(self, student_layers, teacher_layers, weight: float, name: str | None) -> None:
        s, t = paired(self.name, student_layers, teacher_layers)
        super().__init__(s, t, weight, name)
        self.layer_gates: list[float] | None = None

    def set_layer_gates(self, gates) -> None:
        self.layer_gates = check_gates(self.name, gates, len(self.student_features))

    def gated_mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return gated_layer_mean(losses, self.layer_gates)

    def paired_layer_losses(self, student, teacher, layer_loss, shape_hint: str) -> list:
        """``layer_loss(s_ℓ, t_ℓ)`` for each layer pair, after checking the pair has one shape
        (``shape_hint`` says why it must, in the error)."""
        losses = []
        for s, t, spec in zip(student, teacher, self.student_features):
            check_same_shape(self.name, str(spec), s, t, shape_hint)
            losses.append(layer_loss(s, t))
        return losses


class FeatureMapTransfer(_LayerwiseMethod):
    """MobileBERT feature-map transfer: Σ_ℓ g_ℓ · MSE(LN(H_ℓᵗ), LN(H_ℓˢ)) / L between hidden states
    of equal width (student and teacher share the inter-block width).

    Args: student_layers, teacher_layers (one path or equal-length lists); weight (100, the README's
    ``hidden_distill_factor``, tuned for the 24-layer, 512-wide IB-BERT teacher and MobileBERT; the
    MSE of two standardised vectors is at most 4 per layer whatever the width, so the weight does
    not depend on the hidden size).
    """

    name = "feature_map_transfer"

    def __init__(self, student_layers: Sequence[SpecLike] | SpecLike, teacher_layers: Sequence[SpecLike] | SpecLike, *, weight: float = 100.0, name: str | None = None) -> None:
        super().__init__(student_layers, teacher_layers, weight, name)

    def forward(self, student, teacher, target):
        return self.gated_mean(self.paired_layer_losses(student, teacher, feature_map_transfer_loss, HIDDEN_WIDTH_HINT))


class AttentionDistributionTransfer(_LayerwiseMethod):
    """MobileBERT attention transfer: Σ_ℓ g_ℓ · mean_{b,h,q} CE(softmax(A_ℓᵗ), softmax(A_ℓˢ)) / L.

    Args: student_layers, teacher_layers: pre-softmax scores (B, heads, queries, keys), equal shapes;
    weight (1, the README's ``attention_distill_factor``, tuned for MobileBERT's 24 layers of 4 heads;
    per query row the CE is the teacher's entropy, at most log(keys), plus the KL, so the term grows
    with the log of the sequence length).
    """

    name = "attention_distribution_transfer"

    def __init__(self, student_layers: Sequence[SpecLike] | SpecLike, teacher_layers: Sequence[SpecLike] | SpecLike, *, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(student_layers, teacher_layers, weight, name)

    def forward(self, student, teacher, target):
        shape_hint = "student and teacher need the same number of heads and sequence length"
        return self.gated_mean(self.paired_layer_losses(student, teacher, attention_transfer_loss, shape_hint))


class MeanVarianceTransfer(_LayerwiseMethod):
    """MobileBERT mean/variance transfer (the paper's L_mean / L_var; stage 1, progressive):

        mean:      mean_weight     · Σ_ℓ g_ℓ · mean_{b,s} (μ_ℓᵗ − μ_ℓˢ)²   / L
        variance:  variance_weight · Σ_ℓ g_ℓ · mean_{b,s} |σ²_ℓᵗ − σ²_ℓˢ|  / L

    μ and σ² are each token's mean and biased variance over the hidden axis (``tf.nn.moments``
    style). Returns ``{"mean": …, "variance": …}``; the method's ``weight`` multiplies both.

    Defaults: ``mean_weight=5000`` (README ``beta_distill_factor``) and ``variance_weight=5``
    (``gamma_distill_factor``), tuned for the 24-layer, 512-wide IB-BERT teacher and MobileBERT:
    the mean term grows with the square of the gap between token means, the variance term
    linearly with the gap between token variances (so with the square of the activations' scale).

    ``official_teacher_statistics_bug=True`` reproduces google-research's code, which computes the
    teacher statistics on ``teacher_hiddens`` (the whole list of hidden states) instead of the
    paired ``teacher_hidden``: every student layer is then compared with *every* given teacher
    hidden state and the squared / absolute differences averaged over them too. Give as
    ``teacher_layers`` what the code stacks — all L + 1 hidden states, embedding output first — to
    match it exactly; the list need not pair up with ``student_layers`` then. Off by default.
    """

    name = "mean_variance_transfer"

    def __init__(
        self,
        student_layers: Sequence[SpecLike] | SpecLike,
        teacher_layers: Sequence[SpecLike] | SpecLike,
        *,
        mean_weight: float = 5000.0,
        variance_weight: float = 5.0,
        weight: float = 1.0,
        official_teacher_statistics_bug: bool = False,
        name: str | None = None,
    ) -> None:
        if not isinstance(official_teacher_statistics_bug, bool):
            raise TypeError(f"mean_variance_transfer: official_teacher_statistics_bug: expected True/False, got {official_teacher_statistics_bug!r}")
        if official_teacher_statistics_bug:
            s = [student_layers] if isinstance(student_layers, (str, FeatureSpec)) else list(student_layers)
            t = [teacher_layers] if isinstance(teacher_layers, (str, FeatureSpec)) else list(teacher_layers)
            if not s or not t:
                raise ValueError("mean_variance_transfer: expected at least one student and one teacher layer")
            Method.__init__(self, s, t, weight, name)
            self.layer_gates = None
        else:
            super().__init__(student_layers, teacher_layers, weight, name)
        self.mean_weight = check_weight(mean_weight, "mean_variance_transfer: mean_weight")
        self.variance_weight = check_weight(variance_weight, "mean_variance_transfer: variance_weight")
        self.official_teacher_statistics_bug = official_teacher_statistics_bug

    def forward(self, student, teacher, target):
        if self.official_teacher_statistics_bug:
            stacked = torch.stack([t.detach() for t in teacher])
            for s, spec in zip(student, self.student_features):
                check_same_shape(self.name, str(spec), s, stacked[0], "hidden states of equal shape")
            pairs = [mean_variance_transfer_loss(s, stacked) for s in student]
        else:
            pairs = self.paired_layer_losses(student, teacher, mean_variance_transfer_loss, HIDDEN_WIDTH_HINT)
        return {
            "mean": self.mean_weight * self.gated_mean([m for m, _ in pairs]),
            "variance": self.variance_weight * self.gated_mean([v for _, v in pairs]),
        }

    def extra_repr(self) -> str:
        bug = ", official_teacher_statistics_bug=True" if self.official_teacher_statistics_bug else ""
        return super().extra_repr() + f", mean_weight={self.mean_weight:g}, variance_weight={self.variance_weight:g}{bug}"
