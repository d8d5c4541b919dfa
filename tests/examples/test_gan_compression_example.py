"""examples/gan_compression.py --synthetic runs offline in a subprocess and writes its table,
results and image grid."""

import json

import pytest

from .synthetic_run import run_synthetic

pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")


def test_gan_compression_synthetic(tmp_path):
    run_synthetic("gan_compression", "--quiet", "--threads", "1", out=tmp_path, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["students"]) == {"without distillation", "with distillation"}
    for runs in results["students"].values():
        assert all(r["l1"] >= 0 and 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 for r in runs)
    assert "with distillation" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 1000
