"""Which implementation runs a fused loss: ``triton``, ``cuda``, ``cpu`` or ``torch``.

Defaults, per device of the inputs (first that can run wins):

=========  ===========================
device     order
=========  ===========================
CUDA       triton, cuda, torch
CPU        cpu, torch
=========  ===========================

``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1`` (that is how CI exercises every
Triton kernel without a GPU), but is only chosen there when asked for. ``use_backend(name)`` (a
context manager) and the environment variable ``KDKERNELS_BACKEND`` override the default; asking
for a backend that cannot run raises a ``RuntimeError`` that says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from kdkernels import _extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# A plain list (not a contextvar) so torch.compile can read it while tracing.
_override_stack: list[str] = []


# Looked up once: torch.compile cannot trace importlib while it traces a loss.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """Return why backend ``name`` cannot run on ``device``, or None if it can."""
    device = torch.device(device)
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    if device.type == "cuda" and not torch.cuda.is_available():
        # Nothing runs CUDA tensors here, whichever backend: say which half is missing.
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        return "torch has CUDA but no CUDA device is visible"
    if name == "torch":
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if _triton_interpreted() else "Triton runs CPU tensors only with TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"
    if not _extension.has_extension():
        return f"the compiled extension kdkernels._C is not built ({_extension.EXTENSION_ERROR})"
    if name == "cpu":
        return None if device.type == "cpu" else f"the cpu backend takes CPU tensors, got {device.type}"
    # name == "cuda"
    if device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type}"
    if not _extension.has_cuda_kernels():
        return "kdkernels._C was built without CUDA kernels (rebuild with a CUDA torch and nvcc, or FORCE_CUDA=1)"
    return None


def available(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device``, in default order (interpreted Triton last).

    Only what can really run: on a machine without a CUDA device (or with a CPU-only torch)
    ``available("cuda")`` is empty."""
    device = torch.device(device)
    order = list(_DEFAULT_ORDER.get(device.type, ("torch",)))
    if device.type == "cpu":
        order.append("triton")
    return [name for name in order if why_unavailable(name, device) is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused losses in this block with backend ``name`` (checked when a loss runs)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    _override_stack.append(name)
    try:
        yield
    finally:
        _override_stack.pop()


def requested() -> str | None:
    """The backend asked for by ``use_backend`` or ``KDKERNELS_BACKEND``, if any."""
    if _override_stack:
        return _override_stack[-1]
    return os.environ.get("KDKERNELS_BACKEND") or None


def resolve(device: torch.device) -> str:
    """The backend that runs a loss on ``device`` now; raises RuntimeError if the asked one can't."""
    name = requested()
    if name is not None:
        reason = why_unavailable(name, device)
        if reason is not None:
            raise RuntimeError(f"kdkernels backend {name!r} cannot run on {device.type} tensors: {reason}")
        return name
    for candidate in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if why_unavailable(candidate, device) is None:
            if candidate == "torch" and device.type in ("cpu", "cuda"):
                _extension.warn_missing_once()
            return candidate
    return "torch"
