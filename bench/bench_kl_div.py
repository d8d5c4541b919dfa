"""Benchmark of the drop-in ``kdkernels.functional.kl_div`` against ``torch.nn.functional.kl_div``.

    python bench/bench_kl_div.py                        # CPU: N=512, V=32000, fp32
    python bench/bench_kl_div.py --device cuda          # GPU: BT x V grid, bf16 and fp32
    python bench/bench_kl_div.py --log-target --reduction sum --shapes 4096x128256

Inputs are what ``kl_div`` takes: ``input`` = log-probabilities (N, V) with ``requires_grad``,
``target`` = probabilities (log-probabilities with ``--log-target``), in the benchmarked dtype.
Candidates, all on the same inputs:

* ``kdkernels[<backend>]``: the drop-in, one row per fused backend of the device;
* ``eager``: ``F.kl_div(input, target, reduction=..., log_target=...)`` as called, no upcast
  (a drop-in replaces exactly this call);
* ``compile``: ``torch.compile`` of that call;
* ``liger``: Liger-Kernel's ``LigerKLDIVLoss(reduction=..., log_target=...)`` (GPU only, when installed).

Bytes moved (for bandwidth): one read of each input + one write of the input's gradient.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

# The checkout's kdkernels (and its in-place built extension) is what gets measured, installed or not.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]
import _harness as H  # noqa: E402



def _kdkernels_kl_div():
    """The drop-in, or the reason it cannot be imported (it may not exist yet in this checkout)."""
    try:
        from kdkernels.functional import kl_div
    except ImportError as exc:
        return None, f"kdkernels.functional.kl_div does not import ({exc})"
    if not callable(kl_div):  # the module rather than the function
        kl_div = getattr(kl_div, "kl_div", None)
    return (kl_div, None) if callable(kl_div) else (None, "kdkernels.functional.kl_div is not a function")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "kl_div")
    parser.add_argument("--reduction", default="batchmean", choices=["batchmean", "sum", "mean"])
    parser.add_argument("--log-target", action="store_true", help="target given as log-probabilities")
    args = parser.parse_args()
    device = H.resolve_common_args(args, H.GPU_SHAPES, H.CPU_SHAPES, ["bf16", "fp32"], ["fp32"])
    reduction, log_target = args.reduction, args.log_target
    kl_div, kl_div_missing = _kdkernels_kl_div()

    def torch_kl_div(x, y):
        return F.kl_div(x, y, reduction=reduction, log_target=log_target)

    compiled = H.CompiledCache(torch_kl_div, args.compile_static)

    def make_inputs(config: H.Config, device: torch.device, seed: int) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (config.n, config.v)
        # Normalised in fp32 and then cast: what a model's log_softmax / softmax output would be.
        x = torch.randn(shape, generator=g, device=device).mul_(3).log_softmax(-1)
        y = torch.randn(shape, generator=g, device=device).mul_(3)
        y = y.log_softmax(-1) if log_target else y.softmax(-1)
        return [x.to(config.dtype).requires_grad_(), y.to(config.dtype)]

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        def fused(x, y):
            return kl_div(x, y, reduction=reduction, log_target=log_target)

        cands = H.kdkernels_candidates(device, args.backends, fused, missing=kl_div_missing)
        cands.append(H.Candidate("eager", fn=torch_kl_div))
        cands.append(compiled.candidate(config, args.no_compile))

        def build_liger(LigerKLDIVLoss):
            return LigerKLDIVLoss(reduction=reduction, log_target=log_target)

        cands.append(H.liger_candidate("liger", device, build_liger))
        return cands

    spec = H.BenchSpec(
        name="kl_div",
        make_inputs=make_inputs,
        make_candidates=make_candidates,
        reference=H.float64_reference(torch_kl_div),
        bytes_moved=H.two_reads_one_write,  # read input, read target, write grad input
        settings={"reduction": reduction, "log_target": log_target, "target_requires_grad": False},
    )
    H.run_benchmark(spec, args, device)


if __name__ == "__main__":
    main()
