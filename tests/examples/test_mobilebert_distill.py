"""examples/mobilebert_distill.py --synthetic runs end to end in a subprocess and writes its table."""

import json
import math

import pytest

from .synthetic_run import run_synthetic

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_mobilebert_distill_example_synthetic(tmp_path):
    run_synthetic("mobilebert_distill", "--threads", "1", out=tmp_path, timeout=600)
    results = json.loads((tmp_path / "mobilebert_results.json").read_text())["results"]
    assert set(results) == {"teacher (BERT, MLM)", "student: MLM only", "student: stage 1 + stage 2", "student: stage 2 only"}
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["mlm_loss"])
