"""Online mutual learning, BYOT self-distillation and born-again generations."""

import pytest
import torch
import torch.nn.functional as F

from distill_nets import SmallCNN, images
from kdkernels.distill import BYOT, BornAgainEnsemble, Distiller, MutualLearning, born_again
from training_steps import loss_before_and_after


def kl(p_logits, q_logits):
    """KL(p ‖ q) at T = 1, mean over the batch (DML's kl_loss_compute without its 1e-8)."""
    p = p_logits.softmax(1)
    return (p * (p.log() - q_logits.log_softmax(1))).sum(1).mean()


@pytest.mark.parametrize("peer_reduction, scale", [("sum", 1.0), ("mean", 0.5)])
def test_mutual_learning_matches_formula(peer_reduction, scale):
    peers = [SmallCNN(4, bn=False), SmallCNN(4, bn=False), SmallCNN(6, bn=False)]
    x, y = images(), torch.randint(0, 5, (6,))
    out = MutualLearning(peers, peer_reduction=peer_reduction)(x, y)
    z = [p(x) for p in peers]
    for k in range(3):
        torch.testing.assert_close(out.losses[f"peer{k}/ce"], F.cross_entropy(z[k], y))
        expected = scale * sum(kl(z[l], z[k]) for l in range(3) if l != k)
        torch.testing.assert_close(out.losses[f"peer{k}/kl"], expected)
    assert len(out.student_output) == 3


def test_mutual_learning_peer_loss_reaches_only_its_peer():
    peers = [SmallCNN(4), SmallCNN(4)]
    out = MutualLearning(peers)(images(), torch.randint(0, 5, (6,)))
    out.losses["peer0/kl"].backward()
    assert all(p.grad is not None for p in peers[0].parameters())
    assert all(p.grad is None for p in peers[1].parameters())


def test_mutual_learning_updates_every_peer_and_lowers_the_loss():
    peers = [SmallCNN(4), SmallCNN(4)]
    dml = MutualLearning(peers)
    before = [p.fc.weight.detach().clone() for p in peers]
    optimizer = torch.optim.Adam(dml.parameters(), lr=1e-2)
    x, y = images(), torch.randint(0, 5, (6,))
    first, last = loss_before_and_after(lambda: dml(x, y).total, optimizer, steps=8)
    assert last < first
    assert all(not torch.equal(b, p.fc.weight) for b, p in zip(before, peers))


def test_mutual_learning_needs_two_peers():
    with pytest.raises(ValueError, match="at least 2 peers"):
        MutualLearning([SmallCNN()])
    with pytest.raises(ValueError, match="peer_reduction"):
        MutualLearning([SmallCNN(), SmallCNN()], peer_reduction="avg")


def make_byot(**kwargs):
    model = SmallCNN(4)
    return model, BYOT(model, stage_layers=["relu1"], stage_channels=[4], feature_layer="pool", feature_dim=8, num_classes=5, **kwargs)


@pytest.mark.parametrize("head", ["bottleneck", "pointwise"])
def test_byot_matches_formula(head):
    # relu1 is 8×8, the deepest stage 4×4: the bottleneck's middle conv is 2×2 of stride 2
    model, byot = make_byot(temperature=3.0, alpha=0.1, feature_weight=1e-2, head=head, stage_strides=[2])
    x, y = images(), torch.randint(0, 5, (6,))
    out = byot(x, y)
    stem = model.relu1(model.layer1(model.stem(x)))
    f_c = model.pool(model.relu2(model.layer2(stem))).flatten(1)
    z_c = model.fc(f_c)
    layers = byot.heads[0].bottleneck
    h = stem
    # (conv, BN) pairs, each followed by a ReLU: the unofficial code's 1×1 → D/4, k×k stride k, 1×1 → D
    for conv_at, kernel, channels in ([(0, 1, 2), (3, 2, 2), (6, 1, 8)] if head == "bottleneck" else [(0, 1, 8)]):
        conv, bn = layers[conv_at], layers[conv_at + 1]
        assert conv.kernel_size == (kernel, kernel) and conv.stride == (kernel, kernel) and conv.out_channels == channels
        h = bn(conv(h)).relu()
    assert h.shape[-2:] == ((4, 4) if head == "bottleneck" else (8, 8))
    f_1 = h.mean((2, 3))
    z_1 = byot.heads[0].fc(f_1)
    T, a = 3.0, 0.1
    torch.testing.assert_close(out.losses["deepest/ce"], (1 - a) * F.cross_entropy(z_c, y))
    torch.testing.assert_close(out.losses["head0/ce"], (1 - a) * F.cross_entropy(z_1, y))
    torch.testing.assert_close(out.losses["head0/kd"], a * T * T * kl(z_c / T, z_1 / T))
    torch.testing.assert_close(out.losses["head0/feature"], 1e-2 * ((f_1 - f_c) ** 2).sum())
    torch.testing.assert_close(out.student_output, z_c)


def test_byot_deepest_is_the_teacher():
    model, byot = make_byot()
    out = byot(images(), torch.randint(0, 5, (6,)))
    (out.losses["head0/kd"] + out.losses["head0/feature"]).backward()
    assert model.fc.weight.grad is None and model.layer2[0].weight.grad is None  # sg[z_C], sg[F_C]
    assert all(p.grad is not None for p in byot.heads.parameters())
    assert model.stem[0].weight.grad is not None


def test_byot_trains_and_predicts_every_head():
    model, byot = make_byot()
    optimizer = torch.optim.Adam(byot.parameters(), lr=1e-2)
    x, y = images(), torch.randint(0, 5, (6,))
    first, last = loss_before_and_after(lambda: byot(x, y).total, optimizer, steps=8)
    assert last < first
    assert [z.shape for z in byot.predict(x)] == [(6, 5), (6, 5)]


@pytest.mark.parametrize("kwargs, match", [(dict(head="conv"), "head must be one of"), (dict(stage_strides=[2, 2]), "stage_strides"),
                                           (dict(stage_strides=[0]), "stage_strides"), (dict(stage_strides=[1.5]), "stage_strides")])
def test_byot_bad_head_arguments_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_byot(**kwargs)


def test_byot_wrong_feature_dim_is_an_error():
    model = SmallCNN(4)
    byot = BYOT(model, ["relu1"], [4], feature_layer="pool", feature_dim=6, num_classes=5)
    with pytest.raises(ValueError, match="check feature_dim"):
        byot(images(), torch.randint(0, 5, (6,)))


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_byot_calibrate_sets_the_feature_term_to_ratio_times_the_ce(ratio):
    model, byot = make_byot()
    x, y = images(), torch.randint(0, 5, (6,))
    buffers = {k: v.clone() for k, v in byot.state_dict().items() if "running" in k or "num_batches" in k}
    byot.eval()
    weight = byot.calibrate(x, y, ratio=ratio, verbose=False)
    assert not byot.training  # the caller's mode is kept
    assert all(torch.equal(v, byot.state_dict()[k]) for k, v in buffers.items())  # BatchNorm statistics put back
    assert weight == byot.feature_weight != 1e-6 and byot.calibration["weight_before"] == 1e-6
    byot.train()
    out = byot(x, y)
    ce = out.losses["deepest/ce"] / (1 - byot.alpha)
    torch.testing.assert_close(out.losses["head0/feature"], ratio * ce, rtol=1e-5, atol=0)


def test_byot_calibration_travels_in_the_state_dict():
    _, byot = make_byot()
    byot.calibrate(images(), torch.randint(0, 5, (6,)), verbose=False)
    _, fresh = make_byot()
    fresh.load_state_dict(byot.state_dict())
    assert fresh.feature_weight == byot.feature_weight and fresh.calibration == byot.calibration


def test_byot_calibrate_bad_input():
    _, byot = make_byot()
    x, y = images(), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match="ratio"):
        byot.calibrate(x, y, ratio=0)
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="feature_weight left at 1e-06"):
        assert byot.calibrate(x, y, verbose=False) == 1e-6
    assert byot.calibration is None


def test_born_again_trains_generations_on_their_predecessor():
    teacher = SmallCNN(4)
    x, y = images(), torch.randint(0, 5, (6,))
    seen = []

    def train(distiller: Distiller):
        seen.append((distiller.teacher, sorted(distiller(x, y).losses)))
        optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            distiller(x, y).total.backward()
            optimizer.step()

    models = born_again(teacher, lambda: SmallCNN(4), train, generations=2)
    assert len(models) == 3 and models[0] is teacher
    assert seen[0][0] is teacher and seen[1][0] is models[1]
    assert seen[0][1] == ["born_again/kd", "ce"]
    assert not any(m._forward_hooks for model in models for m in model.modules())
    for model in models:
        model.eval()
    ensemble = BornAgainEnsemble(models[1:])
    expected = (models[1](x).softmax(1) + models[2](x).softmax(1)) / 2
    torch.testing.assert_close(ensemble(x), expected)


def test_born_again_loss_is_kl_at_t1_plus_ce():
    teacher, x, y = SmallCNN(4), images(), torch.randint(0, 5, (6,))
    teacher.eval()
    captured = {}

    def train(distiller):
        captured["out"] = distiller(x, y)
        captured["student"] = distiller.student

    born_again(teacher, lambda: SmallCNN(4), train, generations=1)
    z_s = captured["out"].student_output
    torch.testing.assert_close(captured["out"].losses["born_again/kd"], kl(teacher(x), z_s))
    torch.testing.assert_close(captured["out"].losses["ce"], F.cross_entropy(z_s, y))
