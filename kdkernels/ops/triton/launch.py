"""``wrap_triton`` for every Triton kernel this package launches, interpreted ones included.

``torch.library.wrap_triton`` makes a kernel launch traceable, so that under ``torch.compile``
Inductor gets the kernel itself. torch 2.13 also takes the kernels Triton's interpreter runs
(``TRITON_INTERPRET=1``, CPU tensors); torch 2.11 refuses them ("only works on functions annotated
with triton.jit"). An interpreted kernel is never traced here: the op stays whole under the
compiler (``fused_loss._inline_when_traced``), so launching it directly is what wrap_triton
would do.
"""

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself when Triton interprets it."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)
    return kernel
