"""The adversarial trainer: order and ratio of the student and discriminator steps as declared,
gradients kept to their own side (the teacher gets none), the frozen discriminator call, autocast,
state_dict, and configuration errors. DDP is in test_adversarial_ddp.py."""

import pytest
import torch
from torch import nn

from distill_nets import TinyGenerator, TinySegmenter
from kdkernels.distill import (
    AdversarialTrainer,
    Distiller,
    GANCompressionDistillation,
    HintonKD,
    StructuredKD,
    calibrate_weights,
    discriminator_parameters,
    generator_parameters,
)
from kdkernels.distill.adversarial import call_with_frozen_parameters, gradient_penalty
from kdkernels.distill.discriminators import SAGANDiscriminator


def structured(order="generator_first", steps=1, **kwargs):
    torch.manual_seed(0)
    method = StructuredKD(
        "classifier", "classifier", "body", "body", num_classes=4, discriminator_conv_dim=8, discriminator_depth=2,
        order=order, discriminator_steps=steps, **kwargs,
    )
    return Distiller(TinySegmenter(4), TinySegmenter(8), [method]), method


def batch():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class Recorder:
    """Logs optimiser steps and, per parameter group, every gradient accumulation."""

    def __init__(self, trainer, distiller, method):
        self.events = []
        for tag, opt in (("G-step", trainer.optimizer), ("D-step", trainer.discriminator_optimizers[method.name])):
            opt.register_step_post_hook(lambda *_, tag=tag: self.events.append(tag))
        groups = {
            "student": list(distiller.student.parameters()),
            "discriminator": list(method.discriminator.parameters()),
            "teacher": list(distiller.teacher.parameters()),
        }
        for tag, params in groups.items():
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p, tag=tag: self.events.append(tag))

    def phases(self):
        """Collapse runs: ['student', 'G-step', 'discriminator', 'D-step', ...]."""
        out = []
        for e in self.events:
            if not out or out[-1] != e:
                out.append(e)
        return out


@pytest.mark.parametrize(
    "order, steps, expected",
    [
        ("generator_first", 1, ["student", "G-step", "discriminator", "D-step"]),
        ("generator_first", 2, ["student", "G-step", "discriminator", "D-step", "discriminator", "D-step"]),
        ("discriminator_first", 3, ["discriminator", "D-step"] * 3 + ["student", "G-step"]),
    ],
)
def test_order_and_ratio_as_declared_and_gradients_stay_on_their_side(order, steps, expected):
    distiller, method = structured(order, steps)
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.01))
    recorder = Recorder(trainer, distiller, method)
    step = trainer.step(batch())
    # Each backward touches only its own side; the teacher never gets a gradient.
    assert recorder.phases() == expected
    assert "teacher" not in recorder.events
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert set(step.losses) == {
        "structured_kd/pixel_wise", "structured_kd/pair_wise", "structured_kd/adversarial",
        "structured_kd/discriminator", "structured_kd/gradient_penalty",
    }
    assert all(torch.isfinite(v) for v in step.losses.values())


@pytest.mark.parametrize("order", ["generator_first", "discriminator_first"])
def test_adversarial_term_uses_the_discriminator_of_the_declared_order(order):
    """A plain conv critic (no BN, no spectral norm: no state changes with a call), a frozen student."""
    torch.manual_seed(0)
    critic = nn.Conv2d(4, 1, 4, 2, 1)
    distiller, method = structured(order, 1, discriminator=critic, pair_wise_weight=0.0)
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.0))
    x = batch()
    scores = distiller.student(x).detach()
    before = -0.1 * critic(scores).mean().detach()
    step = trainer.step(x)
    after = -0.1 * critic(scores).mean().detach()
    assert not torch.allclose(before, after, rtol=1e-3)
    expected = after if order == "discriminator_first" else before
    torch.testing.assert_close(step.losses["structured_kd/adversarial"], expected, rtol=1e-6, atol=1e-7)


def test_frozen_call_gives_input_gradients_only():
    d = SAGANDiscriminator(4, conv_dim=8, depth=2)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    d.eval()
    out = call_with_frozen_parameters(d, x)
    torch.testing.assert_close(out, d(x))
    out.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in d.parameters())


def test_gradient_penalty_checks_shapes():
    d = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="real shape"):
        gradient_penalty(d, torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="epsilon"):
        gradient_penalty(d, torch.randn(2, 3), torch.randn(2, 3), epsilon=torch.rand(3))


def test_gan_compression_step_trains_both_sides():
    torch.manual_seed(0)
    method = GANCompressionDistillation("model.1", "model.1", student_channels=4, teacher_channels=8, input_channels=1, output_channels=3)
    distiller = Distiller(TinyGenerator(4), TinyGenerator(8), [method])
    trainer = AdversarialTrainer(distiller, torch.optim.Adam(generator_parameters(distiller), lr=2e-4, betas=(0.5, 0.999)))
    recorder = Recorder(trainer, distiller, method)
    x, y = torch.randn(2, 1, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1
    before = [p.clone() for p in method.connectors.parameters()]
    step = trainer.step(x, y)
    assert recorder.phases() == ["student", "G-step", "discriminator", "D-step"]
    assert any(not torch.equal(a, b) for a, b in zip(before, method.connectors.parameters()))
    assert set(step.losses) == {f"gan_compression/{k}" for k in ("distill", "recon", "adversarial", "discriminator_fake", "discriminator_real")}
    torch.testing.assert_close(step.discriminator_total, step.losses["gan_compression/discriminator_fake"] + step.losses["gan_compression/discriminator_real"])


def test_autocast_bf16_step():
    distiller, method = structured()
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.01), autocast_dtype=torch.bfloat16)
    step = trainer.step(batch())
    assert all(torch.isfinite(v) for v in step.losses.values())
    assert step.losses["structured_kd/gradient_penalty"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad is not None for p in method.discriminator.parameters())


def test_state_dict_covers_the_discriminator_once_and_round_trips():
    distiller, method = structured()
    trainer = AdversarialTrainer(distiller, torch.optim.SGD(generator_parameters(distiller), lr=0.01, momentum=0.9))
    trainer.step(batch())
    state = distiller.state_dict()
    d_keys = [k for k in state if "discriminator" in k]
    assert d_keys and all(k.startswith("methods.0.discriminator.") for k in d_keys)
    other, other_method = structured()
    other.load_state_dict(state)
    other_method.discriminator.eval(), method.discriminator.eval()
    probe = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(other_method.discriminator(probe), method.discriminator(probe))
    other_trainer = AdversarialTrainer(other, torch.optim.SGD(generator_parameters(other), lr=0.01, momentum=0.9))
    other_trainer.load_state_dict(trainer.state_dict())
    assert other_trainer.discriminator_optimizers["structured_kd"].state_dict()["state"]


def test_parameter_split():
    distiller, method = structured()
    d_ids = {id(p) for p in method.discriminator.parameters()}
    assert {id(p) for p in discriminator_parameters(distiller)} == d_ids
    g = generator_parameters(distiller)
    assert not d_ids & {id(p) for p in g} and len(g) == len(list(distiller.student.parameters()))


def test_bad_configurations():
    distiller, method = structured()
    with pytest.raises(ValueError, match="generator_parameters"):
        AdversarialTrainer(distiller, torch.optim.SGD(distiller.parameters(), lr=0.01))
    good = torch.optim.SGD(generator_parameters(distiller), lr=0.01)
    with pytest.raises(ValueError, match="no adversarial method named"):
        AdversarialTrainer(distiller, good, {"holistic": torch.optim.SGD(method.discriminator.parameters(), lr=0.1)})
    with pytest.raises(ValueError, match="not its discriminator"):
        AdversarialTrainer(distiller, good, {"structured_kd": torch.optim.SGD(distiller.student.parameters(), lr=0.1)})
    with pytest.raises(ValueError, match="no method owns a discriminator"):
        plain = Distiller(TinySegmenter(4), TinySegmenter(8), [HintonKD("classifier", "classifier", alpha=1.0)])
        AdversarialTrainer(plain, torch.optim.SGD(plain.parameters(), lr=0.01))
    with pytest.raises(ValueError, match="unwrapped Distiller"):
        AdversarialTrainer(nn.DataParallel(distiller), good)
    with pytest.raises(RuntimeError, match="process group"):
        AdversarialTrainer(distiller, good, ddp={})
    with pytest.raises(TypeError, match="autocast_dtype"):
        AdversarialTrainer(distiller, good, autocast_dtype="bf16")
    with pytest.raises(RuntimeError, match="run the distiller's forward first"):
        method.pending_inputs()


def test_calibration_records_the_parts_and_leaves_no_discriminator_inputs():
    """calibrate_weights on an adversarial method of several parts: the record holds each part
    (unweighted by ``weight``, as the loss, in the same read) and its measuring forward leaves no
    pending discriminator inputs behind (they are no training step's)."""
    distiller, method = structured()
    images = batch()
    calibrate_weights(distiller, images, None, task_loss=lambda output, target: output.float().square().mean(), verbose=False)
    record = method.calibration
    assert set(record["parts"]) == {"pixel_wise", "pair_wise", "adversarial"}
    assert sum(record["parts"].values()) == pytest.approx(record["loss"], rel=1e-5)
    assert method.weight == pytest.approx(record["task_loss"] / record["loss"])
    with pytest.raises(RuntimeError):
        method.pending_inputs()
