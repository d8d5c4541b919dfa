"""Runs an example's ``--synthetic`` mode in a subprocess, as CI and a newcomer would (``python
examples/<name>.py --synthetic`` with this checkout first on the path), and fails the test with the
end of its stderr unless it exits with 0. Each test then checks what that example wrote."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_synthetic(example: str, *args: str, out=None, timeout: float, default_backend: bool = False) -> subprocess.CompletedProcess:
    """``examples/<example>.py --synthetic *args [--out out]`` with one OpenMP thread; returns the
    finished process (stdout and stderr as text).

    ``default_backend`` runs the example on kdkernels' default backend whatever the test session
    selected (no ``KDKERNELS_BACKEND``, ``TRITON_INTERPRET=0``); otherwise the session's environment
    is inherited.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if default_backend:
        env.pop("KDKERNELS_BACKEND", None)
        env["TRITON_INTERPRET"] = "0"
    cmd = [sys.executable, str(ROOT / "examples" / f"{example}.py"), "--synthetic", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_seeded_comparison(example: str, out: pathlib.Path, timeout: float = 300) -> tuple[dict, str]:
    """Runs an example that reports through ``examples/_common.write_results`` (``--synthetic
    --quiet --threads 1``); returns its ``results.json`` (parsed) and ``table.md``."""
    run_synthetic(example, "--quiet", "--threads", "1", out=out, timeout=timeout)
    return json.loads((out / "results.json").read_text()), (out / "table.md").read_text()
