"""examples/segmentation_kd.py --synthetic runs offline in a subprocess and writes its table,
results and mask plot."""

import json

import pytest

from .synthetic_run import run_synthetic

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_segmentation_kd_synthetic(tmp_path):
    run_synthetic("segmentation_kd", "--quiet", "--threads", "1", out=tmp_path, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["students"]) == {"no KD", "pixel", "pixel + pair", "all three"}
    assert all(0.0 <= v <= 1.0 for runs in results["students"].values() for v in runs)
    assert "all three" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "masks.png").stat().st_size > 1000
