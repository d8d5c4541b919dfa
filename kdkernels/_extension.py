"""Loads the compiled extension ``kdkernels._C`` if it was built, and says once how to build it."""

from __future__ import annotations

import warnings

_BUILD_HINT = (
    "kdkernels: the compiled extension kdkernels._C is not built, so the 'cpu' and 'cuda' "
    "backends are unavailable (Triton and the PyTorch reference still work). Build it with "
    "`pip install --no-build-isolation -e .` after installing torch."
)

try:
    from kdkernels import _C  # noqa: F401  (importing registers the kdkernels:: C++ ops)

    EXTENSION_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

_warned = False


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def warn_missing_once() -> None:
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(f"{_BUILD_HINT} ({EXTENSION_ERROR})", RuntimeWarning, stacklevel=3)


def cpu_capability() -> str | None:
    """The SIMD capability of the CPU kernels that run ("DEFAULT", "AVX2", "AVX512"), or None
    without the extension. It follows ``torch.backends.cpu.get_cpu_capability()`` (set it with
    ``ATEN_CPU_CAPABILITY=default|avx2|avx512``), capped at the best one compiled."""
    return _C.cpu_capability() if _C is not None else None


def cpu_capabilities() -> list[str]:
    """The capabilities the CPU kernels were compiled for (empty without the extension)."""
    return list(_C.cpu_capabilities()) if _C is not None else []
