"""Under DDP (gloo, 2 CPU processes, as torchrun would start them), the distiller gives the same
losses and gradients as one process on the same global batch.

Losses are batch means and the two halves are equal, so the mean of the ranks' losses and the
DDP-averaged gradients equal the single-process ones. The student has no BatchNorm (per-rank
batch statistics would differ by design); the teacher's BN runs in eval mode.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_harness import run_ddp
from distill_nets import SmallCNN
from kdkernels.distill import AttentionTransfer, Distiller, FitNets, HintonKD

WORLD = 2
TIMEOUT_S = 300


def make_models():
    torch.manual_seed(0)
    return SmallCNN(4, bn=False), SmallCNN(8), SmallCNN(4, bn=False)


def make_methods():
    return [HintonKD(temperature=4.0, alpha=0.9), FitNets("relu1", "relu1", student_channels=4, teacher_channels=8, weight=10.0), AttentionTransfer("relu2", "relu2")]


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def run_step(distiller, x, y):
    out = distiller(x, y)
    out.total.backward()
    return {k: v.detach() for k, v in out.losses.items()}


def _worker(rank):
    student, teacher, student_b = make_models()
    x, y = global_batch()
    x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    result = {}
    # The distiller wrapped: connectors are synchronised with the student; the teacher is not in DDP.
    distiller = DDP(Distiller(student, teacher, make_methods()))
    losses = run_step(distiller, x, y)
    for value in losses.values():
        dist.all_reduce(value)
    result["losses"] = {k: v / WORLD for k, v in losses.items()}
    result["grads"] = {n: p.grad for n, p in distiller.module.named_parameters()}
    # The student wrapped (no connectors): features are captured through DDP.
    wrapped = Distiller(DDP(student_b), teacher, [HintonKD()])
    losses_b = run_step(wrapped, x, y)
    for value in losses_b.values():
        dist.all_reduce(value)
    result["losses_b"] = {k: v / WORLD for k, v in losses_b.items()}
    result["grads_b"] = {n: p.grad for n, p in student_b.named_parameters()}
    try:
        Distiller(DDP(SmallCNN(4, bn=False)), teacher, make_methods())
        result["error"] = None
    except ValueError as exc:
        result["error"] = str(exc)
    return result


def test_ddp_matches_single_process(tmp_path):
    result = run_ddp(_worker, tmp_path, WORLD, TIMEOUT_S)

    student, teacher, student_b = make_models()
    x, y = global_batch()
    single = Distiller(student, teacher, make_methods())
    losses = run_step(single, x, y)
    assert set(losses) == set(result["losses"]) == {"hinton_kd/kd", "hinton_kd/ce", "fitnets", "attention_transfer"}
    for name, value in losses.items():
        torch.testing.assert_close(result["losses"][name], value, rtol=1e-5, atol=1e-6)
    grads = dict(single.named_parameters())
    assert set(grads) == set(result["grads"]) and any(n.startswith("methods.1.connector") for n in grads)
    for name, param in grads.items():
        torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=1e-6)

    single_b = Distiller(student_b, teacher, [HintonKD()])
    for name, value in run_step(single_b, x, y).items():
        torch.testing.assert_close(result["losses_b"][name], value, rtol=1e-5, atol=1e-6)
    for name, param in student_b.named_parameters():
        torch.testing.assert_close(result["grads_b"][name], param.grad, rtol=1e-4, atol=1e-6)

    assert result["error"] is not None and "wrap the distiller instead" in result["error"]
