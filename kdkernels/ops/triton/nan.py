"""Numerics helpers of the Triton kernels: a NaN-propagating maximum, float64 scalar arguments.

``tl.maximum`` / ``tl.max`` drop a NaN operand by default (the GPU's ``max.f32``); the softmax
kernels need the row maximum to be NaN when a logit is, so that the position's loss is NaN through
the arithmetic (``kdkernels/ops/reference/__init__.py``), with no separate test of the data.
"""

import struct

import triton
import triton.language as tl


@triton.jit
def max_nan(a, b):
    """Elementwise maximum that is NaN where either operand is; also a ``tl.reduce`` combiner."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def split_float(x: float) -> tuple[float, float]:
    """``(hi, lo)`` with ``hi`` = x rounded to float32 and ``lo`` = x − hi: Triton passes Python
    floats to a compiled kernel as float32, so a float64 kernel rebuilds x as ``hi + lo`` (to ~2⁻⁴⁸
    relative) instead of using a float32-rounded temperature."""
    hi = float(struct.unpack("f", struct.pack("f", x))[0])
    return hi, x - hi


@triton.jit
def joined_float(hi, lo, ACC: tl.constexpr):
    """The scalar ``hi + lo`` of :func:`split_float` in the accumulation dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)
