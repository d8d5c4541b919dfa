"""Real data: on scikit-learn's digits, a small student with few labels is better with KD from a
stronger teacher than without it, on average over seeds (examples/digits_kd.py)."""

import pathlib
import statistics

import pytest

from tests.script_module import load_script

pytest.importorskip("sklearn")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits_kd.py"


def test_kd_helps_on_average():
    digits_kd = load_script(EXAMPLE, "digits_kd")
    results = digits_kd.compare(seeds=3, train_per_class=5, temperature=4.0, alpha=0.9)
    assert results["teacher"][0] > 0.9
    without, with_kd = statistics.mean(results["student"]), statistics.mean(results["student_kd"])
    # Measured: 86.6% without, 93.5% with KD (5 seeds); demand a clear margin, not noise.
    assert with_kd > without + 0.02, results
