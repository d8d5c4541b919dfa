"""Loss-scale calibration (calibrate_weights, Distiller(calibrate="init")) and the first-step
warning when a method's loss dwarfs the task loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from distill_nets import SmallCNN, images
from kdkernels.distill import (
    AttentionTransfer,
    CrossEntropy,
    Distiller,
    FitNets,
    HintonKD,
    LossScaleWarning,
    SimilarityPreserving,
    calibrate_weights,
)


def setup(seed=0, calibrate=None):
    torch.manual_seed(seed)
    student, teacher = SmallCNN(4), SmallCNN(8)
    methods = [
        CrossEntropy(),
        AttentionTransfer(["relu1", "relu2"], ["relu1", "relu2"]),
        SimilarityPreserving("relu2", "relu2"),
        FitNets("relu1", "relu1", student_channels=4, teacher_channels=8),
        HintonKD(),
    ]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    return Distiller(student, teacher, methods, calibrate=calibrate), x, y


def method_losses(out):
    totals = {}
    for key, value in out.losses.items():
        name = key.split("/")[0]
        totals[name] = totals.get(name, 0.0) + value.detach()
    return totals


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_each_method_starts_at_ratio_times_the_task_loss(ratio):
    distiller, x, y = setup()
    weights = calibrate_weights(distiller, x, y, ratio=ratio, verbose=False)
    assert set(weights) == {"attention_transfer", "similarity_preserving", "fitnets", "hinton_kd"}
    totals = method_losses(distiller(x, y))
    for name in weights:
        torch.testing.assert_close(totals[name], ratio * totals["ce"], rtol=1e-5, atol=0)
    assert distiller.methods[0].weight == 1.0  # the task loss is not calibrated


def test_without_a_ce_method_the_task_loss_is_the_ce_of_the_logits():
    torch.manual_seed(0)
    student, teacher, x, y = SmallCNN(4), SmallCNN(8), images(), torch.randint(0, 5, (6,))
    distiller = Distiller(student, teacher, [SimilarityPreserving("relu2", "relu2")])
    calibrate_weights(distiller, x, y, verbose=False)
    out = distiller(x, y)
    torch.testing.assert_close(out.losses["similarity_preserving"], F.cross_entropy(out.student_output, y).detach(), rtol=1e-5, atol=0)


def test_calibration_is_deterministic_and_has_no_side_effects():
    a, x, y = setup()
    b, _, _ = setup()
    student_buffers = {k: v.clone() for k, v in a.named_buffers()}
    teacher_state = {k: v.clone() for k, v in a.teacher.state_dict().items()}
    rng = torch.get_rng_state()
    first = calibrate_weights(a, x, y, verbose=False)
    assert first == calibrate_weights(b, x, y, verbose=False)
    assert first == calibrate_weights(a, x, y, verbose=False)  # measures unweighted losses: idempotent
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, student_buffers[k]) for k, v in a.named_buffers())
    assert all(torch.equal(v, teacher_state[k]) for k, v in a.teacher.state_dict().items())


def test_weights_and_record_are_saved_in_state_dict():
    distiller, x, y = setup()
    weights = calibrate_weights(distiller, x, y, verbose=False)
    fresh, _, _ = setup(seed=3)
    assert fresh.methods[1].weight == 1e3
    fresh.load_state_dict(distiller.state_dict())
    for method in fresh.methods[1:]:
        assert method.weight == weights[method.name]
        assert method.calibration["weight_before"] > 0 and method.calibration["task_loss"] > 0


def test_calibration_prints_the_new_weights(capsys):
    distiller, x, y = setup()
    calibrate_weights(distiller, x, y)
    printed = capsys.readouterr().out
    assert "task loss" in printed and "attention_transfer: loss" in printed and "becomes" in printed


def test_calibrate_init_calibrates_on_the_first_training_batch_once():
    explicit, x, y = setup()
    expected = calibrate_weights(explicit, x, y, verbose=False)
    distiller, _, _ = setup(calibrate="init")
    with torch.no_grad():
        distiller(x, y)  # not a training step: nothing calibrated yet
    assert distiller.methods[1].weight == 1e3
    distiller(x, y)
    assert {m.name: m.weight for m in distiller.methods[1:]} == expected
    x2 = x.flip(0)
    distiller(x2, y)
    assert {m.name: m.weight for m in distiller.methods[1:]} == expected  # not again
    loaded, _, _ = setup(seed=5, calibrate="init")
    loaded.load_state_dict(distiller.state_dict())
    loaded(x2, y)
    assert {m.name: m.weight for m in loaded.methods[1:]} == expected  # calibrated before: kept


def test_first_step_warning_names_the_method_once():
    torch.manual_seed(0)
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [CrossEntropy(), FitNets("relu1", "relu1", student_channels=4, teacher_channels=8, weight=1e4)])
    x, y = images(), torch.randint(0, 5, (6,))
    with pytest.warns(LossScaleWarning, match=r"fitnets [0-9.e+]+ is more than 10x the task loss"):
        distiller(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller(x, y)  # once only


def test_no_warning_when_the_scales_are_close():
    distiller, x, y = setup()
    calibrate_weights(distiller, x, y, ratio=5.0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller(x, y)


def test_errors_name_the_argument():
    distiller, x, y = setup()
    with pytest.raises(ValueError, match="ratio"):
        calibrate_weights(distiller, x, y, ratio=0.0)
    with pytest.raises(ValueError, match="no method named 'fsp'"):
        calibrate_weights(distiller, x, y, methods=["fsp"])
    only_kd = Distiller(SmallCNN(4), SmallCNN(8), [SimilarityPreserving("relu2", "relu2")])
    with pytest.raises(ValueError, match="no task loss"):
        calibrate_weights(only_kd, x, None)
    with pytest.raises(ValueError, match="calibrate: expected None or 'init'"):
        Distiller(SmallCNN(4), SmallCNN(8), [HintonKD()], calibrate="first")


def test_custom_task_loss():
    distiller, x, y = setup()
    weights = calibrate_weights(distiller, x, y, task_loss=lambda output, target: torch.tensor(2.0), methods=["fitnets"], verbose=False)
    assert list(weights) == ["fitnets"]
    torch.testing.assert_close(method_losses(distiller(x, y))["fitnets"], torch.tensor(2.0), rtol=1e-5, atol=0)


def test_scale_check_waits_for_its_event_instead_of_syncing():
    """The CUDA path in CPU form: until the copy's event has passed, poll() neither reads nor warns."""
    from kdkernels.distill.calibration import LossScaleCheck

    class Event:
        done = False

        def query(self):
            return self.done

    check = LossScaleCheck(["sp"], [torch.tensor(50.0)], torch.tensor(2.0))
    check.event = Event()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check.poll() is False
    check.event.done = True
    with pytest.warns(LossScaleWarning, match="sp 50 is more than 10x the task loss 2"):
        assert check.poll() is True


def test_scale_check_on_meta_tensors_checks_nothing():
    from kdkernels.distill.calibration import LossScaleCheck

    check = LossScaleCheck(["sp"], [torch.tensor(50.0, device="meta")], torch.tensor(2.0, device="meta"))
    assert check.poll() is True
