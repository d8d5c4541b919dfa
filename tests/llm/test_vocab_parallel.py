"""``vocab_parallel_distill_loss`` with 2 CPU ranks (gloo), each holding a slice of the vocabulary,
equals ``distill_loss`` in one process holding all of it: the same loss on both ranks, and each
rank's gradients are the full-vocabulary gradients' slice (every divergence; batchmean, mean and
per-position losses; masks, a teacher row without mass, a teacher whose mass is all on one rank,
soft-capping, ``num_items_in_batch``); and ``fused_linear_distill_loss`` with LM heads split by rows
over the ranks equals it with the whole heads (with the label cross-entropy too)."""

import os
import subprocess
import sys

import pytest
import torch

import kdkernels
from kdkernels.functional import distill_loss, fused_linear_distill_loss, kd_loss
from kdkernels.llm.vocab_parallel import vocab_parallel_distill_loss
from tests.llm import _vocab_parallel_ranks as ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29647",
           os.path.join(REPO, "tests", "llm", "_vocab_parallel_ranks.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name,kw", list(ranks.cases()), ids=[name for name, _ in ranks.cases()])
def test_two_ranks_equal_one_process(two_rank_results, name, kw):
    s, t, mask = ranks.logits()
    s, t = s.requires_grad_(), t.requires_grad_()
    with kdkernels.use_backend("torch"):
        expected = distill_loss(s, t, mask=mask, **kw)
    g_s, g_t = torch.autograd.grad(expected.sum(), (s, t))
    for rank, results in enumerate(two_rank_results):
        loss, r_s, r_t = results[name]
        cols = slice(0, ranks.SPLIT) if rank == 0 else slice(ranks.SPLIT, None)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r_s, g_s[..., cols], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r_t, g_t[..., cols], rtol=1e-10, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("name,kw", list(ranks.fused_linear_cases()), ids=[name for name, _ in ranks.fused_linear_cases()])
def test_fused_linear_with_sharded_heads_equals_one_process(two_rank_results, name, kw):
    """LM heads split by rows over 2 ranks, the hidden states replicated: the whole vocabulary's
    loss on both ranks, each rank's weight and bias gradients are the full ones' rows, and the
    hidden states' gradient (summed over the ranks) is the full one."""
    h_s, w_s, b_s, h_t, w_t, mask = ranks.heads()
    leaves = [x.requires_grad_() for x in (h_s, w_s, b_s)]
    with kdkernels.use_backend("torch"):
        expected = fused_linear_distill_loss(h_s, w_s, h_t, w_t, b_s, mask=mask, **kw)
    g_h, g_w, g_b = torch.autograd.grad(expected.sum(), leaves)
    for rank, results in enumerate(two_rank_results):
        loss, r_h, r_w, r_b = results[name]
        rows = slice(0, ranks.SPLIT) if rank == 0 else slice(ranks.SPLIT, None)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r_h, g_h, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r_w, g_w[rows], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r_b, g_b[rows], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kd_loss_over_two_ranks_equals_one_process(two_rank_results, reduction):
    """kd_loss(process_group=) with the classes along dim 1, each rank holding a slice of them."""
    s, t, mask = ranks.logits()
    s, t = s.movedim(-1, 1).requires_grad_(), t.movedim(-1, 1).requires_grad_()
    with kdkernels.use_backend("torch"):
        expected = kd_loss(s, t, 1.7, reduction, dim=1, mask=mask)
    g_s, g_t = torch.autograd.grad(expected.sum(), (s, t))
    for rank, results in enumerate(two_rank_results):
        loss, r_s, r_t = results[f"kd_loss-{reduction}"]
        cols = slice(0, ranks.SPLIT) if rank == 0 else slice(ranks.SPLIT, None)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r_s, g_s[:, cols], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r_t, g_t[:, cols], rtol=1e-10, atol=1e-13, equal_nan=True)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialised"):
        vocab_parallel_distill_loss(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialised"):
        fused_linear_distill_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3), torch.randn(5, 3), process_group=object())
