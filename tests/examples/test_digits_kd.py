"""examples/digits_kd.py --synthetic (a short run on scikit-learn's digits) runs offline on CPU."""

import re

import pytest

from .synthetic_run import run_synthetic


def test_synthetic_run():
    pytest.importorskip("sklearn")
    result = run_synthetic("digits_kd", timeout=300, default_backend=True)
    mean = re.search(r"^\s+mean\s+([\d.]+)%\s+([\d.]+)%", result.stdout, re.M)
    assert mean, result.stdout
    assert all(0.0 <= float(v) <= 100.0 for v in mean.groups()), result.stdout
    teacher = re.search(r"teacher .*: ([\d.]+)%", result.stdout)
    assert teacher and float(teacher.group(1)) > 80.0, result.stdout  # the teacher really learned the digits
