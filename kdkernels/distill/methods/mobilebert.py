"""MobileBERT layer-wise transfer: Sun et al., "MobileBERT: a Compact Task-Agnostic BERT for
Resource-Limited Devices" (ACL 2020); code google-research ``mobilebert/run_pretraining.py``.

Feature-map transfer, per layer ℓ:   MSE( LN(H_ℓᵗ), LN(H_ℓˢ) )
with LN a parameter-free layer normalisation over the hidden axis (the code standardises both
sides; the paper writes the plain MSE), the MSE a mean over batch × seq × hidden.

Attention transfer, per layer ℓ:   −Σ_k softmax(A_ℓᵗ)_qk · log softmax(A_ℓˢ)_qk
averaged over batch × heads × queries, from the *pre-softmax* scaled and masked scores A
(B, heads, queries, keys) — a CE, the paper's KL up to the teacher's entropy; padded query rows
count. Capture the scores as the input of the attention's softmax module
(``FeatureSpec("encoder.layer.3.attn.softmax", on="input")``) or the output of a module that
returns them.

Both average over the given layers; stage-1 weights are the README factors: 100 (hidden) and 1
(attention). Not here: the mean/variance transfer and the layer-wise phase gating (one phase per
layer, lr ×0.1 after it), which are a training schedule: build one Distiller per phase.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.method import Method, check_same_shape, paired
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce

LAYER_NORM_EPS = 1e-12  # tf.contrib.layers.layer_norm's variance epsilon (unverified for the MobileBERT code)


def feature_map_transfer_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    hidden = student_hidden.shape[-1]
    s = F.layer_norm(student_hidden.float(), (hidden,), eps=LAYER_NORM_EPS)
    t = F.layer_norm(teacher_hidden.detach().float(), (hidden,), eps=LAYER_NORM_EPS)
    return F.mse_loss(s, t)


def attention_transfer_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    return weighted_soft_ce(student_scores, teacher_scores.detach(), reduction="mean", dim=-1)


class FeatureMapTransfer(Method):
    """Mean over layers of the LN-MSE between hidden states of equal width.

    Args: student_layers, teacher_layers (one path or equal-length lists); weight (100).
    """

    name = "feature_map_transfer"

    def __init__(self, student_layers: Sequence[SpecLike] | SpecLike, teacher_layers: Sequence[SpecLike] | SpecLike, weight: float = 100.0, name: str | None = None) -> None:
        s, t = paired("feature_map_transfer", student_layers, teacher_layers)
        super().__init__(s, t, weight, name)

    def forward(self, student, teacher, target):
        loss = 0.0
        for s, t, spec in zip(student, teacher, self.student_features):
            check_same_shape(self.name, str(spec), s, t, "MobileBERT's student and teacher share the inter-block width")
            loss = loss + feature_map_transfer_loss(s, t)
        return loss / len(student)


class AttentionDistributionTransfer(Method):
    """Mean over layers of the CE between teacher and student attention distributions per head.

    Args: student_layers, teacher_layers: pre-softmax scores (B, heads, queries, keys), equal shapes;
    weight (1).
    """

    name = "attention_distribution_transfer"

    def __init__(self, student_layers: Sequence[SpecLike] | SpecLike, teacher_layers: Sequence[SpecLike] | SpecLike, weight: float = 1.0, name: str | None = None) -> None:
        s, t = paired("attention_distribution_transfer", student_layers, teacher_layers)
        super().__init__(s, t, weight, name)

    def forward(self, student, teacher, target):
        loss = 0.0
        for s, t, spec in zip(student, teacher, self.student_features):
            check_same_shape(self.name, str(spec), s, t, "student and teacher need the same number of heads and sequence length")
            loss = loss + attention_transfer_loss(s, t)
        return loss / len(student)
