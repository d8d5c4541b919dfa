"""Plots benchmark JSONs: fwd+bwd time and peak extra memory against V, one line per candidate.

    python bench/plot.py bench/results/kd_loss_nvidia-h100-80gb-hbm3.json [more.json ...]

Writes ``<json stem>.png`` next to each JSON.  One row of panels per (dtype, N); the time panel
shows the median with a p20–p80 band, the memory panel the peak extra memory as a multiple of one
N×V fp32 tensor.  ``--markdown`` prints the README tables instead (same as ``to_markdown.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # headless: benchmark machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def groups(report: dict) -> dict[tuple[str, int], list[dict]]:
    """Configurations grouped by (dtype, N), each group sorted by V."""
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for entry in report["results"]:
        if entry.get("candidates"):
            out[(entry["dtype"], entry["N"])].append(entry)
    return {k: sorted(v, key=lambda e: e["V"]) for k, v in sorted(out.items())}


def candidate_names(report: dict) -> list[str]:
    names: list[str] = []
    for entry in report["results"]:
        for c in entry.get("candidates", []):
            if c["status"] == "ok" and c["name"] not in names:
                names.append(c["name"])
    return names


def plot_report(report: dict, png_path: str) -> None:
    grouped = groups(report)
    if not grouped:
        raise SystemExit(f"{png_path}: no measured configuration in the JSON")
    names = candidate_names(report)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(grouped), 2, figsize=(11, 3.2 * len(grouped)), squeeze=False)
    for row, ((dtype, n), entries) in enumerate(grouped.items()):
        ax_t, ax_m = axes[row]
        for name in names:
            pts = []
            for e in entries:
                c = next((c for c in e["candidates"] if c["name"] == name and c["status"] == "ok"), None)
                if c is not None:
                    t = c["time"]["fwd_bwd"]
                    pts.append((e["V"], t["median_ms"], t["p20_ms"], t["p80_ms"], c["peak_extra_x_nv_fp32"]))
            if not pts:
                continue
            vs, med, p20, p80, mem = zip(*pts)
            ax_t.plot(vs, med, "o-", color=colors[name], label=name)
            ax_t.fill_between(vs, p20, p80, color=colors[name], alpha=0.2)
            ax_m.plot(vs, mem, "o-", color=colors[name], label=name)
        for ax, ylabel in ((ax_t, "fwd+bwd ms (median, p20–p80)"), (ax_m, "peak extra / N·V fp32")):
            ax.set_title(f"{report['benchmark']} — {dtype}, N={n}", fontsize=10)
            ax.set_xlabel("V (classes)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        plain = matplotlib.ticker.FormatStrFormatter("%g")
        ax_t.yaxis.set_major_formatter(plain)
        ax_t.yaxis.set_minor_formatter(plain)
        ax_m.set_ylim(bottom=0)
        if row == 0:
            ax_t.legend(fontsize=8)
    env = report.get("environment", {})
    fig.suptitle(f"{env.get('device', '?')} — torch {env.get('torch', '?')}, kdkernels {env.get('kdkernels', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # leave room for the suptitle
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="result JSON files written by bench_*.py")
    parser.add_argument("--markdown", action="store_true", help="print the README tables instead of plotting")
    args = parser.parse_args()
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import to_markdown

        for path in args.json:
            print(to_markdown.report_markdown(path))
        return
    for path in args.json:
        with open(path) as f:
            report = json.load(f)
        png = os.path.splitext(path)[0] + ".png"
        plot_report(report, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
