"""``kdkernels::kl_div``: torch's pointwise KL divergence (``F.kl_div``), declared once.

Inputs are contiguous tensors of one shape (the public function broadcasts and copies).
"""

from torch import Tensor

from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops.fused_loss import ELEMENTS, FusedLoss
from kdkernels.ops.reference.kl_div import kl_div_pointwise_reference


def kl_div_pointwise(
    input: Tensor, target: Tensor, log_target: bool, grad_scale: Tensor, reduce: bool, input_grad: bool, target_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The pointwise loss ``y (log y − x)`` (``exp(y) (y − x)`` for ``log_target``), or partial sums
    over fixed blocks (``reduce``), in fp32 (fp64 for fp64 inputs), and the gradients of
    ``grad_scale * sum(loss)`` in each input's dtype."""
    raise NotImplementedError  # a signature: csrc/cpu/kl_div.cpp, csrc/cuda, ops/triton/kl_div.py


def _pointwise(input, target, log_target):
    acc = accumulation_dtype(input, target)
    return kl_div_pointwise_reference(input.to(acc), target.to(acc), log_target)


KL_DIV = FusedLoss(
    name="kl_div",
    kernel=kl_div_pointwise,
    twin=_pointwise,
    positions=ELEMENTS,
)
