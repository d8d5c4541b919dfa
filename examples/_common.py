"""What several examples do alike at the end of a run: the spread over seeds, the paired
differences from a baseline run of the same seed, the arguments as JSON, and the table and results
written to ``--out``.

Not an example itself. An example imports it as a sibling module: ``python examples/<name>.py``
puts ``examples/`` first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Sequence


def add_run_flags(parser: argparse.ArgumentParser, *, seeds: int, out: str) -> None:
    """The flags of a seeded comparison run: ``--synthetic``, ``--seeds``, ``--threads``, ``--out``
    and ``--quiet``, with this example's number of seeds and output folder as defaults."""
    parser.add_argument("--synthetic", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: on a busy shared machine, more threads stall at OpenMP barriers)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def save_figure(fig, path: Path) -> None:
    """Lays the figure out, writes it at 120 dpi and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spread(values: list[float]) -> float:
    """The sample standard deviation over seeds; 0.0 for a single seed (e.g. a ``--synthetic`` run)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(differences: Sequence[float]) -> dict:
    """Statistics of per-seed paired differences (a variant's score − the same seed's baseline):
    ``{"mean", "sd", "better", "worse", "p"}`` — the mean, the sample standard deviation (0.0 for
    one seed), how many seeds the variant is above / below its baseline (ties count in neither) and
    the two-sided Wilcoxon signed-rank p (scipy's ``wilcoxon``, its default zero handling). ``p``
    is NaN where the test is undefined: fewer than two seeds, or every difference 0."""
    diffs = [float(d) for d in differences]
    if not diffs:
        raise ValueError("differences: expected at least one per-seed difference, got none")
    p = float("nan")
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        from scipy.stats import wilcoxon

        p = float(wilcoxon(diffs).pvalue)
    return {"mean": statistics.mean(diffs), "sd": spread(diffs), "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs), "p": p}


def paired_cells(stats: dict) -> str:
    """The three table cells of :func:`paired_differences`: ``Δ mean ± sd | better / worse | p``
    (``–`` for an undefined p)."""
    p = "–" if math.isnan(stats["p"]) else f"{stats['p']:.3f}"
    return f"{stats['mean']:+.1f} ± {stats['sd']:.1f} | {stats['better']} / {stats['worse']} | {p}"


def json_args(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON values (paths as strings, everything else as parsed)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def str_args(args: argparse.Namespace) -> dict:
    """The parsed arguments, every value as a string."""
    return {k: str(v) for k, v in vars(args).items()}


def write_table_and_json(out: Path, stem: str, table: str, payload: dict) -> None:
    """Prints the Markdown ``table``; writes it to ``<stem>.md`` and ``payload`` to ``<stem>.json``
    in ``out`` (created if missing)."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))


def write_results(out: Path, results: dict, table: str) -> None:
    """Prints the Markdown ``table`` and ``results["seconds"]``; writes ``results.json`` and
    ``table.md`` into ``out``."""
    print(table)
    print(f"{results['seconds']:.0f} s")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
