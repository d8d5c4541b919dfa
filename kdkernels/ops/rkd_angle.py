"""``kdkernels::rkd_angle``: the angle term of Park et al.'s Relational KD (CVPR 2019), declared
once.

Inputs are (B, Ds) and (B, Dt) embeddings of any floating dtypes; the kernels work per anchor
and tile (no B³ tensor). The loss is a sum over anchors; the public function asks for the mean
over the B³ triples (``reduction`` SUM with ``scale`` 1/B³). The extension has no CUDA kernel
for it (Triton runs it on CUDA).
"""

from torch import Tensor

from kdkernels.ops.fused_loss import leading_index, FusedLoss
from kdkernels.ops.reference.rkd_angle import rkd_angle_anchor_sums


def rkd_angle_anchors(
    student: Tensor, teacher: Tensor, grad_scale: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor j, the Huber (δ = 1) sum over all (i, k) of ``⟨e^s_ij, e^s_kj⟩ − ⟨e^t_ij, e^t_kj⟩``
    as (B,) fp32 (fp64 for fp64 inputs); the gradients of ``grad_scale * sum(loss)``, contiguous,
    in each input's dtype."""
    raise NotImplementedError  # a signature: csrc/cpu/rkd_angle.cpp, ops/triton/rkd_angle.py


RKD_ANGLE = FusedLoss(
    name="rkd_angle",
    kernel=rkd_angle_anchors,
    twin=rkd_angle_anchor_sums,
    positions=leading_index(trailing_dims=1),  # per anchor of (B, D)
    contiguous_grads=True,
    kernel_backends=("triton", "cpu"),
)
