"""Which kernel op runs a fused op for a backend.

Every fused loss has a kernel op in the compiled extension, ``kdkernels::<name>`` (one schema,
CPU and CUDA implementations), and a Triton one, ``kdkernels::<name>_triton``.
"""

import torch


def kernel_op(name: str, backend: str):
    if backend == "triton":
        return getattr(torch.ops.kdkernels, f"{name}_triton")
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.kdkernels, name)
    raise ValueError(f"backend: kdkernels::{name} has no kernel for backend {backend!r}")
