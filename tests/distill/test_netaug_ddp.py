"""NetAug under DDP (gloo, 2 CPU processes): ``train_step(..., ddp=DDP(netaug))`` gives every rank
the mean over ranks of the single-process step's gradients (base + augmented), with every rank
sampling the same subnet from a generator seeded alike."""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_harness import run_ddp
from kdkernels.distill import NetAug
from test_netaug import tiny_mobilenet

WORLD = 2
TIMEOUT_S = 300


def make_netaug():
    return NetAug(tiny_mobilenet(), epochs=2, generator=torch.Generator().manual_seed(5), sort_channels=False)


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def _worker(rank):
    netaug = make_netaug()
    ddp = DDP(netaug)
    x, y = global_batch()
    step = netaug.train_step(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank], torch.optim.SGD(ddp.parameters(), lr=0.0), ddp=ddp)
    return {"grads": {n: p.grad for n, p in netaug.named_parameters()}, "widths": step.widths}


def test_netaug_step_under_ddp_averages_the_ranks_gradients(tmp_path):
    result = run_ddp(_worker, tmp_path, WORLD, TIMEOUT_S)

    x, y = global_batch()
    per_rank = []
    for rank in range(WORLD):
        netaug = make_netaug()
        step = netaug.train_step(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank], torch.optim.SGD(netaug.parameters(), lr=0.0))
        assert step.widths == result["widths"]
        per_rank.append({n: p.grad for n, p in netaug.named_parameters()})
    assert set(result["grads"]) == set(per_rank[0])
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, (per_rank[0][name] + per_rank[1][name]) / WORLD, rtol=1e-4, atol=1e-6)
