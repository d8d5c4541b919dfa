"""Views a tensor with a class dimension as (outer, classes, inner) without copying.

The fused softmax kernels take 3-d views: ``(P, C, 1)`` rows when the class dimension is the
fastest-moving one (``dim=-1`` logits, or NCHW in channels_last with ``dim=1``), ``(N, C, H*W)``
when it is not (contiguous NCHW with ``dim=1``). Positions are numbered in the natural row-major
order of the remaining dimensions in both cases, so a mask of that shape lines up with either view.
A layout that fits neither (an arbitrary permutation) is copied once, with ``.contiguous()``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class ClassDimViews(NamedTuple):
    student: torch.Tensor  # (outer, classes, inner)
    teacher: torch.Tensor  # (outer, classes, inner), same factorisation as student
    mask: torch.Tensor | None  # (outer, inner) bool, contiguous
    positions_shape: tuple[int, ...]  # the logits' shape without the class dimension


def _as_three_d(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    classes = x.shape[dim]
    moved = x.movedim(dim, -1)
    if moved.is_contiguous():
        return moved.reshape(-1, classes, 1)
    if x.is_contiguous():
        return x.reshape(math.prod(x.shape[:dim]), classes, math.prod(x.shape[dim + 1 :]))
    return None


def class_dim_views(student: torch.Tensor, teacher: torch.Tensor, dim: int, mask: torch.Tensor | None) -> ClassDimViews:
    positions_shape = tuple(student.shape[:dim]) + tuple(student.shape[dim + 1 :])
    s3 = _as_three_d(student, dim)
    if s3 is None:
        s3 = _as_three_d(student.contiguous(), dim)
    if s3.shape[2] == 1:  # rows: teacher must be rows too
        t_moved = teacher.movedim(dim, -1)
        t3 = (t_moved if t_moved.is_contiguous() else t_moved.contiguous()).reshape(s3.shape)
    else:
        t3 = (teacher if teacher.is_contiguous() else teacher.contiguous()).reshape(s3.shape)
    mask2 = None if mask is None else mask.reshape(s3.shape[0], s3.shape[2]).contiguous()
    return ClassDimViews(s3, t3, mask2, positions_shape)
