"""Benchmark of ``kdkernels.functional.weighted_soft_ce`` against the composite users write.

    python bench/bench_weighted_soft_ce.py                    # CPU: N=4096, C=1000, fp32
    python bench/bench_weighted_soft_ce.py --device cuda      # GPU: N=8192, C=32000, bf16
    python bench/bench_weighted_soft_ce.py --shapes 1024x1000 --dtypes fp32 bf16 --out /tmp/wsce.json

Candidates, all on the same inputs (student logits with ``requires_grad``, frozen teacher logits,
class weights with the background class at 1.5 as in Chen et al. 2017):

* ``kdkernels[<backend>]``: the fused loss, one row per fused backend of the device
  (cpu on CPU; triton and cuda on GPU; ``--backends torch`` adds the PyTorch reference);
* ``eager``: ``-(w * F.softmax(t.float()/T, -1) * F.log_softmax(s.float()/T, -1)).sum(-1).mean()``;
* ``compile``: ``torch.compile`` of that composite.

Bytes moved (for bandwidth): one read of each input + one write of the student gradient.
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

from kdkernels.functional.weighted_soft_ce import weighted_soft_ce  # noqa: E402

GPU_SHAPES = [(8192, 32000)]
CPU_SHAPES = [(4096, 1000)]


def composite(s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    T = temperature
    s, t = H.upcast_half(s), H.upcast_half(t)  # .float() for fp16/bf16, as people write it; fp64 stays fp64
    return -(weight * F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean()


def class_weight(classes: int, device: torch.device) -> torch.Tensor:
    weight = torch.ones(classes, device=device)
    weight[0] = 1.5  # background, Chen et al. 2017
    return weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "weighted_soft_ce")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    device = H.resolve_common_args(args, GPU_SHAPES, CPU_SHAPES, ["bf16"], ["fp32"])
    T = args.temperature
    weights: dict[int, torch.Tensor] = {}

    def weight_for(classes: int) -> torch.Tensor:
        if classes not in weights:
            weights[classes] = class_weight(classes, device)
        return weights[classes]

    compiled = H.CompiledCache(lambda s, t: composite(s, t, weight_for(s.shape[-1]), T), args.compile_static)

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        w = weight_for(config.v)
        cands = H.kdkernels_candidates(device, args.backends, lambda s, t: weighted_soft_ce(s, t, w, T))
        cands.append(H.Candidate("eager", fn=lambda s, t: composite(s, t, w, T)))
        cands.append(compiled.candidate(config, args.no_compile))
        return cands

    spec = H.BenchSpec(
        name="weighted_soft_ce",
        make_inputs=H.random_logits,
        make_candidates=make_candidates,
        reference=H.float64_reference(lambda s, t: composite(s, t, weight_for(s.shape[-1]).double(), T)),
        bytes_moved=H.two_reads_one_write,  # read s, read t, write grad s
        settings={"temperature": T, "reduction": "mean", "class_weight": "ones, background 1.5", "teacher_requires_grad": False},
    )
    H.run_benchmark(spec, args, device)


if __name__ == "__main__":
    main()
