"""Loss-scale calibration: set each method's weight so that its loss starts at ``ratio`` × the task loss.

The methods' default weights are the values their papers tuned on CIFAR or ImageNet; several
losses grow or shrink with the feature-map size, the batch or the number of feature elements
(each method's docstring says how), so on other data a default can make a method's loss tens of
times the task loss, and the student then learns the method's target instead of its labels.
Calibration is opt-in and explicit::

    distiller = Distiller(student, teacher, [AttentionTransfer(...), CrossEntropy()])
    calibrate_weights(distiller, x, y)            # one no-grad forward; prints the new weights
    # or: Distiller(..., calibrate="init") does the same on the first training batch

For every method that reads the teacher it measures the method's unweighted loss L_m and the
task loss L_task on one batch (student in train mode, a fixed seed for dropout, every buffer —
BatchNorm statistics of student, connectors and teacher — put back afterwards) and sets

    weight_m = ratio · L_task / L_m

so the weighted loss equals ``ratio`` × the task loss on that batch. The task loss is a
:class:`~kdkernels.distill.CrossEntropy` method of the distiller if it has one (its weighted
value), else the cross-entropy of the student's output with the labels, else ``task_loss``.
Under ``torch.distributed`` the measured losses are averaged over ranks, so every rank gets the
same weights. The new weights and what was measured (for a method of several parts, each
part too) are kept on the methods and saved in ``state_dict``. The host reads the losses once,
here, never inside a training step.

The schemes without a distiller have their own: :meth:`~kdkernels.distill.BYOT.calibrate` sets
BYOT's feature weight λ the same way (its other weights do not depend on the scale).

Independently of calibration the distiller warns once (:class:`LossScaleCheck`) when a method's
weighted loss at the first training step is more than 10× the task loss.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.adversarial import AdversarialMethod
from kdkernels.distill.methods.cross_entropy import CrossEntropy

WARN_RATIO = 10.0


class LossScaleWarning(UserWarning):
    """A method's loss dwarfs the task loss at the first step."""


def method_total(result) -> torch.Tensor:
    """A method's loss as one tensor: the tensor, or the sum of its parts."""
    if isinstance(result, torch.Tensor):
        return result
    values = list(result.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def default_task_loss(methods: Sequence[nn.Module], results: Sequence, output: Any, target: torch.Tensor | None) -> torch.Tensor | None:
    """The weighted loss of a CrossEntropy method if there is one; else the CE of logits
    ``output`` (classes on the last dim) with integer labels ``target``; else None."""
    for method, result in zip(methods, results):
        if isinstance(method, CrossEntropy):
            return method.weight * method_total(result).detach()
    if target is None or not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 1:
        return None
    if target.is_floating_point() or output.shape[:-1] != target.shape:
        return None
    with torch.no_grad():
        return F.cross_entropy(output.detach().float().reshape(-1, output.shape[-1]), target.reshape(-1))


def calibrated_methods(methods: Sequence[nn.Module], names: Sequence[str] | None = None) -> list[nn.Module]:
    """The methods ``names`` (default: every method that reads the teacher, so not the task loss)."""
    if names is None:
        return [m for m in methods if m.teacher_features and not isinstance(m, CrossEntropy)]
    by_name = {m.name: m for m in methods}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"methods: no method named {', '.join(map(repr, unknown))}; the distiller has {', '.join(map(repr, by_name))}")
    return [by_name[n] for n in names]


def _inner(distiller: nn.Module) -> nn.Module:
    while isinstance(distiller, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        distiller = distiller.module
    return distiller


@contextlib.contextmanager
def measuring(modules: Sequence[nn.Module], seed: int):
    """A no-grad measuring forward of ``modules[0]`` in train mode (as the training step will run
    it) that leaves no trace: a fixed RNG seed (dropout) with the caller's RNG state kept, and every
    buffer of ``modules`` (BatchNorm running statistics) put back afterwards."""
    saved = [{name: b.detach().clone() for name, b in m.named_buffers()} for m in modules]
    was_training = modules[0].training
    device = next((p.device for p in modules[0].parameters()), torch.device("cpu"))
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        modules[0].train()
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(seed)
            yield
    finally:
        modules[0].train(was_training)
        for module, buffers in zip(modules, saved):
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])


def rank_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The scalars ``values`` as one float tensor, averaged over ranks under ``torch.distributed``
    (so every rank calibrates to the same weights)."""
    measured = torch.stack([v.detach().float().reshape(()) for v in values])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(measured)
        measured /= torch.distributed.get_world_size()
    return measured


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio: expected a finite number > 0, got {ratio!r}")
    return float(ratio)


def calibration_record(loss: float, task_value: float, ratio: float, weight_before: float) -> dict | None:
    """What calibrating one weight measured and the weight it gives (``record["weight"]`` =
    ``ratio`` × task loss / loss), or None where the loss or the task loss is 0 or not finite (the
    weight then stays, and the caller warns)."""
    if not (math.isfinite(loss) and math.isfinite(task_value) and loss > 0 and task_value > 0):
        return None
    return {"loss": loss, "task_loss": task_value, "ratio": ratio, "weight_before": weight_before, "weight": ratio * task_value / loss}


def calibrate_weights(
    distiller: nn.Module,
    x: Any,
    target: torch.Tensor | None = None,
    *,
    ratio: float = 1.0,
    methods: Sequence[str] | None = None,
    task_loss: Callable[[Any, torch.Tensor | None], torch.Tensor] | None = None,
    seed: int = 0,
    verbose: bool = True,
    **kwargs: Any,
) -> dict[str, float]:
    """Set each method's weight so that its loss on ``(x, target)`` is ``ratio`` × the task loss.

    Args:
        distiller: a :class:`~kdkernels.distill.Distiller` (or DDP of one).
        x, target, kwargs: one training batch, as passed to the distiller.
        ratio: the method's weighted loss over the task loss after calibration (default 1).
        methods: names of the methods to calibrate (default: every method that reads the teacher).
        task_loss: ``task_loss(student_output, target) -> tensor``, when the task loss is not a
            cross-entropy on logits.
        seed: the RNG seed of the measuring forward (dropout); the caller's RNG state is kept.
        verbose: print the measured losses and the new weights.

    Returns:
        ``{method name: new weight}``. A method whose loss is 0 or not finite keeps its weight
        (with a warning).
    """
    ratio = check_ratio(ratio)
    inner = _inner(distiller)
    chosen = calibrated_methods(inner.methods, methods)
    if not chosen:
        raise ValueError("calibrate_weights: no method to calibrate (only the task loss reads no teacher)")
    try:
        with measuring([inner, inner.teacher], seed):
            output, results = inner.run_methods(x, target, kwargs)
            task = task_loss(output, target) if task_loss is not None else default_task_loss(inner.methods, results, output, target)
    finally:
        for method in inner.methods:  # the measuring forward's discriminator inputs are not a training step's
            if isinstance(method, AdversarialMethod):
                method.clear_pending()
    if task is None:
        raise ValueError(
            "calibrate_weights: no task loss to calibrate against: pass the labels (target) with a student that returns "
            "logits, add a CrossEntropy method, or pass task_loss=lambda output, target: ..."
        )
    by_method = dict(zip([m.name for m in inner.methods], results))
    # A method of several parts also gets its parts recorded (measured in the same read).
    parts = [by_method[m.name] if isinstance(by_method[m.name], dict) else {} for m in chosen]
    measured = rank_mean([task] + [method_total(by_method[m.name]) for m in chosen] + [v for p in parts for v in p.values()])
    task_value, *values = measured.tolist()  # the one host read, before training
    losses, part_values = values[: len(chosen)], iter(values[len(chosen):])
    parts = [{name: next(part_values) for name in p} for p in parts]
    weights = {}
    lines = [f"calibrate_weights: task loss {task_value:.4g}; each method's loss set to {ratio:g} x that"]
    for method, loss, method_parts in zip(chosen, losses, parts):
        before = method.weight
        record = calibration_record(loss, task_value, ratio, before)
        if record is None:
            warnings.warn(f"calibrate_weights: {method.name}: loss {loss:.4g} (task loss {task_value:.4g}); weight left at {before:g}", LossScaleWarning, stacklevel=2)
            weights[method.name] = before
            continue
        method.weight = record.pop("weight")
        method.calibration = record
        if method_parts:
            method.calibration["parts"] = method_parts  # unweighted by weight, as loss
        weights[method.name] = method.weight
        lines.append(f"  {method.name}: loss {loss:.4g} -> weight {before:g} becomes {method.weight:.4g}")
    if verbose:
        print("\n".join(lines))
    return weights


class LossScaleCheck:
    """Compares the methods' weighted losses of the first training step with the task loss and
    warns once about any more than 10× larger — without a host sync: on CUDA the values are
    copied to pinned memory with an event and read at a later step, once the event has passed;
    on CPU they are read at once; on meta tensors (no data) nothing is checked."""

    def __init__(self, names: Sequence[str], losses: Sequence[torch.Tensor], task: torch.Tensor) -> None:
        self.names = list(names)
        self.event = None
        with torch.no_grad():
            values = torch.stack([task.detach().float().reshape(())] + [v.detach().float().reshape(()) for v in losses])
        if values.device.type == "meta":
            self.host = None
        elif values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values.cpu()

    def poll(self) -> bool:
        """Warns if the values are there and too large; True once done (values read or none)."""
        if self.host is None:
            return True
        if self.event is not None and not self.event.query():
            return False
        task, *losses = self.host.tolist()
        too_large = [(n, v) for n, v in zip(self.names, losses) if not math.isfinite(v) or v > WARN_RATIO * task]
        if too_large and task > 0:
            listed = ", ".join(f"{n} {v:.4g}" for n, v in too_large)
            warnings.warn(
                f"at the first step, the weighted loss of {listed} is more than {WARN_RATIO:g}x the task loss {task:.4g}: "
                "the default weights were tuned at another scale (see each method's docstring); the student may learn the "
                "method's target instead of its labels. Calibrate with calibrate_weights(distiller, x, y) or "
                "Distiller(..., calibrate='init'), or set weight= yourself.",
                LossScaleWarning,
                stacklevel=3,
            )
        return True
