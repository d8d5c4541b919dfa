"""The relational kernels never allocate an N×N (pair-wise) or B³ (RKD angle) buffer: peak extra
CPU memory of a forward + backward, read from the torch profiler's allocator events, stays far
below one such buffer (and far below what the eager formula takes, measured the same way)."""

import pytest
import torch

import kdkernels
from kdkernels.functional.pairwise_similarity import pairwise_similarity_loss
from kdkernels.functional.rkd_angle import rkd_angle_loss
from tests.helpers import peak_extra_bytes

MiB = 1 << 20


def _fwd_bwd(loss_fn, student, teacher):
    def run():
        student.grad = None
        loss_fn(student, teacher).backward()

    return run


def test_pairwise_similarity_holds_no_n_by_n_matrix():
    n, c = 2048, 16
    one_matrix = n * n * 4  # 16 MiB: a single fp32 N×N similarity matrix
    student = torch.randn(1, n, c, requires_grad=True)
    teacher = torch.randn(1, n, c)
    with kdkernels.use_backend("torch"):
        eager = peak_extra_bytes(_fwd_bwd(pairwise_similarity_loss, student, teacher))
    with kdkernels.use_backend("cpu"):
        tiled = peak_extra_bytes(_fwd_bwd(pairwise_similarity_loss, student, teacher))
    assert eager >= 2 * one_matrix  # the measurement sees the eager formula's matrices
    # O(N·C) data (unit rows, gradients: ~0.5 MiB) and a 256×256 tile per thread.
    assert tiled < 4 * MiB, f"tiled peak {tiled / MiB:.1f} MiB (one N×N matrix is {one_matrix / MiB:.0f} MiB)"


def test_rkd_angle_holds_no_cubic_tensor():
    b, d = 192, 8
    cube = b**3 * 4  # 27 MiB: one fp32 B×B×B angle tensor
    student = torch.randn(b, d, requires_grad=True)
    teacher = torch.randn(b, d)
    with kdkernels.use_backend("torch"):
        eager = peak_extra_bytes(_fwd_bwd(rkd_angle_loss, student, teacher))
    with kdkernels.use_backend("cpu"):
        tiled = peak_extra_bytes(_fwd_bwd(rkd_angle_loss, student, teacher))
    assert eager >= 2 * cube
    # O(B·D) rows and gradient buffers per thread plus one B×B tile of one anchor (144 KiB) per thread.
    assert tiled < 2 * MiB, f"tiled peak {tiled / MiB:.1f} MiB (the B³ tensor is {cube / MiB:.0f} MiB)"


@pytest.mark.parametrize("n", [1024, 4096])
def test_pairwise_peak_grows_linearly_not_quadratically(n):
    # At 4× the nodes an N² buffer would take 16× the memory; O(N·C) takes 4× plus the fixed tiles.
    student = torch.randn(1, n, 32, requires_grad=True)
    teacher = torch.randn(1, n, 32)
    with kdkernels.use_backend("cpu"):
        tiled = peak_extra_bytes(_fwd_bwd(pairwise_similarity_loss, student, teacher))
    bound = 6 * n * 32 * 4 + 4 * 256 * 256 * 4  # a few (N, C) fp32 tensors + a few tiles
    assert tiled < bound, f"N={n}: {tiled / MiB:.2f} MiB > {bound / MiB:.2f} MiB"
