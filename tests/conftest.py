"""Shared test fixtures.

Without a GPU, Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1, set
here before Triton is imported), so every backend is exercised on every machine: ``cpu`` and
``triton`` (interpreted) and ``torch`` here; ``triton``, ``cuda`` and ``torch`` on a GPU, where the
tests marked ``gpu`` also run.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kdkernels  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def device_backends():
    """(device, backend) pairs that can run here, the fused ones first."""
    pairs = []
    for device in ["cuda"] if _HAS_CUDA else []:
        pairs += [(device, name) for name in kdkernels.backends.available(device) if name != "torch"]
    pairs += [("cpu", name) for name in kdkernels.backends.available("cpu") if name != "torch"]
    return pairs


FUSED = device_backends()

# Every fused backend of each device, runnable here or not.
_FUSED_BY_DEVICE = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton")}


def _skip_unless_runnable(device: str, backend: str) -> list:
    reason = kdkernels.backends.why_unavailable(backend, device)
    return [] if reason is None else [pytest.mark.skip(reason=f"backend {backend!r} on {device}: {reason}")]


def backend_params(device: str, backends) -> list:
    """``backends`` as pytest params for ``device``: one that cannot run here is a skip that says
    why (shown by ``pytest -rs``), not silently left out."""
    return [pytest.param(b, marks=_skip_unless_runnable(device, b), id=b) for b in backends]


FUSED_PARAMS = [
    pytest.param((device, backend), marks=_skip_unless_runnable(device, backend), id=f"{device}-{backend}")
    for device, backends in _FUSED_BY_DEVICE.items()
    for backend in backends
]


@pytest.fixture(params=FUSED_PARAMS)
def device_backend(request):
    """Parametrises a test over every fused backend (those that cannot run here are skips with
    the reason); yields (device, backend) with that backend active."""
    device, backend = request.param
    with kdkernels.use_backend(backend):
        yield torch.device(device), backend


# The fused backends that can run here plus the eager reference (the spec, itself checked against
# each test's independent formula).
FUSED_AND_REFERENCE = FUSED + [("cpu", "torch")]


@pytest.fixture(params=FUSED_AND_REFERENCE, ids=[f"{d}-{b}" for d, b in FUSED_AND_REFERENCE])
def device_backend_or_reference(request):
    """Like ``device_backend``, over the fused backends that can run here and the torch reference."""
    yield from _with_backend(request)


def _with_backend(request):
    device, backend = request.param
    with kdkernels.use_backend(backend):
        yield torch.device(device), backend


def device_backend_or_reference_of(spec):
    """``device_backend_or_reference`` for one fused loss (its ``FusedLoss``): a backend with no
    kernel for it (the relational losses have no CUDA C++ kernel) is a skip that says so. Use as
    ``device_backend_or_reference = device_backend_or_reference_of(SPEC)`` in a test module."""
    has_kernel = (*spec.kernel_backends, "torch")
    params = [
        pytest.param(
            (device, backend),
            marks=[] if backend in has_kernel else [pytest.mark.skip(reason=f"{spec.name} has no {backend} kernel")],
            id=f"{device}-{backend}",
        )
        for device, backend in FUSED_AND_REFERENCE
    ]
    return pytest.fixture(params=params, name="device_backend_or_reference")(_with_backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
