"""examples/cifar10_vit_to_resnet.py --synthetic runs offline on CPU (transformers models)."""

import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_synthetic_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("KDKERNELS_BACKEND", None)
    cmd = [sys.executable, os.path.join(REPO, "examples", "cifar10_vit_to_resnet.py"), "--synthetic",
           "--models", "transformers", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models: transformers (small)" in result.stdout, result.stdout
    with open(tmp_path / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_acc"]) <= 1.0, rows
    assert float(rows[0]["train_hinton_kd_kd"]) >= 0.0  # the fused KL term ran and is finite
    assert (tmp_path / "accuracy.png").stat().st_size > 0
