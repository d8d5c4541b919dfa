"""Small helpers shared by the test files."""

import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare a fused result with the float64 reference at a tolerance fit for the input dtype."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    actual = actual.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{name}: max error {err:.3e} (relative to {scale:.3e}) > {tol:.1e}"


def assert_compiled_matches_eager(fn, args, wrt, backend: str) -> None:
    """``torch.compile(fn, fullgraph=True)(*args)`` equals ``fn(*args)`` under ``backend``: the
    scalar result and its gradients with respect to the tensors ``wrt``."""
    with kdkernels.use_backend(backend):
        eager = fn(*args)
        eager_grads = torch.autograd.grad(eager, wrt)
        compiled = torch.compile(fn, fullgraph=True)(*args)
        compiled_grads = torch.autograd.grad(compiled, wrt)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, e)


class RecordOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher (``.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


# Ops that read a tensor's value on the host: a device synchronisation on a GPU.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}


def peak_extra_bytes(run) -> int:
    """Highest ``Total Allocated`` of the CPU allocator during ``run()`` above the level before it,
    from the torch profiler's allocator events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    events = [a for a in events if a.get("Device Type", 0) == 0]
    assert events, "the profiler recorded no allocation"
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(a["Total Allocated"] for a in events) - start


def reduce_llm_positions(per_position: torch.Tensor, counted: torch.Tensor, reduction: str, num_items_in_batch=None):
    """The LLM losses' reductions of a per-position loss, written directly (the tests' reference):
    ``num_items_in_batch`` divides the sum; "mean" divides by the counted positions; "batchmean"
    by the leading dimension."""
    if num_items_in_batch is not None:
        return per_position.sum() / num_items_in_batch
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.sum() / counted.sum()
    return per_position.sum() / per_position.shape[0]  # batchmean
