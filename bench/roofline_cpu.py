"""The three CPU softmax/KL losses against the memory-copy roofline, in one process.

    python bench/roofline_cpu.py --threads 2                 # N=512, V=32000 fp32, 5 rounds
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/roofline_cpu.py --threads 2

Times, in turn and round after round, ``torch.add(s, t, out=g)`` (read two N×V tensors, write one
into a buffer made once: the least a fused pass must move) and the fwd+bwd of ``kd_loss``,
``weighted_soft_ce`` (class weights, background 1.5) and ``kl_div`` (batchmean, on
log-probabilities / probabilities, with its own roofline on those inputs); the student gradient
is set to ``None`` before each run, so every run writes a fresh gradient as after
``optimizer.zero_grad()``. Prints one line: the medians and each loss's share of the roofline.

The per-loss scripts (``bench_<loss>.py``) measure more (eager and compiled baselines, memory) one
loss per process; this one exists because on a shared machine the roofline's speed can differ
from process to process (bench/results/roofline_cpu/README.md), and the ratio is only meaningful
when both sides ran in the same process, in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_BENCH)]  # the checkout's kdkernels, installed or not
import kdkernels.functional as F  # noqa: E402


def median_ms(fn, clear, runs: int) -> float:
    times = []
    for _ in range(runs + 1):  # the first run is a warm-up
        clear()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the measurement and prints its line; returns each loss's share of the roofline."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=27, help="timed runs per candidate and round")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.n, args.v, generator=g).requires_grad_()
    t = torch.randn(args.n, args.v, generator=g)
    weight = torch.ones(args.v)
    weight[0] = 1.5
    x = (torch.randn(args.n, args.v, generator=g) * 3).log_softmax(-1).requires_grad_()
    y = (torch.randn(args.n, args.v, generator=g) * 3).softmax(-1)
    out, out_kl = torch.empty_like(t), torch.empty_like(y)

    def clear():
        s.grad = None
        x.grad = None

    candidates = {
        "roofline": lambda: torch.add(s.detach(), t, out=out),
        "kd_loss": lambda: F.kd_loss(s, t, temperature=4.0).backward(),
        "weighted_soft_ce": lambda: F.weighted_soft_ce(s, t, weight, 4.0).backward(),
        "roofline (kl_div inputs)": lambda: torch.add(x.detach(), y, out=out_kl),
        "kl_div": lambda: F.kl_div(x, y, reduction="batchmean").backward(),
    }
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            times[name].append(median_ms(fn, clear, args.runs))
    med = {name: statistics.median(v) for name, v in times.items()}
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
