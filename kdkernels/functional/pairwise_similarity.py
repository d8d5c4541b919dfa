"""``pairwise_similarity_loss``: the pair-wise term of structured KD (Liu et al., CVPR 2019), tiled."""

from __future__ import annotations

import torch

from kdkernels import _validation
from kdkernels.ops._reduction import CODES
from kdkernels.ops.pairwise_similarity import PAIRWISE_SIMILARITY

PAIRWISE_SIMILARITY_REDUCTIONS = ("mean", "sum", "none")


def _check_features(feat, name: str) -> None:
    _validation.check_tensor(feat, name)
    if feat.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected (B, C, H, W) feature maps or (B, N, C) node features, got a {feat.dim()}-d tensor"
        )
    if feat.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(feat.shape)}")


def _nodes(feat: torch.Tensor) -> torch.Tensor:
    """(B, N, C) view of the nodes: a (B, C, H, W) map's pixels, channels last (no copy if possible)."""
    if feat.dim() == 4:
        return feat.flatten(2).transpose(1, 2)
    return feat


def check_pair(student_feat, teacher_feat) -> None:
    _check_features(student_feat, "student_feat")
    _check_features(teacher_feat, "teacher_feat")
    if student_feat.dim() != teacher_feat.dim():
        raise ValueError(
            f"teacher_feat: expected a {student_feat.dim()}-d tensor like student_feat (same layout), "
            f"got {teacher_feat.dim()}-d"
        )
    if student_feat.device != teacher_feat.device:
        raise ValueError(f"teacher_feat: expected device {student_feat.device} to match student_feat, got {teacher_feat.device}")
    s, t = tuple(student_feat.shape), tuple(teacher_feat.shape)
    if s[0] != t[0]:
        raise ValueError(f"teacher_feat: expected batch size {s[0]} to match student_feat, got {t[0]}")
    if student_feat.dim() == 4 and s[2:] != t[2:]:
        raise ValueError(f"teacher_feat: expected spatial size {s[2:]} to match student_feat, got {t[2:]}")
    if student_feat.dim() == 3 and s[1] != t[1]:
        raise ValueError(f"teacher_feat: expected {s[1]} nodes (dim 1) to match student_feat, got {t[1]}")


def pairwise_similarity_loss(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""Pair-wise similarity distillation of Liu et al., "Structured Knowledge Distillation for Semantic
    Segmentation" (CVPR 2019), computed tile by tile: no N×N similarity matrix, memory O(N·C).

    .. math::
        a_{ij} = \frac{f_i^\top f_j}{(\|f_i\| + 10^{-8})(\|f_j\| + 10^{-8})}, \qquad
        \ell = \frac{1}{B}\sum_b \frac{1}{N^2}\sum_{i,j}\big(a^s_{ij} - a^t_{ij}\big)^2

    with the norms detached, as the official ``sim_dis_compute``. The paper applies it to the
    max-pooled PSP features (see methods.md §5); without the N² memory wall the pooling can go.

    Args:
        student_feat: (B, Cs, H, W) feature maps (N = H·W nodes) or (B, N, Cs) node features;
            fp32, fp16 or bf16 (fp64 on the cpu and torch backends).
        teacher_feat: the same layout, batch and nodes; the channel count Ct may differ. It gets a
            gradient only if it requires one (the official teacher is frozen: pass it detached).
        reduction: ``"mean"`` over the batch (the official loss), ``"sum"``, or ``"none"`` (B,).

    Returns:
        The loss in float32 (float64 if an input is float64).

    The fused backends compute the first-order gradients in the forward; a backward with
    ``create_graph=True`` differentiates the eager formula (N×N matrices) instead.
    """
    check_pair(student_feat, teacher_feat)
    reduction = _validation.check_reduction(reduction, PAIRWISE_SIMILARITY_REDUCTIONS)
    student, teacher = _nodes(student_feat), _nodes(teacher_feat)
    return PAIRWISE_SIMILARITY(student, teacher, reduction=CODES[reduction])
