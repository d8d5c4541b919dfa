"""Axis-aligned boxes in (x1, y1, x2, y2) format: IoU, GIoU, DIoU and the format check.

Plain PyTorch, written from the definitions (Rezatofighi et al., CVPR 2019 for GIoU; Zheng et
al., AAAI 2020 for DIoU). Degenerate unions and enclosing boxes are clamped to ``eps`` so that
empty boxes give an IoU of 0, not NaN.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def check_boxes(boxes, name: str, method: str = "detection", *, read_values: bool = True) -> None:
    """``boxes`` is a floating (..., 4) tensor in (x1, y1, x2, y2) format.

    With ``read_values`` (the default, a host synchronisation on a GPU) the coordinates are read:
    x2 < x1 or y2 < y1 is the sign of (cx, cy, w, h) or (x, y, w, h) boxes, and is an error.
    """
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{method}: {name}: expected a torch.Tensor of (x1, y1, x2, y2) boxes, got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise TypeError(f"{method}: {name}: expected floating-point boxes, got {boxes.dtype}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{method}: {name}: expected shape (..., 4) boxes (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if read_values and boxes.numel() and not torch.compiler.is_compiling():
        bad = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
        if bool(bad.any()):
            first = boxes.reshape(-1, 4)[bad.reshape(-1)][0].tolist()
            raise ValueError(
                f"{method}: {name}: expected (x1, y1, x2, y2) boxes with x2 >= x1 and y2 >= y1, got {first}; "
                "convert (cx, cy, w, h) or (x, y, w, h) boxes first"
            )


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def _intersection_and_union(a: torch.Tensor, b: torch.Tensor):
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union.clamp_min(EPS)


def aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of the i-th box of ``a`` with the i-th box of ``b``: (..., 4), (..., 4) -> (...)."""
    inter, union = _intersection_and_union(a, b)
    return inter / union


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M)."""
    return aligned_iou(a[:, None, :], b[None, :, :])


def aligned_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU = IoU − |C \\ (A ∪ B)| / |C|, C the smallest enclosing box."""
    inter, union = _intersection_and_union(a, b)
    enclose = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1))
    enclose = enclose.clamp_min(EPS)
    return inter / union - (enclose - union) / enclose


def pairwise_diou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DIoU = IoU − ρ²(centres) / c², c the diagonal of the enclosing box: (N, 4), (M, 4) -> (N, M)."""
    a, b = a[:, None, :], b[None, :, :]
    inter, union = _intersection_and_union(a, b)
    centre_a = (a[..., :2] + a[..., 2:]) / 2
    centre_b = (b[..., :2] + b[..., 2:]) / 2
    rho2 = (centre_a - centre_b).pow(2).sum(-1)
    wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    c2 = wh.pow(2).sum(-1).clamp_min(EPS)
    return inter / union - rho2 / c2


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (..., 2) centres (x, y)."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (indices kept, by decreasing score); plain PyTorch, for
    the few hundred boxes of a small detector (torchvision's compiled op may not import)."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    iou = pairwise_iou(boxes, boxes)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            suppressed = iou[i] > iou_threshold
            suppressed[: i + 1] = False
            keep &= ~suppressed
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes of different classes are offset apart so they never overlap."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = classes.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    return nms(boxes + offset, scores, iou_threshold)
