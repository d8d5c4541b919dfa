"""examples/segmentation_kd.py --synthetic runs offline in a subprocess and writes its table,
results and mask plot."""

import pytest

from .synthetic_run import run_seeded_comparison

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_segmentation_kd_synthetic(tmp_path):
    results, table = run_seeded_comparison("segmentation_kd", tmp_path)
    assert set(results["students"]) == {"no KD", "pixel", "pixel + pair", "all three"}
    assert all(0.0 <= v <= 1.0 for runs in results["students"].values() for v in runs)
    assert "all three" in table
    assert (tmp_path / "masks.png").stat().st_size > 1000
