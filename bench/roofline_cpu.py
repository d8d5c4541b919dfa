"""The three CPU softmax/KL losses against the memory-copy roofline, in one process.

    python bench/roofline_cpu.py --threads 2                 # N=512, V=32000 fp32, 5 rounds
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/roofline_cpu.py --threads 2

Times, with the benchmarks' harness (``_harness.time_interleaved``: the candidates take turns run
by run, the order rotating), the harness's roofline (``roofline_fn``: ``torch.add(s, t, out=g)``,
read two N×V tensors, write one into a buffer made once: the least a fused pass must move) and the
fwd+bwd of ``kd_loss``, ``weighted_soft_ce`` (class weights, background 1.5) and ``kl_div``
(batchmean, on log-probabilities / probabilities, with its own roofline on those inputs); the
gradients are set to ``None`` before each run, so every run writes a fresh gradient as after
``optimizer.zero_grad()``. Prints one line: the fwd+bwd medians and each loss's share of its
roofline.

The per-loss scripts (``bench_<loss>.py``) measure more (eager and compiled baselines, memory) one
loss per process; this one exists because on a shared machine the roofline's speed can differ
from process to process (bench/results/roofline_cpu/README.md), and the ratio is only meaningful
when both sides ran in the same process, in turn.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]  # the harness; the checkout's kdkernels, installed or not
import _harness as H  # noqa: E402
import kdkernels.functional as F  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the measurement and prints its line; returns each loss's share of the roofline."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25, help="timed runs per candidate and mode")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.n, args.v, generator=g).requires_grad_()
    t = torch.randn(args.n, args.v, generator=g)
    weight = torch.ones(args.v)
    weight[0] = 1.5
    x = (torch.randn(args.n, args.v, generator=g) * 3).log_softmax(-1).requires_grad_()
    y = (torch.randn(args.n, args.v, generator=g) * 3).softmax(-1)
    add_logits, add_probabilities = H.roofline_fn([s, t]), H.roofline_fn([x, y])

    # Every candidate gets (s, t, x, y): the harness clears the gradients of all of them per run.
    candidates = {
        "roofline": lambda s, t, x, y: add_logits(s, t),
        "kd_loss": lambda s, t, x, y: F.kd_loss(s, t, temperature=4.0),
        "weighted_soft_ce": lambda s, t, x, y: F.weighted_soft_ce(s, t, weight, 4.0),
        "roofline (kl_div inputs)": lambda s, t, x, y: add_probabilities(x, y),
        "kl_div": lambda s, t, x, y: F.kl_div(x, y, reduction="batchmean"),
    }
    timings = H.time_interleaved(candidates, [[s, t, x, y]], torch.device("cpu"), args.warmup, args.repeats)
    for name, result in timings.items():
        if isinstance(result, BaseException):
            raise RuntimeError(f"{name} failed") from result
    med = {name: result["fwd_bwd"]["median_ms"] for name, result in timings.items()}
    share = {
        "kd_loss": med["roofline"] / med["kd_loss"],
        "weighted_soft_ce": med["roofline"] / med["weighted_soft_ce"],
        "kl_div": med["roofline (kl_div inputs)"] / med["kl_div"],
    }
    print(
        f"threads {args.threads}, {args.n} x {args.v} fp32, preload {os.environ.get('LD_PRELOAD', '-')}: "
        + " | ".join(f"{name} {ms:.2f} ms" for name, ms in med.items())
        + " | % of roofline: "
        + ", ".join(f"{name} {r:.0%}" for name, r in share.items()),
        flush=True,
    )
    return share


if __name__ == "__main__":
    main()
