"""``kdkernels::divergences``: the LLM divergence family (forward / reverse KL, generalized JSD,
skew KLs, TVD) of a student and a dense teacher, declared once.

Inputs are (outer, classes, inner) views of any strides and an optional (outer, inner) bool mask;
the formulas are :mod:`kdkernels.ops.reference.divergences`'. Kernels: Triton (the shared row
walker, ``kdkernels/ops/triton/divergences.py``), CPU C++ (the CPU row walker,
``csrc/cpu/divergences.cpp``) and CUDA C++ (``csrc/cuda/divergences_kernel.cu``: one thread block
per position; on a GPU it runs without Triton, or with ``backend="cuda"``).
"""

from typing import Optional

from torch import Tensor

from kdkernels.ops.fused_loss import CLASS_ROWS, FusedLoss
from kdkernels.ops.reference.divergences import distill_loss_positions


def divergence_rows(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    divergence: str,
    beta: float,
    temperature: float,
    scale_by_t2: bool,
    student_softcap: Optional[float],
    teacher_softcap: Optional[float],
    student_logit_scale: Optional[float],
    teacher_logit_scale: Optional[float],
    grad_scale: Tensor,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, the divergence of softmax(z_t / T) and softmax(z_s / T) of the transformed
    logits ``z = cap·tanh(scale·x / cap)`` (T² times it with ``scale_by_t2``), as (outer, inner)
    fp32 (fp64 for fp64 logits), 0 where masked out or where the teacher has no mass; the
    gradients of ``grad_scale * sum(loss)`` with the logits' shapes, strides and dtypes."""
    raise NotImplementedError  # a signature: ops/triton/divergences.py, csrc/cpu/divergences.cpp, csrc/cuda/divergences_kernel.cu


def rows_positions(student, mask, divergence, beta, temperature, scale_by_t2, s_cap, t_cap, s_scale, t_scale, **teacher):
    """The reference's per-position loss of (outer, classes, inner) student rows, (outer, inner):
    the twin of the divergence ops; ``teacher``: ``teacher_logits=`` or ``teacher_topk=`` (and
    the sparse teacher's options), already classes-last."""
    loss, _ = distill_loss_positions(
        student.movedim(1, -1),
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        mask=mask,
        softcap=(s_cap, t_cap),
        logit_scale=(s_scale, t_scale),
        **teacher,
    )
    return loss


def _positions(student, teacher, mask, *options):
    return rows_positions(student, mask, *options, teacher_logits=teacher.movedim(1, -1))


DIVERGENCES = FusedLoss(
    name="divergences",
    kernel=divergence_rows,
    twin=_positions,
    positions=CLASS_ROWS,
    dtype_inputs=("student", "teacher"),
    kernel_backends=("triton", "cpu", "cuda"),
)
