"""Compare the two Triton kd_loss kernels on a GPU: the one-read "resident" kernel (whole row in
registers) against the two-pass kernel, across vocabulary sizes, to place
``RESIDENT_MAX_CLASSES``. Prints achieved bandwidth counting one read of each input and one write
of the student gradient. Run: ``PYTHONPATH=. python bench/tune_triton.py [--out FILE]`` (CUDA only).
"""

import argparse
import json
import sys

import torch
import triton
import triton.testing

import kdkernels
from kdkernels.ops.triton import kd_loss as triton_kd_loss


def _time_fwd_bwd(rows, classes, dtype):
    student = torch.randn(rows, classes, device="cuda", dtype=dtype, requires_grad=True)
    teacher = torch.randn(rows, classes, device="cuda", dtype=dtype)

    def step():
        kdkernels.functional.kd_loss(student, teacher, 2.0).backward()
        student.grad = None

    ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
    return ms, 3 * rows * classes * student.element_size() / (ms * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    results = []
    default_limit = triton_kd_loss.RESIDENT_MAX_CLASSES
    with kdkernels.use_backend("triton"):
        for classes in (1000, 2048, 4096, 8192, 16384, 32000):
            for dtype in (torch.bfloat16, torch.float32):
                for kernel, limit in (("resident", 1 << 30), ("two-pass", 0)):
                    triton_kd_loss.RESIDENT_MAX_CLASSES = limit
                    try:
                        ms, gbs = _time_fwd_bwd(8192, classes, dtype)
                    except Exception as exc:  # e.g. a row too long for registers
                        ms = gbs = float("nan")
                        print(f"{kernel} V={classes} failed: {exc}", file=sys.stderr)
                    results.append(dict(kernel=kernel, rows=8192, classes=classes, dtype=str(dtype), ms=ms, gbs=gbs))
                    print(f"{kernel:9s} 8192x{classes:6d} {str(dtype):15s} {ms:8.3f} ms {gbs:6.0f} GB/s", flush=True)
    triton_kd_loss.RESIDENT_MAX_CLASSES = default_limit
    if args.out:
        with open(args.out, "w") as f:
            info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
            json.dump(dict(info, command=" ".join(sys.argv), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
