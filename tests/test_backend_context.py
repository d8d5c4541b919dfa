"""``use_backend`` is local to a thread and to an asyncio task, nests, survives exceptions, and
decides the backend of compiled losses too (issue 10: it used to be one process-wide list)."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
import kdkernels.functional as KF
from kdkernels import backends

pytestmark = pytest.mark.skipif("cpu" not in backends.available("cpu"), reason="needs the compiled cpu backend")


class RecordNamespaces(TorchDispatchMode):
    """Which operator namespaces a call dispatches to (dispatch modes are thread-local)."""

    def __init__(self):
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def ran_fused_kernel(loss_fn) -> bool:
    """True if ``loss_fn()`` ran a kdkernels op (the cpu backend), False if only aten ops (torch)."""
    with RecordNamespaces() as record:
        loss_fn()
    assert "aten" in record.namespaces or "kdkernels" in record.namespaces
    return "kdkernels" in record.namespaces


def kd_call():
    return KF.kd_loss(torch.randn(3, 7), torch.randn(3, 7), 2.0)


def test_default_is_the_fused_cpu_kernel():
    assert backends.requested() is None
    assert ran_fused_kernel(kd_call)


def test_blocks_nest_and_restore():
    with kdkernels.use_backend("torch"):
        assert backends.requested() == "torch" and not ran_fused_kernel(kd_call)
        with kdkernels.use_backend("cpu"):
            assert backends.requested() == "cpu" and ran_fused_kernel(kd_call)
        assert backends.requested() == "torch" and not ran_fused_kernel(kd_call)
    assert backends.requested() is None and ran_fused_kernel(kd_call)


def test_exception_restores_the_enclosing_choice():
    with kdkernels.use_backend("torch"):
        with pytest.raises(ZeroDivisionError):
            with kdkernels.use_backend("cpu"):
                1 / 0
        assert backends.requested() == "torch"
    # a loss that fails inside the block (backend that cannot run) also leaves nothing behind
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        with kdkernels.use_backend("cuda"):
            kd_call()
    assert backends.requested() is None and ran_fused_kernel(kd_call)


def test_unknown_backend_changes_nothing():
    with pytest.raises(ValueError, match="backend: unknown backend 'tpu'"):
        with kdkernels.use_backend("tpu"):
            pass
    assert backends.requested() is None


def test_environment_variable_is_the_default_under_blocks(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert backends.requested() == "torch" and not ran_fused_kernel(kd_call)
    with kdkernels.use_backend("cpu"):
        assert ran_fused_kernel(kd_call)
    assert not ran_fused_kernel(kd_call)
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        kd_call()


def test_threads_keep_their_own_backend():
    """Three threads inside different blocks at the same time (a barrier makes them overlap): each
    runs its own backend, and one asking for an impossible backend does not break the others
    (the issue's reproducer: a `with use_backend("cuda")` in one thread broke every thread)."""
    barrier = threading.Barrier(3, timeout=60)
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def worker(name: str | None):
        seen = results.setdefault(str(name), [])
        try:
            block = kdkernels.use_backend(name) if name else _no_block()
            with block:
                barrier.wait()  # all three are inside their blocks now
                for _ in range(3):
                    seen.append(backends.requested())
                    try:
                        seen.append(ran_fused_kernel(kd_call))
                    except RuntimeError as exc:
                        seen.append(type(exc).__name__)
                    barrier.wait()  # interleave the calls
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("torch", "cuda", None)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results["torch"] == ["torch", False] * 3
    assert results["cuda"] == ["cuda", "RuntimeError"] * 3
    assert results["None"] == [None, True] * 3
    assert backends.requested() is None


class _no_block:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_asyncio_tasks_keep_their_own_backend():
    """Tasks of one thread that interleave inside different blocks each see their own."""

    async def task(name: str | None, log: list):
        async def body():
            for _ in range(3):
                await asyncio.sleep(0)  # let the other tasks run inside their blocks
                log.append((name, backends.requested(), ran_fused_kernel(kd_call)))

        if name is None:
            await body()
        else:
            with kdkernels.use_backend(name):
                await body()

    async def main():
        log: list = []
        await asyncio.gather(task("torch", log), task("cpu", log), task(None, log))
        return log

    log = asyncio.run(main())
    assert len(log) == 9
    # interleaved (not one task after the other) ...
    assert [entry[0] for entry in log[:3]] == ["torch", "cpu", None]
    # ... and each task ran its own backend every time
    expected = {"torch": ("torch", False), "cpu": ("cpu", True), None: (None, True)}
    assert all((requested, fused) == expected[name] for name, requested, fused in log), log


# --- torch.compile(fullgraph=True) ------------------------------------------------------------


class RecordingCompiler:
    """A torch.compile backend that records, per compiled graph and per call, whether the graph
    holds a kdkernels op, and in which thread it ran."""

    def __init__(self):
        self.compiled: list[bool] = []
        self.calls: list[tuple[str, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, gm, example_inputs):
        fused = any("kdkernels" in str(node.target) for node in gm.graph.nodes)
        with self.lock:
            self.compiled.append(fused)

        def run(*args):
            with self.lock:
                self.calls.append((threading.current_thread().name, fused))
            return gm.forward(*args)

        return run


def _loss(s, t):
    return KF.kd_loss(s, t, 2.0)


def test_compiled_loss_follows_the_block_and_recompiles_once_per_backend():
    torch._dynamo.reset()
    compiler = RecordingCompiler()
    compiled = torch.compile(_loss, backend=compiler, fullgraph=True)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    eager = _loss(s, t)
    with kdkernels.use_backend("torch"):
        torch.testing.assert_close(compiled(s, t), eager)
    torch.testing.assert_close(compiled(s, t), eager)  # default: the cpu kernel
    with kdkernels.use_backend("torch"):
        compiled(s, t)
    with pytest.raises(ZeroDivisionError):
        with kdkernels.use_backend("torch"):
            1 / 0
    compiled(s, t)  # the exception restored the default for compiled code too
    assert compiler.compiled == [False, True]  # one graph per backend, reused afterwards
    assert [fused for _, fused in compiler.calls] == [False, True, False, True]


def test_compiled_loss_in_two_threads_uses_each_threads_backend():
    torch._dynamo.reset()
    compiler = RecordingCompiler()
    compiled = torch.compile(_loss, backend=compiler, fullgraph=True)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    barrier = threading.Barrier(2, timeout=120)
    errors: list[BaseException] = []

    def worker(name: str):
        try:
            with kdkernels.use_backend(name):
                barrier.wait()
                for _ in range(3):
                    compiled(s, t)
                    barrier.wait()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,), name=name) for name in ("torch", "cpu")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert sorted(compiler.compiled) == [False, True]
    assert sorted(compiler.calls) == [("cpu", True)] * 3 + [("torch", False)] * 3


def test_block_inside_a_compiled_function():
    torch._dynamo.reset()
    compiler = RecordingCompiler()

    def loss_on_the_reference(s, t):
        with kdkernels.use_backend("torch"):
            return _loss(s, t)

    s, t = torch.randn(4, 9), torch.randn(4, 9)
    inner = torch.compile(loss_on_the_reference, backend=compiler, fullgraph=True)
    torch.testing.assert_close(inner(s, t), _loss(s, t))
    assert backends.requested() is None and backends._traced_request.name is None  # restored
    torch.compile(_loss, backend=compiler, fullgraph=True)(s, t)
    assert compiler.compiled == [False, True]
