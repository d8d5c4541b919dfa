"""``kdkernels::pairwise_similarity``: the pair-wise similarity loss of Liu et al. (Structured
KD, CVPR 2019), declared once.

Inputs are (B, N, Cs) and (B, N, Ct) node features of any strides and floating dtypes; the
kernels work tile by tile (no N×N matrix, memory O(N·C)). The extension has no CUDA kernel for
it (Triton runs it on CUDA).
"""

from torch import Tensor

from kdkernels.ops.fused_loss import leading_index, FusedLoss
from kdkernels.ops.reference.pairwise_similarity import pairwise_similarity_batches as _reference_batches


def pairwise_similarity_batches(
    student: Tensor, teacher: Tensor, grad_scale: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per batch element, ``(1/N²) Σ_ij (a^s_ij − a^t_ij)²`` as (B,) fp32 (fp64 for fp64 inputs);
    the gradients of ``grad_scale * sum(loss)``, contiguous, in each input's dtype."""
    raise NotImplementedError  # a signature: csrc/cpu/pairwise_similarity.cpp, ops/triton


PAIRWISE_SIMILARITY = FusedLoss(
    name="pairwise_similarity",
    kernel=pairwise_similarity_batches,
    twin=_reference_batches,
    positions=leading_index(trailing_dims=2),  # per batch element of (B, N, C)
    contiguous_grads=True,
    kernel_backends=("triton", "cpu"),
)
