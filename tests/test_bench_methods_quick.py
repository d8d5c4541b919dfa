"""bench/bench_methods.py --quick (every method and scheme on digits, the full study's settings on
2 seeds; about a minute of CPU): only what is robust at that size — Hinton KD helps on average, no
loss goes non-finite — plus that calibration sets every method's first-step loss to the CE and
that the first-step warning fires where the default weight is far off (FitNets' 100 here)."""

import json
import pathlib

import pytest
import torch

from tests.script_module import load_script

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_methods.py"


def test_quick_study(tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = load_script(BENCH, "bench_methods").main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    keys = [k for k in summary if "/" in k]
    # 9 methods (FitNets one- and two-stage) and BYOT × (default, calibrated) + mutual learning,
    # and born-again's ensemble rows (× 2) with their control
    assert len(keys) == 24, keys
    assert all(summary[k]["finite"] for k in keys), [k for k in keys if not summary[k]["finite"]]
    assert summary["hinton_kd/default"]["mean_diff_pp"] > 0, summary["hinton_kd/default"]
    for key in keys:
        if key.endswith("/calibrated") and not key.startswith("born_again_ensemble/"):
            assert summary[key]["first_ratio"] == pytest.approx(1.0, rel=1e-3), key
    assert summary["born_again_ensemble/calibrated"]["vs"]["baseline"] == "ce_ensemble/default"
    assert summary["byot/default"]["heads"] == "relu2, pointwise"
    assert summary["byot/calibrated"]["weights"]["λ"] > 1e-3  # BYOT.calibrate raised λ from 1e-6
    assert summary["fitnets/default"]["warned"] == 2  # 100 × hint starts at ~17× the CE here
    assert summary["fitnets/calibrated"]["warned"] == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"methods_digits_quick.{suffix}").stat().st_size > 0
    # FitNets' stage 1 (the hint alone) lowers the hint loss before stage 2 starts.
    per_seed = json.loads((tmp_path / "methods_digits_quick.json").read_text())["per_seed"]
    for row in per_seed:
        for weighting in ("default", "calibrated"):
            first, last = row[f"fitnets_two_stage/{weighting}"]["hint_loss"]
            assert last < 0.5 * first, (weighting, first, last)
