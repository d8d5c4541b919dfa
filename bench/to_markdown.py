"""Prints the README tables of benchmark JSONs.

    python bench/to_markdown.py bench/results/kd_loss_nvidia-h100-80gb-hbm3.json          # summary
    python bench/to_markdown.py --full bench/results/kd_loss_nvidia-h100-80gb-hbm3.json   # + per-shape tables

The summary has one row per configuration: fwd+bwd median per candidate, each baseline's time over
the default kdkernels backend's, the achieved bandwidth of that backend, and the peak extra memory
of every candidate as a multiple of one N×V fp32 tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _names(report: dict) -> tuple[list[str], str | None]:
    names: list[str] = []
    primary = None
    for entry in report["results"]:
        for c in entry.get("candidates", []):
            if c["status"] == "ok" and c["name"] not in names:
                names.append(c["name"])
        primary = primary or (entry.get("ratios") or {}).get("primary")
    return names, primary


def header(report: dict) -> str:
    env = report.get("environment", {})
    peaks = report.get("peak_bandwidth", {})
    bw = f"copy {peaks['copy_Bps'] / 1e9:,.0f} GB/s" if peaks.get("copy_Bps") else ""
    if peaks.get("datasheet_Bps"):
        bw += f", datasheet {peaks['datasheet_label']} {peaks['datasheet_Bps'] / 1e9:,.0f} GB/s"
    settings = report.get("settings", {})
    shown = {k: v for k, v in settings.items() if k in ("temperature", "reduction", "log_target", "compile", "repeats")}
    return "\n".join(
        [
            f"### {report['benchmark']} — {env.get('device', '?')}",
            "",
            f"torch {env.get('torch')}, triton {env.get('triton')}, kdkernels {env.get('kdkernels')}, "
            f"Liger-Kernel {env.get('liger_kernel') or 'not installed'}; driver {env.get('driver') or 'n/a'}; "
            f"peak bandwidth: {bw}; {', '.join(f'{k}={v}' for k, v in shown.items())}",
            "",
            f"`{env.get('command', '?')}` ({env.get('date_utc', '?')})",
        ]
    )


def summary_table(report: dict) -> str:
    names, primary = _names(report)
    if not names:
        skipped = report.get("skipped_configs") or []
        return "(no candidate ran)" + ("; not run (time budget): " + ", ".join(skipped) if skipped else "")
    baselines = [n for n in names if n != primary and not n.startswith("kdkernels")]
    use_datasheet = bool(report.get("peak_bandwidth", {}).get("datasheet_Bps"))
    bw_label = "% datasheet BW" if use_datasheet else "% copy BW"
    cols = ["N", "V", "dtype"] + [f"{n} ms" for n in names]
    cols += [f"{b} / {primary}" for b in baselines] if primary else []
    cols += [f"{primary} {bw_label}"] if primary else []
    cols += ["peak extra × N·V fp32 (" + " / ".join(names) + ")"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for entry in report["results"]:
        by_name = {c["name"]: c for c in entry.get("candidates", [])}

        def cell_time(n):
            c = by_name.get(n)
            if c is None:
                return "–"
            if c["status"] != "ok":
                return c["status"]
            flag = "" if (c.get("check") or {}).get("ok", True) else " ⚠"
            return f"{c['time']['fwd_bwd']['median_ms']:.3f}{flag}"

        row = [str(entry["N"]), str(entry["V"]), entry["dtype"]] + [cell_time(n) for n in names]
        if primary:
            ratios = (entry.get("ratios") or {}).get("time", {})
            for b in baselines:
                r = ratios.get(f"{b} / {primary}")
                row.append("–" if r is None else f"{r:.2f}×")
            p = by_name.get(primary)
            frac = None if p is None or p["status"] != "ok" else p.get("frac_datasheet_bw" if use_datasheet else "frac_copy_bw")
            row.append("–" if frac is None else f"{100 * frac:.0f}%")
        mems = []
        for n in names:
            c = by_name.get(n)
            mems.append(f"{c['peak_extra_x_nv_fp32']:.2f}" if c and c["status"] == "ok" else "–")
        row.append(" / ".join(mems))
        lines.append("| " + " | ".join(row) + " |")
    failed = any(
        c["status"] == "ok" and not (c.get("check") or {}).get("ok", True) for e in report["results"] for c in e.get("candidates", [])
    )
    notes = [""] + (["⚠ = failed the correctness check (relative L2 error against the float64 composite above the tolerance)."] if failed else [])
    skipped = {c["name"]: c.get("reason") for e in report["results"] for c in e.get("candidates", []) if c["status"] == "skipped"}
    for name, reason in skipped.items():
        if name not in names:
            notes.append(f"`{name}` not run: {reason}")
    if report.get("skipped_configs"):
        notes.append("Not run (time budget): " + ", ".join(report["skipped_configs"]))
    return "\n".join(lines + notes)


def report_markdown(path: str, full: bool = False) -> str:
    with open(path) as f:
        report = json.load(f)
    parts = [header(report), "", summary_table(report)]
    if full:
        import _harness

        parts += [""] + [_harness.markdown_table(e) + "\n" for e in report["results"] if e.get("candidates")]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--full", action="store_true", help="also print every configuration's detailed table")
    args = parser.parse_args()
    print("\n\n".join(report_markdown(p, args.full) for p in args.json))


if __name__ == "__main__":
    main()
