"""torchvision Faster R-CNN → the tensors of Chen et al.'s losses, for the RPN and the ROI head.

torchvision (``torchvision.models.detection``) computes its losses inside ``forward``; this
adapter reruns the same steps piece by piece on the *student* — transform, backbone, RPN head,
anchors, target assignment and the RPN's positive/negative sampling, proposals, the ROI head's
proposal sampling — and evaluates the *teacher's* heads on the student's anchors and sampled
proposals (teacher features, under ``no_grad``), so both score the same rows. Neither model is
edited. The tensor layout follows torchvision's: RPN rows are image by image, level by level,
(y, x, anchor) inside a level (``concat_box_prediction_layers``); ROI rows are the sampled
proposals of all images in order; class 0 is the background.

Requirements: teacher and student share the transform (the student's is used for both), the
anchor generator's sizes / aspect ratios and the feature levels (the same strides), and the
number of classes. ``torchvision`` is imported only by :func:`faster_rcnn_tensors`.

Tested where: the tensor-level helpers (:func:`concat_rpn_predictions`, :func:`rpn_targets`,
:func:`roi_boxes_of_labels`, :func:`roi_targets`, :func:`chen_faster_rcnn_losses`) are tested
on hand-made tensors in tests/distill/test_detection_adapters.py; :func:`faster_rcnn_tensors`
needs an importable torchvision and is not run by the tests of this repository's CPU CI.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdkernels.distill.detection.chen import binary_class_logits, chen_classification_loss, chen_hint_loss, chen_regression_loss
from kdkernels.distill.detection.targets import DetectionTargets

ADAPTER = "torchvision_faster_rcnn"
SMOOTH_L1_BETA = 1.0 / 9.0  # torchvision's RPN and ROI box losses


def concat_rpn_predictions(objectness: list[torch.Tensor], deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level RPN head outputs (N, A, H, W) and (N, 4A, H, W) -> (N·Σ H·W·A,) objectness
    logits and (N·Σ H·W·A, 4) deltas, rows in torchvision's order (image, level, y, x, anchor)."""
    if len(objectness) != len(deltas) or not objectness:
        raise ValueError(f"{ADAPTER}: objectness, deltas: expected one tensor per level for both, got {len(objectness)} and {len(deltas)}")
    obj_rows, delta_rows = [], []
    for level, (o, d) in enumerate(zip(objectness, deltas)):
        n, a, h, w = o.shape
        if tuple(d.shape) != (n, 4 * a, h, w):
            raise ValueError(f"{ADAPTER}: deltas[{level}]: expected shape {(n, 4 * a, h, w)} for objectness {tuple(o.shape)}, got {tuple(d.shape)}")
        obj_rows.append(o.permute(0, 2, 3, 1).reshape(n, -1))
        delta_rows.append(d.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(obj_rows, 1).reshape(-1), torch.cat(delta_rows, 1).reshape(-1, 4)


def rpn_targets(labels: list[torch.Tensor], regression_targets: list[torch.Tensor], sampled_pos: list[torch.Tensor], sampled_neg: list[torch.Tensor]) -> DetectionTargets:
    """RPN targets in the rows of :func:`concat_rpn_predictions`: ``labels`` (1 object, 0
    background, −1 ignored) from ``rpn.assign_targets_to_anchors``, ``regression_targets`` from
    ``rpn.box_coder.encode``, the masks of ``rpn.fg_bg_sampler``. ``valid`` = the sampled anchors."""
    pos = torch.cat([p.bool() for p in sampled_pos])
    neg = torch.cat([n.bool() for n in sampled_neg])
    lab = torch.cat(labels)
    return DetectionTargets(
        positive=pos, labels=(lab > 0).long(), box_targets=torch.cat(list(regression_targets)), valid=pos | neg
    )


def roi_boxes_of_labels(box_regression: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R, 4·C) class-specific deltas -> (R, 4): the deltas of each row's label (as
    torchvision's ``fastrcnn_loss`` selects them; for a background row, the background slot)."""
    rows = box_regression.shape[0]
    per_class = box_regression.reshape(rows, -1, 4)
    if labels.shape != (rows,):
        raise ValueError(f"{ADAPTER}: labels: expected shape ({rows},), got {tuple(labels.shape)}")
    return per_class[torch.arange(rows, device=labels.device), labels]


def roi_targets(labels: list[torch.Tensor], regression_targets: list[torch.Tensor]) -> DetectionTargets:
    """ROI targets from ``roi_heads.select_training_samples``: every sampled proposal is valid,
    those of label > 0 are positive."""
    lab = torch.cat(labels)
    return DetectionTargets(positive=lab > 0, labels=lab, box_targets=torch.cat(regression_targets), valid=torch.ones_like(lab, dtype=torch.bool))


class FasterRCNNTensors(NamedTuple):
    """What Chen's losses read from a student / teacher Faster R-CNN pair for one batch."""

    student_feature: torch.Tensor  # the hint level of the student's backbone (+FPN)
    teacher_feature: torch.Tensor
    rpn_student_logits: torch.Tensor  # (M,) objectness logits
    rpn_teacher_logits: torch.Tensor
    rpn_student_boxes: torch.Tensor  # (M, 4) deltas
    rpn_teacher_boxes: torch.Tensor
    rpn_targets: DetectionTargets
    roi_student_logits: torch.Tensor  # (R, C) class logits
    roi_teacher_logits: torch.Tensor
    roi_student_boxes: torch.Tensor  # (R, 4) deltas of the label's class
    roi_teacher_boxes: torch.Tensor
    roi_targets: DetectionTargets


def faster_rcnn_tensors(student: nn.Module, teacher: nn.Module, images: list[torch.Tensor], targets: list[dict], hint_level: str = "0") -> FasterRCNNTensors:
    """Runs the student (its RPN and ROI heads in training mode) and the teacher (no_grad) on
    ``images`` / ``targets`` (torchvision's format: boxes (x1, y1, x2, y2), labels ≥ 1)."""
    from torchvision.models.detection.image_list import ImageList  # noqa: F401  (fails early without torchvision)

    from kdkernels.distill.detection.boxes import check_boxes

    for i, t in enumerate(targets):
        check_boxes(t["boxes"], f"targets[{i}]['boxes']", ADAPTER)
    image_list, targets = student.transform(images, targets)
    s_feats = student.backbone(image_list.tensors)
    with torch.no_grad():
        t_feats = teacher.backbone(image_list.tensors)
    if isinstance(s_feats, torch.Tensor):
        s_feats, t_feats = {"0": s_feats}, {"0": t_feats}
    if list(s_feats) != list(t_feats):
        raise ValueError(f"{ADAPTER}: teacher: its feature levels {list(t_feats)} differ from the student's {list(s_feats)}")
    if hint_level not in s_feats:
        raise ValueError(f"{ADAPTER}: hint_level: expected one of {list(s_feats)}, got {hint_level!r}")
    rpn = student.rpn
    s_levels, t_levels = list(s_feats.values()), list(t_feats.values())
    s_obj, s_deltas = rpn.head(s_levels)
    with torch.no_grad():
        t_obj, t_deltas = teacher.rpn.head(t_levels)
    anchors = rpn.anchor_generator(image_list, s_levels)
    num_anchors_per_level = [o[0].numel() for o in s_obj]
    s_obj_flat, s_delta_flat = concat_rpn_predictions(s_obj, s_deltas)
    t_obj_flat, t_delta_flat = concat_rpn_predictions(t_obj, t_deltas)
    if t_obj_flat.shape != s_obj_flat.shape:
        raise ValueError(f"{ADAPTER}: teacher: its RPN scores {t_obj_flat.numel()} anchors, the student's {s_obj_flat.numel()}; share the anchor generator and strides")
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    regression = rpn.box_coder.encode(matched, anchors)
    pos, neg = rpn.fg_bg_sampler(labels)
    rpn_t = rpn_targets(labels, list(regression), pos, neg)
    proposals = rpn.box_coder.decode(s_delta_flat.detach(), anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, s_obj_flat.detach().reshape(len(anchors), -1), image_list.image_sizes, num_anchors_per_level)

    roi = student.roi_heads
    proposals, _, roi_labels, roi_regression = roi.select_training_samples(boxes, targets)
    s_logits, s_box = roi.box_predictor(roi.box_head(roi.box_roi_pool(s_feats, proposals, image_list.image_sizes)))
    with torch.no_grad():
        th = teacher.roi_heads
        t_logits, t_box = th.box_predictor(th.box_head(th.box_roi_pool(t_feats, proposals, image_list.image_sizes)))
    roi_t = roi_targets(roi_labels, roi_regression)
    return FasterRCNNTensors(
        s_feats[hint_level], t_feats[hint_level],
        s_obj_flat, t_obj_flat, s_delta_flat, t_delta_flat, rpn_t,
        s_logits, t_logits, roi_boxes_of_labels(s_box, roi_t.labels), roi_boxes_of_labels(t_box, roi_t.labels), roi_t,
    )


def chen_faster_rcnn_losses(
    tensors: FasterRCNNTensors,
    connector: nn.Module | None = None,
    *,
    hint_weight: float = 0.5,
    mu: float = 0.5,
    background_weight: float = 1.5,
    temperature: float = 1.0,
    reg_weight: float = 1.0,
    nu: float = 0.5,
    margin: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Chen et al.'s full objective on a Faster R-CNN pair: ``rpn/…`` and ``roi/…`` class and
    regression parts (torchvision's normalisers: the sampled rows, smooth-L1 β = 1/9) and
    ``hint`` through ``connector`` (a 1×1 conv the caller owns and optimises). With μ = 1,
    ν = 0, γ = 0 it equals torchvision's own four losses (objectness, rpn box, classifier, box)."""
    losses = {}
    for head, s_logits, t_logits, s_box, t_box, tg in (
        ("rpn", binary_class_logits(tensors.rpn_student_logits), binary_class_logits(tensors.rpn_teacher_logits),
         tensors.rpn_student_boxes, tensors.rpn_teacher_boxes, tensors.rpn_targets),
        ("roi", tensors.roi_student_logits, tensors.roi_teacher_logits, tensors.roi_student_boxes, tensors.roi_teacher_boxes, tensors.roi_targets),
    ):
        n = tg.valid.sum()
        cls = chen_classification_loss(s_logits, t_logits, tg.labels, mu=mu, background_weight=background_weight, temperature=temperature, valid=tg.valid, normalizer=n)
        reg = chen_regression_loss(s_box, t_box, tg.box_targets, tg.positive, nu=nu, margin=margin, beta=SMOOTH_L1_BETA, normalizer=n)
        losses.update({f"{head}/{k}": v for k, v in cls.items()})
        losses.update({f"{head}/{k}": reg_weight * v for k, v in reg.items()})
    if hint_weight > 0:
        student = tensors.student_feature if connector is None else connector(tensors.student_feature)
        losses["hint"] = hint_weight * chen_hint_loss(student, tensors.teacher_feature)
    return losses
