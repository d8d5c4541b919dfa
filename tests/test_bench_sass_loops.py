"""bench/sass_loops.py compiles the walker kernels as launched and reads their loops from the
SASS, on a machine without a GPU (it needs Triton's NVIDIA backend, which ships cuobjdump)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.test_triton_row_walker import nvidia_backend_installed

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "sass_loops.py"


@pytest.mark.skipif(not nvidia_backend_installed(), reason="Triton's NVIDIA backend is not installed")
def test_sass_loops_reports_vector_loads_for_every_walker_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--classes", "20000", "--rows", "4", "--dtypes", "bf16"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "loop 1:" in line]
    assert [line.split(" bf16")[0] for line in lines] == ["kd_loss", "weighted_soft_ce", "divergences"]
    for line in lines:  # two loops (pass 1, pass 2), each with a few vector loads, not one per element
        loads = [int(n) for n in re.findall(r"(\d+) LDG", line)]
        assert len(loads) == 2 and all(0 < n <= 8 for n in loads), line
