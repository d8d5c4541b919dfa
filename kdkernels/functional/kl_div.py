"""``kl_div``: a drop-in for ``torch.nn.functional.kl_div``, backed by a fused kernel."""

from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction as _torch_reduction

from kdkernels import _validation, backends
from kdkernels.ops import kl_div as _ops  # noqa: F401  (registers kdkernels::kl_div)
from kdkernels.ops._reduction import reduction_code

KL_DIV_REDUCTIONS = ("none", "sum", "mean", "batchmean")

# torch's own wording (and its missing spaces), so filters written for torch keep working.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """torch's rule: the deprecated ``size_average`` / ``reduce`` override ``reduction``."""
    if size_average is not None or reduce is not None:
        return _torch_reduction.legacy_get_string(size_average, reduce)
    return reduction


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
    (sum / numel, with torch's warning that it is not the KL), ``"batchmean"`` (sum / size(0)),
    ``"sum"``, ``"none"``; broadcasting as torch. Gradients reach ``input`` and ``target``.

    Deviations from torch, both where torch returns NaN: the gradient w.r.t. a target of exactly 0
    is 0 (torch: NaN from d/dy of y·log y); ``"mean"`` of an empty input is 0 (torch: 0/0).
    """
    _validation.check_tensor(input, "input")
    _validation.check_tensor(target, "target")
    if input.device != target.device:
        raise ValueError(f"target: expected device {input.device} to match input, got {target.device}")
    if not isinstance(log_target, bool):
        raise TypeError(f"log_target: expected a bool, got {type(log_target).__name__}")
    if size_average is None and reduce is None:
        _validation.check_reduction(reduction, KL_DIV_REDUCTIONS)
        if reduction == "mean" and not torch.compiler.is_compiling():  # Dynamo cannot trace warn()
            warnings.warn(MEAN_WARNING, stacklevel=2)
    reduction = legacy_reduction(size_average, reduce, reduction)
    if input.shape != target.shape:
        try:
            shape = torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError as exc:
            raise ValueError(f"target: shape {tuple(target.shape)} does not broadcast with input {tuple(input.shape)}") from exc
        input, target = input.expand(shape), target.expand(shape)

    backend = backends.resolve(input.device)
    if backend == "torch":
        from kdkernels.ops.reference.kl_div import kl_div_reference

        return kl_div_reference(input, target, reduction, log_target)

    code, scale = reduction_code(reduction, input.shape[0] if input.dim() > 0 else 1)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = torch.ops.kdkernels.kl_div(
        input.contiguous(),
        target.contiguous(),
        log_target,
        code,
        scale,
        grad_enabled and input.requires_grad,
        grad_enabled and target.requires_grad,
        backend,
    )
    if reduction == "none":
        loss = loss.to(torch.promote_types(input.dtype, target.dtype))
    return loss
