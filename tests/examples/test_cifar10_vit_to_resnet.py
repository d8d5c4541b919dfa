"""examples/cifar10_vit_to_resnet.py --synthetic runs offline on CPU (transformers models)."""

import csv

import pytest

from .synthetic_run import run_synthetic


def test_synthetic_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    result = run_synthetic("cifar10_vit_to_resnet", "--models", "transformers", "--device", "cpu", "--threads", "1",
                           out=tmp_path, timeout=600, default_backend=True)
    assert "models: transformers (small)" in result.stdout, result.stdout
    with open(tmp_path / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_acc"]) <= 1.0, rows
    assert float(rows[0]["train_hinton_kd_kd"]) >= 0.0  # the fused KL term ran and is finite
    assert (tmp_path / "accuracy.png").stat().st_size > 0
