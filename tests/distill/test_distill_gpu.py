"""On a GPU: a distillation step with every method, under bf16 autocast, makes no host
synchronisation (CUDA's sync debug mode turns one into an error)."""

import pytest
import torch

from test_distiller import CASES, build

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", CASES)
def test_cuda_step_has_no_host_sync_under_bf16_autocast(case):
    distiller, student, teacher, x, y = build(case)
    distiller.cuda()
    x, y = x.cuda(), y.cuda()
    distiller(x, y).total.backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = distiller(x, y)
        out.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.total.detach().cpu())
    assert all(p.grad is not None for p in distiller.methods.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_cuda_first_step_warning_arrives_without_a_sync():
    """The first step's loss scales are copied to pinned memory behind an event; a later step reads
    them once the event has passed, and the warning names the method."""
    import warnings

    from distill_nets import SmallCNN, images
    from kdkernels.distill import CrossEntropy, Distiller, FitNets, LossScaleWarning

    distiller = Distiller(SmallCNN(4), SmallCNN(8), [CrossEntropy(), FitNets("relu1", "relu1", student_channels=4, teacher_channels=8, weight=1e4)]).cuda()
    x, y = images().cuda(), torch.randint(0, 5, (6,)).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distiller(x, y).total.backward()
        torch.cuda.synchronize()
        distiller(x, y).total.backward()
        distiller(x, y).total.backward()
    scale = [w for w in caught if issubclass(w.category, LossScaleWarning)]
    assert len(scale) == 1 and "fitnets" in str(scale[0].message)


def test_cuda_teacher_is_unchanged_with_ofd():
    from test_teacher_unchanged import snapshot, assert_bitwise_equal, train_steps

    distiller, student, teacher, x, y = build("ofd")
    distiller.cuda()
    before = snapshot(teacher)
    train_steps(distiller, x.cuda(), y.cuda())
    assert_bitwise_equal(before, teacher)
