"""``kl_div``: a drop-in for ``torch.nn.functional.kl_div``, backed by a fused kernel."""

from __future__ import annotations

import warnings

import torch

from kdkernels import _validation
from kdkernels.ops._reduction import CODES
from kdkernels.ops.kl_div import KL_DIV

KL_DIV_REDUCTIONS = ("none", "sum", "mean", "batchmean")

# torch's own wording (and its missing spaces), so filters written for torch keep working.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


# torch/nn/_reduction.py's wording for the deprecated arguments.
LEGACY_WARNING = "size_average and reduce args will be deprecated, please use reduction='{}' instead."


def legacy_reduction(size_average, reduce, reduction: str, stacklevel: int = 2) -> str:
    """torch's rule (``torch.nn._reduction.legacy_get_string``): the deprecated ``size_average`` /
    ``reduce`` (None counts as True) replace ``reduction`` when either is given, with torch's
    deprecation warning. Written out because Dynamo cannot trace torch's helper (it takes it for
    an op returning a string)."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    legacy = "mean" if size_average and reduce else ("sum" if reduce else "none")
    if not torch.compiler.is_compiling():
        warnings.warn(LEGACY_WARNING.format(legacy), stacklevel=stacklevel + 1)
    return legacy


def _base_reduction(size_average, reduce, reduction) -> str:
    """The reduction ``torch.kl_div`` applies before the ``batchmean`` division, as in
    ``torch.nn.functional.kl_div``: the legacy arguments, when given, decide it (and ``reduction``
    is then not checked); otherwise ``batchmean`` is a sum."""
    if size_average is not None or reduce is not None:
        return legacy_reduction(size_average, reduce, reduction, stacklevel=3)
    _validation.check_reduction(reduction, KL_DIV_REDUCTIONS)
    if reduction == "mean" and not torch.compiler.is_compiling():  # Dynamo cannot trace warn()
        warnings.warn(MEAN_WARNING, stacklevel=3)
    return "sum" if reduction == "batchmean" else reduction


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    r"""``torch.nn.functional.kl_div`` with the same arguments and results, in one fused pass.

    Pointwise :math:`\ell = y(\log y - x)` (:math:`e^{y}(y - x)` with ``log_target=True``), where
    ``input`` x holds log-probabilities; terms with y = 0 are 0. Reductions as torch: ``"mean"``
    (sum / numel, with torch's warning that it is not the KL), ``"batchmean"`` (sum /
    ``input.size(0)`` — the size(0) of ``input`` as passed, before broadcasting; no division for a
    0-d input), ``"sum"``, ``"none"``. As in torch, the deprecated ``size_average`` / ``reduce``
    choose the reduction when given, and ``reduction="batchmean"`` then still divides their result
    by ``input.size(0)``. Broadcasting, the result dtype (the promoted dtype of ``input`` and
    ``target``: float16 in, float16 out) and NaN for the mean of an empty input are torch's.
    Gradients reach ``input`` and ``target``.

    Deviations from torch, the same on every backend:

    * the gradient w.r.t. a target of exactly 0 (``log_target=False``) is 0, where torch returns
      NaN (d/dy of y·log y is −∞ there), or NaN where the input there is not finite; the loss
      values agree;
    * at a probability target of +inf (no distribution) the loss is +inf as in torch, but the
      gradients there are ±inf / NaN where torch gives NaN / −inf;
    * float16 / bfloat16 inputs are computed with float32 accumulation and rounded once to the
      result dtype, where torch computes in the half type: the results agree within the dtype's
      rounding, not bit for bit.
    """
    _validation.check_tensor(input, "input")
    _validation.check_tensor(target, "target")
    if input.device != target.device:
        raise ValueError(f"target: expected device {input.device} to match input, got {target.device}")
    if not isinstance(log_target, bool):
        raise TypeError(f"log_target: expected a bool, got {type(log_target).__name__}")
    base = _base_reduction(size_average, reduce, reduction)
    # torch divides by the batch size of ``input`` itself, whatever ``target`` broadcasts it to.
    batch_divisor = input.shape[0] if reduction == "batchmean" and input.dim() != 0 else None
    result_dtype = torch.promote_types(input.dtype, target.dtype)
    if input.shape != target.shape:
        try:
            shape = torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError as exc:
            raise ValueError(f"target: shape {tuple(target.shape)} does not broadcast with input {tuple(input.shape)}") from exc
        input, target = input.expand(shape), target.expand(shape)

    # The batch division is folded into the kernels' gradient scale (no extra pass) unless the
    # loss is per element (legacy ``reduce=False`` with ``"batchmean"``) or the batch is empty.
    fold = batch_divisor is not None and batch_divisor > 0 and base != "none"
    scale = 1.0 / batch_divisor if fold else 1.0
    loss = KL_DIV(input.contiguous(), target.contiguous(), log_target, reduction=CODES[base], scale=scale)
    if batch_divisor is not None and not fold:
        loss = loss / batch_divisor  # torch: 0 / 0 = NaN for an empty batch
    if base == "mean" and input.numel() == 0:
        loss = loss * float("nan")  # torch's mean of nothing; the kernels' empty mean is 0
    return loss.to(result_dtype)
