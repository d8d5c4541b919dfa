"""The Distiller with every method on small models: gradients, training, teacher policy,
parameters / state_dict, autocast, no host syncs."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from distill_nets import SmallCNN, TinyEncoder, images
from training_steps import loss_before_and_after
from kdkernels.distill import (
    FSP,
    OFD,
    RKD,
    AttentionDistributionTransfer,
    AttentionTransfer,
    CrossEntropy,
    Distiller,
    FeatureMapTransfer,
    FeatureSpec,
    FitNets,
    HintonKD,
    SimilarityPreserving,
    hint_parameters,
)

PRE_RELU = [FeatureSpec("relu1", on="input"), FeatureSpec("relu2", on="input")]


def cnn_setup(method_factory, teacher_width=8):
    return SmallCNN(4), SmallCNN(teacher_width), method_factory, images(), torch.randint(0, 5, (6,))


def text_setup(method_factory):
    tokens = torch.randint(0, 11, (3, 6))
    return TinyEncoder(), TinyEncoder(), method_factory, tokens, torch.randint(0, 11, (3, 6))


CASES = {
    "hinton_kd": lambda: cnn_setup(lambda: [HintonKD()]),
    "fitnets": lambda: cnn_setup(lambda: [FitNets("relu1", "relu1", student_channels=4, teacher_channels=8)]),
    "attention_transfer": lambda: cnn_setup(lambda: [AttentionTransfer(["relu1", "relu2"], ["relu1", "relu2"])]),
    "fsp": lambda: cnn_setup(lambda: [FSP([("relu1", "relu2")], [("relu1", "relu2")])], teacher_width=4),
    "rkd": lambda: cnn_setup(lambda: [RKD("pool", "pool")]),
    "similarity_preserving": lambda: cnn_setup(lambda: [SimilarityPreserving("relu2", "relu2")]),
    "ofd": lambda: cnn_setup(lambda: [OFD(PRE_RELU, PRE_RELU, teacher_bns=["layer1.1", "layer2.1"], student_channels=[4, 8])]),
    "feature_map_transfer": lambda: text_setup(lambda: [FeatureMapTransfer(["layers.0", "layers.1"], ["layers.0", "layers.1"])]),
    "attention_distribution_transfer": lambda: text_setup(
        lambda: [AttentionDistributionTransfer([FeatureSpec(f"layers.{i}.softmax", on="input") for i in (0, 1)], [FeatureSpec(f"layers.{i}.softmax", on="input") for i in (0, 1)])]
    ),
}


def build(case):
    student, teacher, methods, x, y = CASES[case]()
    return Distiller(student, teacher, methods()), student, teacher, x, y


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_student_and_connectors_never_teacher(case):
    distiller, student, teacher, x, y = build(case)
    out = distiller(x, y)
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    connector_params = list(distiller.methods.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("case", CASES)
def test_a_few_optimizer_steps_lower_the_loss(case):
    distiller, student, teacher, x, y = build(case)
    optimizer = torch.optim.Adam(distiller.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        optimizer.zero_grad()
        total = distiller(x, y).total
        first = total.detach() if first is None else first
        total.backward()
        optimizer.step()
    assert distiller(x, y).total < first


def test_losses_are_weighted_and_summed():
    student, teacher, x, y = SmallCNN(4), SmallCNN(8), images(), torch.randint(0, 5, (6,))
    sp = SimilarityPreserving("relu2", "relu2", weight=2.5)
    distiller = Distiller(student, teacher, [HintonKD(weight=0.5), sp, CrossEntropy(weight=0.1)])
    out = distiller(x, y)
    assert set(out.losses) == {"hinton_kd/kd", "hinton_kd/ce", "similarity_preserving", "ce"}
    assert out.student_output.shape == (6, 5)
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
    raw = HintonKD()([s_logits], [t_logits], y)
    torch.testing.assert_close(out.losses["hinton_kd/kd"], 0.5 * raw["kd"])
    torch.testing.assert_close(out.total, sum(out.losses.values()))


def test_parameters_cover_student_and_connectors_not_teacher():
    distiller, student, teacher, x, y = build("ofd")
    ids = {id(p) for p in distiller.parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in distiller.methods.parameters()}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert len(list(distiller.methods.parameters())) == 6  # two conv + BN connectors


def test_state_dict_round_trip():
    distiller, student, teacher, x, y = build("ofd")
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller(x, y).total.backward()
    optimizer.step()
    state = distiller.state_dict()
    assert any(k.startswith("methods.0.connectors.") for k in state)
    assert not any(k.startswith("teacher") for k in state)
    fresh = Distiller(SmallCNN(4), teacher, [OFD(PRE_RELU, PRE_RELU, teacher_bns=["layer1.1", "layer2.1"], student_channels=[4, 8])])
    assert not torch.equal(fresh.methods[0].connectors[0][0].weight, distiller.methods[0].connectors[0][0].weight)
    fresh.load_state_dict(state)
    distiller.eval(), fresh.eval()
    a, b = distiller(x, y), fresh(x, y)
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(a.student_output, b.student_output)


def test_teacher_runs_in_eval_and_train_does_not_flip_it():
    teacher = nn.Sequential(SmallCNN(8), nn.Dropout(0.5))
    teacher.train()
    distiller = Distiller(SmallCNN(4), teacher, [HintonKD()])
    assert not teacher.training
    distiller.train()
    assert distiller.student.training and not any(m.training for m in teacher.modules())
    stats = teacher[0].stem[1].running_mean.clone()
    x = images()
    out1, out2 = distiller(x, torch.zeros(6, dtype=torch.long)), distiller(x, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(out1.losses["hinton_kd/kd"], out2.losses["hinton_kd/kd"])  # no dropout in the teacher
    assert torch.equal(teacher[0].stem[1].running_mean, stats)


def test_ofd_keeps_teacher_bn_in_train_mode():
    teacher = nn.Sequential(SmallCNN(8), nn.Dropout(0.5))
    spec = [FeatureSpec("0.relu1", on="input")]
    distiller = Distiller(SmallCNN(4), teacher, [HintonKD(), OFD([PRE_RELU[0]], spec, teacher_bns=["0.layer1.1"], student_channels=[4])])
    distiller.train()
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.training for bn in bns) and not teacher[1].training
    stats = bns[0].running_mean.clone()
    distiller(images(), torch.zeros(6, dtype=torch.long))
    assert torch.equal(bns[0].running_mean, stats)  # batch statistics used, running ones untouched (test_teacher_unchanged.py)
    assert all(p.grad is None for p in teacher.parameters())
    distiller.eval()
    assert not any(m.training for m in teacher.modules())


def test_methods_without_teacher_features_skip_the_teacher():
    calls = []
    teacher = SmallCNN(8)
    teacher.register_forward_hook(lambda *a: calls.append(1))
    Distiller(SmallCNN(4), teacher, [CrossEntropy()])(images(), torch.zeros(6, dtype=torch.long))
    assert not calls


def test_to_moves_the_teacher_too():
    distiller, student, teacher, x, y = build("hinton_kd")
    distiller.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64 and next(student.parameters()).dtype == torch.float64
    assert distiller(x.double(), y).total.dtype == torch.float64


def test_unknown_path_is_an_error_with_close_matches():
    with pytest.raises(ValueError, match=r"student: no module at path 'relu_1'.*'relu1'"):
        Distiller(SmallCNN(4), SmallCNN(8), [FitNets("relu_1", "relu1", student_channels=4, teacher_channels=8)])
    with pytest.raises(ValueError, match=r"teacher: no module at path 'layer3'.*'layer1'"):
        Distiller(SmallCNN(4), SmallCNN(8), [AttentionTransfer("layer1", "layer3")])


def test_channel_mismatch_without_connector_is_an_error():
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [FitNets("relu1", "relu1")])
    with pytest.raises(ValueError, match=r"fitnets: relu1 vs relu1: student shape \(6, 4, 8, 8\).*\(6, 8, 8, 8\).*student_channels"):
        distiller(images(), None)


def test_duplicate_method_names_are_an_error():
    with pytest.raises(ValueError, match="two methods are named 'hinton_kd'"):
        Distiller(SmallCNN(4), SmallCNN(8), [HintonKD(), HintonKD(temperature=2)])
    Distiller(SmallCNN(4), SmallCNN(8), [HintonKD(), HintonKD(temperature=2, name="kd_t2")])


def test_remove_hooks():
    distiller, student, teacher, x, y = build("fitnets")
    distiller.remove_hooks()
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


@pytest.mark.parametrize("case", CASES)
def test_autocast_bf16_runs(case):
    distiller, student, teacher, x, y = build(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(x, y)
    assert torch.isfinite(out.total) and all(v.dtype == torch.float32 for v in out.losses.values())
    out.total.backward()
    assert all(p.grad is not None for p in distiller.methods.parameters())


class _HostSyncs(TorchDispatchMode):
    """Ops that copy a value to the host (a synchronisation on a GPU) or have a data-dependent shape."""

    SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append("index with a bool mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", CASES)
def test_no_host_syncs_per_step(case):
    """On meta tensors (no data: reading a value fails, and the losses' CPU-only value checks are
    skipped as on a GPU), a training step runs no op that copies a value to the host."""
    distiller, student, teacher, x, y = build(case)
    distiller.to("meta")
    with _HostSyncs() as mode:
        distiller(x.to("meta"), y.to("meta")).total.backward()
    assert mode.seen == []
    assert next(student.parameters()).grad.device.type == "meta"


def test_host_sync_detector_detects():
    with _HostSyncs() as mode:
        torch.randn(3).sum().item()
        x = torch.randn(4)
        x[x > 0].mean()
    assert mode.seen == ["_local_scalar_dense.default", "index with a bool mask"]


def test_compiled_student_and_teacher_give_the_same_losses():
    student, teacher, x, y = SmallCNN(4), SmallCNN(8), images(), torch.randint(0, 5, (6,))
    methods = lambda: [HintonKD(), FitNets(FeatureSpec("relu1", on="input"), "relu1", student_channels=4, teacher_channels=8)]  # noqa: E731
    plain = Distiller(student, teacher, methods())
    expected = plain(x, y).losses
    plain.remove_hooks()
    compiled = Distiller(torch.compile(student, backend="eager"), torch.compile(teacher, backend="eager"), methods())
    compiled.methods.load_state_dict(plain.methods.state_dict())
    for name, value in compiled(x, y).losses.items():
        torch.testing.assert_close(value, expected[name])


def test_fitnets_two_stages():
    student, teacher, x, y = SmallCNN(4), SmallCNN(8), images(), torch.randint(0, 5, (6,))
    params = hint_parameters(student, "relu1", x[:2])
    assert {id(p) for p in params} == {id(p) for m in (student.stem, student.layer1) for p in m.parameters()}
    assert not any(m._forward_hooks for m in student.modules()) and student.training
    # Stage 1: guided layer + regressor on the hint alone; the rest of the student is untouched.
    stage1 = Distiller(student, teacher, [FitNets("relu1", "relu1", student_channels=4, teacher_channels=8)])
    optimizer = torch.optim.SGD(params + list(stage1.methods.parameters()), lr=0.05, weight_decay=5e-4)
    fc_before = student.fc.weight.detach().clone()
    first, last = loss_before_and_after(lambda: stage1(x).total, optimizer, steps=5)
    assert last < first and torch.equal(student.fc.weight, fc_before)
    stage1.remove_hooks()
    # Stage 2: the whole student with KD.
    stage2 = Distiller(student, teacher, [HintonKD()])
    stage2(x, y).total.backward()
    assert student.fc.weight.grad is not None and not list(stage2.methods.parameters())


def test_forward_passes_keyword_arguments_to_both_models():
    class Scaled(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.net = SmallCNN(width)

        def forward(self, x, scale=1.0):
            return self.net(x) * scale

    distiller = Distiller(Scaled(4), Scaled(8), [HintonKD(alpha=1.0)])
    x = images()
    out = distiller(x, scale=3.0)
    torch.testing.assert_close(out.student_output, 3.0 * distiller.student.net(x))


def test_teacher_cannot_be_the_student():
    student = SmallCNN(4)
    with pytest.raises(ValueError, match="the teacher is the student"):
        Distiller(torch.compile(student, backend="eager"), student, [HintonKD()])
