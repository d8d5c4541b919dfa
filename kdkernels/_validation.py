"""Argument checks shared by the public losses.

Every check runs in Python before any kernel, and names the argument it rejects, so a user sees
``ValueError: teacher_logits: expected shape (8, 100) to match student_logits, got (8, 99)``
instead of a kernel error. The checks read only shapes, dtypes and devices (no data), so they
add no host synchronisation and trace under ``torch.compile``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(value, name: str, *, floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    # Before the layout test: a legacy nested tensor reports layout torch.strided, and both kinds
    # fail deep inside (e.g. "NestedTensorImpl doesn't support sizes") if they get through.
    if value.is_nested:
        raise TypeError(
            f"{name}: nested tensors are not supported (got a nested tensor with layout {value.layout}); "
            "pad to a dense tensor (e.g. .to_padded_tensor(0.0)) and pass a mask for the padding"
        )
    if value.layout != torch.strided:
        raise TypeError(f"{name}: sparse and other non-strided tensors are not supported (got layout {value.layout})")
    if floating and value.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")


def check_same_shape_and_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name}: expected shape {tuple(a.shape)} to match {a_name}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{b_name}: expected device {a.device} to match {a_name}, got {b.device}")


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def check_dim(dim, ndim: int, name: str = "dim") -> int:
    """Normalise ``dim`` to a non-negative index into a tensor of rank ``ndim``."""
    check_int(dim, name)
    if ndim == 0:
        raise ValueError(f"{name}: logits must have at least one dimension (the class dimension), got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: expected a dimension in [{-ndim}, {ndim - 1}] for {ndim}-d logits, got {dim}")
    return dim % ndim


def check_dim_not_empty(x: torch.Tensor, dim: int, name: str, what: str = "class") -> None:
    """Reject a class (channel, coordinate) dimension of size 0 here rather than inside a kernel: a
    softmax over zero classes is undefined, and a feature without channels or a box without
    coordinates is a shape mistake. An empty batch is fine."""
    if x.shape[dim] == 0:
        raise ValueError(
            f"{name}: the {what} dimension (dim={dim}) has size 0 in shape {tuple(x.shape)}; expected at least one {what}"
        )


def check_finite_real(value, name: str) -> float:
    """A finite real number (int, float, numpy scalar; not a bool or a tensor), as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def check_temperature(temperature, name: str = "temperature") -> float:
    """T > 0 with T, 1/T and T² finite (the kernels scale logits by 1/T and losses by T²)."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"{name}: expected a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"{name}: expected a finite number > 0, got {temperature}")
    if not (math.isfinite(1.0 / temperature) and math.isfinite(temperature * temperature)):
        raise ValueError(f"{name}: expected a number whose square and inverse are finite, got {temperature}")
    return temperature


def check_reduction(reduction, allowed: tuple[str, ...], name: str = "reduction") -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {reduction!r}")
    return reduction


def check_mask(mask, expected_shape: tuple[int, ...], device: torch.device, name: str = "mask") -> None:
    """A mask is a bool tensor with the logits' shape minus the class dimension; True = counted."""
    if mask is None:
        return
    check_tensor(mask, name, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = position counts), got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name}: expected shape {tuple(expected_shape)} (the logits' shape without the class dimension), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name}: expected device {device} to match the logits, got {mask.device}")
