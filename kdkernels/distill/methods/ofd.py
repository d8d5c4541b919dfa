"""Overhaul of feature distillation (OFD): Heo et al., "A Comprehensive Overhaul of Feature
Distillation" (ICCV 2019); code clovaai/overhaul-distillation ``distiller.py``.

    L = Σ_{i=1..L} d_p( max(F_tⁱ, m_i), BN(Conv1×1(F_sⁱ)) ) / 2^{L−i}   /  B

d_p is the partial L2 (an element counts where S > T or T > 0), summed over every element; the
margins m come from the teacher's BN that precedes the ReLU (``kdkernels.ofd_margin``: affine
parameters, not running statistics), computed once when the Distiller is built. Features are
pre-ReLU, at the end of each stage, on both sides. The official totals are CE + Σ/(B·10³)
(CIFAR), CE + Σ/(B·10⁴) (ImageNet) and L_seg + 10⁻⁵·Σ/B with stage divisors [8, 4, 2, 1, 1, 16]
(segmentation): this method returns Σ/B, and its default ``weight=1e-3`` is the CIFAR setting
(1e-4 ImageNet, 1e-5 segmentation with ``stage_weights=[1/8, 1/4, 1/2, 1, 1, 1/16]``).

The teacher runs with its BatchNorm layers in train mode (``teacher_mode="bn_train"``): the
official scripts call ``t_net.train()``, which for their teachers (no dropout) is the same; pass
``teacher_mode="train"`` for the literal call. Teacher features are detached. The teacher's BN
normalises with the batch statistics, but its running statistics are left as they were: the
teacher the user passed in is never changed. The official ``t_net.train()`` also updates them, a
side effect kept only behind ``update_teacher_statistics=True``.

Scale: weight 10⁻³ was tuned on CIFAR-100 (WRN / ResNet teachers, 32×32 images, batch 128).
The loss is summed over every feature element and divided by the batch only, so it grows with
C·H·W of the distilled stages (hence the official 10⁻⁴ on ImageNet's larger maps); it does
not grow with the batch.

Example, torchvision ResNets (the ReLU of a block runs last after the residual add, so its input
is the pre-ReLU stage output; margins from the last block's ``bn2``)::

    OFD([FeatureSpec(f"layer{i}.1.relu", on="input") for i in (1, 2, 3, 4)],
        [FeatureSpec(f"layer{i}.2.relu", on="input") for i in (1, 2, 3, 4)],
        teacher_bns=["layer1.2.bn2", "layer2.3.bn2", "layer3.5.bn2", "layer4.2.bn2"],
        student_channels=[64, 128, 256, 512])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdkernels.distill.capture import SpecLike, find_module
from kdkernels.distill.connectors import Conv1x1BN
from kdkernels.distill.method import Method, check_same_shape, check_weight, loss_dtype, paired
from kdkernels.functional.margin_partial_l2 import margin_partial_l2
from kdkernels.ofd_margin import ofd_margin


class OFD(Method):
    """Args (everything after the two layer lists is keyword-only):
        student_layers, teacher_layers: pre-ReLU stage features, equal-length lists.
        teacher_bns: paths of the teacher BNs whose affine parameters give the margins, one per stage.
        student_channels: channels of each student feature (teacher channels come from the BNs).
        stage_weights: per-stage factors (default 1/2^{L−i}: the last stage 1, then ½, ¼, …).
        weight: default 1e-3 (CIFAR; the official /(B·1000)).
        teacher_mode: default ``"bn_train"``.
        update_teacher_statistics: let the teacher's BN in train mode update its running
            statistics, as the official ``t_net.train()`` does (default False: the teacher is
            never changed).
    """

    name = "ofd"

    def __init__(
        self,
        student_layers: Sequence[SpecLike],
        teacher_layers: Sequence[SpecLike],
        *,
        teacher_bns: Sequence[str],
        student_channels: Sequence[int],
        stage_weights: Sequence[float] | None = None,
        weight: float = 1e-3,
        teacher_mode: str = "bn_train",
        update_teacher_statistics: bool = False,
        name: str | None = None,
    ) -> None:
        s, t = paired("ofd", student_layers, teacher_layers)
        super().__init__(s, t, weight, name, teacher_mode)
        self.updates_teacher_statistics = bool(update_teacher_statistics)
        stages = len(s)
        self.teacher_bns = [teacher_bns] if isinstance(teacher_bns, str) else list(teacher_bns)
        self.student_channels = [student_channels] if isinstance(student_channels, int) else list(student_channels)
        if stage_weights is None:
            stage_weights = [1.0 / 2 ** (stages - 1 - i) for i in range(stages)]
        self.stage_weights = [check_weight(w, "stage_weights") for w in stage_weights]
        for what, values in (("teacher_bns", self.teacher_bns), ("student_channels", self.student_channels), ("stage_weights", self.stage_weights)):
            if len(values) != stages:
                raise ValueError(f"ofd: {what}: expected one per stage ({stages}), got {len(values)}")
        self.connectors = nn.ModuleList()  # built in bind(), when the teacher's channels are known

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        margins, channels = [], []
        for path in self.teacher_bns:
            bn = find_module(teacher, path, role="ofd: teacher_bns")
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
                raise ValueError(
                    f"ofd: teacher module {path!r} is a {type(bn).__name__}; OFD takes its margins from the "
                    "affine BatchNorm that precedes the teacher's ReLU at that stage"
                )
            with torch.no_grad():
                margin = ofd_margin(bn).detach().reshape(1, -1, 1, 1)
            margins.append(margin if margin.dtype == torch.float64 else margin.float())
            channels.append(bn.num_features)
        if len(self.connectors):
            # Bound before: the margins are this teacher's; the trained connectors stay if they fit it.
            built = [c.out_channels for c in self.connectors]
            if built != channels:
                raise ValueError(
                    f"ofd: rebound to a teacher whose BNs have {channels} channels, but the connectors were built for "
                    f"{built}; create a new OFD for this teacher"
                )
            for i, margin in enumerate(margins):
                setattr(self, f"margin{i}", margin.to(getattr(self, f"margin{i}").device))
            return
        for i, (margin, c_s, c_t) in enumerate(zip(margins, self.student_channels, channels)):
            self.register_buffer(f"margin{i}", margin)
            self.connectors.append(Conv1x1BN(c_s, c_t))

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, student, teacher, target):
        if not len(self.connectors):
            raise RuntimeError("ofd: not bound to a teacher; use it inside a Distiller")
        loss = 0.0
        for i, (s, t, margin) in enumerate(zip(student, teacher, self.margins())):
            if s.dim() != 4 or s.shape[1] != self.student_channels[i]:
                raise ValueError(
                    f"{self.name}: the student feature {self.student_features[i]} has shape {tuple(s.shape)}, but the connector "
                    f"was built for student_channels[{i}]={self.student_channels[i]} ((B, C, H, W) features); fix student_channels"
                )
            s = self.connectors[i](s)
            check_same_shape(self.name, f"{self.student_features[i]} (after the connector) vs {self.teacher_features[i]}", s, t)
            dtype = loss_dtype(s, t)
            if dtype == torch.float64:  # keep float64 inputs in float64 end to end
                s, t, margin = s.to(dtype), t.to(dtype), margin.to(dtype)
            loss = loss + self.stage_weights[i] * margin_partial_l2(s, t.detach(), margin.reshape(-1), reduction="sum")
        return loss / student[0].shape[0]
