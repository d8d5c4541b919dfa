"""Small models shared by the distill tests (CPU, milliseconds per step)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """stem → layer1 (C) → layer2 (2C, stride 2) → pool → fc; ReLUs are separate modules, so their
    inputs are the pre-ReLU stage outputs."""

    def __init__(self, width: int = 8, num_classes: int = 5, bn: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=not bn), norm(width), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=not bn), norm(width))
        self.relu1 = nn.ReLU()
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=not bn), norm(2 * width))
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.layer1(self.stem(x)))
        x = self.relu2(self.layer2(x))
        return self.fc(self.pool(x).flatten(1))


class TinyAttention(nn.Module):
    """One self-attention layer whose softmax is a module: its input is the pre-softmax scores."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        y = (self.softmax(scores) @ v).transpose(1, 2).reshape(b, n, d)
        return x + self.out(y)


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TinyAttention(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def images(batch: int = 6, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


class TinySegmenter(nn.Module):
    """conv + ReLU ("body") → 1×1 conv ("classifier"): per-pixel class scores at the input size, for
    the structured-KD and adversarial tests."""

    def __init__(self, width: int, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class TinyGenerator(nn.Module):
    """A 1-channel label map → a 3-channel image in [-1, 1] ("model.1" is the hidden ReLU), for the
    GAN Compression and adversarial tests."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
