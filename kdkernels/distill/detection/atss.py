"""ATSS assignment (Zhang et al., CVPR 2020) and LD's valuable localization region.

ATSS, per ground-truth box g: on each pyramid level take the k anchors whose centres are
closest to g's centre; the IoU threshold is mean + std of those candidates' IoUs; a candidate
is positive if its IoU ≥ the threshold and its centre lies inside g (every edge distance >
0.01); an anchor positive for several boxes goes to the one of highest IoU.

VLR (Zheng et al., CVPR 2022, HikariTJU/LD ``ATSSAssigner.get_vlr_region``): with the same
threshold thr_g, every anchor with 0.25·thr_g ≤ DIoU(anchor, g) < thr_g is in the region,
weighted by its plain IoU with the box of highest IoU among those it qualifies for. As in the
official code the region may include ATSS positives.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kdkernels.distill.detection.boxes import box_centers, check_boxes, pairwise_diou, pairwise_iou

INSIDE_EPS = 0.01


def _candidates(anchors: torch.Tensor, num_level_anchors: Sequence[int], gt_boxes: torch.Tensor, topk: int) -> torch.Tensor:
    """(K, G) indices of the k closest anchors per level per box."""
    distances = torch.cdist(box_centers(anchors), box_centers(gt_boxes))
    out, start = [], 0
    for n in num_level_anchors:
        k = min(topk, n)
        out.append(distances[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    return torch.cat(out, 0)


def _threshold(overlaps: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    cand = overlaps.gather(0, candidates)
    return cand.mean(0) + cand.std(0)  # unbiased std, as torch's default in the official code


def _check(anchors, num_level_anchors, gt_boxes):
    check_boxes(anchors, "anchors", "atss")
    check_boxes(gt_boxes, "gt_boxes", "atss")
    if sum(num_level_anchors) != anchors.shape[0]:
        raise ValueError(f"atss: num_level_anchors: expected level sizes summing to {anchors.shape[0]} anchors, got {list(num_level_anchors)}")


def atss_assign(
    anchors: torch.Tensor, num_level_anchors: Sequence[int], gt_boxes: torch.Tensor, *, topk: int = 9
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(assigned, iou)``: the index of the matched box per anchor (−1 = negative) and its IoU.

    Args:
        anchors: (A, 4) (x1, y1, x2, y2) anchors of all levels, concatenated level by level.
        num_level_anchors: anchors per level.
        gt_boxes: (G, 4) ground-truth boxes of the image.
    """
    _check(anchors, num_level_anchors, gt_boxes)
    assigned = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
    if gt_boxes.shape[0] == 0 or anchors.shape[0] == 0:
        return assigned, anchors.new_zeros(anchors.shape[0])
    overlaps = pairwise_iou(anchors, gt_boxes)
    candidates = _candidates(anchors, num_level_anchors, gt_boxes, topk)
    cand_iou = overlaps.gather(0, candidates)
    is_pos = cand_iou >= _threshold(overlaps, candidates)[None, :]
    centres = box_centers(anchors)[candidates]  # (K, G, 2)
    inside = torch.stack([centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1], gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1]], -1)
    is_pos &= inside.amin(-1) > INSIDE_EPS
    masked = torch.full_like(overlaps, float("-inf"))
    g = torch.arange(gt_boxes.shape[0], device=anchors.device).expand_as(candidates)
    masked[candidates[is_pos], g[is_pos]] = overlaps[candidates[is_pos], g[is_pos]]
    best, best_gt = masked.max(1)
    matched = best > float("-inf")
    assigned[matched] = best_gt[matched]
    return assigned, torch.where(matched, best, torch.zeros_like(best))


def vlr_weights(anchors: torch.Tensor, num_level_anchors: Sequence[int], gt_boxes: torch.Tensor, *, topk: int = 9, low: float = 0.25) -> torch.Tensor:
    """(A,) the IoU weight of each anchor in the valuable localization region, 0 outside."""
    _check(anchors, num_level_anchors, gt_boxes)
    if gt_boxes.shape[0] == 0 or anchors.shape[0] == 0:
        return anchors.new_zeros(anchors.shape[0])
    overlaps = pairwise_iou(anchors, gt_boxes)
    diou = pairwise_diou(anchors, gt_boxes)
    thr = _threshold(overlaps, _candidates(anchors, num_level_anchors, gt_boxes, topk))[None, :]
    in_region = (diou < thr) & (diou >= low * thr)
    masked = torch.where(in_region, overlaps, torch.full_like(overlaps, float("-inf")))
    best = masked.amax(1)
    return torch.where(best > float("-inf"), best, torch.zeros_like(best))
