"""Benchmark of ``kdkernels.functional.kd_loss`` against the ways users write the KD loss today.

    python bench/bench_kd_loss.py                       # CPU: N=512, V=32000, fp32 (about a minute)
    python bench/bench_kd_loss.py --device cuda         # GPU: BT x V grid, bf16 and fp32
    python bench/bench_kd_loss.py --shapes 256x4096 --dtypes fp32 bf16 --out /tmp/kd.json

Candidates, all on the same inputs (student logits with ``requires_grad``, frozen teacher logits):

* ``kdkernels[<backend>]``: the fused loss, one row per fused backend of the device
  (cpu on CPU; triton and cuda on GPU; ``--backends torch`` adds the PyTorch reference);
* ``eager``: ``T*T*F.kl_div(F.log_softmax(s.float()/T, -1), F.softmax(t.float()/T, -1),
  reduction="batchmean")`` -- the composite as people write it, upcasting half inputs;
* ``compile``: ``torch.compile`` of that composite;
* ``liger``: Liger-Kernel's ``LigerKLDIVLoss(reduction="batchmean", log_target=True)`` on
  ``log_softmax(s.float()/T)`` and ``log_softmax(t.float()/T)``, ×T² (GPU only, when installed).

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

from kdkernels.functional import kd_loss  # noqa: E402


def composite(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    T = temperature
    s, t = H.upcast_half(s), H.upcast_half(t)  # .float() for fp16/bf16, as people write it; fp64 stays fp64
    return T * T * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "kd_loss")
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()
    device = H.resolve_common_args(args, H.GPU_SHAPES, H.CPU_SHAPES, ["bf16", "fp32"], ["fp32"])
    T = args.temperature
    compiled = H.CompiledCache(lambda s, t: composite(s, t, T), args.compile_static)

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        cands = H.kdkernels_candidates(device, args.backends, lambda s, t: kd_loss(s, t, T))
        cands.append(H.Candidate("eager", fn=lambda s, t: composite(s, t, T)))
        cands.append(compiled.candidate(config, args.no_compile))

        def build_liger(LigerKLDIVLoss):
            loss_mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)

            def liger(s, t):
                return T * T * loss_mod(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1))

            return liger

        cands.append(H.liger_candidate("liger", device, build_liger))
        return cands

    spec = H.BenchSpec(
        name="kd_loss",
        make_inputs=H.random_logits,  # std 3: soft, but far from uniform, at T=4
        make_candidates=make_candidates,
        reference=H.float64_reference(lambda s, t: composite(s, t, T)),
        bytes_moved=H.two_reads_one_write,  # read s, read t, write grad s
        settings={"temperature": T, "reduction": "batchmean", "teacher_requires_grad": False},
    )
    H.run_benchmark(spec, args, device)


if __name__ == "__main__":
    main()
