"""The pieces of Generalized Focal Loss (Li et al., NeurIPS 2020) that Localization
Distillation builds on: box edges as distributions over bins, their integral, the distribution
focal loss (DFL) and the quality focal loss (QFL).

A box is described from a point (an anchor centre) by its four edge distances
(left, top, right, bottom), in units of the level's stride. Each distance lies in [0, n]
(n = ``reg_max``, 16 in GFL and LD) and is predicted as logits over the n + 1 bins {0, 1, …, n}:

    ê = Σ_i i · softmax(z)_i                      (the integral, GFL's ``Integral`` layer)
    DFL(z, y) = −((⌊y⌋+1 − y) log p_⌊y⌋ + (y − ⌊y⌋) log p_⌊y⌋+1)
    QFL(σ, y, s) = −|s − σ|^β ((1 − s) log(1 − σ) + s log σ)     per class, s the IoU target (0 off-class)

Targets are clamped to [0, n − 0.1] as mmdetection's ``bbox2distance`` does, so ⌊y⌋ + 1 ≤ n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.distill.detection.boxes import aligned_giou

REG_MAX = 16
TARGET_EPS = 0.1  # mmdetection bbox2distance: targets < reg_max so the right bin exists


def check_bins(distributions: torch.Tensor, reg_max: int, name: str, method: str = "gfl") -> int:
    """The last dimension holds reg_max + 1 bins (or 4·(reg_max + 1): four edges side by side)."""
    if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 1:
        raise ValueError(f"{method}: reg_max: expected a positive int, got {reg_max!r}")
    bins = reg_max + 1
    if distributions.dim() == 0 or distributions.shape[-1] not in (bins, 4 * bins):
        raise ValueError(
            f"{method}: {name}: expected the last dimension to hold reg_max + 1 = {bins} bins "
            f"(or 4·{bins} = {4 * bins} for four edges), got shape {tuple(distributions.shape)}; "
            "is reg_max the head's?"
        )
    return bins


def edge_logits(distributions: torch.Tensor, reg_max: int = REG_MAX, name: str = "distributions", method: str = "gfl") -> torch.Tensor:
    """(..., 4·(n+1)) or (..., 4, n+1) edge logits as (..., 4, n+1)."""
    bins = check_bins(distributions, reg_max, name, method)
    if distributions.shape[-1] == 4 * bins:
        return distributions.reshape(*distributions.shape[:-1], 4, bins)
    if distributions.dim() < 2 or distributions.shape[-2] != 4:
        raise ValueError(f"{method}: {name}: expected (..., 4, {bins}) or (..., {4 * bins}) edge logits, got {tuple(distributions.shape)}")
    return distributions


def integral(distributions: torch.Tensor, reg_max: int = REG_MAX) -> torch.Tensor:
    """Expected value Σ_i i·softmax(z)_i over the last dimension of n + 1 bins: (..., n+1) -> (...)."""
    bins = reg_max + 1
    if distributions.shape[-1] != bins:
        raise ValueError(f"integral: distributions: expected {bins} bins (reg_max + 1) in the last dimension, got {tuple(distributions.shape)}")
    project = torch.arange(bins, dtype=distributions.dtype, device=distributions.device)
    return (distributions.softmax(-1) * project).sum(-1)


def box_to_distances(points: torch.Tensor, boxes: torch.Tensor, reg_max: float | None = None, eps: float = TARGET_EPS) -> torch.Tensor:
    """Edge distances (left, top, right, bottom) of (x1, y1, x2, y2) ``boxes`` from ``points``
    (N, 2); with ``reg_max`` clamped to [0, reg_max − eps] (DFL bin targets)."""
    d = torch.stack(
        [points[..., 0] - boxes[..., 0], points[..., 1] - boxes[..., 1], boxes[..., 2] - points[..., 0], boxes[..., 3] - points[..., 1]], -1
    )
    return d if reg_max is None else d.clamp(0, reg_max - eps)


def distances_to_box(points: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`box_to_distances`: (N, 2), (N, 4) -> (x1, y1, x2, y2)."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], -1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor, reg_max: int = REG_MAX) -> torch.Tensor:
    """DFL per edge: (M, n+1) logits, (M,) targets in [0, n) -> (M,) losses."""
    check_bins(logits, reg_max, "logits", "distribution_focal_loss")
    if logits.shape[-1] != reg_max + 1 or target.shape != logits.shape[:-1]:
        raise ValueError(
            f"distribution_focal_loss: target: expected shape {tuple(logits.shape[:-1])} for logits {tuple(logits.shape)} "
            f"of reg_max + 1 = {reg_max + 1} bins, got {tuple(target.shape)}"
        )
    left = target.long().clamp(0, reg_max - 1)
    right = left + 1
    weight_left = right.to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    log_p = logits.log_softmax(-1)
    return -(log_p.gather(-1, left[..., None])[..., 0] * weight_left + log_p.gather(-1, right[..., None])[..., 0] * weight_right)


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL summed over classes: (N, C) sigmoid logits, (N,) labels (C = background), (N,)
    quality targets (the IoU of the predicted box for positives) -> (N,) losses."""
    num_classes = logits.shape[-1]
    sigma = logits.sigmoid()
    # negatives (and the other classes of positives) are pulled to 0 with weight σ^β
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * sigma.pow(beta)
    positive = (labels >= 0) & (labels < num_classes)
    if positive.any():
        rows = positive.nonzero().squeeze(1)
        cols = labels[rows]
        score = quality[rows].to(logits.dtype)
        z = logits[rows, cols]
        pos_loss = F.binary_cross_entropy_with_logits(z, score, reduction="none") * (score - z.sigmoid()).abs().pow(beta)
        loss = loss.index_put((rows, cols), pos_loss)
    return loss.sum(-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − GIoU per box pair: (N, 4), (N, 4) -> (N,)."""
    return 1.0 - aligned_giou(pred, target)
