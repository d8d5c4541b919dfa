"""Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation"
(NeurIPS 2017). No official code exists; the formulas are the paper's (methods.md §3).

Per head (the RPN / a one-stage head, and the ROI head of a two-stage detector):

    L_cls = μ · L_hard(P_s, y) + (1 − μ) · L_soft(P_s, P_t),   L_soft = −Σ_c w_c P_t,c log P_s,c
            (w_background = 1.5, other classes 1, T = 1)
    L_reg = L_smoothL1(R_s, y_reg) + ν · L_b(R_s, R_t, y_reg)
            L_b = ‖R_s − y‖² if ‖R_s − y‖² + m > ‖R_t − y‖², else 0
    L     = L_cls + λ · L_reg        (both averaged over the head's N sampled rows)
and, once per detector, γ · L_hint with L_hint = ‖V − r(Z)‖² between the teacher's feature V
and the student's feature Z through the adaptation layer r (a 1×1 conv, used even when the
channel counts match).

``L_soft`` runs in the fused ``weighted_soft_ce``, ``L_b`` in the fused ``bounded_regression``.
The functions take the head's tensors directly, so any detector can call them; the
torchvision adapter (``adapters/torchvision_faster_rcnn.py``) extracts them from Faster R-CNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.capture import SpecLike
from kdkernels.distill.connectors import make_connector
from kdkernels.distill.detection.targets import check_mask, require
from kdkernels.distill.method import Method, check_same_shape, check_weight
from kdkernels.functional.bounded_regression import bounded_regression
from kdkernels.functional.weighted_soft_ce import weighted_soft_ce

METHOD = "ChenDetectionKD"
HINT_NORMS = ("l2", "l1")
HINT_REDUCTIONS = ("mean", "sum", "batchmean")
CLS_NORMALIZERS = ("valid", "positive")


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{METHOD}: {name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def binary_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid logits z (…) as two-class logits (…, 2) = [0, z]: softmax gives [1 − σ(z), σ(z)],
    background first. Turns an RPN objectness or a sigmoid (focal / QFL) head into the
    background-vs-object distribution that Chen's class-weighted soft CE weighs."""
    return torch.stack([torch.zeros_like(logits), logits], -1)


def chen_class_weight(num_classes: int, background_weight: float = 1.5, background_class: int = 0, *, like: torch.Tensor) -> torch.Tensor:
    """(C,) weights: ``background_weight`` at ``background_class``, 1 elsewhere."""
    if not 0 <= background_class < num_classes:
        raise ValueError(f"{METHOD}: background_class: expected an index in [0, {num_classes}), got {background_class!r}")
    weight = torch.ones(num_classes, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)
    weight[background_class] = background_weight
    return weight


def chen_hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, *, norm: str = "l2", reduction: str = "mean") -> torch.Tensor:
    """‖V − Z‖² (``norm="l2"``) or ‖V − Z‖₁ between the adapted student feature Z and the
    teacher's feature V (detached). ``reduction``: ``"mean"`` over elements (the default: the
    paper's sum would grow with the feature-map size), ``"sum"``, or ``"batchmean"`` (sum / B)."""
    if norm not in HINT_NORMS:
        raise ValueError(f"{METHOD}: hint_norm: expected one of {HINT_NORMS}, got {norm!r}")
    if reduction not in HINT_REDUCTIONS:
        raise ValueError(f"{METHOD}: hint_reduction: expected one of {HINT_REDUCTIONS}, got {reduction!r}")
    check_same_shape(METHOD, "hint features", student_feature, teacher_feature, "the adaptation layer must map the student feature to the teacher's shape")
    diff = student_feature - teacher_feature.detach().to(student_feature.dtype)
    per_element = diff.pow(2) if norm == "l2" else diff.abs()
    if reduction == "mean":
        return per_element.mean()
    total = per_element.sum()
    return total if reduction == "sum" else total / max(student_feature.shape[0], 1)


def chen_classification_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    mu: float = 0.5,
    background_weight: float = 1.5,
    background_class: int = 0,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{"cls_hard": μ · CE(P_s, y), "cls_soft": (1 − μ) · L_soft(P_s, P_t)}`` over the rows of
    (…, C) softmax logits (use :func:`binary_class_logits` for sigmoid ones).

    Args:
        labels: class targets (…) (the background is ``background_class``); needed when μ > 0.
            A part whose weight is 0 is left out of the dict.
        valid: bool (…) rows that count (sampled, not ignored); None = all.
        normalizer: divisor of both sums; default the number of valid rows (the paper's 1/N).
    """
    if student_logits.dim() < 1:
        raise ValueError(f"{METHOD}: student_logits: expected (..., C) class logits, got a 0-d tensor")
    check_same_shape(METHOD, "class logits", student_logits, teacher_logits, "teacher and student must score the same rows and classes")
    mu = _fraction(mu, "mu")
    rows = tuple(student_logits.shape[:-1])
    if valid is not None:
        check_mask(valid, "valid", METHOD, rows)
    counted = (valid.sum() if valid is not None else torch.tensor(float(max(1, student_logits[..., 0].numel())))) if normalizer is None else normalizer
    counted = torch.as_tensor(counted, dtype=student_logits.dtype, device=student_logits.device).clamp_min(1)
    losses = {}
    if mu > 0:
        if labels is None:
            raise ValueError(f"{METHOD}: labels: the hard-label term (mu > 0) needs the class targets; pass mu=0 or the labels")
        if tuple(labels.shape) != rows or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{METHOD}: labels: expected integer class targets of shape {rows}, got {labels.dtype} {tuple(labels.shape)}")
        classes = student_logits.shape[-1]
        safe = labels.clamp(0, classes - 1).long()  # ignored rows may hold -1; they are masked below
        ce = F.cross_entropy(student_logits.reshape(-1, classes), safe.reshape(-1), reduction="none").reshape(rows)
        if valid is not None:
            ce = torch.where(valid, ce, torch.zeros_like(ce))
        losses["cls_hard"] = mu * ce.sum() / counted
    if mu < 1:
        weight = chen_class_weight(student_logits.shape[-1], background_weight, background_class, like=student_logits)
        soft = weighted_soft_ce(student_logits, teacher_logits.detach(), weight, temperature, reduction="sum", mask=valid)
        losses["cls_soft"] = (1 - mu) * soft / counted
    return losses


def chen_regression_loss(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    targets: torch.Tensor,
    positive: torch.Tensor,
    *,
    nu: float = 0.5,
    margin: float = 0.0,
    beta: float = 1.0,
    hard: bool = True,
    normalizer: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{"reg_smooth_l1": Σ_pos smoothL1(R_s, y), "reg_bounded": ν · Σ_pos L_b(R_s, R_t, y)}``,
    both divided by ``normalizer`` (default the number of positive rows; the paper and
    torchvision divide by the N sampled rows: pass that).

    Args:
        student_boxes, teacher_boxes, targets: (…, K) regressions in the head's parameterisation.
        positive: bool (…), the rows with a matched ground-truth box.
        beta: the smooth-L1 transition (torchvision's Faster R-CNN uses 1/9).
        hard: include the smooth-L1 term (False when the detector computes its own).
    """
    check_same_shape(METHOD, "box regressions", student_boxes, teacher_boxes)
    check_same_shape(METHOD, "box regression targets", student_boxes, targets)
    positive = check_mask(positive, "positive", METHOD, tuple(student_boxes.shape[:-1]))
    if not nu >= 0:
        raise ValueError(f"{METHOD}: nu: expected a number >= 0, got {nu!r}")
    counted = positive.sum() if normalizer is None else normalizer
    counted = torch.as_tensor(counted, dtype=student_boxes.dtype, device=student_boxes.device).clamp_min(1)
    losses = {}
    if hard:
        sl1 = F.smooth_l1_loss(student_boxes, targets.detach().to(student_boxes.dtype), beta=beta, reduction="none").sum(-1)
        losses["reg_smooth_l1"] = torch.where(positive, sl1, torch.zeros_like(sl1)).sum() / counted
    if nu > 0:
        bounded = bounded_regression(student_boxes, teacher_boxes.detach(), targets.detach(), margin, reduction="sum", mask=positive)
        losses["reg_bounded"] = nu * bounded / counted
    return losses


class ChenDetectionKD(Method):
    """Chen et al. (NeurIPS 2017): hint + class-weighted soft CE + teacher-bounded regression,
    on one detection head of any detector whose tensors a forward hook can capture.

    Reads (dotted module paths): the hint features (optional), the class logits (…, C) (or
    sigmoid logits with ``sigmoid=True``) and the box regressions (…, K) of the student and the
    teacher, for the same rows (anchors or proposals); the distiller's target is the head's
    assignment, a :class:`~kdkernels.distill.detection.targets.DetectionTargets` with
    ``labels``, ``box_targets``, ``positive`` and optionally ``valid``. Returns the parts::

        "hint":          γ · ‖V − r(Z)‖²           (r: a 1×1 conv owned by the method)
        "cls_hard":      μ · CE / N                 (only with hard_terms=True)
        "cls_soft":      (1 − μ) · Σ_c w_c P_t log P_s / N
        "reg_smooth_l1": λ · smoothL1 / N           (only with hard_terms=True)
        "reg_bounded":   λ · ν · L_b / N

    With ``hard_terms=False`` the detector keeps its own losses (QFL, GIoU …) and scales its
    classification loss by μ itself. N is the number of valid rows (``cls_normalizer="valid"``,
    the paper's mini-batch mean) or of positive rows (``"positive"``, for focal-type dense heads
    whose hard loss divides by the positives); the regression terms divide by the same N.

    Defaults (paper; no official code): γ = 0.5, λ = 1, μ = 0.5 (commonly cited, unverified),
    background weight 1.5, T = 1, ν = 0.5 (unverified), m = 0 (not given in the paper).
    Scale: the paper tuned them on Faster R-CNN students and teachers on PASCAL VOC, KITTI,
    ILSVRC and COCO, with the Faster R-CNN settings of its time (about 600-pixel shorter side,
    1–2 images per step, 256 anchors sampled per image for the RPN and 128 proposals for the ROI
    head; these sizes are the common defaults, not verified in the paper). The class and regression terms are means over the sampled rows, so they
    do not grow with the batch or the image size; the hint is a mean over feature elements
    (``hint_reduction="mean"``), independent of the feature-map size and batch — with ``"sum"``
    (the paper's ‖·‖²) it grows linearly with B·C·H·W and γ must shrink accordingly.

    Args:
        student_cls, teacher_cls, student_reg, teacher_reg: where the logits and regressions are.
        student_hint, teacher_hint: the guided / hint features, or None for no hint term.
        student_channels, teacher_channels: channels of the hint features (builds the 1×1 conv).
        connector: ``"conv"`` (default), ``"conv_bn"`` or a module.
        hint_weight (γ), mu (μ), background_weight, background_class, temperature (T),
        reg_weight (λ), nu (ν), margin (m), smooth_l1_beta, hint_norm (``"l2"``/``"l1"``),
        hint_reduction, sigmoid, hard_terms, cls_normalizer: as above.
        weight: factor on every part (default 1).
    """

    name = "chen_kd"

    def __init__(
        self,
        student_cls: SpecLike,
        teacher_cls: SpecLike,
        student_reg: SpecLike,
        teacher_reg: SpecLike,
        student_hint: SpecLike | None = None,
        teacher_hint: SpecLike | None = None,
        *,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        connector: str | nn.Module = "conv",
        hint_weight: float = 0.5,
        mu: float = 0.5,
        background_weight: float = 1.5,
        background_class: int = 0,
        temperature: float = 1.0,
        reg_weight: float = 1.0,
        nu: float = 0.5,
        margin: float = 0.0,
        smooth_l1_beta: float = 1.0,
        hint_norm: str = "l2",
        hint_reduction: str = "mean",
        sigmoid: bool = False,
        hard_terms: bool = True,
        cls_normalizer: str = "valid",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        if (student_hint is None) != (teacher_hint is None):
            raise ValueError(f"{METHOD}: student_hint, teacher_hint: give both hint layers or neither")
        student = [student_cls, student_reg] + ([student_hint] if student_hint is not None else [])
        teacher = [teacher_cls, teacher_reg] + ([teacher_hint] if teacher_hint is not None else [])
        super().__init__(student, teacher, weight, name)
        self.hint_weight = check_weight(hint_weight, f"{METHOD}: hint_weight")
        self.reg_weight = check_weight(reg_weight, f"{METHOD}: reg_weight")
        self.background_weight = check_weight(background_weight, f"{METHOD}: background_weight")
        self.mu = _fraction(mu, "mu")
        self.nu = check_weight(nu, f"{METHOD}: nu")
        if not temperature > 0:
            raise ValueError(f"{METHOD}: temperature: expected a number > 0, got {temperature!r}")
        self.temperature, self.margin, self.smooth_l1_beta = float(temperature), float(margin), float(smooth_l1_beta)
        if hint_norm not in HINT_NORMS:
            raise ValueError(f"{METHOD}: hint_norm: expected one of {HINT_NORMS}, got {hint_norm!r}")
        if hint_reduction not in HINT_REDUCTIONS:
            raise ValueError(f"{METHOD}: hint_reduction: expected one of {HINT_REDUCTIONS}, got {hint_reduction!r}")
        if cls_normalizer not in CLS_NORMALIZERS:
            raise ValueError(f"{METHOD}: cls_normalizer: expected one of {CLS_NORMALIZERS}, got {cls_normalizer!r}")
        self.hint_norm, self.hint_reduction, self.cls_normalizer = hint_norm, hint_reduction, cls_normalizer
        self.background_class, self.sigmoid, self.hard_terms = int(background_class), bool(sigmoid), bool(hard_terms)
        self.has_hint = student_hint is not None
        self.connector = None
        if self.has_hint:
            if not isinstance(connector, nn.Module) and (student_channels is None or teacher_channels is None):
                raise ValueError(f"{METHOD}: student_channels, teacher_channels: the hint's adaptation layer needs both channel counts")
            self.connector = make_connector(connector, student_channels, teacher_channels)

    def forward(self, student, teacher, target):
        s_cls, s_reg = student[:2]
        t_cls, t_reg = teacher[:2]
        rows = tuple(s_reg.shape[:-1])
        positive = check_mask(require(target, "positive", self.name, "the regression terms need the positive rows"), "target.positive", self.name, rows)
        valid = getattr(target, "valid", None)
        if valid is not None:
            valid = check_mask(valid, "target.valid", self.name, rows)
        box_targets = require(target, "box_targets", self.name, "the regression terms need the regression targets")
        labels = getattr(target, "labels", None)
        if self.hard_terms and self.mu > 0 and labels is None:
            raise ValueError(f"{self.name}: target.labels: missing; the hard classification term (mu > 0, hard_terms=True) needs the labels")
        if self.cls_normalizer == "positive":
            n = positive.sum()
        else:
            n = valid.sum() if valid is not None else torch.tensor(max(1, positive.numel()), device=positive.device)
        losses = {}
        if self.has_hint and self.hint_weight > 0:
            losses["hint"] = self.hint_weight * chen_hint_loss(self.connector(student[2]), teacher[2], norm=self.hint_norm, reduction=self.hint_reduction)
        mu = self.mu if self.hard_terms else 0.0  # without hard terms: the plain soft term, scaled below
        cls_valid, cls_labels = valid, labels
        if self.sigmoid:  # one background-vs-class distribution per (row, class)
            s_cls, t_cls = binary_class_logits(s_cls), binary_class_logits(t_cls)
            classes = s_cls.shape[-2]
            if labels is not None:
                cls_labels = (labels[..., None] == torch.arange(classes, device=labels.device)).long()
            if valid is not None:
                cls_valid = valid[..., None].expand(*rows, classes)
        cls = chen_classification_loss(
            s_cls, t_cls, cls_labels, mu=mu, background_weight=self.background_weight,
            background_class=0 if self.sigmoid else self.background_class,
            temperature=self.temperature, valid=cls_valid, normalizer=n,
        )
        if not self.hard_terms and "cls_soft" in cls:  # soft term only; the caller scales its own hard loss by μ
            cls["cls_soft"] = (1 - self.mu) * cls["cls_soft"]
        losses.update(cls)
        if self.reg_weight > 0:
            reg = chen_regression_loss(
                s_reg, t_reg, box_targets, positive, nu=self.nu, margin=self.margin, beta=self.smooth_l1_beta,
                hard=self.hard_terms, normalizer=n,
            )
            losses.update({k: self.reg_weight * v for k, v in reg.items()})
        return losses
