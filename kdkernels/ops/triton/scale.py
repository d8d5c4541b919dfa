"""``grad *= grad_output`` in place, skipped on the device when ``grad_output`` is exactly 1.

The backward of a fused loss is a scale of the gradient its forward computed. For the common
``loss.backward()`` the scale is 1 and the pass over the N×V gradient is pure waste; reading the
one-element ``grad_output`` inside the kernel avoids both that pass and a host synchronisation.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_unless_one_kernel(G, GRAD_OUTPUT, n, BLOCK: tl.constexpr):
    factor = tl.load(GRAD_OUTPUT)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(G + offs, mask=ok)
        tl.store(G + offs, (g * factor).to(G.dtype.element_ty), mask=ok)


def scale_unless_one_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    n = grad.numel()
    block = 4096
    _scale_unless_one_kernel[(triton.cdiv(n, block),)](grad, grad_output, n, BLOCK=block, num_warps=8)
