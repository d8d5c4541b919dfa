"""NetAug: dynamic layers against plain layers, the supernet's base and export against the model,
the two-pass step's gradients, the schedule, channel sorting, BN re-estimation, bad configurations."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import NetAug, Supernet
from kdkernels.distill.netaug import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, make_divisible


class InvertedResidual(nn.Module):
    """MobileNetV2's block (torchvision layout: ``conv`` Sequential, ``use_res_connect`` flag)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def tiny_mobilenet(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3),
        nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that slicing them matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# --- dynamic layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 6])
def test_dynamic_conv_at_full_width_equals_the_plain_conv(groups):
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=groups, bias=True).double()
    dynamic = DynamicConv2d.from_conv(conv, 6, 6)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert dynamic.weight.dtype == torch.float64
    assert torch.equal(dynamic(x), conv(x))


def test_dynamic_conv_at_narrow_width_equals_a_conv_of_the_sliced_weights():
    dynamic = DynamicConv2d(10, 12, 3, padding=1, bias=True).double()
    dynamic.active_out = 5
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    plain = nn.Conv2d(4, 5, 3, padding=1, bias=True).double()
    with torch.no_grad():
        plain.weight.copy_(dynamic.weight[:5, :4])
        plain.bias.copy_(dynamic.bias[:5])
    assert torch.equal(dynamic(x), plain(x))
    assert torch.equal(dynamic.export(4)(x), plain(x))


def test_dynamic_depthwise_conv_follows_its_input_width():
    dynamic = DynamicConv2d(9, 9, 3, padding=1, groups=9, bias=False).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, dynamic.weight[:4], None, 1, 1, 1, 4)
    assert torch.equal(dynamic(x), expected)
    assert dynamic(x).shape[1] == 4


def test_dynamic_linear_at_narrow_width_equals_a_linear_of_the_sliced_weights():
    dynamic = DynamicLinear(10, 7).double()
    dynamic.active_out = 3
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(dynamic(x), F.linear(x, dynamic.weight[:3, :6].contiguous(), dynamic.bias[:3]))


@pytest.mark.parametrize("training", [True, False])
def test_dynamic_batchnorm_uses_and_updates_only_the_leading_channels(training):
    dynamic = DynamicBatchNorm2d(8).double()
    randomise_bn(dynamic)
    plain = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(plain, name).copy_(getattr(dynamic, name)[:5])
    tail_mean, tail_var = dynamic.running_mean[5:].clone(), dynamic.running_var[5:].clone()
    dynamic.train(training)
    plain.train(training)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    assert torch.equal(dynamic(x), plain(x))
    assert torch.equal(dynamic.running_mean[:5], plain.running_mean)
    assert torch.equal(dynamic.running_var[:5], plain.running_var)
    assert torch.equal(dynamic.running_mean[5:], tail_mean) and torch.equal(dynamic.running_var[5:], tail_var)


def test_dynamic_layers_reject_inputs_wider_than_they_hold():
    with pytest.raises(ValueError, match="input width is 7, but the layer holds 6"):
        DynamicConv2d(6, 4, 1)(torch.randn(1, 7, 2, 2))
    with pytest.raises(ValueError, match="holds"):
        DynamicBatchNorm2d(4)(torch.randn(2, 5, 2, 2))


# --- supernet ------------------------------------------------------------------------------------


def test_supernet_base_computes_what_the_model_computes():
    model = tiny_mobilenet().eval()
    randomise_bn(model)
    supernet = Supernet(model).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(supernet(x), model(x))
    assert any(isinstance(m, DynamicConv2d) for m in supernet.modules())
    assert not any(isinstance(m, DynamicConv2d) for m in model.modules())  # the model itself is untouched


def test_supernet_widths_follow_the_multipliers_and_residuals_keep_out_equal_in():
    supernet = Supernet(tiny_mobilenet(), width_mults=[1.0, 1.8, 2.6], expand_mults=[1.0, 2.0])
    roles = {layer.path: layer.role for layer in supernet.dense}
    assert roles == {"0": "width", "3.conv.3": "residual", "4.conv.0": "expand", "4.conv.6": "width",
                     "5.conv.0": "expand", "5.conv.6": "residual", "6": "width"}
    stem = supernet.dense[0]
    assert stem.choices == tuple(make_divisible(8 * m) for m in (1.0, 1.8, 2.6)) == (8, 14, 21)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        widths = supernet.set_active("random", generator=g)
        assert widths["3.conv.3"] == widths["0"]  # residual: out = in
        assert widths["5.conv.6"] == widths["4.conv.6"]
        assert widths["4.conv.0"] in {make_divisible(3 * m * widths["3.conv.3"]) for m in (1.0, 2.0)}
        supernet(torch.randn(2, 3, 16, 16))  # every sampled subnet runs


def test_min_w_mode_keeps_base_widths_and_samples_expand_ratios():
    supernet = Supernet(tiny_mobilenet())
    g = torch.Generator().manual_seed(0)
    base = supernet.set_active("min")
    seen = set()
    for _ in range(20):
        widths = supernet.set_active("min_w", generator=g)
        assert all(widths[l.path] == base[l.path] for l in supernet.dense if l.role != "expand")
        seen.add(widths["4.conv.0"])
    assert len(seen) > 1


def test_export_is_a_plain_module_equal_to_the_wrapped_base():
    supernet = Supernet(tiny_mobilenet())
    randomise_bn(supernet)
    supernet.train()
    supernet.set_active("random", generator=torch.Generator().manual_seed(1))
    supernet(torch.randn(4, 3, 16, 16))  # BN statistics change for the wide channels too
    exported = supernet.export()
    assert not any(isinstance(m, (DynamicConv2d, DynamicLinear, DynamicBatchNorm2d)) for m in exported.modules())
    assert type(exported) is nn.Sequential and isinstance(exported[3], InvertedResidual)
    x = torch.randn(3, 3, 16, 16)
    supernet.set_active("min")
    supernet.eval(), exported.eval()
    assert torch.equal(exported(x), supernet(x))
    exported.train(), supernet.train()
    assert torch.equal(exported(x), supernet(x))


def test_export_keeps_the_active_configuration():
    supernet = Supernet(tiny_mobilenet())
    widths = supernet.set_active("random", generator=torch.Generator().manual_seed(2))
    supernet.export()
    assert supernet.active_widths() == widths


def test_transformers_mobilenet_v2_converts_and_exports():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=4, min_depth=8)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    supernet = Supernet(model).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(supernet(x).logits, model(x).logits)
    assert any(l.role == "residual" for l in supernet.dense) and any(l.role == "expand" for l in supernet.dense)
    supernet.set_active("random", generator=torch.Generator().manual_seed(0))
    assert supernet(x).logits.shape == (2, 4)
    supernet.set_active("min")
    exported = supernet.export().eval()
    assert type(exported) is type(model)
    assert torch.equal(exported(x).logits, model(x).logits)


# --- the training step -----------------------------------------------------------------------------


def active_input_widths(supernet, widths):
    return {
        l.path: widths[supernet.dense[l.feeder].path] if l.feeder is not None else l.base_in for l in supernet.dense
    }


def test_augmented_step_gradients_reach_only_the_sampled_subnet():
    netaug = NetAug(tiny_mobilenet(), epochs=4, generator=torch.Generator().manual_seed(5), sort_channels=False)
    optimizer = torch.optim.SGD(netaug.parameters(), lr=0.0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    step = netaug.train_step(x, y, optimizer)
    supernet = netaug.supernet
    inputs = active_input_widths(supernet, step.widths)
    assert any(step.widths[l.path] < l.max_out for l in supernet.dense)  # some weights are unused
    for layer in supernet.dense:
        grad, out, inp = layer.module.weight.grad, step.widths[layer.path], inputs[layer.path]
        assert grad[:out, :inp].abs().sum() > 0, layer.path
        outside = grad.clone()
        outside[:out, :inp] = 0
        assert torch.count_nonzero(outside) == 0, layer.path
        for index in layer.norms:  # BNs and depthwise convs on this layer's output
            norm = supernet.layers[index].module
            assert torch.count_nonzero(norm.weight.grad[out:]) == 0
            assert norm.weight.grad[:out].abs().sum() > 0


def test_step_gradient_is_base_plus_alpha_times_augmented():
    torch.manual_seed(0)
    netaug = NetAug(tiny_mobilenet(), epochs=4, aug_weight=0.5, generator=torch.Generator().manual_seed(7), sort_channels=False)
    twin = NetAug(tiny_mobilenet(), epochs=4, sort_channels=False)
    twin.load_state_dict(netaug.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    step = netaug.train_step(x, y, torch.optim.SGD(netaug.parameters(), lr=0.0))

    grads = {}
    for mode in ("min", "aug"):
        twin.zero_grad()
        if mode == "aug":
            for layer in twin.supernet.dense:
                layer.module.active_out = step.widths[layer.path]
        else:
            twin.supernet.set_active("min")
        loss = F.cross_entropy(twin(x), y, label_smoothing=0.1)
        (loss if mode == "min" else 0.5 * loss).backward()
        grads[mode] = {n: p.grad.clone() for n, p in twin.named_parameters()}
        if mode == "min":
            torch.testing.assert_close(step.losses["base"], loss.detach())
        else:
            torch.testing.assert_close(step.losses["augmented"], 0.5 * loss.detach())
    for name, p in netaug.named_parameters():
        torch.testing.assert_close(p.grad, grads["min"][name] + grads["aug"][name], rtol=1e-5, atol=1e-7)


def test_step_updates_the_weights_and_leaves_the_base_active():
    netaug = NetAug(tiny_mobilenet(), epochs=4, generator=torch.Generator().manual_seed(5))
    before = [p.detach().clone() for p in netaug.parameters()]
    netaug.train_step(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)), torch.optim.SGD(netaug.parameters(), lr=0.1))
    assert any(not torch.equal(a, b) for a, b in zip(before, netaug.parameters()))
    assert netaug.supernet.active_widths() == netaug.supernet.set_active("min")


class RecordingWrapper(nn.Module):
    """Stands in for DistributedDataParallel: records which forward/backward ran inside no_sync."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.log = []
        self.syncing = True

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.log.append(("forward", self.syncing))
        return self.module(x)


def test_under_ddp_the_base_pass_runs_in_no_sync_and_forwards_go_through_the_wrapper():
    netaug = NetAug(tiny_mobilenet(), epochs=4, generator=torch.Generator().manual_seed(5))
    wrapper = RecordingWrapper(netaug)
    netaug.train_step(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)), torch.optim.SGD(netaug.parameters(), lr=0.1), ddp=wrapper)
    assert wrapper.log == [("forward", False), ("forward", True)]
    with pytest.raises(ValueError, match="ddp: expected the DistributedDataParallel wrapper of this NetAug"):
        netaug.train_step(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)), torch.optim.SGD(netaug.parameters(), lr=0.1), ddp=RecordingWrapper(nn.Linear(2, 2)))


# --- schedule, sorting, BN re-estimation -------------------------------------------------------------


def test_schedule_stops_width_augmentation_for_the_last_k_epochs():
    netaug = NetAug(tiny_mobilenet(), epochs=10, stop_width_aug_epochs=3)
    assert [netaug.mode(e) for e in range(10)] == ["default"] * 7 + ["min_w"] * 3
    official = NetAug(tiny_mobilenet(), epochs=155, stop_width_aug_epochs=75)  # train.py: remaining = 155 − epoch
    assert official.mode(79) == "default" and official.mode(80) == "min_w" and official.mode(154) == "min_w"
    assert NetAug(tiny_mobilenet(), epochs=9).stop_width_aug_epochs == 4


def test_start_epoch_sorts_channels_only_while_widths_are_augmented():
    netaug = NetAug(tiny_mobilenet(), epochs=4, stop_width_aug_epochs=2)
    expand = next(l for l in netaug.supernet.dense if l.role == "expand")
    with torch.no_grad():
        expand.module.weight.normal_()
    assert netaug.start_epoch(2) == "min_w"
    unsorted = expand.module.weight.clone()
    assert torch.equal(unsorted, expand.module.weight)
    assert netaug.start_epoch(1) == "default"
    assert not torch.equal(unsorted, expand.module.weight)


def test_sorting_orders_inner_channels_by_l1_importance_and_keeps_the_widest_network():
    supernet = Supernet(tiny_mobilenet(), expand_mults=[1.0, 2.0])
    randomise_bn(supernet)
    with torch.no_grad():
        for p in supernet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    supernet.eval()
    widest = {l.path: l.max_out for l in supernet.dense}
    x = torch.randn(2, 3, 16, 16)
    for layer in supernet.dense:
        layer.module.active_out = widest[layer.path]
    before = supernet(x)
    supernet.sort_channels()
    for layer in supernet.dense:
        layer.module.active_out = widest[layer.path]
    torch.testing.assert_close(supernet(x), before, rtol=1e-5, atol=1e-6)
    for layer in supernet.dense:
        if layer.role == "expand":
            project = next(l for l in supernet.dense if l.block == layer.block and l is not layer)
            importance = project.module.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(importance[:-1] >= importance[1:])


def test_reset_bn_sets_running_statistics_to_the_size_weighted_batch_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    supernet = Supernet(model, width_mults=[1.0, 2.0])
    batches = [torch.randn(5, 3, 3, 3) + 1.0, torch.randn(3, 3, 3, 3) * 2]
    seen = supernet.reset_bn(batches)
    assert seen == 8
    conv = supernet.model[0]
    feats = [conv(b).detach() for b in batches]
    mean = sum(f.mean(dim=(0, 2, 3)) * f.shape[0] for f in feats) / 8
    var = sum(((f - f.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3)) * f.shape[0] for f in feats) / 8
    bn = supernet.model[1]
    torch.testing.assert_close(bn.running_mean[:4], mean)
    torch.testing.assert_close(bn.running_var[:4], var)
    assert torch.equal(bn.running_mean[4:], torch.zeros(4)) and torch.equal(bn.running_var[4:], torch.ones(4))
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 0 and supernet.training


# --- bad configurations ---------------------------------------------------------------------------


def test_multipliers_must_start_at_one():
    with pytest.raises(ValueError, match="NetAug: width_mults: the smallest multiplier must be 1.0"):
        Supernet(tiny_mobilenet(), width_mults=[1.5, 2.0])
    with pytest.raises(ValueError, match="NetAug: expand_mults"):
        Supernet(tiny_mobilenet(), expand_mults=[])


def test_unsupported_layers_are_errors():
    with pytest.raises(ValueError, match="groups=2: only dense and depthwise"):
        Supernet(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)))
    with pytest.raises(ValueError, match="LayerNorm with parameters"):
        Supernet(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="cannot follow the channels: Conv2d '1' takes 5 channels but Conv2d '0' gives 4"):
        Supernet(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(5, 6, 1)))


def test_bad_blocks_are_errors():
    model = tiny_mobilenet()
    with pytest.raises(ValueError, match="blocks: no module at path 'nope'"):
        Supernet(model, blocks={"nope": True})
    with pytest.raises(ValueError, match="block '4' has a residual, but its input has 8 channels and its output 12"):
        Supernet(model, blocks={"3": True, "4": True, "5": True})
    with pytest.raises(ValueError, match=r"block '4.conv.0': expected \[expand 1×1 conv,\] depthwise conv, projection conv in this order, got no convolutions"):
        Supernet(model, blocks={"4.conv.0": False})
    two_pointwise = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)))
    with pytest.raises(ValueError, match=r"block '0': .* got \['dense', 'dense'\]"):
        Supernet(two_pointwise, blocks={"0": False})


def test_bad_netaug_arguments_are_errors():
    with pytest.raises(ValueError, match="NetAug: stop_width_aug_epochs: 5 is more than epochs=4"):
        NetAug(tiny_mobilenet(), epochs=4, stop_width_aug_epochs=5)
    with pytest.raises(ValueError, match="NetAug: epochs"):
        NetAug(tiny_mobilenet(), epochs=0)
    with pytest.raises(ValueError, match="NetAug: aug_weight"):
        NetAug(tiny_mobilenet(), epochs=2, aug_weight=-1.0)
    with pytest.raises(ValueError, match="NetAug: epoch: expected 0 <= epoch < epochs=2"):
        NetAug(tiny_mobilenet(), epochs=2).mode(2)
    with pytest.raises(ValueError, match="NetAug: mode"):
        Supernet(tiny_mobilenet()).set_active("max")
    with pytest.raises(TypeError, match="NetAug: generator"):
        NetAug(tiny_mobilenet(), epochs=2, generator=0)
    with pytest.raises(TypeError):
        NetAug(tiny_mobilenet(), 2)  # numeric arguments are keyword-only
