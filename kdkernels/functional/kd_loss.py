"""``kd_loss``: Hinton's soft-target KL with temperature, fused."""

from __future__ import annotations

import torch

from kdkernels import _validation
from kdkernels._layout import class_dim_views
from kdkernels.ops._reduction import reduce_differentiable, reduction_code
from kdkernels.ops.kd_loss import KD_LOSS

KD_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    dim: int = -1,
    mask: torch.Tensor | None = None,
    *,
    process_group=None,
) -> torch.Tensor:
    r"""Knowledge-distillation loss of Hinton et al. (2015), in one fused kernel.

    .. math::
        \ell = T^2 \sum_c p^T_{t,c}\,\big(\log p^T_{t,c} - \log p^T_{s,c}\big),\qquad p^T = \mathrm{softmax}(z / T)

    along ``dim``; equal to
    ``T*T * nn.KLDivLoss(reduction)(F.log_softmax(s / T, dim), F.softmax(t / T, dim))`` without
    materialising either distribution. The T² factor keeps the gradient's size independent of T.

    Args:
        student_logits: logits of any shape with the classes along ``dim`` (fp32, fp16 or bf16;
            fp64 on the cpu and torch backends).
        teacher_logits: same shape and device; its dtype may differ. It receives a gradient when it
            requires grad (online / mutual learning); detach it for a frozen teacher.
        temperature: T > 0.
        reduction: ``"batchmean"`` (sum / size(0), the KL of the paper averaged over the batch),
            ``"sum"``, ``"mean"`` (over the counted positions) or ``"none"`` (one loss per position,
            the logits' shape without ``dim``).
        dim: the class dimension: ``-1`` for (…, V) logits, ``1`` for dense (N, C, H, W) logits
            (read in place, contiguous or channels_last).
        mask: optional bool tensor of the logits' shape without ``dim``; False positions (padding,
            ignored tokens) contribute 0 and get zero gradients.
        process_group: the logits are this rank's slice of the classes, split over the ranks of
            this ``torch.distributed`` group (a tensor-parallel LM head): the loss is the whole
            vocabulary's, identical on every rank, and the gradient this rank's slice's; three
            all-reduces per position make the softmaxes global
            (:mod:`kdkernels.llm.vocab_parallel`; PyTorch operations, not the fused kernel).

    Returns:
        The loss in float32 (float64 for float64 inputs): 0-d, or per position for ``"none"``.

    Teacher logits of −inf (masked vocabulary) are exact: such classes contribute 0.
    """
    _validation.check_tensor(student_logits, "student_logits")
    _validation.check_tensor(teacher_logits, "teacher_logits")
    _validation.check_same_shape_and_device(student_logits, "student_logits", teacher_logits, "teacher_logits")
    dim = _validation.check_dim(dim, student_logits.dim())
    _validation.check_dim_not_empty(student_logits, dim, "student_logits")
    temperature = _validation.check_temperature(temperature)
    reduction = _validation.check_reduction(reduction, KD_REDUCTIONS)
    positions_shape = tuple(student_logits.shape[:dim]) + tuple(student_logits.shape[dim + 1 :])
    _validation.check_mask(mask, positions_shape, student_logits.device)

    code, scale = reduction_code(reduction, student_logits.shape[0])
    if process_group is not None:
        from kdkernels.llm.vocab_parallel import vocab_parallel_positions

        per_position, _ = vocab_parallel_positions(
            student_logits.movedim(dim, -1), teacher_logits.movedim(dim, -1), mask, "forward_kl", 0.5, temperature,
            True, None, None, None, None, group=process_group,
        )
        positions = per_position.numel()
        return reduce_differentiable(per_position, code, scale, positions, mask)
    views = class_dim_views(student_logits, teacher_logits, dim, mask)
    loss = KD_LOSS(views.student, views.teacher, views.mask, temperature, reduction=code, scale=scale)
    if reduction == "none":
        loss = loss.reshape(positions_shape)
    return loss
