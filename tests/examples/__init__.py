"""Tests that run each example's --synthetic mode (a package, so that their module names --
examples.test_<name> -- never clash with a test of the same basename elsewhere, e.g.
tests/distill/test_digits_kd.py)."""
