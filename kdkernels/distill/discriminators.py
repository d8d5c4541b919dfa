"""Discriminators owned by adversarial distillation methods.

- :class:`SAGANDiscriminator`: structured KD's holistic critic (Liu et al., CVPR 2019, after
  SAGAN, Zhang et al., ICML 2019): spectral-norm 4×4 stride-2 convolutions with LeakyReLU 0.1,
  self-attention after the last two of them, a plain 4×4 convolution to one channel, and an input
  BatchNorm (the released code's ``preprocess_GAN_mode=1``).
- :class:`PatchDiscriminator`: the pix2pix N-layer PatchGAN (Isola et al., CVPR 2017) that GAN
  Compression trains with its student (``networks.define_D('n_layers')``).

Spectral normalisation is ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration
per training forward, as the released ``SpectralNorm``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

INPUT_NORMS = ("batch", "tanh", None)
PATCH_NORMS = ("instance", "batch", None)


def _check_positive_ints(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}: expected a positive int, got {value!r}")


def _check_one_of(owner: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name}: expected one of {allowed}, got {value!r}")


class SelfAttention2d(nn.Module):
    """SAGAN self-attention: ``x + γ · V softmax(QᵀK)ᵀ`` over the H·W positions, γ initialised to 0.
    Query and key have ``channels // 8`` channels (at least 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        key_channels = max(1, channels // 8)
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, K, N)
        k = self.key(x).flatten(2)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N): row i attends over j
        out = self.value(x).flatten(2) @ attention.transpose(1, 2)  # (B, C, N)
        return x + self.gamma * out.reshape(b, c, h, w)


class SAGANDiscriminator(nn.Module):
    """Structured KD's holistic discriminator on (B, C, H, W) score maps; returns (B, 1, h, w) scores.

    Args:
        in_channels: C (the classes; plus the image channels when conditioned on the image).
        conv_dim: channels of the first convolution (default 64, the released code); stage i has
            ``conv_dim · 2^i``.
        depth: number of spectral-norm 4×4 stride-2 convolutions (default 4: the released
            code's 65-pixel setting). After them the map must be at least 4×4 (the last conv is
            4×4 without padding): H, W >= 4·2^depth.
        input_norm: ``"batch"`` (default, ``preprocess_GAN_mode=1``), ``"tanh"`` (mode 2) or None.
    """

    def __init__(self, in_channels: int, *, conv_dim: int = 64, depth: int = 4, input_norm: str | None = "batch") -> None:
        super().__init__()
        _check_positive_ints("SAGANDiscriminator", in_channels=in_channels, conv_dim=conv_dim, depth=depth)
        _check_one_of("SAGANDiscriminator", "input_norm", input_norm, INPUT_NORMS)
        self.depth = depth
        self.input_norm = {"batch": nn.BatchNorm2d(in_channels), "tanh": nn.Tanh(), None: nn.Identity()}[input_norm]
        layers, channels = [], in_channels
        for stage in range(depth):
            out = conv_dim * 2**stage
            layers += [spectral_norm(nn.Conv2d(channels, out, 4, 2, 1)), nn.LeakyReLU(0.1)]
            if stage >= depth - 2:
                layers.append(SelfAttention2d(out))
            channels = out
        self.body = nn.Sequential(*layers)
        self.last = nn.Conv2d(channels, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smallest = 4 * 2**self.depth
        if x.dim() != 4 or x.shape[-2] < smallest or x.shape[-1] < smallest:
            raise ValueError(
                f"SAGANDiscriminator: expected (B, C, H, W) maps with H, W >= {smallest} for depth={self.depth}, "
                f"got {tuple(x.shape)}; lower depth="
            )
        return self.last(self.body(self.input_norm(x)))


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4×4 convolutions, stride 2 for the first ``layers``, then two of stride 1;
    LeakyReLU 0.2; normalisation after every convolution but the first and the last. Returns
    (B, 1, h, w) patch scores.

    Args:
        in_channels: image channels (input + output channels for a conditional, paired setup).
        base_channels: ndf (default 64, pix2pix; GAN Compression's distill options use 128).
        layers: n_layers_D (default 3).
        norm: ``"instance"`` (default, GAN Compression's option), ``"batch"`` or None.
    """

    def __init__(self, in_channels: int, *, base_channels: int = 64, layers: int = 3, norm: str | None = "instance") -> None:
        super().__init__()
        _check_positive_ints("PatchDiscriminator", in_channels=in_channels, base_channels=base_channels, layers=layers)
        _check_one_of("PatchDiscriminator", "norm", norm, PATCH_NORMS)

        def normalisation(c: int) -> nn.Module:
            return {"instance": lambda: nn.InstanceNorm2d(c), "batch": lambda: nn.BatchNorm2d(c), None: nn.Identity}[norm]()

        bias = norm != "batch"  # BatchNorm's shift makes a bias redundant (pix2pix's use_bias)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        multiplier = 1
        for n in range(1, layers + 1):
            previous, multiplier = multiplier, min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [
                nn.Conv2d(base_channels * previous, base_channels * multiplier, 4, stride, 1, bias=bias),
                normalisation(base_channels * multiplier),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(base_channels * multiplier, 1, 4, 1, 1))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


__all__ = ["PatchDiscriminator", "SAGANDiscriminator", "SelfAttention2d"]
