"""FitNets hints: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    L_HT = ‖ u_h(x) − r(v_g(x)) ‖²

u_h is the teacher's hint layer, v_g the student's guided layer, r a trainable regressor
(here a connector: 1×1 conv by default). FitNets is not in methods.md; the default reduction is
RepDistiller's ``HintLoss`` (``F.mse_loss``, the mean over every element); ``reduction="paper"``
gives the paper's ½‖·‖² per sample, averaged over the batch. The regressor is a 1×1 conv (or any
connector), so the spatial sizes must match; the paper's regressor is a conv whose kernel also
maps spatial sizes. RepDistiller's regressor (``ConvReg``) puts BatchNorm and ReLU after that conv
(its hint is a post-ReLU feature); pass such a module as ``connector`` (``bench/bench_methods.py``
has one). On that study's 4/8/16-channel student, guiding the middle stage hurt and guiding the
last stage helped (README, "Loss scales and what each method gives").

One stage (RepDistiller ``--distill hint``, its published CIFAR-100 run): CE + 100 × hint, without
KD (``-a 0 -b 100``): ``[CrossEntropy(), FitNets(..., weight=100.0)]``; add ``HintonKD`` for
hint + KD. Two stages (the paper): first train the student up to the guided layer and the
regressor on the hint alone, then the whole student with KD::

    stage1 = Distiller(student, teacher, [FitNets("layer2", "layer3", student_channels=128, teacher_channels=256)])
    opt = SGD(hint_parameters(student, "layer2", x[:2]) + list(stage1.methods.parameters()), ...)
    ...                                     # train on stage1(x).total
    stage2 = Distiller(student, teacher, [HintonKD()])

Scale: RepDistiller's weight 100 is its CIFAR-100 value (32×32 images, batch 64, the hint at a
middle stage). With ``reduction="mean"`` the loss is a mean over elements: it does not
grow with the feature-map size, the channel count or the batch, but with the square of the
teacher feature's magnitude (post-ReLU ResNet features of size ~1 there). ``"paper"`` sums over
C·H·W per sample, so it grows with the feature size.
"""

from __future__ import annotations

import torch
from torch import nn

from kdkernels.distill.capture import FeatureCapture, SpecLike
from kdkernels.distill import connectors
from kdkernels.distill.connectors import make_connector
from kdkernels.distill.method import Method, check_same_shape, loss_dtype

REDUCTIONS = ("mean", "paper")


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``mean``: mean of (s − t)² over all elements; ``paper``: ½ Σ (s − t)² / batch size."""
    dtype = loss_dtype(student_feature, teacher_feature)
    diff = student_feature.to(dtype) - teacher_feature.detach().to(dtype)
    if reduction == "mean":
        return diff.pow(2).mean()
    return 0.5 * diff.pow(2).sum() / student_feature.shape[0]


class FitNets(Method):
    """Hint loss between a student (guided) layer, through a regressor, and a teacher (hint) layer.

    Args (everything after the two layers is keyword-only):
        student_layer, teacher_layer: the guided and the hint feature.
        student_channels, teacher_channels: channel counts; when both are given a connector of
            kind ``connector`` is built, else features are compared as they are.
        connector: ``"conv"`` (1×1 conv, default), ``"conv_bn"``, ``"linear"`` or an ``nn.Module``.
        reduction: ``"mean"`` (default, RepDistiller) or ``"paper"``.
        weight: default 1 (the paper's stage 1 uses the hint alone); RepDistiller's published run is
            CE + 100 × hint, without KD.
    """

    name = "fitnets"

    def __init__(
        self,
        student_layer: SpecLike,
        teacher_layer: SpecLike,
        *,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        connector: str | nn.Module | None = "conv",
        reduction: str = "mean",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__([student_layer], [teacher_layer], weight, name)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(connector, str) and student_channels is None and teacher_channels is None:
            connector = None
        self.connector = make_connector(connector, student_channels, teacher_channels)
        self.reduction = reduction

    def forward(self, student, teacher, target):
        self._check_connector_input(student[0])
        s = student[0] if self.connector is None else self.connector(student[0])
        hint = "pass student_channels and teacher_channels to add a connector" if self.connector is None else ""
        check_same_shape(self.name, f"{self.student_features[0]} vs {self.teacher_features[0]}", s, teacher[0], hint)
        return hint_loss(s, teacher[0], self.reduction)

    def _check_connector_input(self, feature: torch.Tensor) -> None:
        """A wrong ``student_channels`` is reported as that, not as the connector's conv error."""
        expected = getattr(self.connector, "in_channels", None)
        if expected is None:
            return
        channel_dim = -1 if isinstance(self.connector, connectors.Linear) else 1
        if feature.dim() < 2 or feature.shape[channel_dim] != expected:
            where = "last dim" if channel_dim == -1 else "dim 1"
            raise ValueError(
                f"{self.name}: the student feature {self.student_features[0]} has shape {tuple(feature.shape)}, but the "
                f"connector was built for student_channels={expected} (channels on {where}); "
                f"pass student_channels={feature.shape[channel_dim] if feature.dim() >= 2 else '?'}"
            )


def hint_parameters(student: nn.Module, guided_layer: SpecLike, example_input) -> list[nn.Parameter]:
    """The student's parameters that the guided feature depends on (FitNets stage 1), found by
    autograd on ``example_input`` (run in eval mode, so BN statistics are not touched)."""
    capture = FeatureCapture(student, [guided_layer], role="student")
    params = [p for p in student.parameters() if p.requires_grad]
    was_training = student.training
    student.eval()
    try:
        with capture:
            student(example_input)
        feature = capture.get(guided_layer)
        grads = torch.autograd.grad(feature.float().sum(), params, allow_unused=True)
    finally:
        capture.remove()
        student.train(was_training)
    return [p for p, g in zip(params, grads) if g is not None]
