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
Distillation never changes the teacher: a BatchNorm that a method puts in train mode normalises
with the batch statistics but leaves its running statistics as they were (unless a method asks
for the official side effect: ``OFD(update_teacher_statistics=True)``).

Loss scales: the first training step compares each method's weighted loss with the task loss
and warns once if it is more than 10× larger (no host sync; see ``calibration.py``).
``calibrate_weights(distiller, x, y)`` or ``Distiller(..., calibrate="init")`` sets the weights
so each method starts at the task loss's size.

Under DDP wrap the distiller, not the teacher: ``DDP(Distiller(student, teacher, methods))``, so
connectors are synchronised with the student. A DDP-wrapped student inside a Distiller is
accepted only when the methods have no parameters. ``nn.DataParallel`` over several GPUs is
refused (its replicas would overwrite one another's captured features): use DDP.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from kdkernels.distill.calibration import LossScaleCheck, calibrate_weights, calibrated_methods, default_task_loss, method_total
from kdkernels.distill.capture import DATA_PARALLEL_MESSAGE, FeatureCapture, unwrap
from kdkernels.distill.method import TEACHER_MODES, Method

CALIBRATE = (None, "init")


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


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module, frozen: bool = True):
    """BatchNorm layers in train mode normalise with the batch statistics but neither update nor
    count into their running buffers while inside (``track_running_stats`` off for the call)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats] if frozen else []
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.track_running_stats = True


def _check_not_data_parallel(model: nn.Module, role: str) -> None:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(f"{role}: {DATA_PARALLEL_MESSAGE}")
        model = model.module


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
        calibrate: ``None`` (default: the weights as given) or ``"init"``: before the first
            training step, :func:`~kdkernels.distill.calibrate_weights` on that step's batch sets
            each teacher-reading method's weight so its loss is ``calibration_ratio`` × the task
            loss (skipped when the weights were calibrated before, e.g. loaded from a state_dict).
        calibration_ratio: see ``calibrate`` (default 1).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        methods: Sequence[Method],
        *,
        calibrate: str | None = None,
        calibration_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if calibrate not in CALIBRATE:
            raise ValueError(f"calibrate: expected None or 'init', got {calibrate!r}")
        self.calibrate, self.calibration_ratio = calibrate, calibration_ratio
        _check_not_data_parallel(student, "student")
        _check_not_data_parallel(teacher, "teacher")
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
        self.updates_teacher_statistics = any(getattr(m, "updates_teacher_statistics", False) for m in self.methods)
        set_teacher_mode(teacher, self.teacher_mode if self.training else "eval")
        self._scale_check: LossScaleCheck | None = None
        self._scale_checked = False

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
        if getattr(self, "_is_replica", False):
            raise RuntimeError(f"Distiller: {DATA_PARALLEL_MESSAGE}")
        training_step = self.training and torch.is_grad_enabled()
        if training_step and self.calibrate == "init" and any(m.calibration is None for m in calibrated_methods(self.methods)):
            calibrate_weights(self, x, target, ratio=self.calibration_ratio, **kwargs)
        output, results = self.run_methods(x, target, kwargs)
        losses: dict[str, torch.Tensor] = {}
        for method, result in zip(self.methods, results):
            if isinstance(result, torch.Tensor):
                losses[method.name] = method.weight * result
            else:
                for part, value in result.items():
                    losses[f"{method.name}/{part}"] = method.weight * value
        if training_step and not self._scale_checked:
            self._scale_checked = True
            self._start_scale_check(output, target, results)
        if self._scale_check is not None and self._scale_check.poll():
            self._scale_check = None
        return DistillOutput(output, losses, total_loss(losses))

    def run_methods(self, x: Any, target: torch.Tensor | None, kwargs: dict) -> tuple[Any, list]:
        """One pass of both models; the student's output and each method's unweighted result."""
        teacher_capture, student_capture = self._teacher_capture, self._student_capture
        try:
            if teacher_capture is not None:
                frozen = self.training and not self.updates_teacher_statistics
                with torch.no_grad(), teacher_capture, running_statistics_frozen(unwrap(self.teacher), frozen):
                    self.teacher(x, **kwargs)
            with student_capture:
                output = self.student(x, **kwargs)
            results = []
            for method in self.methods:
                student = [student_capture.get(spec) for spec in method.student_features]
                teacher = [teacher_capture.get(spec) for spec in method.teacher_features] if method.teacher_features else []
                results.append(method(student, teacher, target))
        finally:  # the features live on in the autograd graph only as long as it needs them
            student_capture.clear()
            if teacher_capture is not None:
                teacher_capture.clear()
        return output, results

    def _start_scale_check(self, output: Any, target: torch.Tensor | None, results: list) -> None:
        checked = calibrated_methods(self.methods)
        task = default_task_loss(self.methods, results, output, target)
        if not checked or task is None:
            return
        by_name = dict(zip([m.name for m in self.methods], results))
        weighted = [method.weight * method_total(by_name[method.name]).detach() for method in checked]
        self._scale_check = LossScaleCheck([m.name for m in checked], weighted, task)

    def remove_hooks(self) -> None:
        """Unregister the capture hooks from both models (the distiller is unusable afterwards)."""
        self._student_capture.remove()
        if self._teacher_capture is not None:
            self._teacher_capture.remove()

    def extra_repr(self) -> str:
        return f"teacher={type(unwrap(self.teacher)).__name__} (not registered), teacher_mode={self.teacher_mode!r}"
