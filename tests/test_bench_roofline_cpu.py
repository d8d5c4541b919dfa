"""bench/roofline_cpu.py runs end to end on tiny tensors (the timing itself is not checked: it is
a benchmark)."""

import pathlib

import torch

from tests.script_module import load_script

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "roofline_cpu.py"


def test_roofline_script_runs_and_reports_every_loss(capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--threads", "1", "--n", "3", "--v", "37", "--warmup", "1", "--repeats", "5"]
        share = load_script(SCRIPT, "roofline_cpu").main(args)
    finally:
        torch.set_num_threads(threads)
    assert set(share) == {"kd_loss", "weighted_soft_ce", "kl_div"}
    assert all(r > 0 and r == r for r in share.values())
    line = capsys.readouterr().out
    assert "threads 1, 3 x 37 fp32" in line and "% of roofline" in line
