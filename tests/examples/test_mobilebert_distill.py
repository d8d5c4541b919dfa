"""examples/mobilebert_distill.py --synthetic runs end to end in a subprocess and writes its table."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_mobilebert_distill_example_synthetic(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mobilebert_distill.py"), "--synthetic", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "mobilebert_results.json").read_text())["results"]
    assert set(results) == {"teacher (BERT, MLM)", "student: MLM only", "student: stage 1 + stage 2", "student: stage 2 only"}
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["mlm_loss"])
