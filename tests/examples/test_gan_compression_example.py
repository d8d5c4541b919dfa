"""examples/gan_compression.py --synthetic runs offline in a subprocess and writes its table,
results and image grid."""

import pytest

from .synthetic_run import run_seeded_comparison

pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")


def test_gan_compression_synthetic(tmp_path):
    results, table = run_seeded_comparison("gan_compression", tmp_path)
    assert set(results["students"]) == {"without distillation", "with distillation"}
    for runs in results["students"].values():
        assert all(r["l1"] >= 0 and 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 for r in runs)
    assert "with distillation" in table
    assert (tmp_path / "grid.png").stat().st_size > 1000
