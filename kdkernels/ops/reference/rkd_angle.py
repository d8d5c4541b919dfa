r"""Reference RKD angle loss of Park et al., "Relational Knowledge Distillation" (CVPR 2019): the
eager formula of the official ``RKdAngle`` (lenscloth/RKD ``metric/loss.py``), the spec the tiled
kernels are tested against. It builds the B×B×D differences and the B×B×B angles.

.. math::
    e^{ij} = \frac{t_i - t_j}{\max(\|t_i - t_j\|, 10^{-12})}, \qquad
    \psi_A(i, j, k) = \langle e^{ij}, e^{kj} \rangle, \qquad
    L_A = \frac{1}{B^3}\sum_{i,j,k} \mathrm{huber}_1\big(\psi^s_A(i,j,k) - \psi^t_A(i,j,k)\big)

over all ordered triples with vertex j, degenerate ones included (``F.normalize`` sends a zero
difference to 0), as ``F.smooth_l1_loss(..., reduction="mean")`` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._dtypes import accumulation_dtype


def angle_tensor(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): ``[j, i, k] = ⟨e^{ij}, e^{kj}⟩``."""
    diff = embedding.unsqueeze(0) - embedding.unsqueeze(1)  # diff[j, i] = t_i − t_j
    # e[j, j] = 0 for any embedding (F.normalize sends the zero vector to 0): set it as a constant
    # rather than normalise a zero vector, whose second derivative is NaN (double backward).
    diagonal = torch.eye(embedding.shape[0], dtype=torch.bool, device=embedding.device).unsqueeze(-1)
    e = torch.where(diagonal, 0.0, F.normalize(torch.where(diagonal, 1.0, diff), p=2, dim=2))  # unit(t_i − t_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_anchor_sums(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,): per vertex j, the Huber sum over all (i, k); float32 (float64 if an input is)."""
    dtype = accumulation_dtype(student, teacher)
    huber = F.smooth_l1_loss(angle_tensor(student.to(dtype)), angle_tensor(teacher.to(dtype)), beta=1.0, reduction="none")
    return huber.sum(dim=(1, 2))


def rkd_angle_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """0-d loss in float32 (float64 if an input is float64); both inputs get gradients."""
    dtype = accumulation_dtype(student, teacher)
    return F.smooth_l1_loss(angle_tensor(student.to(dtype)), angle_tensor(teacher.to(dtype)), beta=1.0)
