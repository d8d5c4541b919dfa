"""examples/llm_distill.py --synthetic runs offline on CPU (stdlib corpus, BPE, Llama configs, top-k stores)."""

import csv
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_synthetic_run(tmp_path):
    for module in ("transformers", "tokenizers", "matplotlib", "tqdm"):
        pytest.importorskip(module)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "examples", "llm_distill.py"), "--synthetic", "--threads", "1", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    expected = {"teacher", "labels only", "dense forward_kl", "dense reverse_kl", "dense jsd", "dense skew_forward_kl",
                "dense skew_reverse_kl", "dense tvd", "top-8 tail_bucket forward_kl", "top-32 tail_bucket forward_kl",
                "top-32 renormalize forward_kl"}
    assert set(rows) == expected, set(rows)
    for row in rows.values():
        assert math.isfinite(float(row["val_ppl"])) and float(row["val_ppl"]) > 1.0, row
    # the stores hold k × (2-byte id + 2-byte bf16 value) per token
    assert int(rows["top-8 tail_bucket forward_kl"]["bytes_per_token"]) == 8 * 4
    assert (tmp_path / "perplexity.png").stat().st_size > 0
