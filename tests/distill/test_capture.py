"""FeatureCapture: dotted paths, output/input, wrappers, errors; no model edits."""

import pytest
import torch
from torch import nn

from distill_nets import SmallCNN, images
from kdkernels.distill import FeatureCapture, FeatureSpec, unwrap


def test_captures_output_and_pre_activation_input():
    net = SmallCNN()
    capture = FeatureCapture(net, ["layer1", FeatureSpec("relu1", on="input"), "relu1"])
    x = images()
    with capture:
        net(x)
    expected = net.layer1(net.stem(x))
    torch.testing.assert_close(capture.get("layer1"), expected)
    torch.testing.assert_close(capture.get(FeatureSpec("relu1", on="input")), expected)
    torch.testing.assert_close(capture.get("relu1"), expected.relu())
    assert (capture.get(FeatureSpec("relu1", on="input")) < 0).any()  # really pre-ReLU


def test_empty_path_is_the_model_output():
    net = SmallCNN()
    capture = FeatureCapture(net, [""])
    x = images()
    with capture:
        out = net(x)
    assert capture.get("") is out


def test_unknown_path_lists_close_matches():
    with pytest.raises(ValueError, match=r"no module at path 'layer_1'.*'layer1'"):
        FeatureCapture(SmallCNN(), ["layer_1"])


def test_records_nothing_outside_the_context():
    net = SmallCNN()
    capture = FeatureCapture(net, ["layer1"])
    net(images())
    with pytest.raises(RuntimeError, match="did not run"):
        capture.get("layer1")


def test_module_called_twice_keeps_last_call():
    relu = nn.ReLU()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = relu

        def forward(self, x):
            return self.relu(self.relu(x) - 1.0)

    net = Net()
    capture = FeatureCapture(net, [FeatureSpec("relu", on="input")])
    x = torch.randn(4, 3)
    with capture:
        net(x)
    torch.testing.assert_close(capture.get(FeatureSpec("relu", on="input")), x.relu() - 1.0)


def test_non_tensor_output_is_a_clear_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    net = nn.Sequential(Pair())
    capture = FeatureCapture(net, ["0"])
    with capture:
        net(torch.randn(2))
    with pytest.raises(TypeError, match="is a tuple, not a tensor"):
        capture.get("0")


def test_remove_leaves_the_model_without_hooks():
    net = SmallCNN()
    capture = FeatureCapture(net, ["layer1", "fc"])
    assert net.layer1._forward_hooks and net.fc._forward_hooks
    capture.remove()
    assert not net.layer1._forward_hooks and not net.fc._forward_hooks


def test_unwraps_dataparallel_and_compile():
    net = SmallCNN()
    compiled = torch.compile(nn.DataParallel(net), backend="eager")  # with one GPU, DataParallel moves net there
    assert unwrap(compiled) is net
    capture = FeatureCapture(compiled, ["layer2"])
    x = images().to(next(net.parameters()).device)
    with capture:
        compiled(x)
    torch.testing.assert_close(capture.get("layer2"), net.layer2(net.relu1(net.layer1(net.stem(x)))))


def test_wrapped_paths_are_the_inner_model_paths():
    with pytest.raises(ValueError, match="no module at path 'module.layer1'"):
        FeatureCapture(nn.DataParallel(SmallCNN()), ["module.layer1"])


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock pattern: in-place ReLU used twice, in-place residual add."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn(x))
        out = self.bn(out)
        out += x
        return self.relu(out)


def test_input_of_inplace_relu_is_the_pre_activation():
    block = ResidualBlock().eval()
    capture = FeatureCapture(block, [FeatureSpec("relu", on="input")])
    x = torch.randn(5, 4)
    with capture:
        block(x)
    expected = block.bn(block.bn(x).relu()) + x
    assert (expected < 0).any()
    torch.testing.assert_close(capture.get(FeatureSpec("relu", on="input")), expected)


def test_feature_changed_in_place_is_an_error_unless_cloned():
    block = ResidualBlock().eval()
    capture = FeatureCapture(block, ["bn", FeatureSpec("bn", clone=True)])
    x = torch.randn(5, 4)
    with capture:
        block(x)
    with pytest.raises(RuntimeError, match="changed in place after it was captured"):
        capture.get("bn")
    torch.testing.assert_close(capture.get(FeatureSpec("bn", clone=True)), block.bn(block.bn(x).relu()))
