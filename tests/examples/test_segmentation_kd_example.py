"""examples/segmentation_kd.py --synthetic runs offline in a subprocess and writes its table,
results and mask plot; the calibrated variants get a finite positive weight set on the first
batch, and the paired differences are against the same seed's no-KD student."""

import math

import pytest

from .synthetic_run import run_seeded_comparison

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

KD = ("pixel", "pixel + pair", "all three")


def test_segmentation_kd_synthetic(tmp_path):
    results, table = run_seeded_comparison("segmentation_kd", tmp_path)
    variants = ["no KD"] + [v + c for v in KD for c in ("", " calibrated")]
    assert list(results["students"]) == variants
    assert all(0.0 <= v <= 1.0 for runs in results["students"].values() for v in runs)
    assert results["weights"]["no KD"] == [None]
    for variant in KD:
        assert results["weights"][variant] == [1.0]  # the official part weights, method weight 1
        calibrated = results["weights"][variant + " calibrated"]
        record = results["calibration"][variant + " calibrated"][0]
        assert len(calibrated) == 1 and math.isfinite(calibrated[0]) and 0.0 < calibrated[0] != 1.0
        # calibrated: the method's loss on the first batch, times the new weight, is the task loss
        assert calibrated[0] * record["loss"] == pytest.approx(record["task_loss"], rel=1e-5)
        assert sum(record["parts"].values()) == pytest.approx(record["loss"], rel=1e-5)
    assert set(results["calibration"]["all three calibrated"][0]["parts"]) == {"pixel_wise", "pair_wise", "adversarial"}
    for variant in variants[1:]:
        diff = 100 * (results["students"][variant][0] - results["students"]["no KD"][0])
        assert results["paired"][variant]["mean"] == pytest.approx(diff)
        assert math.isnan(results["paired"][variant]["p"])  # one seed: no test
    assert "all three calibrated" in table and "Δ mIoU vs no KD (paired)" in table
    assert (tmp_path / "masks.png").stat().st_size > 1000
