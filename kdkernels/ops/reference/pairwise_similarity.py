r"""Reference pair-wise similarity distillation loss of Liu et al., "Structured Knowledge Distillation
for Semantic Segmentation" (CVPR 2019): the eager formula of the official ``sim_dis_compute``, the
spec the tiled kernels are tested against. It builds the N×N similarity matrices.

For features ``f_i`` (one per node: a pixel of a (B, C, H, W) map or a row of (B, N, C)),

.. math::
    a_{ij} = \frac{f_i^\top f_j}{(\|f_i\| + 10^{-8})(\|f_j\| + 10^{-8})}, \qquad
    \ell_b = \frac{1}{N^2}\sum_{i,j}\big(a^s_{ij} - a^t_{ij}\big)^2

with the norms detached (constants for the gradient), as in the official code. Student and
teacher may have different channel counts.
"""

from __future__ import annotations

import torch

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.reference.reduction import reduce_losses

NORM_EPS = 1e-8  # added to the norm, not clamped (official L2())


def similarity_matrices(feat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, C) nodes -> (B, N, N) cosine similarities with detached norms."""
    f = feat.to(dtype)
    norm = torch.linalg.vector_norm(f, dim=-1, keepdim=True).detach() + NORM_EPS
    u = f / norm
    return u @ u.transpose(1, 2)


def pairwise_similarity_batches(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-batch-element loss ``ℓ_b`` of (B, N, Cs) and (B, N, Ct) nodes, (B,) in float32 (float64)."""
    dtype = accumulation_dtype(student, teacher)
    d = similarity_matrices(student, dtype) - similarity_matrices(teacher, dtype)
    return d.pow(2).mean(dim=(1, 2))


def pairwise_similarity_reference(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``reduction``: ``"mean"`` over the batch (the official loss), ``"sum"`` or ``"none"`` (B,)."""
    return reduce_losses(pairwise_similarity_batches(student, teacher), reduction)
