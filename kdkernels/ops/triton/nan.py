"""NaN-propagating maximum for the Triton kernels.

``tl.maximum`` / ``tl.max`` drop a NaN operand by default (the GPU's ``max.f32``); the softmax
kernels need the row maximum to be NaN when a logit is, so that the position's loss is NaN through
the arithmetic (``kdkernels/ops/reference/__init__.py``), with no separate test of the data.
"""

import triton
import triton.language as tl


@triton.jit
def max_nan(a, b):
    """Elementwise maximum that is NaN where either operand is; also a ``tl.reduce`` combiner."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
