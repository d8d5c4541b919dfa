"""What the relational ops (pair-wise similarity, RKD angle) share in their autograd glue.

Their kernels return the loss and the gradients of the inputs at once (computed tile by tile, no
N×N or B³ buffer), as the other fused ops do. Those gradients are constants: a second-order
gradient through them would be silently zero, so a backward that records a graph
(``create_graph=True``) is refused with an error that names the way out (the torch backend, whose
eager formula is differentiable twice).
"""

from __future__ import annotations

import torch


def refuse_double_backward(op_name: str) -> None:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"kdkernels::{op_name}: the fused kernels compute first-order gradients only; a backward with "
            "create_graph=True (double backward) needs the eager formula: wrap the loss in "
            "kdkernels.backends.use_backend('torch')"
        )
