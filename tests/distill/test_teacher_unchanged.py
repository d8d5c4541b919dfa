"""Distillation never changes the teacher: its state_dict is bitwise the same after training
steps with every method and with born-again (the schemes that have a teacher), including OFD's
BatchNorm-in-train-mode teacher, which normalises with batch statistics but keeps its running ones."""

import copy

import pytest
import torch
from torch import nn

from distill_nets import SmallCNN, images
from kdkernels.distill import OFD, Distiller, FeatureSpec, HintonKD, born_again
from test_distiller import CASES, PRE_RELU, build


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def train_steps(distiller, x, y, steps=3):
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller.train()
    for _ in range(steps):
        optimizer.zero_grad()
        distiller(x, y).total.backward()
        optimizer.step()


@pytest.mark.parametrize("case", CASES)
def test_teacher_state_dict_is_bitwise_unchanged(case):
    distiller, student, teacher, x, y = build(case)
    before = snapshot(teacher)
    train_steps(distiller, x, y)
    assert_bitwise_equal(before, teacher)


@pytest.mark.parametrize("teacher_mode", ["bn_train", "train"])
def test_ofd_teacher_in_train_mode_is_unchanged(teacher_mode):
    teacher = SmallCNN(8)
    ofd = OFD(PRE_RELU, PRE_RELU, teacher_bns=["layer1.1", "layer2.1"], student_channels=[4, 8], teacher_mode=teacher_mode)
    distiller = Distiller(SmallCNN(4), teacher, [HintonKD(), ofd])
    before = snapshot(teacher)
    train_steps(distiller, images(), torch.randint(0, 5, (6,)))
    assert_bitwise_equal(before, teacher)
    assert teacher.layer1[1].num_batches_tracked.item() == 0


def test_bn_train_teacher_features_use_batch_statistics():
    teacher = SmallCNN(8)
    with torch.no_grad():  # running statistics far from the batch's, so the two modes differ clearly
        teacher.layer1[1].running_mean.fill_(3.0)
    reference = copy.deepcopy(teacher).train()  # BN in train mode: batch statistics
    seen = []
    teacher.layer1.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    distiller = Distiller(SmallCNN(4), teacher, [OFD(PRE_RELU, PRE_RELU, teacher_bns=["layer1.1", "layer2.1"], student_channels=[4, 8])])
    x = images()
    distiller(x, None)
    evaluated = copy.deepcopy(teacher).eval()  # running statistics
    with torch.no_grad():
        expected = reference.layer1(reference.stem(x))
        with_running = evaluated.layer1(evaluated.stem(x))
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], with_running)


def test_the_official_side_effect_only_behind_its_flag():
    teacher = SmallCNN(8)
    ofd = OFD(PRE_RELU, PRE_RELU, teacher_bns=["layer1.1", "layer2.1"], student_channels=[4, 8], update_teacher_statistics=True)
    distiller = Distiller(SmallCNN(4), teacher, [ofd])
    before = teacher.layer1[1].running_mean.clone()
    distiller(images(), None)
    assert not torch.equal(teacher.layer1[1].running_mean, before)  # as the official t_net.train()
    assert teacher.layer1[1].track_running_stats


def test_born_again_leaves_each_generation_unchanged():
    teacher = SmallCNN(4)
    before = snapshot(teacher)
    x, y = images(), torch.randint(0, 5, (6,))
    models = born_again(teacher, lambda: SmallCNN(4), lambda d: train_steps(d, x, y), generations=2)
    assert_bitwise_equal(before, teacher)
    assert len(models) == 3


def test_teacher_statistics_frozen_only_for_the_call():
    teacher = SmallCNN(8)
    distiller = Distiller(SmallCNN(4), teacher, [HintonKD(), OFD([PRE_RELU[0]], [FeatureSpec("relu1", on="input")], teacher_bns=["layer1.1"], student_channels=[4])])
    distiller(images(), torch.zeros(6, dtype=torch.long))
    assert all(m.track_running_stats for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    teacher.train()(images())  # the user's own training of the teacher still updates its statistics
    assert teacher.layer1[1].num_batches_tracked.item() == 1
