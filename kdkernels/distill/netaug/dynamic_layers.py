"""Dynamic-width layers for NetAug (Cai et al., "Network Augmentation for Tiny Deep Learning",
ICLR 2022; code mit-han-lab/tinyml ``netaug/models/netaug/layers.py``).

Each layer holds the weights of its widest configuration and runs at a narrower one by slicing
the *leading* channels: a convolution uses ``weight[:out, :in]``, a BatchNorm the first ``C``
entries of its affine parameters and running statistics. The input width is read from the input
tensor (``x.shape[1]``, ``x.shape[-1]`` for Linear); the output width is ``active_out`` (set by the
supernet), so a chain of layers needs only the output widths chosen. The sliced weights are made
contiguous so a layer at width w computes exactly what a plain layer holding the sliced weights
computes (``export()`` returns that plain layer).

The layers subclass the plain PyTorch layers, so code that reads ``kernel_size``, ``stride`` or
``padding`` of a convolution (Hugging Face's TF-style padding) keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_width(layer: str, what: str, width: int, limit: int) -> None:
    if not 0 < width <= limit:
        raise ValueError(f"{layer}: {what} is {width}, but the layer holds {limit} (the supernet's widest configuration)")


def _load_leading(layer, training: bool, **tensors: torch.Tensor | None):
    """Copies each given tensor into the leading block of ``layer``'s tensor of that name (as
    large or larger: a widened copy keeps the rest of its initialisation; None is skipped) and
    sets ``layer``'s train mode; returns ``layer``."""
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(layer, name)[tuple(slice(0, n) for n in value.shape)].copy_(value)
    layer.train(training)
    return layer


class DynamicConv2d(nn.Conv2d):
    """A ``Conv2d`` that runs on the leading ``active_out`` filters and the input's channels.

    Dense (``groups=1``) or depthwise (``groups == in == out``): a depthwise layer's output width
    is its input width (``active_out`` is ignored). Grouped convolutions with other group counts
    are rejected.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depthwise = self.groups > 1
        if self.depthwise and not (self.groups == self.in_channels == self.out_channels):
            raise ValueError(
                f"DynamicConv2d: groups={self.groups} with in_channels={self.in_channels}, out_channels={self.out_channels}: "
                "only dense (groups=1) and depthwise (groups == in == out) convolutions can change width"
            )
        if self.padding_mode != "zeros":
            raise ValueError(f"DynamicConv2d: padding_mode={self.padding_mode!r}: only 'zeros' is supported")
        self.active_out = self.out_channels

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_channels: int, out_channels: int) -> "DynamicConv2d":
        """A dynamic copy of ``conv`` widened to (in, out); the original weights fill the leading
        channels, the rest is initialised as PyTorch initialises a new layer."""
        groups = in_channels if conv.groups > 1 else 1
        if conv.groups > 1 and in_channels != out_channels:
            raise ValueError(f"DynamicConv2d: a depthwise convolution keeps in = out, got {in_channels} and {out_channels}")
        layer = cls(
            in_channels, out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer.active_out = conv.out_channels
        return _load_leading(layer, conv.training, weight=conv.weight, bias=conv.bias)

    def active_weights(self, in_channels: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight, bias, groups) of the active configuration for ``in_channels`` inputs."""
        name = type(self).__name__
        _check_width(name, "the input width", in_channels, self.in_channels)
        if self.depthwise:
            out, weight = in_channels, self.weight[:in_channels]
        else:
            out = self.active_out
            _check_width(name, "active_out", out, self.out_channels)
            weight = self.weight[:out, :in_channels]
        bias = None if self.bias is None else self.bias[:out]
        return weight.contiguous(), bias, in_channels if self.depthwise else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, groups = self.active_weights(x.shape[1])
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def export(self, in_channels: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding a copy of the active weights."""
        weight, bias, groups = self.active_weights(in_channels)
        conv = nn.Conv2d(
            in_channels, weight.shape[0], self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=groups, bias=bias is not None, device=weight.device, dtype=weight.dtype,
        )
        return _load_leading(conv, self.training, weight=weight, bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active_out={self.active_out}"


class DynamicLinear(nn.Linear):
    """A ``Linear`` on the input's leading features and the leading ``active_out`` outputs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.active_out = self.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_features: int, out_features: int) -> "DynamicLinear":
        layer = cls(in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        layer.active_out = linear.out_features
        return _load_leading(layer, linear.training, weight=linear.weight, bias=linear.bias)

    def active_weights(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = type(self).__name__
        _check_width(name, "the input width", in_features, self.in_features)
        _check_width(name, "active_out", self.active_out, self.out_features)
        bias = None if self.bias is None else self.bias[: self.active_out]
        return self.weight[: self.active_out, :in_features].contiguous(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.active_weights(x.shape[-1]))

    def export(self, in_features: int) -> nn.Linear:
        weight, bias = self.active_weights(in_features)
        linear = nn.Linear(in_features, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        return _load_leading(linear, self.training, weight=weight, bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active_out={self.active_out}"


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` over the input's C leading channels: the first C affine parameters and
    running statistics are used, and updated in place in train mode (the slices are views)."""

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_features: int) -> "DynamicBatchNorm2d":
        ref = bn.weight if bn.affine else bn.running_mean
        layer = cls(
            num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
        )
        return _load_leading(
            layer, bn.training, weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean,
            running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
        )

    def _active(self, channels: int):
        _check_width(type(self).__name__, "the input width", channels, self.num_features)

        def cut(t):
            return None if t is None else t[:channels]

        return cut(self.running_mean), cut(self.running_var), cut(self.weight), cut(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        running_mean, running_var, weight, bias = self._active(x.shape[1])
        # The bookkeeping of nn.BatchNorm2d.forward, on the sliced tensors.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(
            x, running_mean if keep else None, running_var if keep else None, weight, bias, use_batch_stats, factor, self.eps
        )

    def export(self, num_features: int) -> nn.BatchNorm2d:
        running_mean, running_var, weight, bias = self._active(num_features)
        ref = weight if weight is not None else running_mean
        bn = nn.BatchNorm2d(
            num_features, eps=self.eps, momentum=self.momentum, affine=self.affine, track_running_stats=self.track_running_stats,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
        )
        return _load_leading(
            bn, self.training, weight=weight, bias=bias, running_mean=running_mean,
            running_var=running_var, num_batches_tracked=self.num_batches_tracked,
        )
