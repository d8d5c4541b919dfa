"""Run a script of tests/llm under ``torch.distributed.run`` with 2 CPU processes."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A gloo rank on this (loaded, shared) machine now and then dies with this C++ message and
# SIGABRT, with no Python error, in any of the 2-rank scripts (the DDP trainer step too); the same
# script then passes when run again. Such a run is repeated once; any other failure fails the test.
_GLOO_ABORT = "terminate called without an active exception"


def run_two_ranks(script: str, *args: str) -> None:
    """``torchrun --standalone`` (a free port: a fixed one collides with other jobs) of
    ``tests/llm/<script> args...``, one thread per rank; fails with the ranks' stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "llm", script), *args]
    for _ in range(2):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode == 0 or _GLOO_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-4000:]
