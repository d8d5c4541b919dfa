"""examples/gan_compression.py --synthetic runs offline in a subprocess and writes its table,
results and image grid."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gan_compression_synthetic(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gan_compression.py"), "--synthetic", "--quiet", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["students"]) == {"without distillation", "with distillation"}
    for runs in results["students"].values():
        assert all(r["l1"] >= 0 and 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 for r in runs)
    assert "with distillation" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 1000
