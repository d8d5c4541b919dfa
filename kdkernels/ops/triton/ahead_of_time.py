"""Compile the row-walker kernels for a CUDA target on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how the test suite runs the kernels on CPU) runs
the kernels as Python: it accepts code that compiled Triton rejects (a plain ``int`` global read
in a kernel, a loop-carried variable that changes type) and says nothing about registers. Triton's
compiler itself runs without a GPU, down to the cubin, when its NVIDIA backend is installed (it
ships in the ``triton`` wheel). This module compiles each kernel of ``kd_loss``,
``weighted_soft_ce``, ``divergences`` and ``fused_linear`` in the constexpr variants that change its code, so such
errors show up on any machine.

Run ``python -m kdkernels.ops.triton.ahead_of_time [kd_loss|weighted_soft_ce|divergences|fused_linear ...]``
(without ``TRITON_INTERPRET=1``: under the interpreter ``triton.jit`` builds interpreted
functions, which cannot be compiled). Prints one line per variant; exits 1 if any fails.

``python -m kdkernels.ops.triton.ahead_of_time vectors`` compiles the row walker's kernels as
their launchers launch them on contiguous bf16 rows, with the JIT's specialisation of those
arguments, and checks that the logits are loaded and the gradients stored in vectors: a row
offset of unknown alignment makes every one of them scalar (see ``launch_strides``).
"""

from __future__ import annotations

import os
import sys


def _signature(kernel, logits: str) -> dict[str, str]:
    """Triton signature of a walker kernel from its parameter names: constexprs as declared,
    upper-case names pointers, ``*_hi``/``*_lo`` float32 scalars (see ``nan.split_float``), the
    rest int32 sizes and strides."""
    pointers = {"MASK": "*i1", "LOSS": "*fp32", "GRAD_SCALE": "*fp32", "W": "*fp32",
                # fused_linear's: labels, per-row statistics and coefficients, fp32 gradient buffers
                "LABELS": "*i64", "STATS": "*fp32", "COEF": "*fp32", "GH": "*fp32", "GW": "*fp32", "GB": "*fp32"}
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = pointers.get(name, "*" + logits)
        elif name.endswith(("_hi", "_lo")):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def variants(which: str):
    """``(kernel, constexprs[, logits dtype])`` of one kernel file: each layout and resident mode,
    for the divergences every kind, for the fused linear kernels float64 heads too (logits dtype
    ``bf16`` where not given)."""
    import triton.language as tl

    walker = dict(ACC=tl.float32, HAS_MASK=True, STUDENT_GRAD=True, TEACHER_GRAD=True)
    shapes = [
        dict(ALONG_INNER=False, RESIDENT=True, BLOCK_P=1, BLOCK_C=1024),
        dict(ALONG_INNER=False, RESIDENT=False, BLOCK_P=1, BLOCK_C=4096),
        dict(ALONG_INNER=True, RESIDENT=True, BLOCK_P=64, BLOCK_C=32),
        dict(ALONG_INNER=True, RESIDENT=False, BLOCK_P=64, BLOCK_C=32),
    ]
    if which == "kd_loss":
        from kdkernels.ops.triton.kd_loss import _kd_loss_kernel

        return [(_kd_loss_kernel, dict(walker, **shape)) for shape in shapes]
    if which == "weighted_soft_ce":
        from kdkernels.ops.triton.weighted_soft_ce import _weighted_soft_ce_kernel

        return [(_weighted_soft_ce_kernel, dict(walker, HAS_WEIGHT=True, **shape)) for shape in shapes]
    if which == "divergences":
        from kdkernels.ops.triton import divergences

        transforms = dict(SCALE_BY_T2=True, S_SCALE=True, S_CAP=True, T_SCALE=False, T_CAP=True)
        kinds = range(divergences.ZERO_STUDENT_REFERENCE.value + 1)
        # Every kind where all passes are compiled (two-pass rows); the resident mode once.
        return [(divergences._divergence_kernel, dict(walker, KIND=kind, **transforms, **shapes[1])) for kind in kinds] + [
            (divergences._divergence_kernel, dict(walker, KIND=divergences.JSD.value, **transforms, **shapes[2]))
        ]
    if which == "fused_linear":
        from kdkernels.ops.triton import divergences
        from kdkernels.ops.triton import fused_linear as tiles

        heads = dict(CE=True, S_BIAS=True, T_BIAS=True, S_SCALE=True, S_CAP=True, T_SCALE=False, T_CAP=True,
                     ACC=tl.float32, S_DOT_ACC=tl.float32, T_DOT_ACC=tl.float32, S_PRECISION=None, T_PRECISION=None,
                     S_OPERAND=tl.bfloat16, T_OPERAND=tl.bfloat16, BLOCK_M=64, BLOCK_V=64, BLOCK_K=64)
        side = dict(heads, G_DOT_ACC=tl.float32, G_PRECISION=None, G_OPERAND=tl.bfloat16, KIND=divergences.JSD.value)
        # float64 heads accumulate their tl.dot in float64. Triton 3.6 (on the GPU machines)
        # asserts that an accumulator passed in has out_dtype: without it this variant fails
        # there (checked with 3.6 on CPU); Triton 3.9 accepts either.
        fp64 = dict(heads, ACC=tl.float64, S_DOT_ACC=tl.float64, T_DOT_ACC=tl.float64, S_PRECISION="ieee",
                    T_PRECISION="ieee", S_OPERAND=tl.float64, T_OPERAND=tl.float64, KIND=divergences.FORWARD_KL.value)
        return [
            (tiles._stats_kernel, dict(heads, KIND=divergences.FORWARD_KL.value)),
            (tiles._stats_kernel, dict(heads, KIND=divergences.JSD.value)),
            (tiles._stats_kernel, fp64, "fp64"),
            (tiles._terms_kernel, dict(heads, KIND=divergences.TVD.value)),
        ] + [
            (kernel, dict(side, TEACHER=teacher, **extra))
            for teacher in (False, True)
            for kernel, extra in ((tiles._hidden_grad_kernel, {}), (tiles._weight_grad_kernel, dict(WANT_W=True, WANT_B=True)))
        ]
    raise ValueError(f"which: expected kd_loss, weighted_soft_ce, divergences or fused_linear, got {which!r}")


def compile_variants(which: str, arch: int = 90) -> list[tuple[str, str | None]]:
    """``(description, error or None)`` per variant, compiled for ``sm_<arch>`` down to the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, constexprs, *logits in variants(which):
        logits = logits[0] if logits else "bf16"
        described = f"{kernel.__name__} {logits} " + " ".join(f"{k}={v}" for k, v in constexprs.items() if k != "ACC")
        source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, logits), constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=target)
            results.append((described, None if compiled.asm.get("cubin") else "no cubin"))
        except Exception as error:  # a compilation error names the line; keep going
            results.append((described, f"{type(error).__name__}: {error}"))
    return results


def record_launch(module, launcher, *args) -> tuple:
    """``(kernel, args, kwargs)`` of the launch that ``launcher(*args)`` makes through
    ``module.wrap_triton``, recorded instead of run (CPU tensors will do)."""
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.kernel, a, kw))

    original = module.wrap_triton
    module.wrap_triton = Recorder
    try:
        launcher(*args)
    finally:
        module.wrap_triton = original
    return calls[0]


def compile_as_launched(kernel, args, kwargs, arch: int = 90):
    """Compile ``kernel`` for ``sm_<arch>`` with the specialisation Triton's JIT gives these
    arguments on a GPU (``native_specialize_impl``: an integer 1 becomes a constant, multiples of
    16 and 16-byte-aligned pointers are marked divisible), so the code is the code a launch runs."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    runtime = iter(args)
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        kind, key = native_specialize_impl(BaseBackend, next(runtime), False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif key:
            attrs[(index,)] = BaseBackend.parse_attr(key)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def walker_launches(student, teacher, teacher_grad: bool = True) -> dict:
    """``{name: (kernel, args, kwargs)}``: the launches of the row walker's three kernels
    (``kd_loss``, ``weighted_soft_ce``, ``divergences`` as forward KL) on these ``(outer, classes,
    inner)`` logits, recorded (:func:`record_launch`), the student's gradient always wanted."""
    import torch

    from kdkernels.ops.triton import divergences, kd_loss, weighted_soft_ce

    scale = torch.ones(1)
    weight = torch.rand(student.shape[1])
    return {
        "kd_loss": record_launch(kd_loss, kd_loss.kd_loss_rows, student, teacher, None, 2.0, scale, True, teacher_grad),
        "weighted_soft_ce": record_launch(weighted_soft_ce, weighted_soft_ce.weighted_soft_ce_rows, student, teacher,
                                          weight, None, 2.0, scale, True, teacher_grad),
        "divergences": record_launch(divergences, divergences.divergence_rows, student, teacher, None, "forward_kl", 0.5,
                                     2.0, True, None, None, None, None, scale.double(), True, teacher_grad),
    }


def row_memory_instructions(classes: int) -> dict:
    """``{kernel name: {"vector loads", "scalar loads", "vector stores", "scalar stores"}}``: the
    16-bit global loads and stores in the PTX of each walker kernel as launched on contiguous
    bf16 rows of ``classes`` classes (only the logits and their gradients are 16-bit)."""
    import re

    import torch

    student = torch.randn(64, classes, dtype=torch.bfloat16).unsqueeze(-1)
    teacher = torch.randn(64, classes, dtype=torch.bfloat16).unsqueeze(-1)
    counts = {}
    for which, launch in walker_launches(student, teacher).items():
        ptx = compile_as_launched(*launch).asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
        # A vector of bf16 is moved as 32-bit words (v2/v4 .b32); a scalar one as .b16.
        counts[which] = {
            "vector loads": count(r"ld\.global(?:\.\w+)*\.v[24]\.b32"),
            "scalar loads": count(r"ld\.global(?:\.\w+)*\.b16"),
            "vector stores": count(r"st\.global(?:\.\w+)*\.v[24]\.b32"),
            "scalar stores": count(r"st\.global(?:\.\w+)*\.b16"),
        }
    return counts


def check_row_vectors() -> int:
    """Print the 16-bit loads and stores of each walker kernel on contiguous bf16 rows (resident
    and two-pass); 1 if any is scalar."""
    failed = 0
    for classes in (2048, 20000):  # multiples of 16: rows that start 16-byte aligned
        for which, counts in row_memory_instructions(classes).items():
            bad = counts["scalar loads"] or counts["scalar stores"] or not counts["vector loads"]
            print(("FAIL " if bad else "ok   ") + f"{which} bf16 rows of {classes} classes: "
                  + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
            failed += bool(bad)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted functions cannot be compiled")
        return 2
    if argv == ["vectors"]:
        return check_row_vectors()
    failed = 0
    for which in argv or ["kd_loss", "weighted_soft_ce", "divergences", "fused_linear"]:
        for described, error in compile_variants(which):
            print(("ok   " if error is None else "FAIL ") + described + ("" if error is None else f"\n{error}"), flush=True)
            failed += error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
