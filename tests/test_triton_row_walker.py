"""The shared Triton row walker (``kdkernels/ops/triton/two_distribution_row.py``) on every path.

The loss-level tests run the launch configurations the launchers choose, which at the shapes
the interpreter affords are mostly one-block ("resident") rows. Here the launch configuration is
forced to small blocks so that the same rows also go through the multi-block online softmax
(maxima that grow from block to block, −inf and NaN in later blocks, a teacher whose mass starts
in a later block) and the re-reading gradient pass, in each position layout, against the float64
references (values and both gradients).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkernels.backends import why_unavailable
from kdkernels.ops.reference.kd_loss import kd_loss_positions
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_positions

pytestmark = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None, reason=str(why_unavailable("triton", "cpu")))

N_CLASSES = 11


def _rows(layout: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` (outer, classes, inner) in float64, laid out as ``layout`` (same values)."""
    if layout == "channels_first":
        return x.contiguous()
    if layout == "classes_last":  # classes contiguous, inner slower: (outer, inner, classes) permuted
        return x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if layout == "strided":  # every stride > 1
        return torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] * 3, dtype=x.dtype)[:, ::2, ::3].copy_(x)
    raise AssertionError(layout)


def _inputs(n_inner: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, N_CLASSES, n_inner, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, N_CLASSES, n_inner, generator=g, dtype=torch.float64) * 3
    s[0, 7, 0] = 40.0  # the student maximum grows in a later block
    t[1, 9, 0] = 60.0  # so does the teacher's
    t[2, :5, 0] = float("-inf")  # the teacher's mass starts in the second block
    s[0, 6, -1] = float("-inf")  # student −inf where the teacher has mass: +inf loss
    t[0, 10, -1] = float("-inf")  # an excluded class in the last (partial) block
    s[1, 2, -1] = 1e10  # large finite logits stay finite
    t[1, 3, -1] = -1e10
    return s, t


def _expected(loss_name, s, t, weight, mask, temperature):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    if loss_name == "kd_loss":
        per_position = kd_loss_positions(s, t, temperature, 1, mask)
    else:
        per_position = weighted_soft_ce_positions(s, t, weight, temperature, 1, mask)
    g_s, g_t = torch.autograd.grad(per_position.sum(), (s, t))
    return per_position.detach(), g_s, g_t


def _run(loss_name, s, t, weight, mask, temperature, block):
    grad_scale = torch.ones((), dtype=torch.float64)
    if loss_name == "kd_loss":
        from kdkernels.ops.triton import kd_loss as module

        call = lambda: module.kd_loss_rows(s, t, mask, temperature, grad_scale, True, True)  # noqa: E731
    else:
        from kdkernels.ops.triton import weighted_soft_ce as module

        call = lambda: module.weighted_soft_ce_rows(s, t, weight, mask, temperature, grad_scale, True, True)  # noqa: E731
    if block is None:
        return call()
    # (BLOCK_P, BLOCK_C, num_warps, RESIDENT): small blocks, so rows of N_CLASSES take several
    # blocks, or a row held in registers (RESIDENT), or one block read twice.
    original = module._launch_config
    module._launch_config = lambda *args: block
    try:
        return call()
    finally:
        module._launch_config = original


@pytest.mark.parametrize(
    "block",
    [None, (2, 4, 1, False), (4, 8, 1, False), (1, 16, 1, True), (4, 16, 1, False)],
    ids=["launcher", "p2c4", "p4c8", "p1c16-resident", "p4c16-reread"],
)
@pytest.mark.parametrize("layout", ["channels_first", "classes_last", "strided"])
@pytest.mark.parametrize("loss_name", ["kd_loss", "weighted_soft_ce"])
def test_walker_matches_reference(loss_name, layout, block):
    s, t = _inputs(n_inner=3, seed=0)
    s, t = _rows(layout, s), _rows(layout, t)
    weight = torch.rand(N_CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    weight[4] = 0.0
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    s[1, :, 1] = float("nan")  # masked out: exactly 0 whatever it holds
    temperature = 2.5
    weight = weight if loss_name == "weighted_soft_ce" else None
    loss, g_s, g_t = _run(loss_name, s, t, weight, mask, temperature, block)
    want_loss, want_g_s, want_g_t = _expected(loss_name, s, t, weight, mask, temperature)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    assert loss[0, 2] == float("inf") and g_s[0, :, 2].isfinite().all()
    assert loss[1, 1] == 0 and (g_s[1, :, 1] == 0).all() and (g_t[1, :, 1] == 0).all()
    torch.testing.assert_close(g_s, want_g_s, rtol=1e-10, atol=1e-10)
    # The teacher gradient of the +inf position is not specified (the reference's is NaN there).
    finite = torch.ones_like(g_t, dtype=torch.bool)
    finite[0, :, 2] = False
    torch.testing.assert_close(g_t[finite], want_g_t[finite], rtol=1e-10, atol=1e-10)
    assert (g_t[2, :5, 0] == 0).all()  # classes the teacher excludes


@pytest.mark.parametrize("block", [(2, 4, 1, False), (1, 16, 1, True)], ids=["p2c4", "p1c16-resident"])
@pytest.mark.parametrize("loss_name", ["kd_loss", "weighted_soft_ce"])
def test_walker_nan_in_a_later_block_makes_the_row_nan(loss_name, block):
    s, t = _inputs(n_inner=1, seed=2)
    s[0, 9, 0] = float("nan")
    t[1, 10, 0] = float("nan")
    s[2, 10, 0] = float("inf")
    loss, g_s, g_t = _run(loss_name, s, t, None, None, 1.0, block)
    assert loss[:, 0].isnan().all()  # student NaN, teacher NaN, student +inf
    assert g_s.isnan().all() and g_t[1].isnan().all() and g_t[0, :10].isnan().all()
    assert g_t[0, 10, 0] == 0  # a class the teacher excludes keeps a zero gradient


@pytest.mark.parametrize("block", [(2, 4, 1, False), (1, 16, 1, True)], ids=["p2c4", "p1c16-resident"])
@pytest.mark.parametrize("loss_name", ["kd_loss", "weighted_soft_ce"])
def test_walker_exact_zeros(loss_name, block):
    """V = 1 gives exactly 0 (both losses); identical logits give exactly 0 for kd_loss, across blocks."""
    one = torch.tensor([[[1e10]], [[-3.0]]], dtype=torch.float32)
    loss, g_s, _ = _run(loss_name, one, one * 0.5, None, None, 0.3, block)
    assert (loss == 0).all() and (g_s == 0).all()
    if loss_name == "kd_loss":
        s, _ = _inputs(n_inner=2, seed=3)
        loss, g_s, g_t = _run(loss_name, s, s.clone(), None, None, 1.7, block)
        counted = s.amax(1) != float("-inf")
        assert (loss[counted] == 0).all()


def nvidia_backend_installed() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def compile_for_sm90(which: str) -> subprocess.CompletedProcess:
    """``python -m kdkernels.ops.triton.ahead_of_time which`` without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "kdkernels.ops.triton.ahead_of_time", which],
        env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.skipif(not nvidia_backend_installed(), reason="Triton's NVIDIA backend is not installed")
def test_contiguous_rows_move_in_vectors():
    """Compiled for sm_90 as their launchers launch them (with the JIT's specialisation of the
    arguments), the walker's kernels load contiguous bf16 rows and store their gradients in
    vectors. Passing a size-1 inner dimension's stride as is made every load scalar (found from
    the SASS after an H200 run: the bf16 kd_loss was instruction-bound); ``launch_strides``
    passes 0 there."""
    result = compile_for_sm90("vectors")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 6


@pytest.mark.skipif(not nvidia_backend_installed(), reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("which", ["kd_loss", "weighted_soft_ce"])
def test_walker_kernels_compile_for_a_gpu(which):
    """The interpreter accepts code compiled Triton rejects: compile each layout × resident
    variant for sm_90 down to the cubin (no GPU needed)."""
    result = compile_for_sm90(which)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 4
