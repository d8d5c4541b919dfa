"""bench/bench_methods.py --methods / --update: a subset run replaces only its own rows of a stored
study, and only when it reproduces the stored teacher and CE accuracies exactly (no training here:
the stored study and the new run are small hand-made results)."""

import argparse
import json
import pathlib

import pytest

from tests.script_module import load_script

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_methods.py"


def load_bench():
    return load_script(BENCH, "bench_methods_update")


SETTINGS = dict(seeds=2, per_class=10, unlabelled=150, steps=150, teacher_steps=150, lr=0.01, threads=1, first_seed=0, split="test")


def row(acc: float) -> dict:
    return {"accuracy": acc, "finite": True}


def stored_study(tmp_path: pathlib.Path) -> pathlib.Path:
    per_seed = [
        {"teacher": 0.97, "ce": row(0.75), "hinton_kd/default": row(0.86), "fitnets/default": row(0.72), "seconds": 1.0},
        {"teacher": 0.96, "ce": row(0.77), "hinton_kd/default": row(0.88), "fitnets/default": row(0.64), "seconds": 1.0},
    ]
    path = tmp_path / "methods_digits.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in SETTINGS.items()}, "runs": [{"command": "full"}], "per_seed": per_seed}))
    return path


def test_update_replaces_only_the_rows_it_ran(tmp_path):
    bench, path = load_bench(), stored_study(tmp_path)
    new = [
        {"teacher": 0.97, "ce": row(0.75), "fitnets/default": row(0.80), "seconds": 2.0},
        {"teacher": 0.96, "ce": row(0.77), "fitnets/default": row(0.81), "seconds": 2.0},
    ]
    per_seed, runs = bench.merge(path, new, argparse.Namespace(**SETTINGS))
    assert [r["fitnets/default"]["accuracy"] for r in per_seed] == [0.80, 0.81]
    assert [r["hinton_kd/default"]["accuracy"] for r in per_seed] == [0.86, 0.88]  # kept
    assert runs == [{"command": "full"}]


def test_update_refuses_a_ce_that_does_not_reproduce(tmp_path):
    bench, path = load_bench(), stored_study(tmp_path)
    new = [
        {"teacher": 0.97, "ce": row(0.75), "fitnets/default": row(0.80)},
        {"teacher": 0.96, "ce": row(0.7700001), "fitnets/default": row(0.81)},
    ]
    with pytest.raises(SystemExit, match="seed 1: ce"):
        bench.merge(path, new, argparse.Namespace(**SETTINGS))


def test_update_refuses_other_settings(tmp_path):
    bench, path = load_bench(), stored_study(tmp_path)
    new = [{"teacher": 0.97, "ce": row(0.75)}, {"teacher": 0.96, "ce": row(0.77)}]
    with pytest.raises(SystemExit, match="steps=150 \\(here 100\\)"):
        bench.merge(path, new, argparse.Namespace(**{**SETTINGS, "steps": 100}))
    with pytest.raises(SystemExit, match="seeds"):
        bench.merge(path, new[:1], argparse.Namespace(**{**SETTINGS, "seeds": 1}))


def test_methods_must_be_known(capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--methods", "hinton_kd,fitnet"])
    assert "unknown ['fitnet']" in capsys.readouterr().err
