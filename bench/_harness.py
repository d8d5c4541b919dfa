"""Timing, memory and reporting utilities shared by the kdkernels benchmarks.

What is measured, per candidate loss ``fn(*inputs) -> scalar`` on fixed inputs:

* **time** of the forward (``fwd``, with autograd recording, as in training), of the backward
  alone (``bwd``: the forward runs untimed first) and of both (``fwd_bwd``), as median / p20 / p80
  over ``repeats`` runs after ``warmup`` runs.  Gradients are set to ``None`` (untimed) before each
  run, so every backward writes fresh gradients as after ``optimizer.zero_grad()``.  The candidates
  of a configuration take turns run by run (``time_interleaved``), so that load from other
  processes on a shared machine falls on all of them alike.

  - CUDA: one pair of ``torch.cuda.Event`` per run, one synchronisation per mode (the host
    never waits inside the loop, as in a training step).  Inputs are rotated over up to
    ``max_input_sets`` copies so that a run does not find the previous run's data in L2; extra
    copies are only made when they fit in free memory next to the measured peak, otherwise one
    set is reused, and the number used is recorded (``input_sets``).
  - CPU: ``time.perf_counter`` around each run, at least 5 runs; one input set is reused (the
    inputs are much larger than the caches at the default sizes).

* **peak extra memory** of one fwd+bwd: the highest amount of memory allocated during the run
  above what was allocated just before it (inputs, with gradients cleared).  It includes
  what the run leaves behind (the gradients).

  - CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() -
    memory_allocated()`` taken before the run.
  - CPU: the torch profiler with ``profile_memory=True``; the exported chrome trace's
    ``[memory]`` instant events carry the CPU allocator's running ``Total Allocated`` (counted from
    the start of profiling); peak = max over events minus the value before the first event.
    ``python bench/_harness.py --selftest`` checks this against known allocations.  Memory that
    a kernel takes outside the c10 allocator (raw ``malloc``) is not seen.

* **achieved bandwidth**: ``bytes_moved / fwd_bwd median`` where each benchmark defines
  ``bytes_moved`` (the bytes a perfect fused kernel must move), reported in GB/s and as a share
  of (a) the device's measured copy bandwidth (``dst.copy_(src)`` on a large tensor, bytes read +
  written) and (b) the datasheet HBM bandwidth when the device name is recognised.

``run_benchmark`` drives a whole benchmark (a list of configurations, candidates per
configuration, a correctness check against a reference, the table and the JSON file); the
benchmark scripts only define inputs, candidates, reference and bytes moved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import torch

# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e
)


def is_oom(exc: BaseException) -> bool:
    # CPU allocations that fail raise a plain RuntimeError with this text.
    return isinstance(exc, _OOM_ERRORS) or "out of memory" in str(exc).lower()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(times_ms: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": percentile(times_ms, 50),
        "p20_ms": percentile(times_ms, 20),
        "p80_ms": percentile(times_ms, 80),
        "runs": len(times_ms),
        "all_ms": [round(t, 6) for t in times_ms],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` for fp16 / bf16 (how the eager composites are written), ``x`` otherwise: the
    float64 reference stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _clear_grads(inputs: Sequence[torch.Tensor]) -> None:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.grad is not None:
            t.grad = None


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

MODES = ("fwd", "bwd", "fwd_bwd")


def _one_run(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], device: torch.device, mode: str):
    """One run of ``mode``; returns a (start, end) CUDA event pair, or the elapsed ms on CPU."""
    cuda = device.type == "cuda"
    _clear_grads(inputs)
    loss = fn(*inputs) if mode == "bwd" else None  # untimed forward for "bwd"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    if mode == "fwd":
        loss = fn(*inputs)
    elif mode == "bwd":
        loss.backward()
    else:
        fn(*inputs).backward()
    if cuda:
        end.record()
        return start, end
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: dict[str, Callable[..., torch.Tensor]],
    input_sets: Sequence[Sequence[torch.Tensor]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, dict[str, Any] | str]]:
    """Times of every candidate in every mode: ``{name: {mode: summary}}`` (or ``{name: error}``).

    Candidates take turns run by run, so a slow spell of a shared machine hits all of them
    alike instead of whichever happened to be running, and the order of the turns rotates from
    round to round, so that no candidate always runs first (on CPU the first run of a round,
    after the previous round's last candidate — e.g. the roofline's copy — has evicted the
    caches and left its pages to the allocator, measured up to 1.6× slower, whichever loss it
    was).  Every run takes the next input set in turn, so on CUDA no run finds the data of the
    run before it in L2 (with >= 2 sets).
    """
    cuda = device.type == "cuda"
    if not cuda:
        repeats = max(repeats, 5)
    live = dict(fns)
    failed: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {name: {} for name in fns}
    turn = 0
    for mode in MODES:
        raw: dict[str, list] = {name: [] for name in live}
        for i in range(warmup + repeats):
            order = list(live.items())
            shift = i % len(order) if order else 0
            for name, fn in order[shift:] + order[:shift]:
                inputs = input_sets[turn % len(input_sets)]
                turn += 1
                try:
                    result = _one_run(fn, inputs, device, mode)
                except Exception as exc:  # noqa: BLE001  (one failing candidate must not stop the others)
                    failed[name] = exc
                    del live[name]
                    _clear_grads(inputs)
                    free_memory(device)
                    continue
                if i >= warmup:
                    raw[name].append(result)
            if i == warmup - 1:
                synchronize(device)  # warm-up work must not spill into the first timed run
        synchronize(device)
        for name in live:
            times = [s.elapsed_time(e) for s, e in raw[name]] if cuda else raw[name]
            out[name][mode] = summarize_ms(times)
    for inputs in input_sets:
        _clear_grads(inputs)
    for name, exc in failed.items():
        out[name] = exc
    return out


def time_all_modes(fn, input_sets, device, warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """fwd / bwd / fwd+bwd summaries of one candidate (raises what the candidate raises)."""
    result = time_interleaved({"fn": fn}, input_sets, device, warmup, repeats)["fn"]
    if isinstance(result, BaseException):
        raise result
    return result


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def _cpu_peak_from_trace(trace: dict) -> int:
    events = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"]
    # Device Type 0 is CPU; the counter is global to the CPU allocator, so order by time.
    events = [e for e in events if e.get("args", {}).get("Device Type", 0) == 0]
    if not events:
        return 0
    events.sort(key=lambda e: (e.get("ts", 0), e.get("args", {}).get("Ev Idx", 0)))
    first = events[0]["args"]
    start = first["Total Allocated"] - first["Bytes"]
    peak = max(e["args"]["Total Allocated"] for e in events)
    return max(0, int(peak - start))


def cpu_peak_extra_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes allocated by ``run()`` on the CPU allocator above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():  # Kineto prints "USDT: ... profiler_start" lines on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="kdk_bench_trace_")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    del result
    return _cpu_peak_from_trace(trace)


# Lines the profiler's C++ side writes to stderr on every start / stop: noise, not errors. (Freeing
# memory allocated before profiling started is expected: the peak is measured from the first event.)
_PROFILER_NOISE = ("USDT", "STAGE:", "[W kineto", "kineto_shim", "allocated before the profiling started")


@contextlib.contextmanager
def _quiet_stderr():
    """Capture what C++ writes to fd 2 inside the block; pass on all but the profiler's noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not any(tag in line for tag in _PROFILER_NOISE):
                    print(line, file=sys.stderr)


def peak_extra_bytes(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], device: torch.device) -> int:
    """Peak memory of one fwd+bwd of ``fn`` above the memory allocated before it (gradients included)."""
    _clear_grads(inputs)
    free_memory(device)

    def run():
        fn(*inputs).backward()

    try:
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - before)
        return cpu_peak_extra_bytes(run)
    finally:
        _clear_grads(inputs)


# ----------------------------------------------------------------------------------------------
# bandwidth
# ----------------------------------------------------------------------------------------------

# Datasheet HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
# "NVIDIA H100 80GB HBM3" is the SXM part; PCIe / NVL parts have other names and numbers.
DATASHEET_BANDWIDTH = (
    ("H200", "H200 (SXM / NVL)", 4.8e12),
    ("H100 80GB HBM3", "H100 SXM", 3.35e12),
    ("H100 SXM", "H100 SXM", 3.35e12),
    ("H100 NVL", "H100 NVL", 3.9e12),
    ("H100 PCIe", "H100 PCIe", 2.0e12),
)


def datasheet_bandwidth(device_name: str) -> tuple[str | None, float | None]:
    for key, label, bw in DATASHEET_BANDWIDTH:
        if key.lower() in device_name.lower():
            return label, bw
    return None, None


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in bytes/s, counting bytes read + written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    if device.type == "cuda":
        # Leave room for the benchmark: at most a quarter of free memory per tensor.
        nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 4)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch (page faults on CPU)
    times = []
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    return 2 * n * 4 / percentile(times, 50)


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, versions and the exact command line, for the JSON file."""
    import kdkernels

    def version(module: str) -> str | None:
        try:
            mod = __import__(module)
        except Exception:  # noqa: BLE001  (absent or broken: just not reported)
            return None
        return getattr(mod, "__version__", "unknown")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _run(["git", "-C", repo, "rev-parse", "HEAD"])
    dirty = _run(["git", "-C", repo, "status", "--porcelain"])
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": version("triton"),
        "kdkernels": getattr(kdkernels, "__version__", "unknown"),
        "kdkernels_backends": kdkernels.backends.available(device),
        "liger_kernel": _liger_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "command": " ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
        "env": {k: os.environ[k] for k in ("KDKERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_bytes"] = props.total_memory
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------


def tolerance(dtype: torch.dtype) -> float:
    """Relative L2 error allowed for a result of ``dtype`` against the float64 reference.

    Half-precision results carry their rounding error (relative ~eps/2 per element, ~eps/3.5 in
    the L2 norm), so the bound is one machine epsilon of the result's dtype; fp32 paths must agree
    to 1e-4 (summation order differs between kernels)."""
    if dtype == torch.bfloat16:
        return 2.0**-7
    if dtype == torch.float16:
        return 1e-3
    return 1e-4


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = expected.norm().item()
    err = (actual - expected).norm().item()
    return err / denom if denom > 0 else err


# ----------------------------------------------------------------------------------------------
# the benchmark driver
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """One implementation in a configuration: ``fn(*inputs) -> scalar loss``, or a skip reason."""

    name: str
    fn: Callable[..., torch.Tensor] | None = None
    skip_reason: str | None = None
    is_kdkernels: bool = False
    note: str | None = None
    # Its own float64 reference (loss, grads) when it computes another loss than the configuration's
    # (e.g. a baseline loss timed alongside); None = the configuration's reference.
    reference: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]] | None = None


@dataclasses.dataclass
class Config:
    n: int
    v: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"N={self.n} V={self.v} {DTYPE_NAMES[self.dtype]}"


@dataclasses.dataclass
class BenchSpec:
    """What a benchmark script supplies to ``run_benchmark``."""

    name: str
    make_inputs: Callable[[Config, torch.device, int], list[torch.Tensor]]  # (config, device, seed)
    make_candidates: Callable[[Config, torch.device], list[Candidate]]
    # Reference loss and gradients (fp32) of the inputs that require grad, in input order.
    reference: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]
    bytes_moved: Callable[[Config], int]
    settings: dict[str, Any]


# Default shapes (N = batch x tokens, V = vocabulary): Llama-2 32000, Llama-3 128256, Qwen2 152064.
GPU_SHAPES = [(bt, v) for v in (32000, 128256, 152064) for bt in (1024, 4096, 8192)]
CPU_SHAPES = [(512, 32000)]


def kdkernels_backends(device: torch.device, requested: list[str] | None) -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run or None) for the rows to show."""
    if requested:
        names = requested
    else:
        # Fused backends only; interpreted Triton on CPU would time the interpreter.
        names = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    import kdkernels

    return [(b, kdkernels.backends.why_unavailable(b, device)) for b in names]


def kdkernels_candidates(
    device: torch.device, requested: list[str] | None, loss: Callable[..., torch.Tensor], missing: str | None = None
) -> list[Candidate]:
    """One ``kdkernels[<backend>]`` row per backend of :func:`kdkernels_backends`: ``loss(*inputs)``
    under ``kdkernels.use_backend(backend)``; skipped with ``missing`` (the fused loss is absent) or
    the reason the backend cannot run."""
    import kdkernels

    def under_backend(backend: str) -> Callable[..., torch.Tensor]:
        def fused(*inputs):
            with kdkernels.use_backend(backend):
                return loss(*inputs)

        return fused

    return [
        Candidate(f"kdkernels[{backend}]", fn=under_backend(backend), skip_reason=missing or reason, is_kdkernels=True)
        for backend, reason in kdkernels_backends(device, requested)
    ]


def float64_reference(loss: Callable[..., torch.Tensor]):
    """The ``reference`` of a :class:`BenchSpec` whose first input alone gets a gradient:
    ``inputs -> (loss, [gradient of the first input])``, ``loss`` evaluated on float64 copies."""

    def reference(inputs):
        first = inputs[0].detach().double().requires_grad_()
        value = loss(first, *(x.detach().double() for x in inputs[1:]))
        value.backward()
        return value.detach(), [first.grad]

    return reference


def random_logits(config: Config, device: torch.device, seed: int) -> list[torch.Tensor]:
    """``make_inputs`` of a two-distribution loss: student and teacher (N, V) logits of std 3 (a
    spread like real models': soft, far from uniform), the student's requiring grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (config.n, config.v)
    s = (torch.randn(shape, generator=g, device=device, dtype=config.dtype) * 3).requires_grad_()
    t = torch.randn(shape, generator=g, device=device, dtype=config.dtype) * 3
    return [s, t]


def liger_candidate(name: str, device: torch.device, build) -> Candidate:
    """A Liger-Kernel candidate, or a skipped one saying why (its kernels are Triton on GPU)."""
    if device.type != "cuda":
        return Candidate(name, skip_reason="Liger-Kernel's kernels run on GPU tensors only")
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception as exc:  # noqa: BLE001
        return Candidate(name, skip_reason=f"liger_kernel does not import ({type(exc).__name__}: {exc})")
    return Candidate(name, fn=build(LigerKLDIVLoss))


class CompiledCache:
    """One ``torch.compile`` per (V, dtype) with the batch dim dynamic, or one per shape (--compile-static).

    Dynamo caches on the code object, so a new (V, dtype) resets it: each timing then sees a
    graph specialised to its V and dtype (the class dim sets the reduction kernels' blocking; the
    batch dim only the grid), and the "first call" column shows the compile time.
    """

    def __init__(self, fn, static: bool):
        self.fn, self.static, self.key, self.compiled = fn, static, None, None

    def get(self, config: Config):
        key = (config.n, config.v, config.dtype) if self.static else (config.v, config.dtype)
        if key != self.key:
            torch._dynamo.reset()
            self.key, self.compiled = key, torch.compile(self.fn, dynamic=False if self.static else None)
        return self.compiled

    def candidate(self, config: Config, no_compile: bool) -> Candidate:
        """The ``compile`` row of ``config`` (skipped under --no-compile). Unless static, the batch
        dim of the first two inputs (student and teacher) is marked dynamic, so that one graph per
        (V, dtype) serves every N."""
        if no_compile:
            return Candidate("compile", skip_reason="--no-compile")
        fn = self.get(config)

        def compiled_fn(*inputs):
            if not self.static:
                for x in inputs[:2]:
                    torch._dynamo.maybe_mark_dynamic(x, 0)
            return fn(*inputs)

        return Candidate("compile", fn=compiled_fn)


def two_reads_one_write(config: Config) -> int:
    """``bytes_moved`` of a loss on two (N, V) inputs of ``config.dtype`` whose gradient goes to
    one of them: read both, write that gradient."""
    elem = torch.empty((), dtype=config.dtype).element_size()
    return 3 * config.n * config.v * elem


def _check(cand: Candidate, inputs, ref_loss, ref_grads) -> dict[str, Any]:
    """Loss and gradient of ``cand`` against the float64 reference; also the first call's time
    (torch.compile, Triton JIT), with a progress line while it runs."""
    _clear_grads(inputs)
    t0 = time.perf_counter()
    with _progress(f"  {cand.name}: first call{' (torch.compile warm-up)' if 'compile' in cand.name else ''}"):
        loss = cand.fn(*inputs)
        loss.backward()
        synchronize(inputs[0].device)
    first_call_s = time.perf_counter() - t0
    grads = [t.grad for t in inputs if t.requires_grad]
    loss_err = rel_l2(loss.float(), ref_loss)
    grad_errs = [rel_l2(g, r) if g is not None else float("inf") for g, r in zip(grads, ref_grads)]
    grad_abs = [max_abs_err(g, r) if g is not None else float("inf") for g, r in zip(grads, ref_grads)]
    loss_tol = tolerance(loss.dtype)
    grad_tol = tolerance(inputs[0].dtype)
    ok = loss_err <= loss_tol and all(e <= grad_tol for e in grad_errs)
    _clear_grads(inputs)
    return {
        "ok": bool(ok),
        "reference": "the eager composite in float64 on the same input values",
        "loss": float(loss.float().item()),
        "loss_rel_err": loss_err,  # |loss - ref| / |ref|
        "grad_rel_err": max(grad_errs) if grad_errs else None,  # ||g - ref||_2 / ||ref||_2
        "grad_max_abs_err": max(grad_abs) if grad_abs else None,  # max_i |g_i - ref_i|
        "loss_tol": loss_tol,
        "grad_tol": grad_tol,
        "first_call_s": first_call_s,
    }


@contextlib.contextmanager
def _progress(label: str, every_s: float = 5.0):
    """Prints ``label ... N s`` every few seconds while the block runs (compiles take a while)."""
    done = threading.Event()

    def tick():
        start = time.perf_counter()
        while not done.wait(every_s):
            print(f"{label} ... {time.perf_counter() - start:.0f} s", flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _plan_input_sets(device: torch.device, set_bytes: int, peak_extra: int, max_sets: int) -> int:
    """How many input copies to rotate over: as many as fit (up to max_sets) next to the peak."""
    if device.type != "cuda" or max_sets <= 1:
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = 0.85 * (free + cached) - 1.2 * peak_extra
    return int(max(1, min(max_sets, 1 + budget // max(set_bytes, 1))))


def _fmt_time(t: dict | None) -> str:
    if not t:
        return "–"
    return f"{t['median_ms']:.3f} [{t['p20_ms']:.3f}, {t['p80_ms']:.3f}]"


def _fmt_mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.1f}"


def markdown_table(entry: dict[str, Any]) -> str:
    """The table of one configuration (as stored in the JSON), in markdown."""
    lines = [
        f"**{entry['label']}** — times in ms, median [p20, p80] over {entry.get('repeats', '?')} runs; "
        f"input sets rotated: {entry.get('input_sets', 1)}",
        "",
        "| candidate | fwd | bwd | fwd+bwd | peak extra MiB | × N·V fp32 | GB/s | % copy BW | % datasheet | first call s "
        "| loss rel err vs float64 | grad max abs err vs float64 | check (rel L2 ≤ tol) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in entry["candidates"]:
        if c["status"] != "ok":
            reason = c.get("reason") or ""
            reason = reason if len(reason) <= 120 else reason[:117] + "..."  # the JSON keeps it whole
            lines.append(f"| {c['name']} | {c['status']}: {reason} |" + " |" * 11)
            continue
        t = c["time"]
        check = c.get("check") or {}
        if check:
            mark = "ok" if check["ok"] else "**MISMATCH**"
            loss_err = f"{check['loss_rel_err']:.1e}"
            grad_err = f"{check['grad_max_abs_err']:.1e}" if check.get("grad_max_abs_err") is not None else "–"
        else:
            mark = loss_err = grad_err = "–"

        def pct(x):
            return "–" if x is None else f"{100 * x:.0f}%"

        lines.append(
            f"| {c['name']} | {_fmt_time(t.get('fwd'))} | {_fmt_time(t.get('bwd'))} | {_fmt_time(t.get('fwd_bwd'))} "
            f"| {_fmt_mib(c.get('peak_extra_bytes'))} | {c.get('peak_extra_x_nv_fp32', float('nan')):.2f} "
            f"| {c['achieved_GBps']:.1f} | {pct(c.get('frac_copy_bw'))} | {pct(c.get('frac_datasheet_bw'))} "
            f"| {check.get('first_call_s', float('nan')):.2f} | {loss_err} | {grad_err} | {mark} |"
        )
    ratios = entry.get("ratios") or {}
    if ratios.get("primary"):
        # The JSON holds ratios against every kdkernels backend; the table shows the default one.
        primary = ratios["primary"]
        suffix = f" / {primary}"

        def against_primary(kind):
            return ", ".join(
                f"{key[: -len(suffix)]} {value:.2f}×"
                for key, value in ratios[kind].items()
                if key.endswith(suffix) and value is not None
            )

        if against_primary("time"):  # no line when no baseline ran (e.g. --candidates kdkernels)
            lines += ["", f"vs {primary}: fwd+bwd time {against_primary('time')}; peak extra memory {against_primary('peak_memory')}"]
    return "\n".join(lines)


ROOFLINE = "roofline: torch.add(s, t, out=g)"


def roofline_fn(inputs: Sequence[torch.Tensor]) -> Callable[..., torch.Tensor] | None:
    """The least a fused two-input loss must move, as a timed run: ``torch.add(s, t, out=g)`` on
    the benchmark's first two inputs (read both, write one tensor of their size), into a buffer
    made once. The "forward" does the add and returns a 0-d leaf that requires grad, whose backward
    is free, so its fwd+bwd time is the add's. None when the first two inputs differ in shape."""
    if len(inputs) < 2 or inputs[0].shape != inputs[1].shape:
        return None
    out = torch.empty_like(inputs[0], requires_grad=False)
    done = torch.zeros((), device=inputs[0].device, requires_grad=True)

    def add(s, t, *_):
        torch.add(s.detach(), t.detach(), out=out)
        done.grad = None
        return done

    return add


def _compute_ratios(cands: list[dict]) -> dict[str, Any]:
    """Baseline over kdkernels, fwd+bwd median time and peak memory, e.g. 'eager / kdkernels[cpu]'."""
    ok = [c for c in cands if c["status"] == "ok"]
    fused = [c for c in ok if c.get("is_kdkernels")]
    baselines = [c for c in ok if not c.get("is_kdkernels")]
    out: dict[str, Any] = {"primary": fused[0]["name"] if fused else None, "time": {}, "peak_memory": {}}
    for k in fused:
        for b in baselines:
            key = f"{b['name']} / {k['name']}"
            out["time"][key] = b["time"]["fwd_bwd"]["median_ms"] / k["time"]["fwd_bwd"]["median_ms"]
            out["peak_memory"][key] = b["peak_extra_bytes"] / k["peak_extra_bytes"] if k["peak_extra_bytes"] else None
    return out


def run_config(spec: BenchSpec, config: Config, device: torch.device, args, peaks: dict) -> dict[str, Any]:
    print(f"\n== {spec.name}: {config.label}", flush=True)
    entry: dict[str, Any] = {
        "label": config.label,
        "N": config.n,
        "V": config.v,
        "dtype": DTYPE_NAMES[config.dtype],
        "bytes_moved": spec.bytes_moved(config),
        "repeats": args.repeats if device.type == "cuda" else max(args.repeats, 5),
        "warmup": args.warmup,
        "candidates": [],
    }
    nv_fp32 = config.n * config.v * 4
    try:
        inputs = spec.make_inputs(config, device, args.seed)
    except Exception as exc:  # noqa: BLE001
        entry["error"] = f"inputs: {'OOM' if is_oom(exc) else type(exc).__name__}: {exc}"
        print("  " + entry["error"], flush=True)
        free_memory(device)
        return entry
    set_bytes = tensor_bytes(inputs)

    # Reference on the full inputs; if it does not fit, check every candidate on the first rows.
    check_inputs = inputs
    try:
        ref_loss, ref_grads = spec.reference(inputs)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        free_memory(device)
        rows = min(config.n, 1024)
        check_inputs = [t[:rows].detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        ref_loss, ref_grads = spec.reference(check_inputs)
        entry["check_note"] = f"reference OOM on the full inputs; checked on the first {rows} rows"

    candidates = spec.make_candidates(config, device)
    if args.candidates:
        candidates = [c for c in candidates if any(s in c.name for s in args.candidates)]
    results: list[dict[str, Any]] = []
    runnable: list[tuple[Candidate, dict]] = []
    for cand in candidates:
        res: dict[str, Any] = {"name": cand.name, "is_kdkernels": cand.is_kdkernels, "status": "ok"}
        if cand.note:
            res["note"] = cand.note
        results.append(res)
        if cand.skip_reason:
            res.update(status="skipped", reason=cand.skip_reason)
            print(f"  {cand.name}: skipped ({cand.skip_reason})", flush=True)
            continue
        try:
            own = cand.reference(check_inputs) if cand.reference is not None else (ref_loss, ref_grads)
            res["check"] = _check(cand, check_inputs, *own)
            res["peak_extra_bytes"] = peak_extra_bytes(cand.fn, inputs, device)
            res["peak_extra_x_nv_fp32"] = res["peak_extra_bytes"] / nv_fp32
            runnable.append((cand, res))
            chk = res["check"]
            print(
                f"  {cand.name}: vs float64: loss rel err {chk['loss_rel_err']:.1e}, grad max abs err "
                f"{chk['grad_max_abs_err']:.1e}, grad rel L2 err {chk['grad_rel_err']:.1e} "
                f"({'ok' if chk['ok'] else 'MISMATCH'}); first call {chk['first_call_s']:.2f} s; "
                f"peak extra {res['peak_extra_bytes'] / 2**20:,.1f} MiB",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001  (one failing candidate must not stop the others)
            res.update(status="oom" if is_oom(exc) else "error", reason=_short(exc))
            print(f"  {cand.name}: {res['status']}: {res['reason']}", flush=True)
            _clear_grads(check_inputs)
            _clear_grads(inputs)
            free_memory(device)
    del ref_loss, ref_grads, check_inputs
    free_memory(device)

    max_peak = max((r["peak_extra_bytes"] for _, r in runnable), default=0)
    n_sets = _plan_input_sets(device, set_bytes, max_peak, args.input_sets)
    input_sets = [inputs]
    try:
        for i in range(1, n_sets):
            input_sets.append(spec.make_inputs(config, device, args.seed + i))
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        free_memory(device)
    entry["input_sets"] = len(input_sets)

    timed = {cand.name: cand.fn for cand, _ in runnable}
    roofline = roofline_fn(inputs) if device.type == "cpu" else None
    if roofline is not None:  # timed in turn with the candidates, like them
        timed[ROOFLINE] = roofline
    timings = time_interleaved(timed, input_sets, device, args.warmup, args.repeats)
    roofline_ms = None
    if roofline is not None and not isinstance(timings[ROOFLINE], BaseException):
        roofline_ms = timings[ROOFLINE]["fwd_bwd"]["median_ms"]
        entry["roofline"] = {"what": ROOFLINE, "fwd_bwd_median_ms": roofline_ms}
        print(f"  {ROOFLINE}: {roofline_ms:.3f} ms", flush=True)
    for cand, res in runnable:
        timing = timings[cand.name]
        if isinstance(timing, BaseException):
            res.update(status="oom" if is_oom(timing) else "error", reason="timing: " + _short(timing))
            print(f"  {cand.name}: {res['status']}: {res['reason']}", flush=True)
            continue
        res["time"] = timing
        med = res["time"]["fwd_bwd"]["median_ms"]
        res["achieved_GBps"] = entry["bytes_moved"] / (med / 1e3) / 1e9
        res["frac_copy_bw"] = res["achieved_GBps"] * 1e9 / peaks["copy_Bps"] if peaks.get("copy_Bps") else None
        res["frac_datasheet_bw"] = (
            res["achieved_GBps"] * 1e9 / peaks["datasheet_Bps"] if peaks.get("datasheet_Bps") else None
        )
        # The copy's time over the candidate's: the candidate's share of the copy's bandwidth.
        res["frac_roofline"] = roofline_ms / med if roofline_ms else None
        print(
            f"  {cand.name}: fwd {res['time']['fwd']['median_ms']:.3f} ms, bwd {res['time']['bwd']['median_ms']:.3f} ms, "
            f"fwd+bwd {med:.3f} ms" + (f" ({res['frac_roofline']:.0%} of the roofline)" if roofline_ms else ""),
            flush=True,
        )
    del input_sets, inputs
    free_memory(device)

    entry["candidates"] = results
    entry["ratios"] = _compute_ratios(results)
    return entry


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_common_args(parser, default_out_stem: str) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--shapes", nargs="+", default=None, help="NxV shapes, e.g. 512x32000 4096x128256")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES), help="input dtypes")
    parser.add_argument("--candidates", nargs="+", default=None, help="run only candidates whose name contains one of these")
    parser.add_argument("--backends", nargs="+", default=None, help="kdkernels backends to run (default: the fused ones available)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per mode (default: cuda 5, cpu 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode (default: cuda 20, cpu 7; at least 5 on cpu)")
    parser.add_argument("--input-sets", type=int, default=3, help="CUDA: rotate over up to this many input copies if they fit")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    parser.add_argument("--compile-static", action="store_true", help="compile per shape (default: batch dim dynamic, one compile per V and dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; configurations not started by then are skipped and listed")
    parser.add_argument(
        "--out", default=None,
        help=f"JSON path (default bench/out/{default_out_stem}_<device>.json, ignored by git; "
        "the committed bench/results/ is written only when named here)",
    )


def resolve_common_args(args, gpu_shapes, cpu_shapes, gpu_dtypes, cpu_dtypes) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads or 2)
    args.shapes = [parse_shape(s) for s in args.shapes] if args.shapes else (gpu_shapes if cuda else cpu_shapes)
    args.dtypes = args.dtypes or (gpu_dtypes if cuda else cpu_dtypes)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if cuda else 7)
    return device


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, v = text.lower().split("x")
        return int(n), int(v)
    except ValueError:
        raise SystemExit(f"--shapes: expected NxV like 512x32000, got {text!r}") from None


def default_out_path(stem: str, device: torch.device, name: str) -> str:
    slug = "cpu" if device.type == "cpu" else "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "out", f"{stem}_{slug}.json")


def configs_in_order(args) -> list[Config]:
    # dtype, then V, then N: the compiled baseline recompiles only when V or dtype changes.
    return [Config(n, v, DTYPES[d]) for d in args.dtypes for v in sorted({v for _, v in args.shapes}) for n, vv in args.shapes if vv == v]


def run_benchmark(spec: BenchSpec, args, device: torch.device) -> dict[str, Any]:
    """Run every configuration, print the tables, write the JSON after each configuration."""
    started = time.perf_counter()
    env = environment(device)
    name = env["device"]
    out = args.out or default_out_path(spec.name, device, name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    print(f"{spec.name} on {name}; torch {env['torch']}, triton {env['triton']}, kdkernels {env['kdkernels']}", flush=True)

    label, datasheet = datasheet_bandwidth(name) if device.type == "cuda" else (None, None)
    copy_bps = copy_bandwidth(device)
    peaks = {"copy_Bps": copy_bps, "datasheet_Bps": datasheet, "datasheet_label": label}
    print(
        f"copy bandwidth {copy_bps / 1e9:,.1f} GB/s (read + write)"
        + (f"; datasheet {label} {datasheet / 1e9:,.0f} GB/s" if datasheet else ""),
        flush=True,
    )
    report: dict[str, Any] = {
        "benchmark": spec.name,
        "environment": env,
        "peak_bandwidth": peaks,
        "settings": {
            **spec.settings,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "max_input_sets": args.input_sets,
            "compile": "off" if args.no_compile else ("static shapes" if args.compile_static else "batch dim dynamic"),
            "bytes_moved": "one read of each input + one write of the gradient of the input that requires grad",
            "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch profiler [memory] events",
        },
        "results": [],
        "skipped_configs": [],
    }
    for config in configs_in_order(args):
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            report["skipped_configs"].append(config.label)
            print(f"\n== {config.label}: skipped (time budget)", flush=True)
            continue
        entry = run_config(spec, config, device, args, peaks)
        report["results"].append(entry)
        report["elapsed_s"] = time.perf_counter() - started
        _write_json(report, out)
        print("\n" + markdown_table(entry), flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    # A busy host (shared cores) shows up here: CPU numbers taken under load are noisy.
    report["environment"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    _write_json(report, out)
    print(f"\nwrote {out} ({report['elapsed_s']:.0f} s)", flush=True)
    return report


def _write_json(report: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def measure(
    fn_fwd: Callable[..., torch.Tensor],
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    device: torch.device | str,
    warmup: int | None = None,
    repeats: int | None = None,
    max_input_sets: int = 3,
) -> dict[str, Any]:
    """Stand-alone measurement of one loss: times of fwd / bwd / fwd+bwd and peak extra memory.

    ``make_inputs()`` returns a fresh input set (tensors that need gradients already have
    ``requires_grad``); it is called once more per extra rotated set on CUDA.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    warmup = warmup if warmup is not None else (5 if cuda else 2)
    repeats = repeats if repeats is not None else (20 if cuda else 7)
    first = list(make_inputs())
    peak = peak_extra_bytes(fn_fwd, first, device)
    n_sets = _plan_input_sets(device, tensor_bytes(first), peak, max_input_sets)
    sets = [first] + [list(make_inputs()) for _ in range(n_sets - 1)]
    return {"time": time_all_modes(fn_fwd, sets, device, warmup, repeats), "peak_extra_bytes": peak, "input_sets": n_sets}


# ----------------------------------------------------------------------------------------------
# self-test of the CPU memory method
# ----------------------------------------------------------------------------------------------


def _selftest() -> None:
    """Checks the profiler-based CPU peak against allocations of known size."""
    keep = [torch.empty(8 << 20, dtype=torch.uint8)]  # allocated before profiling

    def run():
        a = torch.empty(10_000_000, dtype=torch.uint8)
        b = torch.empty(5_000_000, dtype=torch.uint8)
        del a
        keep.clear()  # freeing memory from before profiling must not move the baseline
        c = torch.empty(20_000_000, dtype=torch.uint8)
        del b
        return c

    peak = cpu_peak_extra_bytes(run)
    assert peak == 25_000_000, peak  # 10 + 5, then 5 + 20
    # fwd+bwd of exp(x).sum() on 4 MB: exp(x) saved for backward (4 MB) + the gradient (4 MB).
    x = torch.randn(1000, 1000, requires_grad=True)
    peak = peak_extra_bytes(lambda t: t.exp().sum(), [x], torch.device("cpu"))
    assert 8_000_000 <= peak <= 8_000_000 + 1024, peak
    print(f"cpu memory self-test ok (known 25,000,000 B; exp(x).sum() fwd+bwd: {peak:,} B for 8,000,000 expected)")


if __name__ == "__main__":
    if "--selftest" in sys.argv:
        _selftest()
    else:
        print(__doc__)
