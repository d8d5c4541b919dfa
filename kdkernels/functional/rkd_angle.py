"""``rkd_angle_loss``: the angle term of Relational KD (Park et al., CVPR 2019) without the B³ tensor."""

from __future__ import annotations

import torch

from kdkernels import _validation, backends
from kdkernels.ops import rkd_angle as _ops  # noqa: F401  (registers kdkernels::rkd_angle)
from kdkernels.ops.reference.rkd_angle import rkd_angle_reference


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
    through F.normalize's clamp and is scaled by 10¹². The fused backends compute first-order
    gradients only; ``create_graph=True`` raises (use the ``torch`` backend for double backward).
    """
    _check_embedding(student_emb, "student_emb")
    _check_embedding(teacher_emb, "teacher_emb")
    if student_emb.device != teacher_emb.device:
        raise ValueError(f"teacher_emb: expected device {student_emb.device} to match student_emb, got {teacher_emb.device}")
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(
            f"teacher_emb: expected batch size {student_emb.shape[0]} to match student_emb, got {teacher_emb.shape[0]}"
        )
    backend = backends.resolve(student_emb.device)
    if backend == "torch":
        return rkd_angle_reference(student_emb, teacher_emb)
    if backend == "cuda":
        raise RuntimeError(
            "kdkernels backend 'cuda': rkd_angle_loss has no CUDA C++ kernel yet; "
            "use the triton backend (the default on CUDA) or 'torch'"
        )
    grad = torch.is_grad_enabled()
    loss, _, _ = torch.ops.kdkernels.rkd_angle(
        student_emb, teacher_emb, grad and student_emb.requires_grad, grad and teacher_emb.requires_grad, backend
    )
    return loss
