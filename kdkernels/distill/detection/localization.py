"""Localization Distillation: Zheng et al., "Localization Distillation for Dense Object
Detection" (CVPR 2022); official code HikariTJU/LD (``mmdet/models/dense_heads/ld_head.py``,
``mmdet/models/losses/kd_loss.py``, ``ATSSAssigner.get_vlr_region``).

Each box edge is a distribution over the n + 1 bins of GFL (n = ``reg_max`` = 16). Per edge,

    LD_e = T² · (1 / (n+1)) · Σ_i p^T_t,i (log p^T_t,i − log p^T_s,i),    T = 10

(the official code averages the KL over the bins with ``.mean(1)``), and over the positive
anchors j of the ATSS assignment

    L_LD = 0.25 · (1 / 4) · Σ_j Σ_e w_j · LD_e,        w_j = max_c σ(student cls_j) (detached)

— ``avg_factor = 4``: not divided by the number of positives or by Σ w (methods.md §4). The
valuable-localization region (VLR) adds the same KL on the anchors of
:func:`~kdkernels.distill.detection.atss.vlr_weights`, weighted by their IoU, with
``avg_factor = 16`` and weight 0.25; the class-KD term is T² · KL / C (T = 2) on the positives,
divided by the number of positives of each pyramid level and summed over levels, weight 10.
"""

from __future__ import annotations

import torch

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.detection.gfl import REG_MAX, edge_logits
from kdkernels.distill.detection.targets import check_mask, require
from kdkernels.distill.method import Method, check_same_shape, check_weight
from kdkernels.functional.kd_loss import kd_loss

METHOD = "LocalizationDistillation"


def _positive_number(value, name: str, method: str = METHOD) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{method}: {name}: expected a finite number > 0, got {value!r}")
    return float(value)


def ld_edge_losses(
    student_distributions: torch.Tensor, teacher_distributions: torch.Tensor, *, reg_max: int = REG_MAX, temperature: float = 10.0
) -> torch.Tensor:
    """T² · KL(p_t ‖ p_s) / (n+1) per edge (the official ``.mean(1) * T * T``), through the fused
    ``kd_loss`` on (P·4, n+1) rows: (P, 4·(n+1)) or (P, 4, n+1) logits -> (P, 4)."""
    s = edge_logits(student_distributions, reg_max, "student_distributions", METHOD)
    t = edge_logits(teacher_distributions, reg_max, "teacher_distributions", METHOD)
    check_same_shape(METHOD, "box distributions", s, t)
    bins = reg_max + 1
    per_edge = kd_loss(s.reshape(-1, bins), t.detach().reshape(-1, bins), temperature, reduction="none")
    return (per_edge / bins).reshape(s.shape[:-1])


def localization_distillation_loss(
    student_distributions: torch.Tensor,
    teacher_distributions: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    reg_max: int = REG_MAX,
    temperature: float = 10.0,
    avg_factor: float = 4.0,
) -> torch.Tensor:
    """LD over P boxes: Σ_j Σ_e w_j · LD_e / avg_factor (the loss weight 0.25 is the caller's).

    Args:
        student_distributions, teacher_distributions: (P, 4·(n+1)) or (P, 4, n+1) edge logits of
            the selected boxes (positives, or VLR anchors).
        weight: (P,) per-box weights (LD: max sigmoid of the student's class scores, detached;
            VLR: the IoU), shared by the four edges; None = 1.
        reg_max: n; the last dimension must hold n + 1 bins.
        temperature: T (10 in the official config).
        avg_factor: the divisor (4 for the main region, 16 for VLR in the official code).
    """
    avg_factor = _positive_number(avg_factor, "avg_factor")
    per_edge = ld_edge_losses(student_distributions, teacher_distributions, reg_max=reg_max, temperature=temperature)
    if weight is not None:
        if tuple(weight.shape) != tuple(per_edge.shape[:-1]):
            raise ValueError(f"{METHOD}: weight: expected one weight per box, shape {tuple(per_edge.shape[:-1])}, got {tuple(weight.shape)}")
        per_edge = per_edge * weight.detach().to(per_edge.dtype)[..., None]
    return per_edge.sum() / avg_factor


def ld_box_weights(student_cls_logits: torch.Tensor) -> torch.Tensor:
    """w_j = max_c σ(student class logit), detached: (P, C) -> (P,)."""
    return student_cls_logits.detach().sigmoid().amax(-1)


def class_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    avg_factor: float | None = None,
) -> torch.Tensor:
    """LD's class KD on P selected anchors: Σ_j w_j · T² · KL(p_t ‖ p_s) / C / avg_factor, a softmax
    over the C class logits (as the official code, even for a sigmoid head); ``avg_factor``
    defaults to P (the official: the number of positives of the level)."""
    check_same_shape(METHOD, "class logits", student_logits, teacher_logits)
    classes = student_logits.shape[-1]
    per_row = kd_loss(student_logits.reshape(-1, classes), teacher_logits.detach().reshape(-1, classes), temperature, reduction="none") / classes
    if weight is not None:
        per_row = per_row * weight.detach().reshape(-1).to(per_row.dtype)
    divisor = max(per_row.shape[0], 1) if avg_factor is None else _positive_number(avg_factor, "avg_factor")
    return per_row.sum() / divisor


class LocalizationDistillation(Method):
    """Localization Distillation (Zheng et al., CVPR 2022) on a GFL-style dense head.

    Reads four tensors: the student's and the teacher's class logits (B, A, C) and box
    distributions (B, A, 4·(n+1)), all anchors of all levels concatenated in the same order,
    and takes the head's assignment as the distiller's target (a
    :class:`~kdkernels.distill.detection.targets.DetectionTargets` with ``positive``, and
    ``vlr_weight`` when the VLR term is on, ``num_level_anchors`` for the per-level KD normaliser).
    Returns up to three parts::

        "ld":     ld_weight · Σ_pos Σ_e w_j LD_e / 4            (w_j = max σ(student cls), detached)
        "ld_vlr": vlr_weight · Σ_vlr Σ_e IoU_j LD_e / 16
        "kd":     kd_weight · Σ_levels Σ_pos T_kd² KL(cls) / C / (#pos in the level)

    Defaults are the official ``LDHead`` and GFLv1 config (HikariTJU/LD): reg_max 16, T = 10,
    weights 0.25 / 0.25 / 10, T_kd = 2, avg factors 4 and 16. The mmdetection port keeps only
    the ``ld`` part: set ``vlr_weight=0, kd_weight=0``. A part of weight 0 is not computed.

    Scale: the defaults were tuned on COCO (ResNet-18 GFL student of a ResNet-101 teacher, FPN
    strides 8–128 at 1333×800 inputs; the official config loads 3 images per GPU, and the losses
    are computed per GPU). Because the
    main and VLR terms are *sums* over boxes divided by a constant, they grow linearly with the
    number of positive (or VLR) anchors per step, i.e. with the batch size per device and the
    number of objects per image; the KD term is a mean over positives, independent of both.
    Halving the batch halves ``ld`` relative to the GFL losses (which are normalised by Σw).

    Args:
        student_cls, student_reg, teacher_cls, teacher_reg: where the (B, A, C) class logits and
            the (B, A, 4·(n+1)) box logits are (dotted module paths).
        reg_max: n (bins 0…n). temperature: T of the box KL. kd_temperature: T of the class KD.
        ld_weight, vlr_weight, kd_weight: part weights. avg_factor, vlr_avg_factor: divisors.
        weight: factor on every part (default 1).
    """

    name = "ld"

    def __init__(
        self,
        student_cls: SpecLike,
        student_reg: SpecLike,
        teacher_cls: SpecLike,
        teacher_reg: SpecLike,
        *,
        reg_max: int = REG_MAX,
        temperature: float = 10.0,
        ld_weight: float = 0.25,
        vlr_weight: float = 0.25,
        kd_weight: float = 10.0,
        kd_temperature: float = 2.0,
        avg_factor: float = 4.0,
        vlr_avg_factor: float = 16.0,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__([student_cls, student_reg], [teacher_cls, teacher_reg], weight, name)
        if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 1:
            raise ValueError(f"{METHOD}: reg_max: expected a positive int, got {reg_max!r}")
        self.reg_max = reg_max
        self.temperature = _positive_number(temperature, "temperature")
        self.kd_temperature = _positive_number(kd_temperature, "kd_temperature")
        self.ld_weight = check_weight(ld_weight, f"{METHOD}: ld_weight")
        self.vlr_weight = check_weight(vlr_weight, f"{METHOD}: vlr_weight")
        self.kd_weight = check_weight(kd_weight, f"{METHOD}: kd_weight")
        self.avg_factor = _positive_number(avg_factor, "avg_factor")
        self.vlr_avg_factor = _positive_number(vlr_avg_factor, "vlr_avg_factor")

    def forward(self, student, teacher, target):
        s_cls, s_reg = student
        t_cls, t_reg = teacher
        check_same_shape(self.name, "class logits", s_cls, t_cls, "teacher and student must share the anchors and classes")
        check_same_shape(self.name, "box distributions", s_reg, t_reg, "teacher and student must share the anchors and reg_max")
        bins = self.reg_max + 1
        if s_reg.shape[-1] != 4 * bins:
            raise ValueError(f"{METHOD}: reg_max: the box logits have {s_reg.shape[-1]} channels, expected 4·(reg_max + 1) = {4 * bins}")
        rows = tuple(s_cls.shape[:-1])
        if tuple(s_reg.shape[:-1]) != rows:
            raise ValueError(f"{METHOD}: student_reg: expected leading shape {rows} (one row per anchor, as the class logits), got {tuple(s_reg.shape)}")
        classes = s_cls.shape[-1]
        s_cls, t_cls = s_cls.reshape(-1, classes), t_cls.reshape(-1, classes)
        s_reg, t_reg = s_reg.reshape(-1, 4 * bins), t_reg.reshape(-1, 4 * bins)
        zero = s_reg.sum() * 0  # keeps the graph when a batch has no positive anchor
        losses = {}
        need_positive = self.ld_weight > 0 or self.kd_weight > 0
        if need_positive:
            positive = check_mask(require(target, "positive", self.name, "LD needs the positive anchors of the assignment"), "target.positive", self.name, rows)
            positive = positive.reshape(-1)
        if self.ld_weight > 0:
            idx = positive.nonzero().squeeze(1)
            ld = zero
            if idx.numel():
                ld = localization_distillation_loss(
                    s_reg[idx], t_reg[idx], ld_box_weights(s_cls[idx]), reg_max=self.reg_max, temperature=self.temperature, avg_factor=self.avg_factor
                )
            losses["ld"] = self.ld_weight * ld
        if self.vlr_weight > 0:
            vlr = require(target, "vlr_weight", self.name, "the VLR term (vlr_weight > 0) needs the VLR IoU weights of the assignment; pass vlr_weight=0 to drop it")
            if tuple(vlr.shape) != rows:
                raise ValueError(f"{METHOD}: target.vlr_weight: expected shape {rows}, got {tuple(vlr.shape)}")
            vlr = vlr.reshape(-1)
            idx = (vlr > 0).nonzero().squeeze(1)
            ld_vlr = zero
            if idx.numel():
                ld_vlr = localization_distillation_loss(
                    s_reg[idx], t_reg[idx], vlr[idx], reg_max=self.reg_max, temperature=self.temperature, avg_factor=self.vlr_avg_factor
                )
            losses["ld_vlr"] = self.vlr_weight * ld_vlr
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * self._class_kd(s_cls, t_cls, positive, rows, getattr(target, "num_level_anchors", None), zero)
        return losses

    def _class_kd(self, s_cls, t_cls, positive, rows, num_level_anchors, zero):
        """Per level: Σ over that level's positives (all images) / their number; summed over levels."""
        level = torch.zeros(rows, dtype=torch.long, device=s_cls.device)
        if num_level_anchors is not None:
            sizes = [int(n) for n in num_level_anchors]
            if len(rows) < 2 or sum(sizes) != rows[-1]:
                raise ValueError(f"{METHOD}: target.num_level_anchors: expected level sizes summing to the anchors per image ({rows[-1] if rows else 0}), got {sizes}")
            level = torch.repeat_interleave(torch.arange(len(sizes), device=s_cls.device), torch.tensor(sizes, device=s_cls.device)).expand(rows)
        level = level.reshape(-1)
        total = zero
        for lvl in level[positive].unique().tolist():
            idx = (positive & (level == lvl)).nonzero().squeeze(1)
            total = total + class_kd_loss(s_cls[idx], t_cls[idx], temperature=self.kd_temperature, avg_factor=idx.numel())
        return total

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", reg_max={self.reg_max}, T={self.temperature:g}, ld={self.ld_weight:g}, vlr={self.vlr_weight:g}, kd={self.kd_weight:g}"
        )
