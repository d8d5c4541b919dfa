"""The base class of distillation methods.

A method declares the features it reads (``student_features``, ``teacher_features``: one
:class:`~kdkernels.distill.capture.FeatureSpec` each), owns its trainable connectors (as
submodules), has an explicit ``weight``, and says how the teacher runs (``teacher_mode``).
Its ``forward(student, teacher, target)`` receives the captured features in declaration order
and returns its loss (a tensor) or a few named parts (a dict); the
:class:`~kdkernels.distill.Distiller` multiplies by ``weight``.
"""

from __future__ import annotations

import contextlib
import math
from numbers import Real
from typing import Mapping, Sequence

import torch
from torch import nn

from kdkernels.distill.capture import FeatureSpec, SpecLike, as_spec

TEACHER_MODES = ("eval", "bn_train", "train")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_weight(weight, name: str = "weight") -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {weight!r}")
    return float(weight)


class Method(nn.Module):
    """Base of every method. Subclasses set ``name`` and implement ``forward``.

    Args:
        student_features, teacher_features: features read, in the order ``forward`` gets them.
        weight: factor on the method's loss (each part of it, if it returns a dict).
        name: key of the loss in ``DistillOutput.losses`` (default: the class's ``name``).
        teacher_mode: ``"eval"`` (default), ``"bn_train"`` (BatchNorm layers in train mode, the
            rest in eval) or ``"train"``, while the distiller trains. The teacher always runs
            under ``no_grad``.
    """

    name = "method"

    def __init__(
        self,
        student_features: Sequence[SpecLike],
        teacher_features: Sequence[SpecLike],
        weight: float,
        name: str | None = None,
        teacher_mode: str = "eval",
    ) -> None:
        super().__init__()
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"name: expected a non-empty str, got {name!r}")
            self.name = name
        self.student_features: tuple[FeatureSpec, ...] = tuple(layer_spec(self.name, s) for s in student_features)
        self.teacher_features: tuple[FeatureSpec, ...] = tuple(layer_spec(self.name, s) for s in teacher_features)
        self.weight = check_weight(weight)
        # What calibrate_weights measured (None until then); saved with the weight in state_dict.
        self.calibration: dict | None = None
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode: expected one of {TEACHER_MODES}, got {teacher_mode!r}")
        self.teacher_mode = teacher_mode

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Called once by the Distiller with the unwrapped models, before any forward: a method
        that reads the teacher's structure (OFD's BN margins) does it here."""

    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], target: torch.Tensor | None
    ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def get_extra_state(self) -> dict:
        """The weight (it may have been calibrated) and the calibration record travel with the
        connectors in ``state_dict``."""
        return {"weight": self.weight, "calibration": self.calibration}

    def set_extra_state(self, state: dict) -> None:
        self.weight = check_weight(state["weight"])
        self.calibration = state.get("calibration")

    def extra_repr(self) -> str:
        s = ", ".join(map(str, self.student_features))
        t = ", ".join(map(str, self.teacher_features))
        return f"name={self.name!r}, weight={self.weight:g}, student=[{s}], teacher=[{t}]"


def layer_spec(method: str, spec: SpecLike) -> FeatureSpec:
    """A layer argument as a FeatureSpec; a number here is a number passed where a layer path is
    expected (``HintonKD(4.0)``), which is said in those words."""
    if isinstance(spec, Real) and not isinstance(spec, bool):
        raise TypeError(
            f"{method}: got the number {spec!r} where a layer path is expected; the layer paths come first and "
            "every number is a keyword argument, e.g. HintonKD(temperature=4.0), FitNets('layer2', 'layer2', student_channels=64, teacher_channels=256)"
        )
    return as_spec(spec)


def paired(name: str, student_layers: Sequence[SpecLike] | SpecLike, teacher_layers: Sequence[SpecLike] | SpecLike):
    """Normalise one path or a list of paths per side to two equal-length tuples of specs."""

    def as_list(layers):
        return [layers] if isinstance(layers, (str, FeatureSpec)) else list(layers)

    for layers in (student_layers, teacher_layers):
        if isinstance(layers, Real) and not isinstance(layers, bool):
            layer_spec(name, layers)  # raises: a number where the layer paths go
    s, t = as_list(student_layers), as_list(teacher_layers)
    if len(s) != len(t) or not s:
        raise ValueError(f"{name}: expected as many student layers as teacher layers (at least one), got {len(s)} and {len(t)}")
    return tuple(layer_spec(name, x) for x in s), tuple(layer_spec(name, x) for x in t)


def check_same_shape(method: str, what: str, student: torch.Tensor, teacher: torch.Tensor, hint: str = "") -> None:
    """Shapes only (no data read, no host sync)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"{method}: {what}: student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}"
            + (f"; {hint}" if hint else "")
        )


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype loss math runs in: float32 for half inputs (autocast's rule for losses), float64
    when any input is float64, otherwise the inputs' promoted floating dtype."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.dtype not in HALF_DTYPES and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def upcast(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (default :func:`loss_dtype` of itself): half → float32, float64 kept."""
    return tensor.to(loss_dtype(tensor) if dtype is None else dtype)


def full_precision(tensor: torch.Tensor):
    """Context in which autocast leaves matmuls of ``tensor``'s device in the inputs' dtype: loss
    math (Gram and distance matrices) runs in fp32 even under bf16/fp16 autocast."""
    device_type = tensor.device.type
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext()


def require_target(method: str, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        raise ValueError(f"{method}: needs the labels: call distiller(x, target)")
    return target
