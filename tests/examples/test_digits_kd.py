"""examples/digits_kd.py --synthetic (a short run on scikit-learn's digits) runs offline on CPU."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_synthetic_run():
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("KDKERNELS_BACKEND", None)
    cmd = [sys.executable, os.path.join(REPO, "examples", "digits_kd.py"), "--synthetic"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mean = re.search(r"^\s+mean\s+([\d.]+)%\s+([\d.]+)%", result.stdout, re.M)
    assert mean, result.stdout
    assert all(0.0 <= float(v) <= 100.0 for v in mean.groups()), result.stdout
    teacher = re.search(r"teacher .*: ([\d.]+)%", result.stdout)
    assert teacher and float(teacher.group(1)) > 80.0, result.stdout  # the teacher really learned the digits
