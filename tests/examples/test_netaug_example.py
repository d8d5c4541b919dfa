"""examples/netaug.py --synthetic runs end to end in a subprocess and writes its table.

(Named ``..._example`` because tests/distill/test_netaug.py already takes the module name.)"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_netaug_example_synthetic(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "netaug.py"), "--synthetic", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| netaug |" in run.stdout and "| baseline |" in run.stdout
    results = json.loads((tmp_path / "netaug_results.json").read_text())["accuracy"]
    assert set(results) == {"baseline", "netaug"}
    assert all(0.0 <= a <= 1.0 for accs in results.values() for a in accs)
