"""Benchmark of the LLM divergence family (``kdkernels.functional.distill_loss`` with a dense
teacher) against the composites users write, and against ``kd_loss`` on the same logits.

    python bench/bench_divergences.py                       # CPU: N=512, V=32000, fp32, every divergence
    python bench/bench_divergences.py --divergences jsd tvd --shapes 256x32000
    python bench/bench_divergences.py --device cuda         # GPU grid (Triton)
    python bench/bench_divergences.py --out bench/results/divergences_cpu.json

One harness run per divergence (``bench/_harness.py``: candidates interleaved run by run, medians,
peak extra memory, the memory-copy roofline on CPU), then one summary table of all of them. The
candidates of a divergence, on the same inputs (student logits with ``requires_grad``, frozen
teacher logits, T = 2, T² scaling, batchmean):

* ``kdkernels[<backend>]``: ``distill_loss(s, t, divergence=..., beta=..., temperature=2)``;
* ``kd_loss[<backend>]``: ``kdkernels.functional.kd_loss(s, t, temperature=2)`` (forward KL), the
  yardstick of the issue's "within 1.3× of kd_loss on the same shape and backend";
* ``eager``: the divergence as people write it (``F.log_softmax`` of both, ``F.kl_div(...,
  log_target=True)``, the mixture by ``torch.logsumexp`` as TRL's GKD does), in fp32;
* ``compile``: ``torch.compile`` of that composite.

β: 0.5 for the JSD (TRL's default), 0.1 for the skew KLs. Bytes moved (for bandwidth): one read of
each input + one write of the student gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]
import _harness as H  # noqa: E402

from kdkernels.functional import distill_loss, kd_loss  # noqa: E402

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BETA = {"jsd": 0.5, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.1}
GPU_SHAPES = [(4096, 128256), (8192, 32000)]
CPU_SHAPES = [(512, 32000)]
TEMPERATURE = 2.0


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), as TRL's GKD writes it."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def composite(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float, T: float) -> torch.Tensor:
    """The divergence per position, T²-scaled, batchmean: the eager code users write."""
    s, t = H.upcast_half(s), H.upcast_half(t)
    log_p = F.log_softmax(s / T, -1)  # student
    log_q = F.log_softmax(t / T, -1)  # teacher

    def kl(log_x, log_y):  # KL(x ‖ y) per position
        return F.kl_div(log_y, log_x, reduction="none", log_target=True).sum(-1)

    if divergence == "forward_kl":
        per_position = kl(log_q, log_p)
    elif divergence == "reverse_kl":
        per_position = kl(log_p, log_q)
    elif divergence == "jsd":
        log_m = _log_mixture(log_q, log_p, beta)
        per_position = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    elif divergence == "skew_forward_kl":
        per_position = kl(log_q, _log_mixture(log_q, log_p, beta))
    elif divergence == "skew_reverse_kl":
        per_position = kl(log_p, _log_mixture(log_p, log_q, beta))
    else:  # tvd
        per_position = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
    return per_position.sum() * (T * T) / per_position.numel()


def run_divergence(divergence: str, args, device: torch.device) -> dict:
    beta = BETA.get(divergence, 0.5)
    T = TEMPERATURE
    compiled = H.CompiledCache(lambda s, t: composite(s, t, divergence, beta, T), args.compile_static)

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        fused = H.kdkernels_candidates(
            device, args.backends, lambda s, t: distill_loss(s, t, divergence=divergence, beta=beta, temperature=T)
        )
        yardsticks = H.kdkernels_candidates(device, args.backends, lambda s, t: kd_loss(s, t, temperature=T))
        for cand in yardsticks:  # forward KL by kd_loss, with its own reference
            cand.name = cand.name.replace("kdkernels", "kd_loss")
            cand.is_kdkernels = False
            cand.note = "forward KL by kd_loss: the yardstick"
            cand.reference = H.float64_reference(lambda s, t: composite(s, t, "forward_kl", 0.5, T))
        eager = H.Candidate("eager", fn=lambda s, t: composite(s, t, divergence, beta, T))
        return fused + yardsticks + [eager, compiled.candidate(config, args.no_compile)]

    spec = H.BenchSpec(
        name=f"divergences_{divergence}",
        make_inputs=H.random_logits,
        make_candidates=make_candidates,
        reference=H.float64_reference(lambda s, t: composite(s, t, divergence, beta, T)),
        bytes_moved=H.two_reads_one_write,
        settings={"divergence": divergence, "beta": beta, "temperature": T, "scale_by_t2": True,
                  "reduction": "batchmean", "teacher_requires_grad": False},
    )
    out = args.out
    args.out = None  # each divergence's own report goes to bench/out/ (ignored); --out gets them all
    try:
        return H.run_benchmark(spec, args, device)
    finally:
        args.out = out


def summary(reports: dict[str, dict]) -> str:
    """One row per divergence and configuration: the fused loss's time against each baseline."""
    lines = [
        "| divergence | shape | kdkernels ms | kd_loss ms | ÷ kd_loss | eager ms | eager ÷ ours | compile ms | compile ÷ ours "
        "| peak extra MiB (ours / eager / compile) | grad MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for divergence, report in reports.items():
        for entry in report["results"]:
            by_name = {c["name"]: c for c in entry["candidates"]}
            ours = next((c for c in entry["candidates"] if c["is_kdkernels"] and c.get("time")), None)
            if ours is None:
                continue
            backend = ours["name"][len("kdkernels"):]
            ms = lambda c: c["time"]["fwd_bwd"]["median_ms"] if c and c.get("time") else None  # noqa: E731
            mib = lambda c: f"{c['peak_extra_bytes'] / 2**20:,.0f}" if c and "peak_extra_bytes" in c else "–"  # noqa: E731
            fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
            t_ours, t_kd = ms(ours), ms(by_name.get(f"kd_loss{backend}"))
            t_eager, t_comp = ms(by_name.get("eager")), ms(by_name.get("compile"))
            grad_mib = entry["N"] * entry["V"] * torch.empty((), dtype=H.DTYPES[entry["dtype"]]).element_size() / 2**20
            lines.append(
                f"| {divergence} | {entry['label']} | {fmt(t_ours)} | {fmt(t_kd)} | {fmt(t_ours / t_kd if t_kd else None)} "
                f"| {fmt(t_eager)} | {fmt(t_eager / t_ours if t_eager else None)} | {fmt(t_comp)} "
                f"| {fmt(t_comp / t_ours if t_comp else None)} "
                f"| {mib(ours)} / {mib(by_name.get('eager'))} / {mib(by_name.get('compile'))} | {grad_mib:,.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "divergences")
    parser.add_argument("--divergences", nargs="+", default=DIVERGENCES, choices=DIVERGENCES)
    args = parser.parse_args()
    device = H.resolve_common_args(args, GPU_SHAPES, CPU_SHAPES, ["bf16"], ["fp32"])
    reports = {d: run_divergence(d, args, device) for d in args.divergences}
    table = summary(reports)
    print("\n" + table)
    out = args.out or H.default_out_path("divergences", device, H.environment(device)["device"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": "divergences", "command": " ".join(sys.argv), "summary_markdown": table, "reports": reports},
                  f, indent=1, allow_nan=True)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"`{' '.join(['python'] + sys.argv)}`\n\n{table}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
