"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning" (CVPR 2017).

For the feature maps F¹ (h×w×m) and F² (h×w×n) at the two ends of a section,

    G_ij = (1/hw) Σ_{s,t} F¹_{s,t,i} F²_{s,t,j},     L_FSP = Σ_k ‖Gᵀ_k − Gˢ_k‖²

as RepDistiller ``FSP.py`` (the reference code): the larger map of a pair is adaptive-average-
pooled to the smaller size, and the loss is the mean over (B, m, n) (``reduction="mean"``,
default); ``"paper"`` sums over (m, n) and averages over the batch, all λ_k = 1. The method has
two stages: minimise L_FSP alone first (``Distiller(student, teacher, [FSP(...)])``), then train
on the task loss.

FSP pairs layers of equal width: Gˢ and Gᵀ are m×n matrices indexed by channel, so the student
and the teacher need the same m and n at each section (the paper distils between networks of the
same widths and different depths). Layers of other widths are an error that names them, at bind
when the widths can be read from the modules (a conv or BatchNorm at the path), else at the first
forward. Deviation (opt-in): ``connector="conv"`` with ``student_channels`` / ``teacher_channels``
maps each student feature whose width differs through a trainable 1×1 conv to the teacher's width
before the Gram matrix; the paper has no such projection, and the student's Gram is then taken of
learned projections, which the loss can fit by training the connector instead of the student.

Scale: the weight 1 is RepDistiller's (CIFAR-100, 32×32 images, batch 64, init stage with the
pair losses unweighted). The mean reduction does not grow with the batch, the widths or the map
size; the Gram entries are products of two features, so the loss grows with the fourth power of
the features' magnitude. ``"paper"`` sums over m·n and grows with the widths.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.capture import FeatureSpec, SpecLike, find_module
from kdkernels.distill.connectors import make_connector
from kdkernels.distill.method import Method, full_precision, loss_dtype

REDUCTIONS = ("mean", "paper")


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, m, H, W), (B, n, H', W') → (B, m, n), pooling the larger map to the smaller size."""
    dtype = loss_dtype(first, second)
    first, second = first.to(dtype), second.to(dtype)
    if first.shape[-2:] != second.shape[-2:]:
        size = min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1])
        first, second = F.adaptive_avg_pool2d(first, size), F.adaptive_avg_pool2d(second, size)
    hw = first.shape[-2] * first.shape[-1]
    with full_precision(first):
        return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / hw


def fsp_loss(student_gram: torch.Tensor, teacher_gram: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    dtype = loss_dtype(student_gram, teacher_gram)
    diff2 = (student_gram.to(dtype) - teacher_gram.detach().to(dtype)).pow(2)
    return diff2.mean() if reduction == "mean" else diff2.sum() / diff2.shape[0]


def declared_width(model: nn.Module, spec: FeatureSpec) -> int | None:
    """The channel count of a feature when the module says it without running: the output of a
    conv / BatchNorm (or of a Sequential ending in one), the input of one (or of a Sequential
    starting with one); otherwise None."""
    module = find_module(model, spec.path)
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1] if spec.on == "output" else module[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if spec.on == "output" else module.in_channels
    return None


class FSP(Method):
    """Sum over sections of the FSP loss.

    Args (everything after the pairs is keyword-only):
        student_pairs, teacher_pairs: equal-length lists of ``(start_layer, end_layer)``, of equal
            widths on both sides.
        reduction: ``"mean"`` (default, RepDistiller) or ``"paper"``.
        connector: ``None`` (default, the paper) or ``"conv"``: a 1×1 conv for each student
            feature whose width differs (a deviation; needs the channels below).
        student_channels, teacher_channels: ``(m, n)`` per section, for the connector.
        weight: default 1 (RepDistiller's init stage sums the pair losses unweighted).
    """

    name = "fsp"

    def __init__(
        self,
        student_pairs: Sequence[tuple[SpecLike, SpecLike]],
        teacher_pairs: Sequence[tuple[SpecLike, SpecLike]],
        *,
        reduction: str = "mean",
        connector: str | None = None,
        student_channels: Sequence[tuple[int, int]] | None = None,
        teacher_channels: Sequence[tuple[int, int]] | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        student_pairs, teacher_pairs = list(student_pairs), list(teacher_pairs)
        if len(student_pairs) != len(teacher_pairs) or not student_pairs:
            raise ValueError(f"fsp: expected as many student pairs as teacher pairs (at least one), got {len(student_pairs)} and {len(teacher_pairs)}")
        if any(isinstance(pair, (str, FeatureSpec)) or len(pair) != 2 for pair in student_pairs + teacher_pairs):
            raise ValueError("fsp: every pair must be (start_layer, end_layer)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        super().__init__([p for pair in student_pairs for p in pair], [p for pair in teacher_pairs for p in pair], weight, name)
        self.reduction = reduction
        self.connectors = None
        if connector is not None:
            if connector != "conv":
                raise ValueError(f"connector: expected None or 'conv', got {connector!r}")
            if student_channels is None or teacher_channels is None:
                raise ValueError("fsp: connector='conv' needs student_channels and teacher_channels, one (m, n) per section")
            s_widths, t_widths = _flat_widths("student_channels", student_channels), _flat_widths("teacher_channels", teacher_channels)
            for what, widths in (("student_channels", s_widths), ("teacher_channels", t_widths)):
                if len(widths) != len(self.student_features):
                    raise ValueError(f"fsp: {what}: expected one (m, n) per section ({len(student_pairs)}), got {len(widths) // 2}")
            self.connectors = nn.ModuleList(
                nn.Identity() if c_s == c_t else make_connector("conv", c_s, c_t) for c_s, c_t in zip(s_widths, t_widths)
            )

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.connectors is not None:
            return
        for k in range(0, len(self.student_features), 2):
            specs = self.student_features[k : k + 2], self.teacher_features[k : k + 2]
            s_widths = tuple(declared_width(student, spec) for spec in specs[0])
            t_widths = tuple(declared_width(teacher, spec) for spec in specs[1])
            if None not in s_widths + t_widths and s_widths != t_widths:
                raise ValueError(self._width_message(k, s_widths, t_widths))

    def _width_message(self, k: int, s_widths, t_widths) -> str:
        s = ", ".join(map(str, self.student_features[k : k + 2]))
        t = ", ".join(map(str, self.teacher_features[k : k + 2]))
        return (
            f"{self.name}: section {k // 2}: the student's ({s}) have widths {tuple(s_widths)} and the teacher's ({t}) "
            f"{tuple(t_widths)}; FSP compares m×n Gram matrices channel by channel, so it pairs layers of equal width: "
            "pick teacher layers of the student's widths, or pass connector='conv' with student_channels and "
            "teacher_channels (a trainable 1×1 projection, a deviation from the paper)"
        )

    def forward(self, student, teacher, target):
        if self.connectors is not None:
            for i, (connector, s) in enumerate(zip(self.connectors, student)):
                expected = getattr(connector, "in_channels", None)
                if expected is not None and (s.dim() != 4 or s.shape[1] != expected):
                    raise ValueError(
                        f"{self.name}: the student feature {self.student_features[i]} has shape {tuple(s.shape)}, but its connector "
                        f"was built for {expected} channels: fix student_channels[{i // 2}][{i % 2}]"
                    )
            student = [connector(s) for connector, s in zip(self.connectors, student)]
        loss = 0.0
        for k in range(0, len(student), 2):
            s_widths, t_widths = (student[k].shape[1], student[k + 1].shape[1]), (teacher[k].shape[1], teacher[k + 1].shape[1])
            if s_widths != t_widths:
                raise ValueError(self._width_message(k, s_widths, t_widths))
            if student[k].shape[0] != teacher[k].shape[0]:
                raise ValueError(f"{self.name}: section {k // 2}: batch sizes differ, shapes {tuple(student[k].shape)} and {tuple(teacher[k].shape)}")
            g_s = fsp_matrix(student[k], student[k + 1])
            g_t = fsp_matrix(teacher[k].detach(), teacher[k + 1].detach())
            loss = loss + fsp_loss(g_s, g_t, self.reduction)
        return loss


def _flat_widths(what: str, pairs) -> list[int]:
    widths = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"fsp: {what}: expected (m, n) per section, got {pair!r}")
        widths.extend(pair)
    return widths
