"""Benchmark of ``kdkernels.functional.fused_linear_distill_loss``: the divergence of two LM heads
computed from hidden states and weights in row blocks, against the versions that hold the logits.

    python bench/bench_fused_linear_kd.py                     # CPU: N=2048, H=1024, V=32000, fp32
    python bench/bench_fused_linear_kd.py --shapes 512x32000 --hidden 256 --divergence jsd
    python bench/bench_fused_linear_kd.py --device cuda       # GPU: N=8192, H=4096, V=128256, bf16

Inputs: student hidden states (N, H) and LM-head weight (V, H), both requiring grad; frozen
teacher hidden states and weight of the same sizes. Candidates (``bench/_harness.py``: interleaved
runs, medians, peak extra memory above the inputs):

* ``kdkernels[<backend>]``: ``fused_linear_distill_loss(h_s, W_s, h_t, W_t, divergence=...)``; on
  cuda ``kdkernels[triton]`` is the Triton ``tl.dot`` tiles (no logits beyond one tile per
  program, ``kdkernels/ops/triton/fused_linear.py``) and ``kdkernels[cuda]`` the row-block walk
  (cuBLAS GEMMs per block of rows + the CUDA C++ divergence kernel); on CPU ``kdkernels[cpu]`` is
  the row-block walk (``--backends triton`` with ``TRITON_INTERPRET=1`` would time the interpreter);
* ``eager``: ``z_s = h_s W_sᵀ``, ``z_t = h_t W_tᵀ`` materialised, then the divergence as users write
  it (``bench_divergences.composite``);
* ``compile``: ``torch.compile`` of that;
* ``chunked eager``: the same per block of rows under ``torch.utils.checkpoint`` (the logits of one
  block at a time, recomputed in the backward), the usual memory fix;
* Liger-Kernel's ``LigerFusedLinearJSDLoss`` on GPU where installed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.checkpoint import checkpoint

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]
import _harness as H  # noqa: E402
from bench_divergences import composite  # noqa: E402

from kdkernels.functional import fused_linear_distill_loss  # noqa: E402

GPU_SHAPES = [(8192, 128256)]
CPU_SHAPES = [(2048, 32000)]
CHUNK_ROWS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "fused_linear_kd")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H (default: cpu 1024, cuda 4096)")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    device = H.resolve_common_args(args, GPU_SHAPES, CPU_SHAPES, ["bf16"], ["fp32"])
    hidden = args.hidden or (4096 if device.type == "cuda" else 1024)
    div, beta, T = args.divergence, args.beta, args.temperature

    def eager(h_s, w_s, h_t, w_t):
        return composite(h_s @ w_s.T, h_t @ w_t.T, div, beta, T)

    def chunked(h_s, w_s, h_t, w_t):
        n = h_s.shape[0]
        total = 0
        for r0 in range(0, n, CHUNK_ROWS):
            rows = slice(r0, r0 + CHUNK_ROWS)
            # composite() is a batchmean over its rows: weight each block by its share of N.
            part = checkpoint(eager, h_s[rows], w_s, h_t[rows], w_t, use_reentrant=False)
            total = total + part * (min(n, r0 + CHUNK_ROWS) - r0) / n
        return total

    compiled = H.CompiledCache(eager, args.compile_static)

    def make_inputs(config: H.Config, device: torch.device, seed: int) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale):
            return torch.randn(*shape, generator=g, device=device, dtype=config.dtype) * scale

        # Logits of std ~3, as the other benchmarks' (hidden ~ N(0, 1), weights ~ N(0, 9/H)).
        w = 3.0 / hidden**0.5
        return [randn(config.n, hidden, scale=1.0).requires_grad_(), randn(config.v, hidden, scale=w).requires_grad_(),
                randn(config.n, hidden, scale=1.0), randn(config.v, hidden, scale=w)]

    def reference(inputs):
        h_s, w_s, h_t, w_t = (x.detach().double() for x in inputs)
        h_s.requires_grad_()
        w_s.requires_grad_()
        loss = eager(h_s, w_s, h_t, w_t)
        loss.backward()
        return loss.detach(), [h_s.grad, w_s.grad]

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        fused = H.kdkernels_candidates(
            device, args.backends,
            lambda h_s, w_s, h_t, w_t: fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence=div, beta=beta, temperature=T),
        )
        liger = H.liger_candidate("liger fused linear JSD", device, lambda _kl_class: _liger_jsd(beta, T)) if div == "jsd" else None
        cands = fused + [H.Candidate("eager", fn=eager), compiled.candidate(config, args.no_compile),
                         H.Candidate("chunked eager", fn=chunked, note=f"{CHUNK_ROWS} rows per checkpointed block")]
        return cands + ([liger] if liger is not None else [])

    def bytes_moved(config: H.Config) -> int:
        # Read both heads' hidden states and weights, write the student's two gradients.
        elem = torch.empty((), dtype=config.dtype).element_size()
        return 3 * (config.n + config.v) * hidden * elem

    spec = H.BenchSpec(
        name="fused_linear_kd",
        make_inputs=make_inputs,
        make_candidates=make_candidates,
        reference=reference,
        bytes_moved=bytes_moved,
        settings={"divergence": div, "beta": beta, "temperature": T, "hidden": hidden, "reduction": "batchmean",
                  "teacher_requires_grad": False, "chunked_eager_rows": CHUNK_ROWS},
    )
    H.run_benchmark(spec, args, device)


def _liger_jsd(beta: float, temperature: float):
    from liger_kernel.transformers import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(jsd_beta=beta, temperature=temperature)
    return lambda h_s, w_s, h_t, w_t: loss(h_s, w_s, h_t, w_t)


if __name__ == "__main__":
    main()
