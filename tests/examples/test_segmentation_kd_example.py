"""examples/segmentation_kd.py --synthetic runs offline in a subprocess and writes its table,
results and mask plot."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_segmentation_kd_synthetic(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "segmentation_kd.py"), "--synthetic", "--quiet", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["students"]) == {"no KD", "pixel", "pixel + pair", "all three"}
    assert all(0.0 <= v <= 1.0 for runs in results["students"].values() for v in runs)
    assert "all three" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "masks.png").stat().st_size > 1000
