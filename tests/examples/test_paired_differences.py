"""examples/_common.paired_differences: the paired statistics that detection_kd and
segmentation_kd report (mean ± sd of per-seed differences, seeds better / worse, Wilcoxon p),
on hand-computed cases."""

import itertools
import math

import pytest

from tests.script_module import load_script

from .synthetic_run import ROOT

pytest.importorskip("scipy")


def load_common():
    return load_script(ROOT / "examples" / "_common.py", "examples_common")


def exact_signed_rank_p(differences):
    """Two-sided exact Wilcoxon signed-rank p by enumerating every sign pattern (zeros dropped,
    no ties among the magnitudes): 2 · P(W ≤ min(W+, W−)), at most 1."""
    nonzero = [d for d in differences if d != 0]
    ranks = {abs(d): r for r, d in enumerate(sorted(nonzero, key=abs), start=1)}
    w_plus = sum(ranks[abs(d)] for d in nonzero if d > 0)
    observed = min(w_plus, sum(ranks.values()) - w_plus)
    sums = [sum(r for r, s in zip(ranks.values(), signs) if s) for signs in itertools.product((0, 1), repeat=len(ranks))]
    return min(1.0, 2 * sum(w <= observed for w in sums) / len(sums))


def test_mixed_differences_with_a_tie():
    d = load_common().paired_differences([3.0, -1.0, 2.0, 0.0])
    assert d["mean"] == pytest.approx(1.0)
    assert d["sd"] == pytest.approx(math.sqrt(10 / 3))  # deviations 2, −2, 1, −1 over n − 1 = 3
    assert (d["better"], d["worse"]) == (2, 1)  # the 0 counts in neither
    assert d["p"] == pytest.approx(0.5) == pytest.approx(exact_signed_rank_p([3.0, -1.0, 2.0, 0.0]))


def test_every_seed_better():
    diffs = [1.5, 2.0, 0.5, 3.0, 2.5, 1.0]
    d = load_common().paired_differences(diffs)
    assert d["mean"] == pytest.approx(10.5 / 6) and (d["better"], d["worse"]) == (6, 0)
    assert d["p"] == pytest.approx(2 / 2**6) == pytest.approx(exact_signed_rank_p(diffs))


def test_all_zero_and_single_seed_have_no_p():
    common = load_common()
    zero = common.paired_differences([0.0, 0.0, 0.0])
    assert (zero["mean"], zero["sd"], zero["better"], zero["worse"]) == (0.0, 0.0, 0, 0) and math.isnan(zero["p"])
    one = common.paired_differences([-2.5])
    assert (one["mean"], one["sd"], one["better"], one["worse"]) == (-2.5, 0.0, 0, 1) and math.isnan(one["p"])
    assert common.paired_cells(one) == "-2.5 ± 0.0 | 0 / 1 | –"
    assert common.paired_cells(common.paired_differences([3.0, -1.0, 2.0, 0.0])) == "+1.0 ± 1.8 | 2 / 1 | 0.500"


def test_no_differences_is_an_error():
    with pytest.raises(ValueError, match="differences"):
        load_common().paired_differences([])
