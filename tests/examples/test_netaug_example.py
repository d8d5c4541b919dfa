"""examples/netaug.py --synthetic runs end to end in a subprocess and writes its table.

(Named ``..._example`` because tests/distill/test_netaug.py already takes the module name.)"""

import json

from .synthetic_run import run_synthetic


def test_netaug_example_synthetic(tmp_path):
    run = run_synthetic("netaug", out=tmp_path, timeout=600)
    assert "| netaug |" in run.stdout and "| baseline |" in run.stdout
    results = json.loads((tmp_path / "netaug_results.json").read_text())["accuracy"]
    assert set(results) == {"baseline", "netaug"}
    assert all(0.0 <= a <= 1.0 for accs in results.values() for a in accs)
