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


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted functions cannot be compiled")
        return 2
    failed = 0
    for which in argv or ["kd_loss", "weighted_soft_ce", "divergences", "fused_linear"]:
        for described, error in compile_variants(which):
            print(("ok   " if error is None else "FAIL ") + described + ("" if error is None else f"\n{error}"), flush=True)
            failed += error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
