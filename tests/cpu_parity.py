"""Parity of the compiled CPU kernels with the PyTorch reference, under the CPU capability this
process runs (``ATEN_CPU_CAPABILITY=default|avx2|avx512``, or an emulated CPU under qemu-user).

    python tests/cpu_parity.py                  # prints the capability and the checks
    python tests/cpu_parity.py --expect AVX2    # also fails unless the AVX2 kernels ran
    qemu-x86_64 -cpu Westmere python tests/cpu_parity.py --expect DEFAULT --without-numpy

Every fused op runs on the ``cpu`` backend and on the ``torch`` reference in float64, on small
inputs that reach each code path of the kernels: class rows with a vector tail, rows longer than
one block of the shared row walker (student gradient from its cached exponentials), the channels
layout (classes strided, positions contiguous), a strided fallback, masks, fp32 and bf16, and
each family of the LLM divergence kernel, and its sparse (top-k) teacher. The
shapes are small because under qemu every instruction is emulated. Run by
tests/test_cpu_capabilities.py (one subprocess per capability) and by .ci/run (under qemu).
"""

from __future__ import annotations

import argparse
import sys

if "--without-numpy" in sys.argv:
    # numpy 2.4's wheel dies with SIGILL on qemu's pre-AVX CPU models (Westmere, Nehalem) at import;
    # torch and kdkernels run without it (torch imports numpy only if it can).
    sys.modules["numpy"] = None

import torch  # noqa: E402

import kdkernels  # noqa: E402
import kdkernels.functional as KF  # noqa: E402
from kdkernels import _extension  # noqa: E402

# (dtype, relative tolerance of the loss and the gradients against the float64 reference)
DTYPES = ((torch.float32, 2e-5), (torch.bfloat16, 2e-2))
# TVD's gradient jumps where p = q: fp32 rounding of the inputs moves classes across the jump, and
# the fp32 reference's own error is as large as the kernel's (6.6e-6 vs 6.2e-6 on one seed).
TOLERANCE_SCALE = {"distill_loss tvd": 5.0}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> float:
    """Relative max error ‖a − e‖∞ / max(‖e‖∞, 1e-12), raising if above rtol."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    if not err <= rtol:
        raise AssertionError(f"relative error {err:.3g} > {rtol:.1g}")
    return err


def _run(fn, inputs: list[torch.Tensor], n_grad: int, backend: str, dtype: torch.dtype):
    """fn's loss and the gradients of its first n_grad inputs, on one backend, inputs cast to dtype."""
    leaves = [x.detach().to(dtype).requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    with kdkernels.use_backend(backend):
        loss = fn(*leaves)
    loss.backward()
    return loss, [x.grad for x in leaves[:n_grad]]


def cases() -> list[tuple[str, object, list[torch.Tensor], int]]:
    """(name, fn, inputs, how many leading inputs get a gradient)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 3

    def ramped(rows, classes):
        return randn(rows, classes) + torch.linspace(0, 30, classes, dtype=torch.float64)

    mask_rows = torch.rand(7, generator=g) > 0.3
    long_weight = torch.rand(4133, generator=g, dtype=torch.float64)
    weight = torch.rand(517, generator=g, dtype=torch.float64)
    margin = torch.linspace(-1.0, -0.1, 16, dtype=torch.float64)
    # A sparse teacher's ids (unsorted, on vector and block edges): the complement pass of the
    # tail bucket walks two streams of 2048-class blocks with the ids' lanes masked.
    sparse_ids = torch.stack([torch.tensor([4132, 0, 15, 16, 2047, 2048, 4095, 4096, 31]), torch.randperm(4133, generator=g)[:9],
                              torch.randperm(4133, generator=g)[:9]])
    return [
        ("kd_loss rows", lambda s, t: KF.kd_loss(s, t, 2.0), [randn(7, 1003), randn(7, 1003)], 2),
        ("kd_loss rows mask", lambda s, t: KF.kd_loss(s, t, 2.0, reduction="sum", mask=mask_rows), [randn(7, 131), randn(7, 131)], 1),
        # Rows longer than one walker block (2048 classes), the maxima growing along the row: the
        # student gradient alone comes from the walker's cached exponentials, rescaled per block.
        ("kd_loss rows long", lambda s, t: KF.kd_loss(s, t, 2.0), [ramped(3, 4133), ramped(3, 4133)], 1),
        ("kd_loss channels", lambda s, t: KF.kd_loss(s, t, 1.5, dim=1), [randn(2, 37, 3, 5), randn(2, 37, 3, 5)], 2),
        ("kd_loss strided", lambda s, t: KF.kd_loss(s.transpose(0, 1), t.transpose(0, 1), 2.0), [randn(45, 6), randn(45, 6)], 1),
        ("kl_div", lambda x, y: KF.kl_div(x.log_softmax(-1), y.softmax(-1), reduction="batchmean"), [randn(5, 333), randn(5, 333)], 2),
        ("weighted_soft_ce rows", lambda s, t: KF.weighted_soft_ce(s, t, weight.to(s.dtype), temperature=2.0), [randn(6, 517), randn(6, 517)], 2),
        ("weighted_soft_ce rows long", lambda s, t: KF.weighted_soft_ce(s, t, long_weight.to(s.dtype), temperature=2.0), [ramped(3, 4133), ramped(3, 4133)], 1),
        ("weighted_soft_ce channels", lambda s, t: KF.weighted_soft_ce(s, t, dim=1), [randn(2, 19, 4, 9), randn(2, 19, 4, 9)], 1),
        ("margin_partial_l2", lambda s, t: KF.margin_partial_l2(s, t, margin.to(s.dtype)), [randn(2, 16, 5, 7), randn(2, 16, 5, 7)], 1),
        ("bounded_regression", lambda s, t, y: KF.bounded_regression(s, t, y, margin=0.5), [randn(33, 4), randn(33, 4), randn(33, 4)], 1),
        ("pairwise_similarity", KF.pairwise_similarity_loss, [randn(2, 6, 5, 7), randn(2, 9, 5, 7)], 2),
        ("rkd_angle", KF.rkd_angle_loss, [randn(13, 10), randn(13, 6)], 2),
        # The LLM divergences: the KL policy walked both ways, the mixtures' three passes (with the
        # fast log), soft-capping in the kernel; rows longer than one walker block.
        ("distill_loss reverse_kl", lambda s, t: KF.distill_loss(s, t, divergence="reverse_kl", temperature=2.0), [randn(7, 131), randn(7, 131)], 2),
        ("distill_loss jsd long softcap", lambda s, t: KF.distill_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, softcap=(30.0, None)),
         [ramped(3, 4133), ramped(3, 4133)], 2),
        ("distill_loss skew_forward_kl", lambda s, t: KF.distill_loss(s, t, divergence="skew_forward_kl", beta=0.1), [randn(5, 517), randn(5, 517)], 1),
        ("distill_loss tvd", lambda s, t: KF.distill_loss(s, t, divergence="tvd"), [randn(5, 517), randn(5, 517)], 2),
        ("distill_loss sparse tail_bucket long", lambda s, v: KF.distill_loss(s, teacher_topk=(sparse_ids, v), teacher_values="logprobs",
                                                                               tail="tail_bucket", divergence="jsd", temperature=2.0),
         [ramped(3, 4133), randn(3, 9).log_softmax(-1) - 0.05], 2),
        ("distill_loss sparse renormalize", lambda s, v: KF.distill_loss(s, teacher_topk=(torch.tensor([[36, 0, 5, 17, 16], [1, 2, 3, 30, 20], [7, 35, 9, 11, 13]]), v), tail="renormalize"),
         [randn(3, 37), randn(3, 5)], 2),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect", default=None, help="fail unless the kernels run this capability (DEFAULT, AVX2, AVX512)")
    parser.add_argument("--without-numpy", action="store_true", help="block `import numpy` (for qemu's pre-AVX CPU models)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not _extension.has_extension():
        raise SystemExit(f"kdkernels._C is not built: {_extension.EXTENSION_ERROR}")
    torch_cap = torch.backends.cpu.get_cpu_capability()
    ours = _extension.cpu_capability()
    print(f"torch capability {torch_cap}; kdkernels CPU kernels {ours} (compiled: {', '.join(_extension.cpu_capabilities())})", flush=True)
    if args.expect is not None and ours != args.expect.upper():
        raise SystemExit(f"expected the {args.expect.upper()} kernels, got {ours}")
    failures = 0
    checks = 0
    for name, fn, inputs, n_grad in cases():
        for dtype, rtol in DTYPES:
            rtol *= TOLERANCE_SCALE.get(name, 1.0)
            # The reference sees the same (rounded) inputs, in float64.
            rounded = [x.to(dtype).double() for x in inputs]
            ref_loss, ref_grads = _run(fn, rounded, n_grad, "torch", torch.float64)
            try:
                loss, grads = _run(fn, inputs, n_grad, "cpu", dtype)
                assert len(grads) == len(ref_grads), f"{len(grads)} gradients, expected {len(ref_grads)}"
                errs = [_close(loss, ref_loss, rtol)] + [_close(a, e, rtol) for a, e in zip(grads, ref_grads)]
                checks += 1
                print(f"  ok   {name} {str(dtype)[6:]}: max rel err {max(errs):.1e}", flush=True)
            except AssertionError as exc:
                failures += 1
                print(f"  FAIL {name} {str(dtype)[6:]}: {exc}", flush=True)
    if failures:
        raise SystemExit(f"capability {ours}: {failures} of {failures + checks} checks failed")
    print(f"capability {ours}: {checks} checks ok")


if __name__ == "__main__":
    sys.exit(main())
