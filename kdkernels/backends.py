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
for a backend that cannot run raises a ``RuntimeError`` that says why. ``use_backend`` is local to
the thread and the asyncio task that enters it (see :func:`use_backend`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from typing import Iterator

import torch

from kdkernels import _extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# The backend asked for by ``use_backend``: one value per thread and per asyncio task.
_requested_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdkernels_backend", default=None)


class _TracedRequest(threading.local):
    """A per-thread copy of ``_requested_backend`` for ``torch.compile`` to read.

    Dynamo cannot trace ``ContextVar.get`` (torch 2.13: "Dynamo does not know how to trace method
    `get` of class `ContextVar`", a graph break), but it reads ``threading.local`` attributes and
    guards on them, so a compiled loss is re-traced when the thread's backend changes.
    ``use_backend`` writes both; eager calls read the context variable only.
    """

    def __init__(self) -> None:  # runs once per thread, on its first access
        # An instance attribute in every thread (not a class default): Dynamo then guards on its
        # value rather than on whether the thread's dict holds it.
        self.name: str | None = None


_traced_request = _TracedRequest()


# Looked up once: torch.compile cannot trace importlib while it traces a loss.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
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
            return None if triton_interpreted() else "Triton runs CPU tensors only with TRITON_INTERPRET=1"
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
    """Run the fused losses in this block with backend ``name`` (checked when a loss runs).

    The choice belongs to the thread and the asyncio task (a ``contextvars.ContextVar``) that
    enters the block: other threads and tasks keep their own. Blocks nest; leaving one, normally
    or by an exception, restores the enclosing choice.

    Under ``torch.compile`` the backend is fixed when a loss is traced, and the compiled code is
    guarded on a per-thread copy of the choice (Dynamo cannot read a context variable). That copy
    is exact for threads and for blocks that do not ``await`` inside; two asyncio tasks of one
    thread that interleave inside different ``use_backend`` blocks share it while they call
    compiled code (eager calls are always exact).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    if torch.compiler.is_compiling():
        # A block inside a compiled function: Dynamo cannot trace ContextVar.set either, and the
        # traced code reads only the per-thread copy.
        enclosing = _traced_request.name
        _traced_request.name = name
        try:
            yield
        finally:
            _traced_request.name = enclosing
        return
    token = _requested_backend.set(name)
    _traced_request.name = name
    try:
        yield
    finally:
        _requested_backend.reset(token)
        _traced_request.name = _requested_backend.get()


def requested() -> str | None:
    """The backend asked for by ``use_backend`` (in this thread and task) or ``KDKERNELS_BACKEND``."""
    if torch.compiler.is_compiling():
        name = _traced_request.name
    else:
        name = _requested_backend.get()
    if name is not None:
        return name
    return os.environ.get("KDKERNELS_BACKEND") or None


def resolve(device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs a loss on ``device`` now; raises RuntimeError if the asked one can't.

    ``implemented``: the backends that have a kernel for this loss (``torch`` always does); the
    default is the first of the device's order that can run and is implemented."""
    name = requested()
    if name is not None:
        reason = why_unavailable(name, device)
        if reason is None and name not in implemented:
            reason = f"this loss has no {name} kernel yet (backends with one: {', '.join(implemented)})"
        if reason is not None:
            raise RuntimeError(f"kdkernels backend {name!r} cannot run on {device.type} tensors: {reason}")
        return name
    for candidate in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if candidate not in implemented:
            continue
        if why_unavailable(candidate, device) is None:
            if candidate == "torch" and device.type in ("cpu", "cuda"):
                _extension.warn_missing_once()
            return candidate
    return "torch"
