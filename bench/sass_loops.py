"""Static instruction counts of the row walker's Triton kernels, no GPU needed.

Compiles ``kd_loss``, ``weighted_soft_ce`` and ``divergences`` (forward KL) for sm_90 as their
launchers launch them on contiguous rows (``walker_launches`` and ``compile_as_launched`` of
``kdkernels.ops.triton.ahead_of_time``: the JIT's own specialisation of the arguments),
disassembles the cubin (``cuobjdump``, shipped
with Triton's NVIDIA backend) and prints, for each loop of the kernel (pass 1 over the class
blocks, pass 2 writing the gradients), its instructions, global loads (LDG) and global stores
(STG) per block and thread. A GPU time is not a static count: this says what a block costs in
instructions, the GPU benchmarks say what it costs in time.

    python bench/sass_loops.py [--classes 20000] [--dtypes bf16 fp32]     # without TRITON_INTERPRET
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_INSTRUCTION = re.compile(r"\S+\t(@!?U?P\w+\s+)?([A-Z0-9_]+)")


def loop_counts(sass: str) -> list[tuple[int, int, int]]:
    """``(instructions, LDG, STG)`` of each loop: the lines from a label to a branch back to it."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^LBB\d+:$", line)}
    loops = []
    for i, line in enumerate(lines):
        back = re.search(r"BRA (LBB\d+);", line)
        if back and labels[back.group(1)] < i - 2:
            ops = collections.Counter(m.group(2) for m in map(_INSTRUCTION.match, lines[labels[back.group(1)] : i]) if m)
            loops.append((sum(ops.values()), ops["LDG"], ops["STG"]))
    return loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted functions cannot be compiled")
    import torch
    from triton.tools.disasm import get_sass

    from kdkernels.ops.triton.ahead_of_time import compile_as_launched, walker_launches

    for name in args.dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        s = torch.randn(args.rows, args.classes, dtype=dtype).unsqueeze(-1)
        t = torch.randn(args.rows, args.classes, dtype=dtype).unsqueeze(-1)
        for loss, launch in walker_launches(s, t, teacher_grad=False).items():
            loops = loop_counts(get_sass(compile_as_launched(*launch).asm["cubin"]))
            shown = "; ".join(f"loop {k + 1}: {n} instructions, {ldg} LDG, {stg} STG" for k, (n, ldg, stg) in enumerate(loops))
            print(f"{loss} {name} {args.rows}x{args.classes} (student gradient only): {shown}", flush=True)


if __name__ == "__main__":
    main()
