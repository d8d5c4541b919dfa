"""Under DDP (gloo, 2 CPU processes, as torchrun would start them), the adversarial trainer gives
the same losses and the same student, connector and discriminator gradients as one process on
the same global batch.

Every loss compared is a mean over the batch (the structured-KD pixel term, a sum over the
batch, is off here), the halves are equal in size, and no model has BatchNorm (per-rank batch
statistics differ by design). The gradient penalty draws its mixing weights per rank, so it is
run under DDP (it must work there) but left out of the exact comparison.
"""

import torch
import torch.distributed as dist

from ddp_harness import run_ddp
from distill_nets import TinyGenerator, TinySegmenter
from kdkernels.distill import AdversarialTrainer, Distiller, GANCompressionDistillation, StructuredKD, generator_parameters
from kdkernels.distill.discriminators import PatchDiscriminator, SAGANDiscriminator

WORLD = 2
TIMEOUT_S = 300


def make_structured(gradient_penalty_weight=0.0):
    torch.manual_seed(0)
    method = StructuredKD(
        "classifier", "classifier", "body", "body", pixel_wise_weight=0.0,
        discriminator=SAGANDiscriminator(4, conv_dim=8, depth=2, input_norm=None), gradient_penalty_weight=gradient_penalty_weight,
    )
    return Distiller(TinySegmenter(4), TinySegmenter(8), [method])


def make_gan_compression():
    torch.manual_seed(0)
    method = GANCompressionDistillation(
        "model.1", "model.1", student_channels=4, teacher_channels=8, discriminator=PatchDiscriminator(4, base_channels=8, layers=2, norm=None)
    )
    return Distiller(TinyGenerator(4), TinyGenerator(8), [method])


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 1, 16, 16, generator=g), torch.rand(8, 3, 16, 16, generator=g) * 2 - 1


def run(distiller, x, y, ddp=None):
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.01), ddp=ddp)
    step = trainer.step(x, y)
    return step.losses, {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}


def _worker(rank):
    seg_x, gen_x, gen_y = (t.chunk(WORLD)[rank] for t in data())
    result = {}
    for key, distiller, x, y in (("structured", make_structured(), seg_x, None), ("gan_compression", make_gan_compression(), gen_x, gen_y)):
        losses, grads = run(distiller, x, y, ddp={})
        for value in losses.values():
            dist.all_reduce(value)
        result[key] = ({k: v / WORLD for k, v in losses.items()}, grads)
    losses, _ = run(make_structured(gradient_penalty_weight=10.0), seg_x, None, ddp={})
    result["with_penalty"] = {k: bool(torch.isfinite(v)) for k, v in losses.items()}
    return result


def test_adversarial_trainer_under_ddp_matches_single_process(tmp_path):
    result = run_ddp(_worker, tmp_path, WORLD, TIMEOUT_S)

    seg_x, gen_x, gen_y = data()
    for key, distiller, x, y in (("structured", make_structured(), seg_x, None), ("gan_compression", make_gan_compression(), gen_x, gen_y)):
        losses, grads = run(distiller, x, y)
        ddp_losses, ddp_grads = result[key]
        assert set(losses) == set(ddp_losses) and any("discriminator" in k for k in losses)
        for name, value in losses.items():
            torch.testing.assert_close(ddp_losses[name], value, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ddp_grads) and any(".discriminator." in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert result["with_penalty"] and all(result["with_penalty"].values()) and "structured_kd/gradient_penalty" in result["with_penalty"]
