"""Errors that name the mistake (issue 10, distill layer): numbers are keyword-only, shape and
connector errors name the method, the feature and the shapes; OFD rebinds its margins;
DataParallel is refused with a pointer to DDP; float64 inputs stay float64."""

import pytest
import torch
from torch import nn

from distill_nets import SmallCNN, images
from kdkernels import ofd_margin
from kdkernels.distill import (
    FSP,
    OFD,
    RKD,
    AttentionTransfer,
    CrossEntropy,
    Distiller,
    FeatureCapture,
    FitNets,
    HintonKD,
    SimilarityPreserving,
)
from kdkernels.distill.methods.attention_transfer import attention_transfer_loss
from test_distiller import CASES, PRE_RELU, build


def test_a_number_where_a_layer_path_goes_says_so():
    with pytest.raises(TypeError, match=r"hinton_kd: got the number 4.0 where a layer path is expected.*keyword"):
        HintonKD(4.0)
    with pytest.raises(TypeError, match=r"attention_transfer: got the number 1000.0 where a layer path"):
        AttentionTransfer(1000.0, "a")


@pytest.mark.parametrize(
    "make",
    [
        lambda: HintonKD("", "", 4.0),
        lambda: FitNets("a", "b", 4, 8),
        lambda: AttentionTransfer("a", "b", 2.0),
        lambda: FSP([("a", "b")], [("c", "d")], "mean"),
        lambda: RKD("a", "b", 25.0),
        lambda: SimilarityPreserving("a", "b", 3000.0),
        lambda: OFD(["a"], ["b"], ["bn"], [4]),
        lambda: CrossEntropy("", 1.0),
    ],
)
def test_numbers_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional argument"):
        make()


def test_hinton_kd_class_mismatch_reports_the_models_shapes():
    student, teacher = SmallCNN(4, num_classes=10), SmallCNN(8, num_classes=100)
    distiller = Distiller(student, teacher, [HintonKD()])
    with pytest.raises(ValueError, match=r"hinton_kd: <model> of the student has shape \(6, 10\) and <model> of the teacher \(6, 100\)"):
        distiller(images(), torch.zeros(6, dtype=torch.long))


def test_fitnets_wrong_student_channels_names_the_argument():
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [FitNets("relu1", "relu1", student_channels=6, teacher_channels=8)])
    with pytest.raises(ValueError, match=r"fitnets: the student feature relu1 has shape \(6, 4, 8, 8\).*student_channels=6.*pass student_channels=4"):
        distiller(images(), None)


def test_fitnets_linear_connector_checks_the_last_dim():
    method = FitNets("a", "b", student_channels=5, teacher_channels=6, connector="linear")
    with pytest.raises(ValueError, match=r"student_channels=5 \(channels on last dim\); pass student_channels=4"):
        method([torch.randn(2, 3, 4)], [torch.randn(2, 3, 6)], None)


def test_batch_mismatch_names_method_feature_and_shapes():
    with pytest.raises(ValueError, match=r"similarity_preserving: a vs b: batch sizes differ, shapes \(4, 3\) and \(5, 3\)"):
        SimilarityPreserving("a", "b")([torch.randn(4, 3)], [torch.randn(5, 3)], None)
    with pytest.raises(ValueError, match=r"rkd: a vs b: .*\(4, 3\).*\(5, 3\)"):
        RKD("a", "b")([torch.randn(4, 3)], [torch.randn(5, 3)], None)
    with pytest.raises(ValueError, match=r"attention_transfer: a vs b: expected \(B, C, H, W\) feature maps, got shapes \(4, 3\)"):
        AttentionTransfer("a", "b")([torch.randn(4, 3)], [torch.randn(4, 3, 2, 2)], None)
    with pytest.raises(ValueError, match=r"ce: the student's logits \(<model>\) have shape \(4, 5\) and the labels \(3,\)"):
        CrossEntropy()([torch.randn(4, 5)], [], torch.zeros(3, dtype=torch.long))


def test_fsp_says_at_bind_which_widths_differ():
    with pytest.raises(ValueError, match=r"fsp: section 0: the student's \(layer1, layer2\) have widths \(4, 8\) and the teacher's \(layer1, layer2\) \(8, 16\).*equal width.*connector='conv'"):
        Distiller(SmallCNN(4), SmallCNN(8), [FSP([("layer1", "layer2")], [("layer1", "layer2")])])


def test_fsp_connector_maps_student_widths():
    fsp = FSP([("relu1", "relu2")], [("relu1", "relu2")], connector="conv", student_channels=[(4, 8)], teacher_channels=[(8, 16)])
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [fsp])
    distiller(images(), None).total.backward()
    assert all(p.grad is not None for p in fsp.parameters()) and len(list(fsp.parameters())) == 2


def test_fsp_connector_with_wrong_student_channels_names_the_argument():
    fsp = FSP([("relu1", "relu2")], [("relu1", "relu2")], connector="conv", student_channels=[(4, 6)], teacher_channels=[(8, 16)])
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [fsp])
    with pytest.raises(ValueError, match=r"fsp: the student feature relu2 has shape \(6, 8, 4, 4\).*6 channels: fix student_channels\[0\]\[1\]"):
        distiller(images(), None)


def ofd_teacher(gamma, beta):
    teacher = SmallCNN(8)
    with torch.no_grad():
        teacher.layer1[1].weight.fill_(gamma)
        teacher.layer1[1].bias.fill_(beta)
    return teacher


def test_ofd_rebind_recomputes_the_margins():
    ofd = OFD([PRE_RELU[0]], [PRE_RELU[0]], teacher_bns=["layer1.1"], student_channels=[4])
    first, second = ofd_teacher(1.0, -0.5), ofd_teacher(2.0, 0.3)
    Distiller(SmallCNN(4), first, [ofd])
    connector = ofd.connectors[0]
    torch.testing.assert_close(ofd.margins()[0].reshape(-1), ofd_margin(first.layer1[1]).float())
    Distiller(SmallCNN(4), second, [ofd])
    torch.testing.assert_close(ofd.margins()[0].reshape(-1), ofd_margin(second.layer1[1]).float())
    assert ofd.connectors[0] is connector  # trained connectors kept
    with pytest.raises(ValueError, match=r"ofd: rebound to a teacher whose BNs have \[16\] channels.*\[8\]"):
        Distiller(SmallCNN(4), SmallCNN(16), [ofd])


def test_data_parallel_over_several_devices_is_refused_with_a_pointer_to_ddp():
    student = nn.DataParallel(SmallCNN(4))
    student.device_ids = [0, 1]  # as on a 2-GPU machine (CPU-only here)
    with pytest.raises(ValueError, match="student: nn.DataParallel over several devices.*DistributedDataParallel"):
        Distiller(student, SmallCNN(8), [HintonKD()])


def cpu_replica(module: nn.Module) -> nn.Module:
    """What nn.parallel.replicate builds, without GPUs: replicas (``_is_replica``) of every submodule."""
    replicas = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for original, replica in replicas.items():
        replica._modules = {name: replicas[child] for name, child in original._modules.items()}
        replica._parameters = dict(original._parameters)
    return replicas[module]


def test_a_data_parallel_replica_is_refused_when_captured():
    net = SmallCNN(4)
    capture = FeatureCapture(net, ["relu1"], role="student")
    replica = cpu_replica(net)
    replica(images())  # not armed: the model works on its own
    with pytest.raises(RuntimeError, match="student: nn.DataParallel.*DistributedDataParallel"), capture:
        replica(images())


def test_a_data_parallel_replica_of_the_distiller_is_refused():
    distiller = Distiller(SmallCNN(4), SmallCNN(8), [HintonKD()])
    with pytest.raises(RuntimeError, match="Distiller: nn.DataParallel.*DistributedDataParallel"):
        distiller._replicate_for_data_parallel()(images(), torch.zeros(6, dtype=torch.long))


FLOAT64_CASES = [c for c in CASES if c not in ("feature_map_transfer", "attention_distribution_transfer")]  # mobilebert.py: issue 14


@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_float64_inputs_stay_float64(case):
    distiller, student, teacher, x, y = build(case)
    distiller.to(torch.float64)
    out = distiller(x.double(), y)
    assert all(v.dtype == torch.float64 for v in out.losses.values()), {k: v.dtype for k, v in out.losses.items()}


def test_float64_attention_transfer_is_float64_accurate():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g), torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)

    def q(a):
        v = a.pow(2).mean(1).flatten(1)
        return v / v.norm(dim=1, keepdim=True)

    expected = (q(s) - q(t)).pow(2).mean()
    torch.testing.assert_close(attention_transfer_loss(s, t), expected, rtol=1e-13, atol=0)


def test_half_inputs_are_computed_in_float32():
    s, t = torch.randn(4, 3, 2, 2).bfloat16(), torch.randn(4, 3, 2, 2).bfloat16()
    assert SimilarityPreserving("a", "b")([s], [t], None).dtype == torch.float32
    assert FitNets("a", "b")([s], [t], None).dtype == torch.float32
