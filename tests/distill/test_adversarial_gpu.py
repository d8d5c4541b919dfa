"""On a GPU: a structured-KD and a GAN Compression trainer step under bf16 autocast (the pixel
term through the Triton/CUDA weighted_soft_ce), finite losses on both sides, and the fused
pixel-wise term equal to the PyTorch reference backend."""

import pytest
import torch

import kdkernels
from kdkernels.distill import AdversarialTrainer, generator_parameters
from kdkernels.distill.methods.structured_kd import pixel_wise_loss
from test_adversarial import batch, structured

pytestmark = pytest.mark.gpu


def check_structured_step(device: str) -> None:
    distiller, method = structured()
    distiller.to(device)
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.01), autocast_dtype=torch.bfloat16)
    step = trainer.step(batch().to(device))
    assert all(bool(torch.isfinite(v.cpu())) for v in step.losses.values())
    assert all(p.grad is not None and p.dtype == torch.float32 for p in method.discriminator.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


def check_pixel_wise_matches_reference(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 19, 32, 32, generator=g).to(device), torch.randn(4, 19, 32, 32, generator=g).to(device)
    fused = pixel_wise_loss(s, t)
    with kdkernels.use_backend("torch"):
        reference = pixel_wise_loss(s, t)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-4)


def test_structured_kd_step_on_cuda_under_bf16_autocast():
    check_structured_step("cuda")


def test_pixel_wise_on_cuda_matches_reference():
    check_pixel_wise_matches_reference("cuda")
