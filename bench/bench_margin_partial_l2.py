"""Benchmark of ``kdkernels.functional.margin_partial_l2`` (Overhaul of Feature Distillation)
against the official code's composite.

    python bench/bench_margin_partial_l2.py                      # CPU: (64, 256, 56, 56) fp32, 2 threads
    python bench/bench_margin_partial_l2.py --device cuda        # GPU: ResNet-50 stage shapes, bf16 and fp32
    python bench/bench_margin_partial_l2.py --features 128x512x28x28 --channels-last --dtypes fp32

Inputs: student feature (N, C, H, W) with ``requires_grad`` (contiguous, or channels_last with
``--channels-last``), teacher feature of the same shape, per-channel margins (C,) in (-1.5, 0).
In the tables, N is the batch and V = C·H·W the features per sample. Candidates:

* ``kdkernels[<backend>]``: the fused loss, one row per fused backend of the device;
* ``eager``: clovaai/overhaul-distillation's ``distillation_loss``:
  ``t = max(t, m); l = mse_loss(s, t, reduction="none"); (l * ((s > t) | (t > 0)).float()).sum()``;
* ``compile``: ``torch.compile`` of that composite.

Bytes moved (for bandwidth): one read of student and teacher + one write of the student gradient.
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

from kdkernels.functional.margin_partial_l2 import margin_partial_l2  # noqa: E402

CPU_FEATURES = ["64x256x56x56"]
# ResNet-50 stage outputs at batch 64 and 256 (ImageNet, 224²).
GPU_FEATURES = [f"{n}x{c}x{h}x{h}" for n in (64, 256) for c, h in ((256, 56), (512, 28), (1024, 14), (2048, 7))]


def composite(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The official code (``distiller.py``), with the margin as a (1, C, 1, 1) view."""
    t = torch.max(t, m.view(1, -1, 1, 1))
    loss = F.mse_loss(s, t, reduction="none")
    loss = loss * ((s > t) | (t > 0)).float()
    return loss.sum()


def _parse_features(texts: list[str]) -> dict[tuple[int, int], tuple[int, int, int]]:
    dims = {}
    for text in texts:
        try:
            n, c, h, w = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--features: expected NxCxHxW like 64x256x56x56, got {text!r}") from None
        dims[(n, c * h * w)] = (c, h, w)
    return dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "margin_partial_l2")
    parser.add_argument("--features", nargs="+", default=None, help="NxCxHxW feature shapes (replaces --shapes)")
    parser.add_argument("--channels-last", action="store_true", help="student and teacher in channels_last")
    args = parser.parse_args()
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dims = _parse_features(args.features or (GPU_FEATURES if cuda else CPU_FEATURES))
    args.shapes = [f"{n}x{v}" for n, v in dims]
    device = H.resolve_common_args(args, None, None, ["bf16", "fp32"], ["fp32"])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    compiled = H.CompiledCache(composite, args.compile_static)

    def make_inputs(config: H.Config, device: torch.device, seed: int) -> list[torch.Tensor]:
        c, h, w = dims[(config.n, config.v)]
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (config.n, c, h, w)
        s = torch.randn(shape, generator=g, device=device, dtype=config.dtype)
        t = torch.randn(shape, generator=g, device=device, dtype=config.dtype)
        s = s.contiguous(memory_format=memory_format).requires_grad_()
        t = t.contiguous(memory_format=memory_format)
        m = -1.5 * torch.rand(c, generator=g, device=device)
        return [s, t, m]

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        cands = H.kdkernels_candidates(device, args.backends, margin_partial_l2)
        cands.append(H.Candidate("eager", fn=composite))
        cands.append(compiled.candidate(config, args.no_compile))
        return cands

    spec = H.BenchSpec(
        name="margin_partial_l2",
        make_inputs=make_inputs,
        make_candidates=make_candidates,
        reference=H.float64_reference(composite),
        bytes_moved=H.two_reads_one_write,  # read s, read t, write grad s
        settings={
            "reduction": "sum",
            "layout": "channels_last" if args.channels_last else "contiguous (NCHW)",
            "features": {f"{n}x{v}": dims[(n, v)] for n, v in dims},
            "teacher_requires_grad": False,
        },
    )
    H.run_benchmark(spec, args, device)


if __name__ == "__main__":
    main()
