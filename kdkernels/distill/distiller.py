"""The offline distiller: a frozen teacher, a student, and a list of methods.

    distiller = Distiller(student, teacher, [HintonKD(temperature=4, alpha=0.9)])
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)   # student + connectors
    out = distiller(x, y)
    out.total.backward(); optimizer.step()
    log({k: v.detach() for k, v in out.losses.items()})

The teacher is held but not registered: ``parameters()``, ``state_dict()`` and DDP see the student
and the methods' connectors only; ``.to()`` / ``.cuda()`` / ``.half()`` move the teacher too. It
runs under ``no_grad``, in eval mode unless a method asks otherwise (OFD: BN in train mode), and
``distiller.train()`` does not put it back in train mode. ``distiller.eval()`` puts it in eval.

Under DDP wrap the distiller, not the teacher: ``DDP(Distiller(student, teacher, methods))``, so
connectors are synchronised with the student. A DDP-wrapped student inside a Distiller is
accepted only when the methods have no parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from kdkernels.distill.capture import FeatureCapture, unwrap
from kdkernels.distill.method import TEACHER_MODES, Method


class DistillOutput(NamedTuple):
    """What a distiller's forward returns: the student's output (as the student returned it),
    the weighted losses by name (``method`` or ``method/part``), and their sum."""

    student_output: Any
    losses: dict[str, torch.Tensor]
    total: torch.Tensor


def set_teacher_mode(teacher: nn.Module, mode: str) -> None:
    """``eval``, ``train``, or ``bn_train`` (BatchNorm layers in train mode, the rest in eval)."""
    teacher.train(mode == "train")
    if mode == "bn_train":
        for module in teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(True)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the losses (in insertion order, so the result repeats bit for bit)."""
    values = list(losses.values())
    if not values:
        raise ValueError("no losses to sum: every method returned an empty dict (all its part weights are 0?)")
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _check_methods(methods: Sequence[Method]) -> list[Method]:
    methods = list(methods)
    if not methods:
        raise ValueError("methods: expected at least one distillation method")
    names = set()
    for method in methods:
        if not isinstance(method, Method):
            raise TypeError(f"methods: expected kdkernels.distill methods, got {type(method).__name__}")
        if method.name in names:
            raise ValueError(f"methods: two methods are named {method.name!r}; give one another name=")
        names.add(method.name)
    return methods


class Distiller(nn.Module):
    """Runs teacher and student once per step and returns the student's output plus the
    weighted losses of ``methods``.

    Args:
        student: the model being trained (may be wrapped by DDP / DataParallel / torch.compile).
        teacher: the frozen model (may be wrapped by torch.compile).
        methods: :class:`~kdkernels.distill.method.Method` instances with distinct names.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, methods: Sequence[Method]) -> None:
        super().__init__()
        if unwrap(student) is unwrap(teacher):
            raise ValueError("teacher: the teacher is the student; for self-distillation use schemes.BYOT, for online KD schemes.MutualLearning")
        self.student = student
        # Not registered: the teacher stays out of parameters(), state_dict() and DDP.
        object.__setattr__(self, "teacher", teacher)
        self.methods = nn.ModuleList(_check_methods(methods))
        for method in self.methods:
            method.bind(unwrap(student), unwrap(teacher))
        if isinstance(student, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and any(True for _ in self.methods.parameters()):
            raise ValueError(
                "student: the methods have trainable connectors, which a DDP/DataParallel-wrapped student does not "
                "synchronise; wrap the distiller instead: DistributedDataParallel(Distiller(student, teacher, methods))"
            )
        student_specs = [spec for m in self.methods for spec in m.student_features]
        teacher_specs = [spec for m in self.methods for spec in m.teacher_features]
        self._student_capture = FeatureCapture(student, student_specs, role="student")
        self._teacher_capture = FeatureCapture(teacher, teacher_specs, role="teacher") if teacher_specs else None
        self.teacher_mode = max((m.teacher_mode for m in self.methods), key=TEACHER_MODES.index)
        set_teacher_mode(teacher, self.teacher_mode if self.training else "eval")

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)  # the student and the connectors
        set_teacher_mode(self.teacher, self.teacher_mode if mode else "eval")
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def forward(self, x: Any, target: torch.Tensor | None = None, **kwargs: Any) -> DistillOutput:
        """Runs ``teacher(x, **kwargs)`` (if a method reads it) and ``student(x, **kwargs)``;
        ``target`` goes to the methods that need labels."""
        teacher_capture, student_capture = self._teacher_capture, self._student_capture
        try:
            if teacher_capture is not None:
                with torch.no_grad(), teacher_capture:
                    self.teacher(x, **kwargs)
            with student_capture:
                output = self.student(x, **kwargs)
            losses: dict[str, torch.Tensor] = {}
            for method in self.methods:
                student = [student_capture.get(spec) for spec in method.student_features]
                teacher = [teacher_capture.get(spec) for spec in method.teacher_features] if method.teacher_features else []
                result = method(student, teacher, target)
                if isinstance(result, torch.Tensor):
                    losses[method.name] = method.weight * result
                else:
                    for part, value in result.items():
                        losses[f"{method.name}/{part}"] = method.weight * value
        finally:  # the features live on in the autograd graph only as long as it needs them
            student_capture.clear()
            if teacher_capture is not None:
                teacher_capture.clear()
        return DistillOutput(output, losses, total_loss(losses))

    def remove_hooks(self) -> None:
        """Unregister the capture hooks from both models (the distiller is unusable afterwards)."""
        self._student_capture.remove()
        if self._teacher_capture is not None:
            self._teacher_capture.remove()

    def extra_repr(self) -> str:
        return f"teacher={type(unwrap(self.teacher)).__name__} (not registered), teacher_mode={self.teacher_mode!r}"
