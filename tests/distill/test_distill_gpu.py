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
