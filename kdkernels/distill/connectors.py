"""Trainable connectors that map student features to the teacher's shape.

A connector belongs to the method that uses it, so it lives in the :class:`~kdkernels.distill.Distiller`:
``distiller.parameters()``, ``state_dict`` and DDP see it; the student is not edited.
"""

from __future__ import annotations

import math

from torch import nn


def _check_channels(student_channels: int, teacher_channels: int) -> None:
    for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


class Conv1x1(nn.Sequential):
    """1×1 convolution, ``student_channels → teacher_channels`` (FitNets' regressor with
    matching spatial sizes)."""

    def __init__(self, student_channels: int, teacher_channels: int, bias: bool = False) -> None:
        _check_channels(student_channels, teacher_channels)
        super().__init__(nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=bias))
        self.in_channels, self.out_channels = student_channels, teacher_channels


class Conv1x1BN(nn.Sequential):
    """1×1 convolution without bias, then BatchNorm: the connector of Heo et al. (OFD, ICCV 2019).

    Initialised as the official code: conv weights ~ N(0, √(2/C_t)) (He init over the output
    fan, 1×1 kernel), BN γ = 1, β = 0.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        _check_channels(student_channels, teacher_channels)
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
        bn = nn.BatchNorm2d(teacher_channels)
        super().__init__(conv, bn)
        self.in_channels, self.out_channels = student_channels, teacher_channels


class Linear(nn.Sequential):
    """Linear map on the last dimension, ``student_channels → teacher_channels`` (token or
    embedding features)."""

    def __init__(self, student_channels: int, teacher_channels: int, bias: bool = True) -> None:
        _check_channels(student_channels, teacher_channels)
        super().__init__(nn.Linear(student_channels, teacher_channels, bias=bias))
        self.in_channels, self.out_channels = student_channels, teacher_channels


CONNECTORS = {"conv": Conv1x1, "conv_bn": Conv1x1BN, "linear": Linear}


def make_connector(kind: str | nn.Module | None, student_channels: int | None, teacher_channels: int | None) -> nn.Module | None:
    """``None`` (features used as they are), a module (used as given), or one of
    ``"conv"``, ``"conv_bn"``, ``"linear"`` built for the given channel counts."""
    if kind is None or isinstance(kind, nn.Module):
        return kind
    if kind not in CONNECTORS:
        raise ValueError(f"connector: expected None, an nn.Module or one of {tuple(CONNECTORS)}, got {kind!r}")
    if student_channels is None or teacher_channels is None:
        raise ValueError(f"connector {kind!r} needs student_channels and teacher_channels")
    return CONNECTORS[kind](student_channels, teacher_channels)

