"""A compact GFL / ATSS detector (Li et al., NeurIPS 2020; Zhang et al., CVPR 2020): the dense
head Localization Distillation was designed for, small enough to train on a CPU.

Backbone (strided conv stages) → FPN (lateral 1×1, top-down sum, 3×3 output convs) → a head
shared by the levels (conv towers with GroupNorm; class logits, sigmoid, one per class; box
logits 4·(n+1) per anchor, one anchor per location, a learnable scale per level).
Training: ATSS assignment, QFL (×1, / #positives) + GIoU (×2) + DFL (×0.25) on the positives,
GIoU and DFL weighted by the detached max class score and divided by its sum — the
normalisation of mmdetection's ``GFLHead``.

The head's outputs over all levels are concatenated by :class:`LevelConcat` modules
(``head.cls_out`` (B, A, C), ``head.reg_out`` (B, A, 4·(n+1))) and their integral by
``head.distances`` (B, A, 4, in stride units), so the distillation methods capture them by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.detection.atss import atss_assign, vlr_weights
from kdkernels.distill.detection.boxes import aligned_iou, batched_nms
from kdkernels.distill.detection.gfl import (
    REG_MAX,
    box_to_distances,
    distances_to_box,
    distribution_focal_loss,
    giou_loss,
    integral,
    quality_focal_loss,
)


@dataclass
class GFLTargets:
    """The assignment of one batch: the fields of
    :class:`~kdkernels.distill.detection.targets.DetectionTargets` (read by the KD methods) plus
    the matched boxes in pixels for the GFL losses."""

    positive: torch.Tensor  # (B, A) bool
    labels: torch.Tensor  # (B, A) long, num_classes = background
    box_targets: torch.Tensor  # (B, A, 4) edge distances in stride units (clamped to reg_max − 0.1)
    gt_boxes: torch.Tensor  # (B, A, 4) matched boxes in pixels (0 for negatives)
    valid: torch.Tensor | None = None
    vlr_weight: torch.Tensor | None = None
    num_level_anchors: Sequence[int] | None = None


class LevelConcat(nn.Module):
    """Per-level (B, K, H, W) maps -> (B, Σ H·W, K), levels in order, rows in (y, x) order."""

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


class EdgeIntegral(nn.Module):
    """(B, A, 4·(n+1)) box logits -> (B, A, 4) expected edge distances."""

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.reg_max = reg_max

    def forward(self, box_logits: torch.Tensor) -> torch.Tensor:
        return integral(box_logits.reshape(*box_logits.shape[:-1], 4, self.reg_max + 1), self.reg_max)


def conv_gn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(8, cout // 4) or 1, cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """Stages of stride 2 (stem), 4, 8, 16, 32; returns the stride 8, 16 and 32 maps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_gn(3, w, 2), conv_gn(w, w))
        self.stage1 = nn.Sequential(conv_gn(w, 2 * w, 2), conv_gn(2 * w, 2 * w))
        self.stage2 = nn.Sequential(conv_gn(2 * w, 4 * w, 2), conv_gn(4 * w, 4 * w))
        self.stage3 = nn.Sequential(conv_gn(4 * w, 4 * w, 2), conv_gn(4 * w, 4 * w))
        self.stage4 = nn.Sequential(conv_gn(4 * w, 4 * w, 2), conv_gn(4 * w, 4 * w))
        self.channels = (4 * w, 4 * w, 4 * w)

    def forward(self, x):
        c3 = self.stage2(self.stage1(self.stem(x)))
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.outputs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats):
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [out(lat) for out, lat in zip(self.outputs, laterals)]


class GFLHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, num_levels: int, stacked_convs: int = 2, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.cls_tower = nn.Sequential(*[conv_gn(channels, channels) for _ in range(stacked_convs)])
        self.reg_tower = nn.Sequential(*[conv_gn(channels, channels) for _ in range(stacked_convs)])
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_logits = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.cls_out, self.reg_out = LevelConcat(), LevelConcat()
        self.distances = EdgeIntegral(reg_max)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -4.595)  # prior 0.01, as GFL / RetinaNet
        nn.init.normal_(self.box_logits.weight, std=0.01)
        nn.init.zeros_(self.box_logits.bias)

    def forward(self, feats):
        cls = [self.cls_logits(self.cls_tower(f)) for f in feats]
        reg = [self.box_logits(self.reg_tower(f)) * s for f, s in zip(feats, self.scales)]
        cls_flat, reg_flat = self.cls_out(cls), self.reg_out(reg)
        self.distances(reg_flat)  # recorded by a hook when a method reads "head.distances"
        return cls_flat, reg_flat


class CompactGFL(nn.Module):
    """A GFL detector for small images.

    Args:
        num_classes: foreground classes (the background is index ``num_classes`` in the labels).
        width: backbone base width (channels 4·width at strides 8–32).
        channels: FPN / head channels.
        strides: the pyramid levels' strides (8, 16, 32).
        anchor_scale: anchor side = anchor_scale · stride (GFL: 8 on COCO; smaller here for small objects).
        reg_max: n, bins 0…n per edge.
    """

    def __init__(
        self, num_classes: int, *, width: int = 16, channels: int = 64, stacked_convs: int = 2, strides: Sequence[int] = (8, 16, 32),
        anchor_scale: float = 4.0, reg_max: int = REG_MAX, topk: int = 9,
    ) -> None:
        super().__init__()
        self.num_classes, self.strides, self.anchor_scale, self.reg_max, self.topk = num_classes, tuple(strides), anchor_scale, reg_max, topk
        self.backbone = Backbone(width)
        self.neck = FPN(self.backbone.channels, channels)
        self.head = GFLHead(channels, num_classes, len(self.strides), stacked_convs, reg_max)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> class logits (B, A, C) and box logits (B, A, 4·(n+1))."""
        return self.head(self.neck(self.backbone(images)))

    # anchors -----------------------------------------------------------------------------
    def level_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        h, w = image_size
        sizes = []
        for s in self.strides:  # the conv arithmetic of the backbone: ceil at every stride-2 conv
            sizes.append((-(-h // s), -(-w // s)))
        return sizes

    def anchors(self, image_size: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(A, 4) anchors, (A,) strides and the anchors per level, level by level, (y, x) order."""
        boxes, strides, counts = [], [], []
        for (h, w), s in zip(self.level_sizes(image_size), self.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            centres = torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], -1).float()
            half = self.anchor_scale * s / 2
            boxes.append(torch.cat([centres - half, centres + half], -1))
            strides.append(torch.full((h * w,), float(s), device=device))
            counts.append(h * w)
        return torch.cat(boxes), torch.cat(strides), counts

    # training ----------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], image_size: tuple[int, int], *, vlr: bool = False) -> GFLTargets:
        """ATSS targets for a batch (and LD's VLR weights with ``vlr=True``)."""
        anchors, strides, counts = self.anchors(image_size, gt_boxes[0].device if gt_boxes else None)
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        positive, labels, targets, boxes, vlrs = [], [], [], [], []
        for g_boxes, g_labels in zip(gt_boxes, gt_labels):
            assigned, _ = atss_assign(anchors, counts, g_boxes, topk=self.topk)
            pos = assigned >= 0
            matched = g_boxes[assigned.clamp_min(0)] if len(g_boxes) else anchors.new_zeros(anchors.shape)
            matched = torch.where(pos[:, None], matched, torch.zeros_like(matched))
            positive.append(pos)
            labels.append(torch.where(pos, g_labels[assigned.clamp_min(0)] if len(g_labels) else assigned, torch.full_like(assigned, self.num_classes)))
            dist = box_to_distances(centres / strides[:, None], matched / strides[:, None], self.reg_max)
            targets.append(torch.where(pos[:, None], dist, torch.zeros_like(dist)))
            boxes.append(matched)
            if vlr:
                vlrs.append(vlr_weights(anchors, counts, g_boxes, topk=self.topk))
        return GFLTargets(
            positive=torch.stack(positive), labels=torch.stack(labels), box_targets=torch.stack(targets), gt_boxes=torch.stack(boxes),
            valid=None, vlr_weight=torch.stack(vlrs) if vlr else None, num_level_anchors=counts,
        )

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: GFLTargets, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``{"qfl", "giou", "dfl"}`` (weights 1, 2, 0.25), normalised as mmdetection's GFLHead."""
        cls, reg = outputs
        b, a, c = cls.shape
        anchors, strides, _ = self.anchors(image_size, cls.device)
        centres = ((anchors[:, :2] + anchors[:, 2:]) / 2 / strides[:, None]).expand(b, a, 2)
        pos = targets.positive
        num_pos = max(int(pos.sum()), 1)
        quality = torch.zeros(b, a, device=cls.device, dtype=cls.dtype)
        losses = {}
        if pos.any():
            pos_reg = reg[pos].reshape(-1, 4, self.reg_max + 1)
            pos_centres = centres[pos]
            pos_stride = strides.expand(b, a)[pos][:, None]
            pred_boxes = distances_to_box(pos_centres, integral(pos_reg, self.reg_max))
            target_boxes = targets.gt_boxes[pos] / pos_stride
            weight = cls.detach()[pos].sigmoid().amax(-1)
            quality[pos] = aligned_iou(pred_boxes.detach(), target_boxes).clamp_min(0)
            wsum = weight.sum().clamp_min(1e-6)
            losses["giou"] = 2.0 * (giou_loss(pred_boxes, target_boxes) * weight).sum() / wsum
            dfl = distribution_focal_loss(pos_reg.reshape(-1, self.reg_max + 1), targets.box_targets[pos].reshape(-1), self.reg_max)
            losses["dfl"] = 0.25 * (dfl * weight.repeat_interleave(4)).sum() / 4.0 / wsum
        else:
            losses["giou"] = losses["dfl"] = reg.sum() * 0
        losses["qfl"] = quality_focal_loss(cls.reshape(-1, c), targets.labels.reshape(-1), quality.reshape(-1)).sum() / num_pos
        return losses

    # inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, score_threshold: float = 0.05, nms_threshold: float = 0.6, max_per_image: int = 100, pre_nms: int = 1000):
        """Per image: a dict of ``boxes`` (K, 4) in pixels, ``scores`` (K,), ``labels`` (K,)."""
        was_training = self.training
        self.eval()
        cls, reg = self(images)
        self.train(was_training)
        size = tuple(images.shape[-2:])
        anchors, strides, _ = self.anchors(size, images.device)
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        results = []
        for scores, box_logits in zip(cls.sigmoid(), reg):
            dist = integral(box_logits.reshape(-1, 4, self.reg_max + 1), self.reg_max) * strides[:, None]
            boxes = distances_to_box(centres, dist)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
            flat = scores.reshape(-1)
            keep = (flat > score_threshold).nonzero().squeeze(1)
            keep = keep[flat[keep].argsort(descending=True)[:pre_nms]]
            rows, labels = keep // self.num_classes, keep % self.num_classes
            b, s = boxes[rows], flat[keep]
            kept = batched_nms(b, s, labels, nms_threshold)[:max_per_image]
            results.append({"boxes": b[kept], "scores": s[kept], "labels": labels[kept]})
        return results
