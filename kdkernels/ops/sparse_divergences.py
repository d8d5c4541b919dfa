"""``kdkernels::sparse_divergences``: the LLM divergence family between a student and a *sparse*
(top-k) teacher, declared once.

Inputs: the student's logits as an (outer, classes, inner) view of any strides (an LLM's
``(N, V, 1)``), the teacher's ``values`` and ``indices`` as (outer, k, inner) views (int64 ids), an
optional (outer, inner) bool mask. The formulas are :mod:`kdkernels.ops.reference.divergences`'
(``sparse_log_probs``, ``bucket_gradient``, ``student_logit_gradient``): per position the
divergence over k buckets (``tail="renormalize"``) or k + 1 buckets (``"tail_bucket"``: the
teacher's missing mass ``1 − Σ_k p_t`` in log space vs the student's mass outside the k ids),
with the re-tempering of stored log-probs (``values · T₀ / T``) and the student's / teacher's logit
transforms (``cap·tanh(scale·z / cap)``; the teacher's only for ``teacher_values="logits"``).

Both inputs that can get a gradient do: the student's logits (dense, (…, V): nothing else of
that size is made) and the teacher's values (O(N·k)). Kernels: Triton
(``kdkernels/ops/triton/sparse_divergences.py``), CPU C++ (``csrc/cpu/sparse_divergences.cpp``)
and CUDA C++ (``csrc/cuda/sparse_divergences_kernel.cu``: one thread block per position; on CUDA
tensors it runs without Triton, or with ``backend="cuda"``).
"""

from typing import Optional

from torch import Tensor

from kdkernels.ops.fused_loss import CLASS_ROWS, FusedLoss
from kdkernels.ops.divergences import rows_positions


def sparse_divergence_rows(
    student: Tensor,
    values: Tensor,
    indices: Tensor,
    mask: Optional[Tensor],
    divergence: str,
    beta: float,
    temperature: float,
    scale_by_t2: bool,
    tail: str,
    teacher_values: str,
    stored_temperature: float,
    student_softcap: Optional[float],
    teacher_softcap: Optional[float],
    student_logit_scale: Optional[float],
    teacher_logit_scale: Optional[float],
    grad_scale: Tensor,
    student_grad: bool,
    values_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, the divergence between the teacher's bucket distribution (its k values, plus
    the tail bucket) and the student's (its logits gathered at the k ids, plus its mass outside
    them), T² times it with ``scale_by_t2``, as (outer, inner) fp32 (fp64 if an input is fp64), 0
    where masked out or where the teacher has no mass; the gradients of ``grad_scale * sum(loss)``
    with the inputs' shapes, strides and dtypes:
    ``∂/∂z_j = (g_j·[j∈K] + g_tail·p_j/P_tail·[j∉K] − p_j Σ_b g_b) / T`` (``g = ∂D/∂log p_s`` per
    bucket; renormalize: the k ids only, p conditioned on them) and
    ``∂/∂w_b = h_b − q_b Σ h`` (``h = ∂D/∂log p_t``) back through the teacher's bucket logits ``w``."""
    raise NotImplementedError  # a signature: csrc/cpu/sparse_divergences.cpp, ops/triton/sparse_divergences.py, csrc/cuda/sparse_divergences_kernel.cu


def _positions(
    student, values, indices, mask, divergence, beta, temperature, scale_by_t2, tail, teacher_values,
    stored_temperature, *transforms,
):
    return rows_positions(
        student, mask, divergence, beta, temperature, scale_by_t2, *transforms,
        teacher_topk=(indices.movedim(1, -1), values.movedim(1, -1)), tail=tail, teacher_values=teacher_values,
        stored_temperature=stored_temperature,
    )


SPARSE_DIVERGENCES = FusedLoss(
    name="sparse_divergences",
    kernel=sparse_divergence_rows,
    twin=_positions,
    # (outer, inner) per-position grad_output broadcasts across the classes (student) and the k
    # entries (values) of the (outer, ·, inner) views.
    positions=CLASS_ROWS,
    dtype_inputs=("student", "values"),
    kernel_backends=("triton", "cpu", "cuda"),
)
