"""Benchmark of the memory-lean relational losses against their eager formulas (CPU).

    python bench/bench_relational.py                       # writes bench/out/relational_cpu.{json,md,png}
    python bench/bench_relational.py --out bench/results   # the committed run
    python bench/bench_relational.py --pairwise-n 1024 4096 --rkd-b 256 --repeats 3

Two families, one forward + backward per run (student requires grad, teacher frozen):

* pair-wise similarity (structured KD): ``pairwise_similarity_loss`` on (B, N, C) node features,
  B = 2, C = 128, across N. ``eager`` is the official ``sim_dis_compute`` (two N×N similarity
  matrices per sample), ``tiled`` the kdkernels cpu backend (no N×N matrix).
* RKD angle: ``rkd_angle_loss`` on (B, D) embeddings, D = 128, across B. ``eager`` is the official
  ``RKdAngle`` (B×B×D differences, two B×B×B angle tensors), ``tiled`` the cpu backend.

Measured per configuration and candidate:

* time: median (and p20 / p80) of ``--repeats`` fwd+bwd runs after one warm-up, the candidates
  taking turns run by run (the machine is shared: load falls on both alike);
* peak extra memory of one fwd+bwd above what was allocated before it (gradient included), from
  the CPU allocator's events in the torch profiler (``bench/_harness.cpu_peak_extra_bytes``);
* the relative difference of the two losses.

The process runs under an address-space cap (``--memory-cap-gib`` above what it has mapped at the
start, default 6 GiB; 0 = none): on a shared machine the eager formula at B = 1024 (4 GiB per
B³ fp32 tensor) would otherwise push everything else into swap or the OOM killer. A candidate that
cannot allocate within the cap is reported as ``cannot allocate`` with the error; the other one
still runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
import time

import torch
import torch.nn.functional as F

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]
import _harness as H  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss  # noqa: E402
from kdkernels.functional.rkd_angle import rkd_angle_loss  # noqa: E402

MiB = 1 << 20


# The official formulas, as written in their repositories (reimplemented, same operations).
def eager_pairwise(student, teacher):
    """irfanICMLL/structure_knowledge_distillation sim_dis_compute on (B, N, C) nodes."""

    def similarity(feat):
        feat = feat.float()
        norm = (feat.pow(2).sum(dim=2, keepdim=True) ** 0.5).detach() + 1e-8
        feat = feat / norm
        return torch.bmm(feat, feat.transpose(1, 2))

    n = student.shape[1]
    return ((similarity(teacher) - similarity(student)) ** 2 / n**2 / student.shape[0]).sum()


def eager_rkd_angle(student, teacher):
    """lenscloth/RKD RKdAngle."""
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def tiled(loss_fn):
    def run(student, teacher):
        with kdkernels.use_backend("cpu"):
            return loss_fn(student, teacher)

    return run


def cap_address_space(gib: float) -> str:
    if gib <= 0:
        return "none"
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return f"RLIMIT_AS = mapped at start ({vm / (1 << 30):.2f} GiB) + {gib:g} GiB"


def fwd_bwd_ms(fn, student, teacher) -> float:
    student.grad = None
    t0 = time.perf_counter()
    fn(student, teacher).backward()
    ms = (time.perf_counter() - t0) * 1e3
    student.grad = None
    return ms


def measure(config: dict, candidates: dict, student, teacher, repeats: int) -> dict:
    results = {name: {} for name in candidates}
    live = dict(candidates)
    for name, fn in list(live.items()):  # memory first (one run each), then it doubles as warm-up
        try:
            student.grad = None
            results[name]["loss"] = float(fn(student, teacher).detach())
            results[name]["peak_extra_mib"] = H.cpu_peak_extra_bytes(lambda: fn(student, teacher).backward()) / MiB
        except (RuntimeError, MemoryError) as exc:
            results[name] = {"error": f"cannot allocate: {str(exc).splitlines()[0][:160]}"}
            del live[name]
        student.grad = None
    times = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            times[name].append(fwd_bwd_ms(fn, student, teacher))
    for name in live:
        results[name].update(H.summarize_ms(times[name]))
    if all("loss" in results[n] for n in candidates):
        a, b = (results[n]["loss"] for n in candidates)
        config["loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-30)
    config["candidates"] = results
    return config


def fmt(result: dict, key: str, spec: str) -> str:
    return "cannot allocate" if "error" in result else format(result[key], spec)


def markdown(rows: list[dict]) -> str:
    lines = []
    for family, size in (("pairwise", "N"), ("rkd_angle", "B")):
        sel = [r for r in rows if r["family"] == family]
        if not sel:
            continue
        lines += [
            f"\n**{family}** ({sel[0]['shape_note']})\n",
            f"| {size} | tiled ms (median) | eager ms (median) | speed-up | tiled peak MiB | eager peak MiB | loss rel. diff |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sel:
            t, e = r["candidates"]["tiled"], r["candidates"]["eager"]
            speed = f"{e['median_ms'] / t['median_ms']:.2f}×" if "error" not in t and "error" not in e else "–"
            diff = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "–"
            lines.append(
                f"| {r['size']} | {fmt(t, 'median_ms', '.1f')} | {fmt(e, 'median_ms', '.1f')} | {speed} | "
                f"{fmt(t, 'peak_extra_mib', '.2f')} | {fmt(e, 'peak_extra_mib', '.1f')} | {diff} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (family, size) in enumerate((("pairwise", "N (nodes)"), ("rkd_angle", "B (batch)"))):
        sel = [r for r in rows if r["family"] == family]
        for row, (key, label) in enumerate((("peak_extra_mib", "peak extra memory (MiB)"), ("median_ms", "fwd+bwd time (ms, median)"))):
            ax = axes[row][col]
            for name, style in (("tiled", "o-"), ("eager", "s--")):
                pts = [(r["size"], r["candidates"][name][key]) for r in sel if "error" not in r["candidates"][name]]
                if pts:
                    ax.plot(*zip(*pts), style, label=name)
                failed = [r["size"] for r in sel if "error" in r["candidates"][name]]
                for x in failed:
                    ax.axvline(x, color="red", alpha=0.3)
                    ax.annotate(f"{name}: cannot allocate", (x, ax.get_ylim()[1]), rotation=90, va="top", ha="right",
                                fontsize=7, color="red")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(size)
            ax.set_ylabel(label)
            ax.set_title(f"{family} ({sel[0]['shape_note']})" if sel else family, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(_BENCH, "out"), help="output folder (default bench/out)")
    parser.add_argument("--pairwise-n", type=int, nargs="*", default=[256, 1024, 2048, 4096])
    parser.add_argument("--pairwise-b", type=int, default=2)
    parser.add_argument("--pairwise-c", type=int, default=128)
    parser.add_argument("--rkd-b", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--rkd-d", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    # One thread by default: on a shared machine a second OpenMP thread mostly waits for a busy core.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-cap-gib", type=float, default=6.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cap = cap_address_space(args.memory_cap_gib)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "relational_cpu")
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "memory_cap": cap,
        "repeats": args.repeats,
    }
    rows: list[dict] = []

    def save():
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    torch.manual_seed(0)
    configs = [("pairwise", n) for n in args.pairwise_n] + [("rkd_angle", b) for b in args.rkd_b]
    for family, size in configs:
        if family == "pairwise":
            student = torch.randn(args.pairwise_b, size, args.pairwise_c, requires_grad=True)
            teacher = torch.randn(args.pairwise_b, size, args.pairwise_c)
            candidates = {"tiled": tiled(pairwise_similarity_loss), "eager": eager_pairwise}
            note = f"B={args.pairwise_b}, C={args.pairwise_c}, fp32"
        else:
            student = torch.randn(size, args.rkd_d, requires_grad=True)
            teacher = torch.randn(size, args.rkd_d)
            candidates = {"tiled": tiled(rkd_angle_loss), "eager": eager_rkd_angle}
            note = f"D={args.rkd_d}, fp32"
        print(f"{family} {size} ...", flush=True)
        rows.append(measure({"family": family, "size": size, "shape_note": note}, candidates, student, teacher, args.repeats))
        for name, r in rows[-1]["candidates"].items():
            print(f"  {name}: " + (r["error"] if "error" in r else f"{r['median_ms']:.1f} ms, {r['peak_extra_mib']:.2f} MiB"), flush=True)
        del student, teacher
        save()
    meta["load_average_at_end"] = os.getloadavg()
    save()
    table = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, {args.threads} thread(s), "
                f"{meta['cpu_capability']}, memory cap: {cap}\n{table}")
    plot(rows, stem + ".png")
    print(table)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
