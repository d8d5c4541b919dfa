"""``rkd_angle_loss``: the angle term of Relational KD (Park et al., CVPR 2019) without the B³ tensor."""

from __future__ import annotations

import torch

from kdkernels import _validation
from kdkernels.ops._reduction import SUM
from kdkernels.ops.rkd_angle import RKD_ANGLE


def _check_embedding(emb, name: str) -> None:
    _validation.check_tensor(emb, name)
    if emb.dim() != 2:
        raise ValueError(f"{name}: expected (B, D) embeddings (flatten them first), got a {emb.dim()}-d tensor")
    if emb.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(emb.shape)}")


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    r"""Angle-wise distillation loss of Park et al., "Relational Knowledge Distillation" (CVPR 2019),
    computed per anchor and tile: no B×B×B tensor, memory O(B·D).

    .. math::
        e^{ij} = \frac{t_i - t_j}{\max(\|t_i - t_j\|, 10^{-12})}, \quad
        L_A = \frac{1}{B^3}\sum_{i,j,k}\mathrm{huber}_1\big(\langle e^{ij}_s, e^{kj}_s\rangle - \langle e^{ij}_t, e^{kj}_t\rangle\big)

    over all ordered triples, degenerate ones included (a zero difference normalises to 0), as the
    official ``RKdAngle`` (``F.smooth_l1_loss`` mean). For each anchor j the angles are the Gram
    matrix of the unit differences, so the triple sum is a sum of per-anchor Gram tiles and the
    Huber stays exact.

    Args:
        student_emb: (B, Ds) embeddings; fp32, fp16 or bf16 (fp64 on the cpu and torch backends).
        teacher_emb: (B, Dt) embeddings, same batch and device (Dt may differ). It gets a gradient
            only if it requires one (the official teacher is frozen: pass it detached).

    Returns:
        The 0-d loss in float32 (float64 if an input is float64).

    Duplicate embeddings (t_i = t_j, i ≠ j) get the official formula's exact gradient, which goes
    through F.normalize's clamp and is scaled by 10¹². The fused backends compute the
    first-order gradients in the forward; a backward with ``create_graph=True`` differentiates the
    eager formula (B³ angles) instead; its second derivatives are finite.
    """
    _check_embedding(student_emb, "student_emb")
    _check_embedding(teacher_emb, "teacher_emb")
    if student_emb.device != teacher_emb.device:
        raise ValueError(f"teacher_emb: expected device {student_emb.device} to match student_emb, got {teacher_emb.device}")
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(
            f"teacher_emb: expected batch size {student_emb.shape[0]} to match student_emb, got {teacher_emb.shape[0]}"
        )
    # The mean over the B³ triples (i, j, k): the kernels sum per anchor j.
    triples = float(max(student_emb.shape[0], 1)) ** 3
    return RKD_ANGLE(student_emb, teacher_emb, reduction=SUM, scale=1.0 / triples)
